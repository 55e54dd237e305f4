"""Lower slimline's quantized linears, in an exported ONNX model, to ONNX Runtime's kernels.

The quantize pass leaves ``quantized_linear`` calls (:mod:`slimline.quant.linear`) in the graph;
torch's exporter turns each into plain ONNX ops — unpack (``BitShift``/``BitwiseAnd``),
dequantize (``Sub``/``Mul``), ``MatMul`` or ``Gemm`` — which ORT runs correctly but slower than
float32. This module finds each one by its packed-weight initializer (the buffer name the pass
registered, which the exporter keeps) and replaces the matmul with one kernel:

    form            replaces                                  weights       activations
    matmulnbits     com.microsoft::MatMulNBits                2, 4, 8 bits  float (accuracy_level)
    qdq             DequantizeLinear (blocked, opset ≥ 21)    4, 8 bits     float; ORT fuses it
                    → MatMul
    dynamic_int8    com.microsoft::DynamicQuantizeMatMul      8 bits, sym,  uint8 per tensor
                                                              per channel

Other widths (3, 5, 6 bits) stay in the plain form (``stats.plain``), and so do layers whose
dequantization the exporter's constant folding already turned into a float weight (small
layers: ``stats.folded``).

The rewrite, per layer (pattern → check → replacement)::

    MatMul(A, cone(packed, scales, zeros)) [+ b]          cone: only constant inputs; b a
                                                          constant vector, the only reader
    Gemm(A, cone(...), C, transB=1)                       alpha = beta = 1
    A = shape ops(fake_int8(x))                           dynamic_int8: x found behind the
                                                          rounding (one non-constant input)
      → Kernel(A or shape ops(x), B', scales', zero points', bias=b or C)

Which form is faster was measured on this machine (``benchmarks/quant_ort_cpu.py``): for 8-bit
weights with int8 activations ``DynamicQuantizeMatMul`` (2.7–3.6× float32 at 256–2048 rows);
for 4-bit weights ``MatMulNBits`` with ``accuracy_level=4`` (int8 compute): 1.2–1.4× at 256+
rows, ~6× at one row. ``form="auto"`` picks those.

:func:`export_quantized_onnx` runs the whole flow: export (checked in ORT by
:func:`~slimline.backends.onnx_export.export_onnx_model`), lower, apply the exact ONNX rules of
:mod:`slimline.onnx.pipeline` (as the onnxruntime target does), check the lowered file in ORT
against torch again (within the tolerance its kernels' rounding needs, below), then replace.

Shape legend:  N out_features,  K in_features,  Kq K padded to whole groups,  Bk blocks per row.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.fx as fx

from slimline.errors import ExportError
from slimline.quant.linear import quantized_linear
from slimline.quant.pack import unpack

__all__ = ["QuantizedLayer", "quantized_layers", "lower_quantized_matmuls", "LoweringStats",
           "export_quantized_onnx", "FORMS", "CHECK_TOLERANCES"]

FORMS = ("auto", "matmulnbits", "qdq", "plain")
MICROSOFT = "com.microsoft"
MATMULNBITS_BITS = (2, 4, 8)
QDQ_BITS = (4, 8)
QDQ_MIN_OPSET = 21
# ops a constant weight may pass through between its initializers and the matmul
_MAX_CONE = 200
# ops that lie between x and the matmul in the int8-activation form
_SHAPE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
# (max relative error, min cosine) the lowered file must keep against torch's quantized graph,
# per output tensor: MatMulNBits computes the same dequantized weights in another order
# ("exact_float"); with accuracy_level 4 (and ORT's fusion of DequantizeLinear + MatMul) it
# rounds activations to int8 per block of each row ("int8_compute"). Per-tensor int8
# activations ("int8_activations") are rounded by torch and by ORT independently: where the
# two matmuls' last bits differ, an activation lands on the neighbouring code, and in a deep
# model those flips spread: on MiniLM the torch and ORT int8 graphs are cosine 0.992 apart, as
# far as either is from float32. Only their cosine is held, to the default budget's 0.99.
CHECK_TOLERANCES = {"exact_float": (1e-3, 0.99999), "int8_compute": (5e-2, 0.999),
                    "int8_activations": (1.0, 0.99)}


@dataclass(frozen=True)
class QuantizedLayer:
    """One ``quantized_linear`` call of the FX graph: its buffer names and tensors.

    The packed buffer's name finds the layer in the ONNX graph (the exporter names initializers
    after buffers); the tensors come from torch, since constant folding may rename scales.
    """

    packed: str
    packed_tensor: torch.Tensor
    scales_tensor: torch.Tensor
    zeros_tensor: torch.Tensor | None
    bits: int
    layout: str
    group_size: int
    padded_features: int
    in_features: int
    activations: str
    module_path: str


def quantized_layers(module: fx.GraphModule) -> list[QuantizedLayer]:
    from slimline.ir.graph import module_path

    found = []
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target is not quantized_linear:
            continue
        _x, packed, scales, zeros, _bias = node.args
        kwargs = node.kwargs
        tensor = lambda n: _attribute(module, n) if n is not None else None  # noqa: E731
        found.append(QuantizedLayer(str(packed.target), tensor(packed), tensor(scales), tensor(zeros),
                                    kwargs["bits"], kwargs["layout"], kwargs["group_size"],
                                    kwargs["padded_features"], kwargs["in_features"],
                                    kwargs.get("activations", "none"), module_path(node)))
    return found


def _attribute(module: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    value: Any = module
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


@dataclass
class LoweringStats:
    """Counters of what :func:`lower_quantized_matmuls` did, and why a layer stayed plain."""

    forms: Counter = field(default_factory=Counter)  # form -> layers
    folded: int = 0
    plain: int = 0
    reasons: dict[str, str] = field(default_factory=dict)  # module path -> why not lowered

    @property
    def lowered(self) -> int:
        return sum(self.forms.values())

    def to_json(self) -> dict:
        return {"forms": dict(self.forms), "lowered": self.lowered, "folded": self.folded,
                "plain": self.plain, "reasons": dict(self.reasons)}


# ---------------------------------------------------------------------------------------------
# pattern


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    if value.const_value is not None or value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx")


@dataclass
class _Site:
    matmul: ir.Node  # MatMul or Gemm
    activation: ir.Value  # the matmul's A input
    bias: ir.Value | None  # Gemm's C, or the constant a MatMul's only reader adds
    bias_add: ir.Node | None = None  # that Add: the kernel takes the bias, the Add goes

    @property
    def result(self) -> ir.Value:
        """The value the replacement computes: the bias Add's output when it is folded."""
        return (self.bias_add or self.matmul).outputs[0]


def _constant_derived(value: ir.Value | None, memo: dict[int, bool], depth: int = 0) -> bool:
    """Whether ``value`` is computed from initializers and constants only."""
    if value is None or _is_constant(value):
        return True
    if id(value) in memo:
        return memo[id(value)]
    producer = value.producer()
    memo[id(value)] = False  # cycles cannot happen in a valid graph; depth bounds the walk
    result = producer is not None and depth < _MAX_CONE and \
        all(_constant_derived(v, memo, depth + 1) for v in producer.inputs)
    memo[id(value)] = result
    return result


def _find_site(packed: ir.Value) -> _Site | str:
    """The matmul whose weight input is computed from ``packed`` (and constants only)."""
    frontier = [packed]
    visited: set[int] = set()
    memo: dict[int, bool] = {}
    while frontier:
        value = frontier.pop()
        for node, index in list(value.uses()):
            if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx") and index == 1:
                return _check_matmul(node)
            if id(node) in visited:
                continue
            visited.add(id(node))
            if len(visited) > _MAX_CONE:
                return "the dequantization is more than 200 nodes deep"
            for other in node.inputs:
                if not _constant_derived(other, memo):
                    return f"the weight path reads a non-constant value at {node.op_type}"
            frontier.extend(node.outputs)
    return "no MatMul/Gemm reads the dequantized weight"


def _check_matmul(node: ir.Node) -> _Site | str:
    if node.op_type == "MatMul":
        return _Site(node, node.inputs[0], *_bias_add(node))
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    if attributes.get("transA", 0) or not attributes.get("transB", 0):
        return "Gemm with transA or without transB"
    if attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
        return "Gemm with alpha or beta other than 1"
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return _Site(node, node.inputs[0], bias)


def _bias_add(matmul: ir.Node) -> tuple[ir.Value | None, ir.Node | None]:
    """``(b, Add)`` when the MatMul's only reader adds a constant vector ``b`` of its width."""
    output = matmul.outputs[0]
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output():
        return None, None
    add, _index = uses[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
    tensor = other.const_value if other is not None else None
    if tensor is None or len(tensor.shape) != 1:
        return None, None
    width = output.shape[-1] if output.shape is not None and len(output.shape) else None
    if not isinstance(width, int) or tensor.shape[0] != width:
        return None, None
    return other, add


def _unrounded_input(activation: ir.Value) -> tuple[ir.Value, list[ir.Node]] | str:
    """``(x, shape_ops)`` for an int8-activation layer: the matmul's input behind the rounding,
    and the shape ops (Reshape, …) between the rounding and the matmul, first to last.

    The torch form exports as (see :func:`~slimline.quant.linear.fake_quantize_dynamic_uint8`)::

        rounded = Mul(Sub(Clip(Add(Round(Div(x, scale)), zero), 0, 255), zero), scale)
        scale, zero  from  ReduceMin(x), ReduceMax(x)
    """
    value = activation
    shape_ops: list[ir.Node] = []
    while value.producer() is not None and value.producer().op_type in _SHAPE_OPS:
        shape_ops.insert(0, value.producer())  # Reshape/Flatten between rounding and matmul
        value = value.producer().inputs[0]
    rounded = value
    chain = [("Mul", 0), ("Sub", 0), ("Clip", 0), ("Add", None), ("Round", 0), ("Div", 0)]
    node = rounded.producer()
    nodes = []
    for op_type, next_input in chain:
        if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
            found = node.op_type if node is not None else "a graph input"
            return f"the activation rounding does not match: expected {op_type}, found {found}"
        nodes.append(node)
        if next_input is None:  # Add(Round(...), zero) in either order
            rounds = [v.producer() for v in node.inputs if v is not None and v.producer() is not None
                      and v.producer().op_type == "Round"]
            node = rounds[0] if len(rounds) == 1 else None
        else:
            node = node.inputs[next_input].producer() if node.inputs[next_input] is not None else None
    x = nodes[-1].inputs[0]
    scale = nodes[0].inputs[1]
    if nodes[-1].inputs[1] is not scale:
        return "the activation rounding divides and multiplies by different scales"
    reductions = {user.op_type for user, _ in x.uses()}
    if not {"ReduceMin", "ReduceMax"} <= reductions:
        return "the activation rounding's range does not come from ReduceMin/ReduceMax of x"
    return x, shape_ops


# ---------------------------------------------------------------------------------------------
# replacements


def _initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    tensor = ir.tensor(array, dtype=dtype, name=name) if dtype is not None else ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def _codes(layer: QuantizedLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes ``(N, Kq)`` uint8, scales ``(N, G)`` float32, zeros ``(N, G)`` uint8 or None."""
    codes = unpack(layer.packed_tensor, layer.bits, layer.padded_features, layer.layout)
    zeros = layer.zeros_tensor
    return (codes.numpy().astype(np.uint8), layer.scales_tensor.float().numpy(),
            zeros.numpy().astype(np.uint8) if zeros is not None else None)


def _blocking(layer: QuantizedLayer) -> int:
    """MatMulNBits' block size: the group when it is a power of two in [16, 256], else 128 (or
    less for narrow layers) with each channel's scale repeated per block."""
    group = layer.group_size
    if group == layer.padded_features and not (16 <= group <= 256 and group & (group - 1) == 0):
        block = 128
        while block > 16 and block >= 2 * layer.in_features:
            block //= 2
        return block
    return group


def _reblock(layer: QuantizedLayer, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
             block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes ``(N, Bk·block)``, scales and zeros ``(N, Bk)`` for blocks of ``block`` inputs."""
    out_features = codes.shape[0]
    symmetric_zero = 1 << (layer.bits - 1)
    zeros = zeros if zeros is not None else np.full(scales.shape, symmetric_zero, np.uint8)
    if block != layer.group_size:  # one group per row, repeated per block
        blocks = -(-layer.in_features // block)
        scales = np.repeat(scales[:, :1], blocks, axis=1)
        zeros = np.repeat(zeros[:, :1], blocks, axis=1)
    blocks = scales.shape[1]
    padded = np.repeat(zeros, block, axis=1).astype(np.uint8)  # (N, Bk·block): pad with the zero
    width = min(codes.shape[1], blocks * block, layer.in_features)
    padded[:, :width] = codes[:, :width]
    return padded.reshape(out_features, blocks * block), scales.astype(np.float32), zeros


def _pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack along the last axis, ``8 // bits`` codes per byte, the first in the lowest bits."""
    per = 8 // bits
    width = -(-codes.shape[-1] // per) * per
    padded = np.zeros(codes.shape[:-1] + (width,), np.uint8)
    padded[..., :codes.shape[-1]] = codes
    grouped = padded.reshape(codes.shape[:-1] + (width // per, per)).astype(np.uint16)
    shifts = (np.arange(per) * bits).astype(np.uint16)
    return (grouped << shifts).sum(-1).astype(np.uint8)


def _matmulnbits(graph: ir.Graph, site: _Site, layer: QuantizedLayer, accuracy_level: int,
                 symmetric: bool) -> list[ir.Node]:
    codes, scales, zeros = _codes(layer)
    block = _blocking(layer)
    codes, scales, zeros = _reblock(layer, codes, scales, zeros, block)
    out_features, blocks = scales.shape
    blob = _pack_low_first(codes.reshape(out_features, blocks, block), layer.bits)  # (N, Bk, block·bits/8)
    prefix = layer.packed.removesuffix("_packed")
    inputs = [site.activation,
              _initializer(graph, f"{prefix}_nbits_B", blob),
              _initializer(graph, f"{prefix}_nbits_scales", scales.reshape(-1))]
    inputs.append(_initializer(graph, f"{prefix}_nbits_zeros",
                               _pack_low_first(zeros, layer.bits).reshape(-1))
                  if not symmetric else None)
    if site.bias is not None:
        inputs += [None, site.bias]  # g_idx unused; bias
    node = ir.node("MatMulNBits", _trim(inputs), {"K": layer.in_features, "N": out_features,
                                                  "bits": layer.bits, "block_size": block,
                                                  "accuracy_level": accuracy_level},
                   domain=MICROSOFT, name=f"{prefix}_MatMulNBits")
    return [node]


def _trim(inputs: list) -> list:
    while inputs and inputs[-1] is None:
        inputs.pop()
    return inputs


def _qdq(graph: ir.Graph, site: _Site, layer: QuantizedLayer, symmetric: bool) -> list[ir.Node]:
    codes, scales, zeros = _codes(layer)
    block = layer.group_size
    codes = codes[:, :layer.in_features]
    zeros = zeros if zeros is not None else np.full(scales.shape, 1 << (layer.bits - 1), np.uint8)
    prefix = layer.packed.removesuffix("_packed")
    dtype = ir.DataType.UINT4 if layer.bits == 4 else ir.DataType.UINT8
    weight = _initializer(graph, f"{prefix}_qdq_weight", np.ascontiguousarray(codes.T), dtype)  # (K, N)
    if block == layer.padded_features:  # per channel: per-axis along N
        scale_array, zero_array, attributes = scales[:, 0], zeros[:, 0], {"axis": 1}
    else:
        scale_array, zero_array = scales.T, zeros.T  # (G, N)
        attributes = {"axis": 0, "block_size": block}
    dequantize = ir.node("DequantizeLinear",
                         [weight, _initializer(graph, f"{prefix}_qdq_scales", np.ascontiguousarray(scale_array)),
                          _initializer(graph, f"{prefix}_qdq_zeros", np.ascontiguousarray(zero_array), dtype)],
                         attributes, name=f"{prefix}_DequantizeLinear")
    matmul = ir.node("MatMul", [site.activation, dequantize.outputs[0]], name=f"{prefix}_MatMul")
    return [dequantize, *_with_bias(matmul, site, prefix)]


def _dynamic_int8(graph: ir.Graph, site: _Site, layer: QuantizedLayer, x: ir.Value,
                  shape_ops: list[ir.Node]) -> list[ir.Node]:
    codes, scales, _zeros = _codes(layer)
    weight = (codes[:, :layer.in_features].astype(np.int16) - 128).astype(np.int8)  # (N, K)
    prefix = layer.packed.removesuffix("_packed")
    # the kernel rounds its input itself: it reads x through copies of the shape ops that fed
    # the matmul the rounded x (the rounding may be shared, by Q, K and V, so it stays for now
    # and goes with the last reader)
    replayed: list[ir.Node] = []
    value = x
    for index, node in enumerate(shape_ops):
        replayed.append(ir.node(node.op_type, [value, *node.inputs[1:]], dict(node.attributes),
                                domain=node.domain, name=f"{prefix}_{node.op_type}_{index}"))
        value = replayed[-1].outputs[0]
        value.type, value.shape = node.outputs[0].type, node.outputs[0].shape
    inputs = [value, _initializer(graph, f"{prefix}_int8_B", np.ascontiguousarray(weight.T)),
              _initializer(graph, f"{prefix}_int8_scales", np.ascontiguousarray(scales[:, 0]))]
    if site.bias is not None:
        inputs += [None, site.bias]
    node = ir.node("DynamicQuantizeMatMul", inputs, domain=MICROSOFT,
                   name=f"{prefix}_DynamicQuantizeMatMul")
    return [*replayed, node]


def _with_bias(node: ir.Node, site: _Site, prefix: str) -> list[ir.Node]:
    if site.bias is None:
        return [node]
    add = ir.node("Add", [node.outputs[0], site.bias], name=f"{prefix}_bias")
    return [node, add]


def lower_quantized_matmuls(model: ir.Model, layers: list[QuantizedLayer], *, form: str = "auto",
                            accuracy_level: int = 4) -> LoweringStats:
    """Replace each layer's plain dequantize-then-matmul by one ORT kernel, in place.

    ``form``: ``auto`` (``DynamicQuantizeMatMul`` for int8 activations, ``MatMulNBits`` for
    2/4/8-bit weights), ``matmulnbits``, ``qdq``, or ``plain`` (change nothing).
    ``accuracy_level`` is MatMulNBits' (0: float compute; 4: int8 compute, fastest here).
    """
    if form not in FORMS:
        raise ExportError(f"unknown quantized-matmul form {form!r}", stage="export",
                          where="lower_quantized_matmuls(form=...)", hint=f"use one of: {', '.join(FORMS)}")
    graph = model.graph
    stats = LoweringStats()
    opset = model.opset_imports.get("", 0)
    for layer in layers:
        where = layer.module_path or layer.packed
        if form == "plain":
            stats.plain += 1
            continue
        packed = graph.initializers.get(layer.packed)
        if packed is None:
            stats.folded += 1
            stats.reasons[where] = "constant folding turned the dequantized weight into a float initializer"
            continue
        site = _find_site(packed)
        if isinstance(site, str):
            stats.plain += 1
            stats.reasons[where] = site
            continue
        symmetric = layer.zeros_tensor is None
        replacement: list[ir.Node] | str
        if layer.activations == "dynamic_int8":
            found = _unrounded_input(site.activation)
            if isinstance(found, str):
                replacement, chosen = found, ""
            else:
                replacement, chosen = _dynamic_int8(graph, site, layer, *found), "dynamic_int8"
        elif form in ("auto", "matmulnbits") and layer.bits in MATMULNBITS_BITS:
            replacement, chosen = _matmulnbits(graph, site, layer, accuracy_level, symmetric), "matmulnbits"
        elif form == "qdq" and layer.bits in QDQ_BITS and opset >= QDQ_MIN_OPSET:
            replacement, chosen = _qdq(graph, site, layer, symmetric), "qdq"
        else:
            replacement, chosen = f"no {form} kernel for {layer.bits}-bit weights at opset {opset}", ""
        if isinstance(replacement, str):
            stats.plain += 1
            stats.reasons[where] = replacement
            continue
        graph.insert_before(site.matmul, replacement)
        result, new_result = site.result, replacement[-1].outputs[0]
        # the kernel computes the value it replaces: same type and shape (the ONNX rules that
        # run next, attention_heads_3d among them, match on known shapes)
        new_result.type, new_result.shape = result.type, result.shape
        if result.is_graph_output():  # the new value takes the output's place and name
            _swap_graph_output(graph, result, new_result)
        result.replace_all_uses_with(new_result)
        stats.forms[chosen] += 1
    if stats.lowered:
        if MICROSOFT not in model.opset_imports:
            model.opset_imports[MICROSOFT] = 1
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
    return stats


def _swap_graph_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    name = old.name
    for index, output in enumerate(graph.outputs):
        if output is old:
            graph.outputs[index] = new
    old.name = None
    new.name = name
    new.shape, new.type = old.shape, old.type


# ---------------------------------------------------------------------------------------------
# the whole flow


def _compare(reference: list[torch.Tensor], arrays: list[np.ndarray]) -> tuple[float, float]:
    worst_rel, worst_cos = 0.0, 1.0
    for expected, got in zip(reference, arrays):
        expected = expected.detach().double().flatten()
        got = torch.from_numpy(np.asarray(got)).double().flatten()
        scale = float(expected.abs().max()) or 1.0
        worst_rel = max(worst_rel, float((got - expected).abs().max()) / scale)
        denominator = float(expected.norm() * got.norm()) or 1.0
        worst_cos = min(worst_cos, float((expected * got).sum()) / denominator)
    return worst_rel, worst_cos


def export_quantized_onnx(module: fx.GraphModule, args: tuple, kwargs: dict | None,
                          path: str | os.PathLike, *, dynamic_shapes: Any = None,
                          form: str = "auto", accuracy_level: int = 4, opset: int | None = None,
                          check_inputs: list | None = None) -> dict:
    """Export ``module`` (a quantized slimline graph) to ONNX with ORT's quantized kernels.

    Returns the exporter's summary plus ``"quantized"``: forms used, layers left plain and why,
    and the lowered file's worst relative error and cosine against torch on the example inputs
    (and ``check_inputs``, a list of ``(args, kwargs)``).
    """
    from slimline.backends.onnx_export import export_onnx_model
    from slimline.backends.onnxruntime import load_ort_module

    if form not in FORMS:
        raise ExportError(f"unknown quantized-matmul form {form!r}", stage="export",
                          where="export_quantized_onnx(form=...)", hint=f"use one of: {', '.join(FORMS)}")
    path = Path(path)
    layers = quantized_layers(module)
    int8_activations = any(layer.activations == "dynamic_int8" for layer in layers)
    # the plain form with int8 activations drifts from torch as the lowered one does (see
    # CHECK_TOLERANCES): the exporter's element-wise check is replaced by the cosine check below
    info = export_onnx_model(module, args, kwargs, path, dynamic_shapes=dynamic_shapes, opset=opset,
                             check=not int8_activations)
    model = ir.load(str(path))
    stats = lower_quantized_matmuls(model, layers, form=form, accuracy_level=accuracy_level)
    # the exact ONNX rules the onnxruntime target applies to every export (3-D attention, ...):
    # some match only now, once the lowering has removed the activation rounding's extra readers
    from slimline.onnx.pipeline import run_rules

    rules = [result.to_json() for result in run_rules(model)]
    staged = Path(tempfile.mkdtemp(prefix=".quant-", dir=path.parent)) / path.name
    try:
        ir.save(model, str(staged))
        runner = load_ort_module(staged)
        worst_rel, worst_cos = 0.0, 1.0
        for sample_args, sample_kwargs in [(args, kwargs or {})] + list(check_inputs or []):
            with torch.no_grad():
                expected = module(*sample_args, **sample_kwargs)
            reference = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
            rel, cos = _compare(reference, runner.run_numpy(sample_args, sample_kwargs))
            worst_rel, worst_cos = max(worst_rel, rel), min(worst_cos, cos)
        # ORT fuses DequantizeLinear + MatMul into MatMulNBits with int8 compute
        int8_compute = stats.forms.get("qdq", 0) or \
            (stats.forms.get("matmulnbits", 0) and accuracy_level >= 4)
        kind = "int8_activations" if int8_activations else \
            "int8_compute" if int8_compute else "exact_float"
        max_rel, min_cos = CHECK_TOLERANCES[kind]
        if worst_rel > max_rel or worst_cos < min_cos:
            raise ExportError(
                f"the lowered quantized model disagrees with torch: max relative error "
                f"{worst_rel:.2e} (allowed {max_rel:g}), cosine {worst_cos:.6f} (allowed {min_cos})",
                stage="export", where=str(path),
                hint="export with form='plain', or accuracy_level=0")
        del runner
        os.replace(staged, path)
        data = staged.parent / (staged.name + ".data")
        if data.exists():
            os.replace(data, path.parent / data.name)
    finally:
        for leftover in staged.parent.glob("*"):
            leftover.unlink()
        staged.parent.rmdir()
    summary = info.to_json()
    from slimline.backends.onnxruntime import onnx_op_histogram

    summary["op_histogram"] = onnx_op_histogram(path)
    summary["file_size"] = path.stat().st_size
    summary["onnx_rules"] = rules
    summary["quantized"] = {**stats.to_json(), "check": kind, "max_rel_error": worst_rel,
                            "min_cosine": worst_cos, "accuracy_level": accuracy_level, "form": form}
    return summary
