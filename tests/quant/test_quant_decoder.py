"""QuantStaticDecoder under ``TRITON_INTERPRET=1``: its tokens are those of the same quantized model
run in torch (the dense form it keeps for the prompt), for a grouped and a per-channel width, Llama
(RMSNorm, SiLU pairs) and slimline's GPT (LayerNorm, GELU); the model is never touched; refusals."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
pytest.importorskip("triton")

from slimline.errors import SlimlineError  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a GPU or the Triton interpreter")


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=64,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _fast_configs(decoder):
    from slimline.backends.cuda.quant_gemv import TiledConfig

    decoder.configs.update({name: TiledConfig(64, 4) for name in ("qkv", "o", "up", "down", "head")})


def _torch_tokens(decoder, prompt, new_tokens):
    """Greedy decoding by re-running the decoder's dense (dequantized) weights on the whole sequence."""
    sequence = prompt
    for _ in range(new_tokens):
        logits, _, _ = decoder.weights(sequence)
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    return sequence


@pytest.mark.parametrize("bits,group", [(8, None), (3, 32)])
def test_llama_tokens_are_the_quantized_models(bits, group):
    from slimline.backends.cuda.quant_decoder import QuantStaticDecoder

    model = _tiny_llama()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    decoder = QuantStaticDecoder(model, 12, bits=bits, group_size=group, tune=False)
    _fast_configs(decoder)
    tokens = decoder.generate(prompt, 2)
    assert tokens.tolist() == _torch_tokens(decoder, prompt, 2).tolist()
    logits, _, _ = decoder.weights(tokens[:, :-1])  # the last step's logits, from the dense form
    torch.testing.assert_close(decoder.logits, logits[0], rtol=1e-4, atol=1e-4)
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())
    assert decoder.report["quantization"]["bits"] == bits
    packed = decoder.tiled_weights()
    assert all(w.words.shape[0] == bits for name, family in packed.items() if name != "head" for w in family)
    assert packed["head"][0].words.shape[0] == 8  # the LM head: int8 per channel
    dense = decoder.weights.layers[0].o  # the prompt's weights are the quantized ones, not the model's
    original = model.model.layers[0].self_attn.o_proj.weight
    assert not torch.equal(dense, original) and torch.allclose(dense, original, atol=0.1)


def test_gpt_layernorm_and_gelu():
    from slimline.backends.cuda.quant_decoder import QuantStaticDecoder
    from slimline.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(context_length=32, n_layer=1, n_head=2, d_model=32)).eval()
    with torch.no_grad():  # trained-looking norms: not all ones, biases not zero
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(3))
    decoder = QuantStaticDecoder(model, 8, bits=4, group_size=32, tune=False)
    _fast_configs(decoder)
    tokens = decoder.generate(prompt, 2)
    assert tokens.tolist() == _torch_tokens(decoder, prompt, 2).tolist()


def test_refusals():
    from slimline.backends.cuda.quant_decoder import QuantStaticDecoder

    with pytest.raises(SlimlineError, match="2, 3, 4 or 8"):
        QuantStaticDecoder(_tiny_llama(), 8, bits=5, tune=False)
    with pytest.raises(SlimlineError, match="head"):
        QuantStaticDecoder(_tiny_llama(), 8, bits=4, head_bits=4, tune=False)
