"""The zoo on the raw path: build -> torch.export (non-strict) -> ep.module() -> torch.onnx -> ORT.

This is the path before slimline's own pipeline: what a zoo model must survive for the passes
and the exporter to have something to work on. ``docs/zoo-findings.md`` says why each model is
built the way it is and which combinations fail upstream (the xfail tests below pin those).
"""

from __future__ import annotations

import inspect
import time

import onnx
import onnxruntime
import pytest
import torch
import torch.utils._pytree as pytree

from slimline.errors import ConfigError
from slimline.models import REFERENCE_MODELS
from slimline.models.zoo import ZOO, build_zoo_model, zoo_dynamic_shapes

transformers = pytest.importorskip("transformers")

# ep.module() is a GraphModule in training mode whose .eval() raises NotImplementedError; the
# train/eval behaviour was fixed at capture (in eval mode), so the exporter's warning is moot.
pytestmark = pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode")

CAPTURE_TOLERANCE = 1e-5  # max |captured - eager| / max |eager|, fp32
ORT_TOLERANCE = 1e-4  # max |onnxruntime - eager| / max |eager|, fp32


def tensors(output) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def named_inputs(model, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """The example inputs by name: positional ones take their forward parameter's name."""
    parameters = list(inspect.signature(model.forward).parameters)
    return {**dict(zip(parameters, args)), **kwargs}


def export_and_run(target, args, kwargs, inputs: dict[str, torch.Tensor], path, *,
                   opset: int, **options) -> tuple[onnx.ModelProto, list[torch.Tensor]]:
    program = torch.onnx.export(target, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                verbose=False, **options)
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(inputs)
    outputs = session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})
    return onnx.load(str(path)), [torch.from_numpy(output) for output in outputs]


def attention_layers(model) -> int:
    """Attention blocks the model runs: self-attention, plus cross-attention in a decoder."""
    config = model.config
    if config.is_encoder_decoder:
        encoder = getattr(config, "encoder_layers", None) or config.num_layers
        decoder = getattr(config, "decoder_layers", None) or config.num_decoder_layers
        return encoder + 2 * decoder
    return getattr(config, "num_hidden_layers", None) or config.n_layer


def op_count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(node.op_type == op_type for node in model.graph.node)


# ---------------------------------------------------------------------------------------------
# the registry


def test_zoo_names_do_not_shadow_reference_models():
    assert not set(ZOO) & set(REFERENCE_MODELS)
    assert all(name.startswith("hf-") and entry.name == name for name, entry in ZOO.items())


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, args, _ = build_zoo_model("hf-llama")
    second, again, _ = build_zoo_model("hf-llama", attn_implementation="sdpa")
    other, _, _ = build_zoo_model("hf-llama", seed=1)
    assert torch.equal(torch.rand(3), expected_next)
    assert torch.equal(args[0], again[0])
    weights = [(a, b, c) for a, b, c in zip(first.parameters(), second.parameters(), other.parameters())]
    assert all(torch.equal(a, b) for a, b, _ in weights)
    assert not all(torch.equal(a, c) for a, _, c in weights)
    assert second.config._attn_implementation == "sdpa"


def test_bad_name_and_attention_raise_config_error():
    with pytest.raises(ConfigError, match="unknown zoo model 'hf-lama'") as error:
        build_zoo_model("hf-lama")
    assert "hf-llama" in str(error.value)  # the valid names are listed
    with pytest.raises(ConfigError, match="attn_implementation 'flash'"):
        build_zoo_model("hf-llama", attn_implementation="flash")


def test_dynamic_shapes_share_one_dim_per_name():
    shapes = zoo_dynamic_shapes("hf-t5")
    assert shapes["input_ids"][0] is shapes["decoder_input_ids"][0]  # one batch
    assert shapes["input_ids"][1] is shapes["attention_mask"][1]
    assert shapes["input_ids"][1] is not shapes["decoder_input_ids"][1]
    assert set(zoo_dynamic_shapes("hf-whisper")["input_features"]) == {0}  # frames are fixed


# ---------------------------------------------------------------------------------------------
# every model: capture, then ONNX in onnxruntime (eager attention, static shapes, opset 18)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_captures_and_exports(name, tmp_path):
    entry = ZOO[name]
    start = time.perf_counter()
    model, args, kwargs = build_zoo_model(name)
    assert time.perf_counter() - start < 5.0  # tiny: milliseconds once transformers is imported
    assert not model.training and model.config._attn_implementation == "eager"
    with torch.no_grad():
        expected = model(*args, **kwargs)
    assert tuple(expected.keys()) == entry.outputs
    assert set(entry.primary_outputs) <= set(entry.outputs)
    inputs = named_inputs(model, args, kwargs)
    assert set(entry.dynamic_axes) == set(inputs)

    program = torch.export.export(model, args, kwargs, strict=False)
    graph_module = program.module()
    captured = graph_module(*args, **kwargs)
    assert type(captured) is type(expected)  # ModelOutput survives as a pytree node
    for actual, reference in zip(tensors(captured), tensors(expected), strict=True):
        assert relative_error(actual, reference) <= CAPTURE_TOLERANCE

    # the unlifted GraphModule is what slimline holds after its rewrites: export that
    exported, outputs = export_and_run(graph_module, args, kwargs, inputs,
                                       tmp_path / f"{name}.onnx", opset=18)
    assert len(outputs) == len(entry.outputs)
    for actual, reference in zip(outputs, tensors(expected), strict=True):
        assert relative_error(actual, reference) <= ORT_TOLERANCE


# ---------------------------------------------------------------------------------------------
# sdpa: opset 23 turns scaled_dot_product_attention into one ONNX Attention per layer


@pytest.mark.parametrize("name", ["hf-qwen2", "hf-bert"])  # GQA, and bidirectional with padding
def test_sdpa_exports_to_onnx_attention(name, tmp_path):
    model, args, kwargs = build_zoo_model(name, attn_implementation="sdpa")
    with torch.no_grad():
        expected = model(*args, **kwargs)
    program = torch.export.export(model, args, kwargs, strict=False)
    exported, outputs = export_and_run(program.module(), args, kwargs,
                                       named_inputs(model, args, kwargs),
                                       tmp_path / f"{name}.onnx", opset=23)
    assert op_count(exported, "Attention") == attention_layers(model)
    for actual, reference in zip(outputs, tensors(expected), strict=True):
        assert relative_error(actual, reference) <= ORT_TOLERANCE


def pin_contiguous(graph_module: torch.fx.GraphModule) -> int:
    """Rewrite ``aten.contiguous(x)`` as ``aten.clone(x, memory_format=contiguous_format)``.

    The workaround for the T5 + sdpa export failure: a clone is never dropped as a no-op, so
    the ``view`` after it always sees a contiguous tensor, whatever strides SDPA reports.
    """
    rewritten = 0
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.contiguous.default:
            node.target = torch.ops.aten.clone.default
            node.kwargs = {"memory_format": torch.contiguous_format}
            rewritten += 1
    graph_module.recompile()
    return rewritten


@pytest.mark.xfail(strict=True, raises=torch.onnx.errors.OnnxExporterError,
                   reason="torch 2.13: decomposition drops T5's .contiguous() after SDPA with a "
                          "float mask, then the type-promotion pass cannot view the transposed "
                          "output (docs/zoo-findings.md)")
def test_t5_sdpa_exports_unpatched(tmp_path):
    model, args, kwargs = build_zoo_model("hf-t5", attn_implementation="sdpa")
    program = torch.export.export(model, args, kwargs, strict=False)
    torch.onnx.export(program.module(), args, kwargs=kwargs, dynamo=True, opset_version=23,
                      verbose=False)


def test_t5_sdpa_exports_with_contiguous_pinned(tmp_path):
    model, args, kwargs = build_zoo_model("hf-t5", attn_implementation="sdpa")
    with torch.no_grad():
        expected = model(*args, **kwargs)
    graph_module = torch.export.export(model, args, kwargs, strict=False).module()
    assert pin_contiguous(graph_module) > 0
    _, outputs = export_and_run(graph_module, args, kwargs, named_inputs(model, args, kwargs),
                                tmp_path / "t5.onnx", opset=23)
    for actual, reference in zip(outputs, tensors(expected), strict=True):
        assert relative_error(actual, reference) <= ORT_TOLERANCE


# ---------------------------------------------------------------------------------------------
# dynamic batch and sequence: one model with rotary positions, GQA and a sliding window


def test_dynamic_batch_and_sequence(tmp_path):
    name = "hf-mistral"
    model, args, kwargs = build_zoo_model(name)
    shapes = zoo_dynamic_shapes(name)
    program = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)

    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(1, 256, (3, 21), generator=generator)  # batch 3, sequence 21
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -5:] = 0
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
    captured = program.module()(input_ids, attention_mask=attention_mask).logits
    assert relative_error(captured, expected) <= CAPTURE_TOLERANCE

    # opset 18: at opset 23 the exporter's RotaryEmbedding fusion breaks batch > 1 (findings)
    program_onnx = torch.onnx.export(program, args, kwargs=kwargs, dynamo=True, opset_version=18,
                                     verbose=False)
    path = tmp_path / f"{name}.onnx"
    program_onnx.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch, sequence = session.get_inputs()[0].shape
    assert isinstance(batch, str) and isinstance(sequence, str)  # symbolic, not 2 and 16
    (logits,) = session.run(None, {"input_ids": input_ids.numpy(),
                                   "attention_mask": attention_mask.numpy()})
    assert relative_error(torch.from_numpy(logits), expected) <= ORT_TOLERANCE
