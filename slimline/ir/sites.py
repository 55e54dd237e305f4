"""Sites: the places in a graph the report lists layer by layer.

A *linear site* is an ``aten.linear`` node with a constant 2-D weight (after canonicalisation,
every dense layer has that form). An *attention site* is a fused
``aten.scaled_dot_product_attention`` node, or an unfused ``softmax`` whose input comes from a
matmul (through scale, mask and dtype nodes) and whose output feeds a matmul — the pattern the
attention-fusion pass rewrites.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx

from slimline.ir.graph import Graph, module_path

__all__ = ["Site", "find_sites", "LINEAR", "ATTENTION"]

aten = torch.ops.aten
LINEAR = "linear"
ATTENTION = "attention"

_MATMULS = {aten.matmul.default, aten.bmm.default, aten.mm.default, aten.baddbmm.default,
            aten.einsum.default}
_SOFTMAXES = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_SDPA = {aten.scaled_dot_product_attention.default,
         aten._scaled_dot_product_flash_attention_for_cpu.default}
# ops allowed between the score matmul and the softmax, or between softmax and the value matmul
_PASSTHROUGH = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.masked_fill.Scalar,
                aten.masked_fill.Tensor, aten.where.self, aten.to.dtype, aten._to_copy.default,
                aten.type_as.default, aten.dropout.default, aten.clone.default,
                aten.contiguous.default, aten.sub.Tensor, aten.alias.default}


@dataclass
class Site:
    kind: str
    module_path: str
    node: fx.Node
    params: int
    flops: sympy.Expr


def _reaches(node: object, wanted: set, forward: bool, depth: int = 6) -> bool:
    if not isinstance(node, fx.Node) or depth == 0:
        return False
    neighbours = list(node.users) if forward else [a for a in node.all_input_nodes]
    for other in neighbours:
        if other.op != "call_function":
            continue
        if other.target in wanted:
            return True
        if other.target in _PASSTHROUGH and _reaches(other, wanted, forward, depth - 1):
            return True
    return False


def find_sites(graph: Graph) -> list[Site]:
    """Every linear and attention site, in graph order, with params and FLOPs (sympy)."""
    from slimline.ir.cost import node_cost

    sites: list[Site] = []
    for node in graph.fx.nodes:
        if node.op != "call_function":
            continue
        if node.target == aten.linear.default:
            weight = graph.attribute(node.args[1]) if isinstance(node.args[1], fx.Node) else None
            if weight is None:
                continue
            bias = graph.attribute(node.args[2]) if len(node.args) > 2 and isinstance(node.args[2], fx.Node) else None
            params = weight.numel() + (bias.numel() if bias is not None else 0)
            sites.append(Site(LINEAR, module_path(node), node, params,
                              node_cost(node, graph.rename).flops))
        elif node.target in _SDPA:
            sites.append(Site(ATTENTION, module_path(node), node, 0,
                              node_cost(node, graph.rename).flops))
        elif node.target in _SOFTMAXES and _reaches(node, _MATMULS, forward=False) \
                and _reaches(node, _MATMULS, forward=True):
            flops = _attention_flops(node, graph)
            sites.append(Site(ATTENTION, module_path(node), node, 0, flops))
    return sites


def _attention_flops(softmax: fx.Node, graph: Graph) -> sympy.Expr:
    """FLOPs of the unfused pattern: the two matmuls around the softmax, plus the softmax."""
    from slimline.ir.cost import node_cost

    total = node_cost(softmax, graph.rename).flops
    for neighbour_set, forward in ((softmax.all_input_nodes, False), (softmax.users, True)):
        frontier = list(neighbour_set)
        for _ in range(6):
            nxt = []
            for other in frontier:
                if other.op != "call_function":
                    continue
                if other.target in _MATMULS:
                    total += node_cost(other, graph.rename).flops
                    nxt = []
                    break
                if other.target in _PASSTHROUGH:
                    total += node_cost(other, graph.rename).flops
                    nxt.extend(other.users if forward else other.all_input_nodes)
            else:
                frontier = nxt
                continue
            break
    return sympy.expand(total)
