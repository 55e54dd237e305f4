"""fuse_norm: hand-written RMSNorm / LayerNorm → one ``aten.rms_norm`` / ``aten.layer_norm``.

Before → Expected on tiny modules (op types and counts), numbers against the original (fp32
relative ≤ 1e-5), transformers Llama and T5 (fp32 and bf16), and the ONNX export holding
``RMSNormalization`` that ORT runs.
"""

import pytest
import torch
from torch import nn

from slimline.ir.capture import capture
from slimline.ir.graph import PROVENANCE_PASS
from slimline.passes import fuse_norm
from slimline.passes.base import PassContext

aten = torch.ops.aten
D = 16


class LlamaStyleRMSNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, x):
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * x32.to(x.dtype)


class HandLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(D) + 0.5)
        self.bias = nn.Parameter(torch.randn(D))

    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        variance = (centred * centred).mean(-1, keepdim=True)
        return centred * torch.rsqrt(variance + 1e-5) * self.weight + self.bias


class VarSqrtLayerNorm(nn.Module):
    """torch.var(correction=0) and a division by sqrt: no weight, nothing to fold."""

    def forward(self, x):
        centred = x - x.mean(dim=-1, keepdim=True)
        return centred / torch.sqrt(x.var(dim=-1, keepdim=True, correction=0) + 1e-5)


class UnbiasedVariance(nn.Module):
    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + 1e-5)


def _run(module, *inputs):
    graph = capture(module, inputs)
    result = fuse_norm.run(graph.copy(), fuse_norm.Config(), PassContext("cpu", "lossless"))
    return graph, result


def _targets(graph):
    return [n.target for n in graph.fx.nodes if n.op == "call_function"]


def _relative(expected, actual):
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize("module, expected", [
    (LlamaStyleRMSNorm, (aten.rms_norm.default, 1)),
    (HandLayerNorm, (aten.layer_norm.default, 2)),
    (VarSqrtLayerNorm, (aten.layer_norm.default, 0)),
])
def test_hand_written_norm_becomes_one_op(module, expected):
    model = module().eval()
    x = torch.randn(2, 5, D) * 3 + 1
    graph, result = _run(model, x)
    target, folded = expected
    assert aten.rsqrt.default in _targets(graph) or aten.sqrt.default in _targets(graph)

    after = _targets(result.graph)
    assert after.count(target) == 1 and result.stats["weights_folded"] == folded
    for gone in (aten.rsqrt.default, aten.sqrt.default, aten.mean.dim, aten.var.correction,
                 aten.mul.Tensor, aten.add.Tensor, aten.div.Tensor):
        assert gone not in after, gone
    (fused,) = [n for n in result.graph.fx.nodes if n.target == target]
    assert fused.meta[PROVENANCE_PASS] == "fuse_norm"
    assert _relative(model(x), result.graph.run((x,), {})) <= 1e-5


def test_unbiased_variance_is_refused_with_a_reason():
    graph, result = _run(UnbiasedVariance().eval(), torch.randn(2, 5, D))
    assert not result.changed
    assert any("unbiased" in key for key in result.stats), result.stats
    assert _targets(result.graph) == _targets(graph)


def test_bf16_keeps_the_cast_and_weight_outside():
    """Llama in bf16 normalises in float32, casts, then multiplies by the bf16 weight."""
    model = LlamaStyleRMSNorm().to(torch.bfloat16).eval()
    x = torch.randn(2, 5, D).to(torch.bfloat16)
    _graph, result = _run(model, x)
    (fused,) = [n for n in result.graph.fx.nodes if n.target == aten.rms_norm.default]
    assert fused.meta["val"].dtype == torch.float32 and fused.args[2] is None
    assert result.stats["weights_folded"] == 0
    assert _relative(model(x), result.graph.run((x,), {})) <= 1e-2


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      hidden_size=32, intermediate_size=64, vocab_size=100,
                                      attn_implementation="eager", use_cache=False)
    return transformers.LlamaForCausalLM(config).eval(), torch.randint(0, 100, (2, 8))


def test_llama_norms_fuse_and_export_as_rms_normalization(tmp_path):
    onnx_export = pytest.importorskip("slimline.backends.onnx_export")
    model, ids = _tiny_llama()
    _graph, result = _run(model, ids)
    norms = 2 * 2 + 1  # two per layer, one final
    assert result.stats["rms_norm"] == norms and result.stats["weights_folded"] == norms
    assert aten.rsqrt.default not in _targets(result.graph)
    with torch.no_grad():
        assert _relative(model(ids).logits, result.graph.run((ids,), {}).logits) <= 1e-5
    info = onnx_export.export_onnx_model(result.graph.module, (ids,), {}, tmp_path / "llama.onnx",
                                         opset=23)
    assert info.op_histogram.get("RMSNormalization") == norms
    assert info.output_checks and info.max_rel_error <= 1e-4


def test_t5_norm_of_upcast_squares_fuses_in_bf16():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(num_layers=1, num_decoder_layers=1, num_heads=2, d_model=32,
                                   d_kv=16, d_ff=64, vocab_size=100, use_cache=False)
    model = transformers.T5EncoderModel(config).eval().to(torch.bfloat16)
    ids = torch.randint(0, 100, (2, 8))
    _graph, result = _run(model, ids)
    assert result.stats["rms_norm"] == 2 + 1  # attention and MLP norms, one final
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    assert _relative(expected, result.graph.run((ids,), {}).last_hidden_state) <= 1.6e-2
