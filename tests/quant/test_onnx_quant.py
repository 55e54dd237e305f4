"""ONNX lowering of quantized linears: op types and counts, and ORT against torch."""

import pytest
import torch
from torch import nn

from slimline.backends.onnx_quant import export_quantized_onnx, quantized_layers
from slimline.ir.capture import capture
from slimline.passes import canonicalize_linear, quantize
from slimline.passes.base import PassContext


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(256, 512)
        self.b = nn.Linear(512, 256, bias=False)
        self.c = nn.Linear(256, 256)
        self.d = nn.Linear(256, 48)  # its output is the graph output
        self.e = nn.Linear(256, 256)

    def forward(self, x):  # (B, T, 256)
        x = self.b(nn.functional.gelu(self.a(x)))
        return self.d(torch.relu(self.c(x)) + self.e(x))  # c and e read one input, as Q, K, V do


def _quantized(*configs, seed=0):
    """The Stack's graph with each layer quantized by the config that names it (skip the rest)."""
    torch.manual_seed(seed)
    model = Stack().eval()
    x = torch.randn(2, 8, 256)
    graph = capture(model, (x,))
    graph = canonicalize_linear.run(graph, canonicalize_linear.Config(), PassContext("cpu", "balanced")).graph
    for layers, options in configs:
        skip = tuple(name for name in "abcde" if name not in layers)
        config = quantize.Config(skip=skip, fit_budget=False, allow_slower=True, **options)
        graph = quantize.run(graph, config, PassContext("cpu", "balanced", calibration=[((x,), {})])).graph
    return graph, x


def test_mixed_widths_lower_to_matmulnbits_and_plain(tmp_path):
    graph, x = _quantized(("ae", {"bits": 4, "group_size": 32}), ("b", {"bits": 8}),
                          ("c", {"bits": 3}), ("d", {"bits": 2, "group_size": 64}))
    assert len(quantized_layers(graph.module)) == 5
    summary = export_quantized_onnx(graph.module, (x,), {}, tmp_path / "m.onnx", accuracy_level=0,
                                    check_inputs=[((torch.randn(2, 8, 256) * 3,), {})])
    lowering = summary["quantized"]
    ops = summary["op_histogram"]
    assert lowering["forms"]["matmulnbits"] >= 3  # a, b, e; d too unless constant-folded
    assert lowering["plain"] == 1 and "3-bit" in lowering["reasons"]["c"]
    assert lowering["lowered"] + lowering["plain"] + lowering["folded"] == 5
    assert ops["com.microsoft::MatMulNBits"] == lowering["forms"]["matmulnbits"]
    assert "BitShift" in ops  # the 3-bit layer unpacks in plain ONNX ops
    assert lowering["check"] == "exact_float" and lowering["max_rel_error"] < 1e-5


def test_qdq_form_and_int8_compute(tmp_path):
    graph, x = _quantized(("ab", {"bits": 4, "group_size": 64}), ("cde", {"bits": 8}))
    summary = export_quantized_onnx(graph.module, (x,), {}, tmp_path / "m.onnx", form="qdq")
    assert summary["quantized"]["forms"]["qdq"] >= 3
    assert summary["op_histogram"]["DequantizeLinear"] == summary["quantized"]["forms"]["qdq"]
    assert summary["quantized"]["check"] == "int8_compute"
    assert summary["quantized"]["min_cosine"] > 0.999


def test_int8_activations_lower_to_dynamic_quantize_matmul(tmp_path):
    graph, x = _quantized(("abcde", {"bits": 8, "activations": "dynamic_int8"}))
    summary = export_quantized_onnx(graph.module, (x,), {}, tmp_path / "m.onnx")
    lowering = summary["quantized"]
    assert lowering["forms"].get("dynamic_int8", 0) + lowering["folded"] == 5
    assert lowering["forms"]["dynamic_int8"] == 5  # c and e share one rounding; d writes the output
    ops = summary["op_histogram"]
    assert ops["com.microsoft::DynamicQuantizeMatMul"] == lowering["forms"]["dynamic_int8"]
    # the torch-side rounding is gone where the kernel rounds (2 Round nodes per rounding)
    assert ops.get("Round", 0) == 2 * lowering["folded"]
    assert lowering["min_cosine"] > 0.999
    # each kernel's output keeps the shape of the value it replaced (later ONNX rules match on it)
    import onnx_ir as ir

    kernels = [n for n in ir.load(str(tmp_path / "m.onnx")).graph if n.op_type == "DynamicQuantizeMatMul"]
    assert kernels and all(n.outputs[0].shape is not None and n.outputs[0].shape.rank() == 3
                           for n in kernels)


def test_plain_form_leaves_the_export_alone(tmp_path):
    graph, x = _quantized(("ab", {"bits": 4, "group_size": 32}))
    summary = export_quantized_onnx(graph.module, (x,), {}, tmp_path / "m.onnx", form="plain")
    assert summary["quantized"]["plain"] == 2 and summary["quantized"]["lowered"] == 0
    assert "com.microsoft::MatMulNBits" not in summary["op_histogram"]


def test_unknown_form_is_refused(tmp_path):
    from slimline.errors import ExportError

    graph, x = _quantized(("a", {"bits": 4}))
    with pytest.raises(ExportError, match="form"):
        export_quantized_onnx(graph.module, (x,), {}, tmp_path / "m.onnx", form="awq")
