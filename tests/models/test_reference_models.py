"""Reference models: shapes, causality, the KV-cache steps, torch.export and ONNX Runtime parity."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

from slimline.errors import InputError, SlimlineError
from slimline.models import DEFAULT_MODEL, REFERENCE_MODELS, load_weights
from slimline.models.gpt import GPT, GPT_CONFIGS, GPTConfig, GPTDecode, GPTPrefill, generate
from slimline.models.hyena import Hyena, HyenaConfig, causal_long_conv

# Aliases build the same model as their target; test each model once.
DISTINCT_MODELS = [name for name in REFERENCE_MODELS if name != "gpt"]
# gpt-tiny is gpt-small's code at another size; its cache steps are exported in their own tests.
EXPORTED_MODELS = [name for name in DISTINCT_MODELS if name != "gpt-tiny"]


def as_tuple(output) -> tuple[torch.Tensor, ...]:
    return output if isinstance(output, tuple) else (output,)


def seeded_gpt(config: GPTConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(config).eval()


@pytest.fixture(scope="module")
def tiny_gpt() -> GPT:
    return seeded_gpt(GPT_CONFIGS["gpt-tiny"])


@pytest.fixture(scope="module")
def reference(request):
    """(name, model, example_inputs) of the registry entry named by indirect parametrization."""
    model, example_inputs = REFERENCE_MODELS[request.param]()
    return request.param, model, example_inputs


# ---------------------------------------------------------------------------------------------
# Registry and shapes


def test_registry_names_and_default():
    assert set(REFERENCE_MODELS) == {
        "gpt-tiny", "gpt-small", "gpt", "gpt-small-decode", "bert", "vit", "mixer", "hyena"
    }
    assert DEFAULT_MODEL == "gpt-small"
    assert REFERENCE_MODELS["gpt"] is REFERENCE_MODELS["gpt-small"]


def test_factories_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, _ = REFERENCE_MODELS["vit"]()
    second, _ = REFERENCE_MODELS["vit"]()
    assert torch.equal(torch.rand(3), expected_next)  # the global stream was not consumed
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_weights_argument_loads_checkpoints():
    model, _ = REFERENCE_MODELS["mixer"](weights=None)
    assert load_weights(model, None) is model
    with pytest.raises(SlimlineError, match="not found"):
        REFERENCE_MODELS["mixer"](weights="no-such-checkpoint.safetensors")


@pytest.mark.parametrize("reference", DISTINCT_MODELS, indirect=True)
def test_output_shapes(reference):
    name, model, inputs = reference
    assert not model.training
    with torch.no_grad():
        outputs = as_tuple(model(*inputs))
    if name.startswith("gpt") and name != "gpt-small-decode":
        assert outputs[0].shape == (*inputs[0].shape, 256)
    elif name == "gpt-small-decode":
        logits, k_cache, v_cache = outputs
        assert logits.shape == (1, 1, 256)
        assert k_cache.shape == v_cache.shape == (10, 1, 6, 1024, 64)  # (L, B, nh, Tm, hs)
    elif name == "bert":
        assert outputs[0].shape == (2, 256)
    elif name in ("vit", "mixer"):
        assert outputs[0].shape == (8, 10)
    elif name == "hyena":
        assert outputs[0].shape == (1, 1024, 256)
    assert all(torch.isfinite(output).all() for output in outputs)


def test_gpt_parameter_counts():
    tiny, small = GPT(GPT_CONFIGS["gpt-tiny"]), GPT(GPT_CONFIGS["gpt-small"])
    assert 0.9e6 < tiny.num_parameters() < 1.1e6
    assert small.num_parameters(include_embedding=False) == 17_710_848  # ~17.7M
    assert small.head.weight is small.token_embedding.weight  # tied head
    assert "rope_cos" not in small.state_dict()  # derived tables stay out of checkpoints


# ---------------------------------------------------------------------------------------------
# GPT: causality, KV cache, generation


@torch.no_grad()
def test_gpt_is_causal(tiny_gpt):
    idx = torch.randint(0, 256, (2, 40))
    changed = idx.clone()
    changed[:, 25] = (changed[:, 25] + 1) % 256
    before, after = tiny_gpt(idx), tiny_gpt(changed)
    torch.testing.assert_close(before[:, :25], after[:, :25], rtol=0, atol=0)
    assert (before[:, 25:] - after[:, 25:]).abs().max() > 1e-4  # the change is seen from 25 on


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(tiny_gpt):
    idx = torch.randint(0, 256, (2, 24))
    full = tiny_gpt(idx)  # (B, T, V)
    k_cache, v_cache = tiny_gpt.new_kv_cache(batch_size=2)
    k_in, v_in = k_cache.clone(), v_cache.clone()
    logits, k_cache2, v_cache2 = GPTPrefill(tiny_gpt)(idx[:, :16], k_cache, v_cache)
    assert torch.equal(k_cache, k_in) and torch.equal(v_cache, v_in)  # inputs not mutated
    torch.testing.assert_close(logits, full[:, :16], rtol=1e-5, atol=1e-5)
    k_cache, v_cache = k_cache2, v_cache2
    assert k_cache[:, :, :, 16:].abs().max() == 0  # nothing written past the prompt
    decode = GPTDecode(tiny_gpt)
    for position in range(16, 24):
        input_pos = torch.tensor([position])
        logits, k_cache, v_cache = decode(idx[:, position : position + 1], input_pos, k_cache, v_cache)
        assert logits.shape == (2, 1, 256)
        torch.testing.assert_close(logits[:, 0], full[:, position], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_generate_matches_greedy_full_forward(tiny_gpt):
    prompt = torch.randint(0, 256, (2, 10))
    generated = generate(tiny_gpt, prompt, max_new_tokens=12, greedy=True)
    assert generated.shape == (2, 22)
    assert torch.equal(generated[:, :10], prompt)
    expected = prompt
    for _ in range(12):
        next_token = tiny_gpt(expected)[:, -1].argmax(dim=-1, keepdim=True)
        expected = torch.cat([expected, next_token], dim=1)
    assert torch.equal(generated, expected)


def test_generate_refuses_to_overrun_the_cache(tiny_gpt):
    with pytest.raises(InputError, match="context_length"):
        generate(tiny_gpt, torch.zeros(1, 250, dtype=torch.int64), max_new_tokens=10)


# ---------------------------------------------------------------------------------------------
# torch.export


@pytest.mark.parametrize("reference", EXPORTED_MODELS, indirect=True)
@torch.no_grad()
def test_export_matches_eager(reference):
    name, model, inputs = reference
    exported = torch.export.export(model, inputs, strict=False)
    expected, actual = as_tuple(model(*inputs)), as_tuple(exported.module()(*inputs))
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_exported_decode_step_serves_every_position(tiny_gpt):
    idx = torch.randint(0, 256, (1, 12))
    k_cache, v_cache = tiny_gpt.new_kv_cache(batch_size=1)
    _, k_cache, v_cache = GPTPrefill(tiny_gpt)(idx[:, :4], k_cache, v_cache)
    decode = GPTDecode(tiny_gpt)
    step = torch.export.export(decode, (idx[:, 4:5], torch.tensor([4]), k_cache, v_cache), strict=False).module()
    for position in range(4, 12):
        args = (idx[:, position : position + 1], torch.tensor([position]), k_cache, v_cache)
        exported_logits, k_cache, v_cache = step(*args)
        eager_logits, _, _ = decode(*args)
        torch.testing.assert_close(exported_logits, eager_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exported_logits[:, 0], tiny_gpt(idx)[:, -1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_exported_prefill_has_dynamic_batch_and_length(tiny_gpt):
    prefill = GPTPrefill(tiny_gpt)
    batch, length = torch.export.Dim("batch", max=64), torch.export.Dim("length", max=256)
    k_cache, v_cache = tiny_gpt.new_kv_cache(batch_size=2)
    dynamic_shapes = ({0: batch, 1: length}, {1: batch}, {1: batch})
    step = torch.export.export(
        prefill, (torch.randint(0, 256, (2, 8)), k_cache, v_cache), dynamic_shapes=dynamic_shapes, strict=False
    ).module()
    idx = torch.randint(0, 256, (3, 13))
    k_cache, v_cache = tiny_gpt.new_kv_cache(batch_size=3)
    for actual, expected in zip(step(idx, k_cache, v_cache), prefill(idx, k_cache, v_cache)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# ONNX export, run in ONNX Runtime


def run_in_onnxruntime(model, inputs, path) -> list[np.ndarray]:
    program = torch.onnx.export(model, inputs, dynamo=True, verbose=False)
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {arg.name: tensor.numpy() for arg, tensor in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def assert_onnxruntime_matches(model, inputs, path):
    with torch.no_grad():
        expected = [t.numpy() for t in as_tuple(model(*inputs))]
    actual = run_in_onnxruntime(model, inputs, path)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_onnx_gpt_decode_step(tiny_gpt, tmp_path):
    # gpt-tiny rather than gpt-small-decode: the same code, and ~4x faster to export and save.
    prompt = torch.randint(0, 256, (2, 9))
    _, k_cache, v_cache = GPTPrefill(tiny_gpt)(prompt[:, :8], *tiny_gpt.new_kv_cache(batch_size=2))
    decode = GPTDecode(tiny_gpt)
    inputs = (prompt[:, 8:9], torch.tensor([8]), k_cache, v_cache)
    path = tmp_path / "gpt_tiny_decode.onnx"
    actual = run_in_onnxruntime(decode, inputs, path)
    expected = decode(*inputs)
    assert len(actual) == 3
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e.numpy(), rtol=1e-4, atol=1e-4)
    # One graph, every position: run the saved graph at another position.
    other = (prompt[:, 8:9], torch.tensor([3]), k_cache, v_cache)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), other)})
    for a, e in zip(actual, decode(*other)):
        np.testing.assert_allclose(a, e.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_onnx_encoders(name, tmp_path):
    model, inputs = REFERENCE_MODELS[name]()
    assert_onnxruntime_matches(model, inputs, tmp_path / f"{name}.onnx")


# ---------------------------------------------------------------------------------------------
# BERT padding, Hyena convolution and causality


@torch.no_grad()
def test_bert_ignores_padding():
    model, (input_ids, attention_mask) = REFERENCE_MODELS["bert"]()
    trimmed = model(input_ids[1:, :40], attention_mask[1:, :40])
    padded_with_other_ids = input_ids.clone()
    padded_with_other_ids[1, 40:] = 7
    padded = model(padded_with_other_ids, attention_mask)[1:]
    torch.testing.assert_close(padded, trimmed, rtol=1e-5, atol=1e-5)


def test_causal_long_conv_matches_the_convolution_sum():
    torch.manual_seed(0)
    B, C, T, Lf = 2, 3, 10, 16
    u = torch.randn(B, C, T)
    filter_by_lag = torch.randn(C, Lf)  # [c, m] multiplies u[t - m]
    expected = torch.zeros(B, C, T)
    for t in range(T):
        for m in range(t + 1):
            expected[:, :, t] += filter_by_lag[:, m] * u[:, :, t - m]
    weight = filter_by_lag.flip(-1)[:, None, :]  # (C, 1, Lf), time-reversed for conv1d
    torch.testing.assert_close(causal_long_conv(u, weight), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("filter_kind", ["explicit", "implicit"])
@torch.no_grad()
def test_hyena_is_causal(filter_kind):
    torch.manual_seed(0)
    model = Hyena(HyenaConfig(filter_length=128, n_layer=2, d_model=32, filter=filter_kind)).eval()
    idx = torch.randint(0, 256, (2, 128))
    changed = idx.clone()
    changed[:, 70] = (changed[:, 70] + 1) % 256
    before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :70], after[:, :70], rtol=0, atol=0)
    assert (before[:, 70:] - after[:, 70:]).abs().max() > 1e-4
    # A shorter sequence gives the prefix of the longer one's logits.
    torch.testing.assert_close(model(idx[:, :50]), before[:, :50], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_hyena_implicit_filter_exports():
    torch.manual_seed(0)
    model = Hyena(HyenaConfig(filter_length=64, n_layer=1, d_model=16, filter="implicit")).eval()
    idx = torch.randint(0, 256, (1, 64))
    exported = torch.export.export(model, (idx,), strict=False)
    torch.testing.assert_close(exported.module()(idx), model(idx), rtol=1e-5, atol=1e-5)
