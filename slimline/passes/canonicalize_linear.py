"""Canonicalise linear layers: one form, ``aten.linear(x, W, b)``, however they were captured.

Exact. Runs first: every pass that works on dense layers (low-rank, Monarch, quantization) reads
only ``aten.linear`` with a constant 2-D weight ``W`` of shape (out, in).

Rules (``W`` is a constant weight read through ``get_attr``; ``Wt`` its transpose)::

    addmm(b, x, t(W))           -> linear(x, W, b)
    addmm(b, x, Wio)            -> linear(x, Wioᵀ, b)      # GPT-2's Conv1D keeps W as (in, out)
    mm(x, t(W))                 -> linear(x, W)
    matmul(x, t(W))             -> linear(x, W)
    matmul(x, t(W)) + b         -> linear(x, W, b)         # b 1-D constant of size out
    linear(x, W) + b            -> linear(x, W, b)

``t(W)`` is ``aten.t``, ``aten.transpose(W, 0, 1)``, ``aten.permute(W, [1, 0])`` or
``aten.numpy_T``. A weight stored as (in, out) gets a transposed copy registered on the graph (the
values are identical, so the rewrite stays exact); the user's tensor is not touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from slimline.ir.graph import Graph, stamp
from slimline.passes.base import PassContext, PassResult, Reason

NAME = "canonicalize_linear"
EXACT = True
TARGETS = {"cpu", "cuda", "onnxruntime"}

aten = torch.ops.aten
_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}


@dataclass
class Config:
    fold_bias_add: bool = True


def _constant_2d(graph: Graph, node: object) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    tensor = graph.attribute(node)
    return tensor if tensor is not None and tensor.dim() == 2 else None


def _transposed_weight(graph: Graph, node: object) -> fx.Node | None:
    """``W`` when ``node`` is a transpose of a constant 2-D weight ``W``."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _TRANSPOSES):
        return None
    if node.target == aten.transpose.int and sorted(int(d) % 2 for d in node.args[1:3]) != [0, 1]:
        return None
    if node.target == aten.permute.default and list(node.args[1]) not in ([1, 0], [-1, -2], [1, -2], [-1, 0]):
        return None
    source = node.args[0]
    return source if _constant_2d(graph, source) is not None else None


def _bias_for(graph: Graph, node: object, out_features: int) -> fx.Node | None:
    if not isinstance(node, fx.Node):
        return None
    tensor = graph.attribute(node)
    if tensor is None or tensor.dim() != 1 or tensor.shape[0] != out_features:
        return None
    return node


def _weight_for_matmul(graph: Graph, right: object, site: fx.Node) -> tuple[fx.Node | None, Reason | None]:
    """The (out, in) weight node for ``x @ right``: a transposed constant, or a constant (in, out)."""
    weight = _transposed_weight(graph, right)
    if weight is not None:
        return weight, None
    tensor = _constant_2d(graph, right)
    if tensor is None:
        return None, Reason("right operand is not a constant 2-D weight")
    transposed = graph.add_parameter(f"{right.target}_t", tensor.t().contiguous(), before=site)
    stamp(transposed, NAME, site)
    return transposed, None


def _replace_with_linear(graph: Graph, site: fx.Node, x: fx.Node, weight: fx.Node,
                         bias: fx.Node | None) -> fx.Node:
    with graph.fx.inserting_before(site):
        linear = graph.fx.call_function(aten.linear.default,
                                        (x, weight, bias) if bias is not None else (x, weight))
    linear.meta["val"] = site.meta.get("val")
    stamp(linear, NAME, site)
    site.replace_all_uses_with(linear)
    graph.fx.erase_node(site)
    return linear


def run(graph: Graph, config: Config, context: PassContext) -> PassResult:
    stats = {"addmm": 0, "mm": 0, "matmul": 0, "bias_add_folded": 0}
    for site in list(graph.fx.nodes):
        if site.op != "call_function":
            continue
        if site.target == aten.addmm.default and len(site.args) == 3 and not site.kwargs:
            bias, x, right = site.args
            weight, _reason = _weight_for_matmul(graph, right, site)
            tensor = graph.attribute(weight) if weight is not None else None
            if tensor is not None and _bias_for(graph, bias, tensor.shape[0]) is not None:
                _replace_with_linear(graph, site, x, weight, bias)
                stats["addmm"] += 1
        elif site.target in (aten.mm.default, aten.matmul.default) and len(site.args) == 2:
            x, right = site.args
            if _transposed_weight(graph, right) is None and _constant_2d(graph, right) is None:
                continue
            x_value = x.meta.get("val") if isinstance(x, fx.Node) else None
            if x_value is None or x_value.dim() < 2:
                continue  # a vector times a matrix is not a linear layer over rows
            weight, _reason = _weight_for_matmul(graph, right, site)
            _replace_with_linear(graph, site, x, weight, None)
            stats["mm" if site.target == aten.mm.default else "matmul"] += 1
    if config.fold_bias_add:
        stats["bias_add_folded"] = _fold_bias_adds(graph)
    graph.fx.eliminate_dead_code()
    graph.recompile()
    return PassResult(graph, any(stats.values()), stats)


def _fold_bias_adds(graph: Graph) -> int:
    """linear(x, W) + b -> linear(x, W, b) when b is a constant of size out."""
    folded = 0
    for linear in list(graph.fx.nodes):
        if linear.op != "call_function" or linear.target != aten.linear.default or len(linear.args) != 2:
            continue
        if len(linear.users) != 1:
            continue
        add = next(iter(linear.users))
        if add.target != aten.add.Tensor or add.kwargs or len(add.args) != 2:
            continue
        other = add.args[1] if add.args[0] is linear else add.args[0]
        out_features = graph.attribute(linear.args[1]).shape[0]
        bias = _bias_for(graph, other, out_features)
        if bias is None:
            continue
        linear.args = (linear.args[0], linear.args[1], bias)
        linear.meta["val"] = add.meta.get("val", linear.meta.get("val"))
        add.replace_all_uses_with(linear)
        graph.fx.erase_node(add)
        folded += 1
    return folded
