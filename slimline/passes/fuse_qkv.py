"""Fuse the Q, K, V projections of an attention site into one linear and a split.

Exact (each output column is the same dot product as before; a missing bias becomes a zero
bias, and ``y + 0`` is ``y``). Runs after ``fuse_attention``, whose SDPA calls it uses to know
which linears are projections of one attention site, and after ``canonicalize_linear``, whose
``aten.linear(x, W, b)`` form it reads. One GEMM of width ``Dq + Dk + Dv`` instead of three
narrow ones: one read of ``x``, one kernel launch, better tensor-core use at small batch.

Shape letters: N every leading dimension of the input, C its width, Dq/Dk/Dv the projections'
widths (H·E for the query, Hkv·E for key and value under grouped-query attention).

The rule, as pattern + check + replacement::

    pattern   q_NDq = linear(x_NC, Wq, bq)     k_NDk = linear(x_NC, Wk, bk)     v_NDv = linear(x_NC, Wv, bv)
              each reaching the same scaled_dot_product_attention call (as query, key or value)
              within a few ops (views, transposes, rotary embedding, casts)
    check     at least two such linears read the very same ``x``; weights are constants of one
              dtype and device; no two reach the same SDPA operand
    replace   qkv_N(Dq+Dk+Dv) = linear(x, cat([Wq, Wk, Wv]), cat([bq, bk, bv]))   # 0 for a missing bias
              q, k, v = split_with_sizes(qkv, [Dq, Dk, Dv], -1)

Only projections into one SDPA call are fused; other linears that share an input (an MLP's gate
and up projections) are left to the passes after this one. Cross-attention fuses K and V (they
read the encoder output; Q reads the decoder). GPT-2 already computes Q, K, V with one ``c_attn``
and has nothing to fuse.

The split's outputs are strided views of ``qkv``: a ``view`` of one of them that merges its last
dimension with another would fail on those strides (checked on FakeTensors), so such a ``view`` /
``_unsafe_view`` becomes ``reshape`` (the same values, as a copy). Views that still fit, as the
head split ``(N, D) -> (N, H, E)`` of every model here, stay views.

Stats: ``fused_qkv`` / ``fused_kv`` / ``fused_qk`` ... by the operands the fused group feeds;
``refused: <reason>`` per group left alone. One :class:`LayerDecision` per fused group, named by
the module the projections share (``model.layers.0.self_attn``).
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from slimline.ir.cost import node_cost
from slimline.ir.graph import Graph, module_path, stamp
from slimline.passes.base import LayerDecision, PassContext, PassResult, Reason, tunable

__all__ = ["NAME", "EXACT", "TARGETS", "Config", "run"]

NAME = "fuse_qkv"
EXACT = True
TARGETS = {"cpu", "cuda", "onnxruntime"}

aten = torch.ops.aten
_LINEAR = aten.linear.default
_SDPA = aten.scaled_dot_product_attention.default
_STRICT_VIEWS = {aten.view.default, aten._unsafe_view.default}
_OPERANDS = "qkv"                  # SDPA's first three arguments


@dataclass
class Config:
    max_hops: int = tunable(16, (8, 16, 32),
                            "how many ops (views, transposes, rotary embedding) may sit between a "
                            "projection and the SDPA operand it becomes")


# ---------------------------------------------------------------------------------------------
# pattern: which SDPA operand does a linear become?


def _operands_reached(linear: fx.Node, max_hops: int) -> set[tuple[fx.Node, int]]:
    """``(sdpa, operand index)`` pairs reached forward from ``linear`` within ``max_hops`` ops,
    not through another linear, matrix product or SDPA."""
    reached: set[tuple[fx.Node, int]] = set()
    frontier, seen = [linear], {linear}
    for _ in range(max_hops):
        following = []
        for node in frontier:
            for user in node.users:
                if user in seen or user.op != "call_function":
                    continue
                seen.add(user)
                if user.target == _SDPA:
                    reached.update((user, i) for i, a in enumerate(user.args[:3]) if a is node)
                elif user.target not in (_LINEAR, aten.matmul.default, aten.bmm.default,
                                         aten.mm.default, aten.addmm.default):
                    following.append(user)
        frontier = following
    return reached


def _groups(graph: Graph, config: Config) -> list[tuple[list[fx.Node], list[int]]]:
    """Linears that read one input and feed one SDPA call: ``(linears, operand per linear)``,
    in graph order; only groups of two or more."""
    found: dict[tuple[fx.Node, fx.Node], list[tuple[fx.Node, int]]] = {}
    for node in graph.fx.nodes:
        if node.op != "call_function" or node.target != _LINEAR:
            continue
        reached = _operands_reached(node, config.max_hops)
        sites = {sdpa for sdpa, _ in reached}
        if len(sites) != 1 or len(reached) != 1:
            continue                     # no attention, or more than one operand: not a projection
        ((sdpa, operand),) = reached
        found.setdefault((node.args[0], sdpa), []).append((node, operand))
    groups = []
    for members in found.values():
        if len(members) >= 2:
            groups.append(([linear for linear, _ in members], [operand for _, operand in members]))
    return groups


# ---------------------------------------------------------------------------------------------
# the rule: check


def _check(graph: Graph, linears: list[fx.Node], operands: list[int]) -> Reason | None:
    if len(set(operands)) != len(operands):
        return Reason("two projections feed the same attention operand")
    weights = [graph.attribute(n.args[1]) for n in linears]
    if any(w is None or w.dim() != 2 for w in weights):
        return Reason("a projection weight is not a constant 2-D tensor")
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
        return Reason("the projection weights differ in dtype, device or input width")
    for node in linears:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if bias is not None and (graph.attribute(bias) is None or graph.attribute(bias).dim() != 1):
            return Reason("a projection bias is not a constant 1-D tensor")
    if any(n.meta.get("val") is None for n in linears):
        return Reason("a projection has no recorded shape")
    return None


# ---------------------------------------------------------------------------------------------
# the rule: replacement


def _common_path(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = os.path.commonprefix(parts)
    return ".".join(common)


class _Emit:
    """Inserts stamped nodes before ``before``, with FakeTensor metadata computed as it goes."""

    def __init__(self, graph: Graph, before: fx.Node, source: str):
        self.graph, self.before, self.source = graph, before, source
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.fx.nodes
                                           if isinstance(n.meta.get("val"), torch.Tensor)])

    def __call__(self, target: Callable, *args: Any) -> fx.Node:
        with self.graph.fx.inserting_before(self.before):
            node = self.graph.fx.call_function(target, args)
        node.meta["val"] = self._fake(target, args)
        return stamp(node, NAME, self.source)

    def _fake(self, target: Callable, args: tuple, *, strict: bool = False) -> Any:
        """The op's FakeTensor result; None when it fails (``strict``: raise instead)."""
        if self.fake_mode is None:
            if strict:
                raise RuntimeError("no fake mode to check the op with")
            return None

        def value(argument: Any) -> Any:
            if isinstance(argument, fx.Node):
                found = argument.meta.get("val")
                if isinstance(found, torch.Tensor) and not isinstance(found, torch._subclasses.FakeTensor):
                    found = self.fake_mode.from_tensor(found)
                return found
            if isinstance(argument, (list, tuple)):
                return type(argument)(value(a) for a in argument)
            return argument

        try:
            with self.fake_mode:
                return target(*value(args))
        except Exception:  # noqa: BLE001 - metadata is best effort; the graph itself stays correct
            if strict:
                raise
            return None

    def view_fails(self, view: fx.Node) -> bool:
        """Would ``view`` (a view op reading a new split output) fail on its strides?"""
        try:
            self._fake(view.target, view.args, strict=True)
        except Exception:  # noqa: BLE001 - any failure (or no way to check) means: reshape
            return True
        return False


def _replace(graph: Graph, linears: list[fx.Node]) -> tuple[str, int]:
    """One linear with the concatenated weights (in the order given), split back into the
    projections; returns the shared module path and the fused parameter count."""
    order = {node: index for index, node in enumerate(graph.fx.nodes)}
    first = min(linears, key=order.__getitem__)   # x is defined before every projection
    source = _common_path([module_path(n) for n in linears])
    weights = [graph.attribute(n.args[1]) for n in linears]
    biases = [graph.attribute(n.args[2]) if len(n.args) > 2 and n.args[2] is not None else None
              for n in linears]
    widths = [w.shape[0] for w in weights]
    weight = torch.cat([w.detach() for w in weights], dim=0)
    weight_node = graph.add_parameter(f"{source}.qkv_weight", weight, before=first)
    stamp(weight_node, NAME, source)
    bias_node = None
    if any(b is not None for b in biases):
        dtype = next(b.dtype for b in biases if b is not None)
        bias = torch.cat([b.detach() if b is not None else weight.new_zeros(width, dtype=dtype)
                          for b, width in zip(biases, widths)])
        bias_node = stamp(graph.add_parameter(f"{source}.qkv_bias", bias, before=first), NAME, source)
    emit = _Emit(graph, first, source)
    x = first.args[0]
    fused = emit(_LINEAR, x, weight_node, bias_node) if bias_node is not None else \
        emit(_LINEAR, x, weight_node)
    split = emit(aten.split_with_sizes.default, fused, widths, -1)
    parts = [emit(operator.getitem, split, index) for index in range(len(linears))]
    for linear, part in zip(linears, parts):
        linear.replace_all_uses_with(part)
        for user in list(part.users):     # a strided slice: a view that no longer fits its
            if user.target in _STRICT_VIEWS and emit.view_fails(user):  # strides becomes reshape
                user.target = aten.reshape.default
        graph.fx.erase_node(linear)
    return source, weight.numel() + (graph.attribute(bias_node).numel() if bias_node is not None else 0)


# ---------------------------------------------------------------------------------------------
# the entry point


def run(graph: Graph, config: Config, context: PassContext) -> PassResult:
    stats: dict[str, float] = {}
    decisions: list[LayerDecision] = []
    for linears, operands in _groups(graph, config):
        reason = _check(graph, linears, operands)
        if reason:
            key = f"refused: {reason}"
            stats[key] = stats.get(key, 0) + 1
            continue
        order = sorted(range(len(linears)), key=lambda i: operands[i])
        linears, operands = [linears[i] for i in order], [operands[i] for i in order]
        params = sum(graph.attribute(n.args[1]).numel() for n in linears) + \
            sum(graph.attribute(n.args[2]).numel() for n in linears if len(n.args) > 2 and n.args[2] is not None)
        # one wide linear does the same multiply-adds as the projections it replaces
        flops = str(sympy.expand(sum(node_cost(n, graph.rename).flops for n in linears)))
        source, params_after = _replace(graph, linears)
        pattern = "fused_" + "".join(_OPERANDS[i] for i in operands)
        stats[pattern] = stats.get(pattern, 0) + 1
        decisions.append(LayerDecision(source, "linear", f"{len(linears)} projections → one linear",
                                       NAME, params_before=params, params_after=params_after,
                                       flops_before=flops, flops_after=flops))
    changed = any(key.startswith("fused_") for key in stats)
    if changed:
        graph.fx.eliminate_dead_code()
        graph.recompile()
    return PassResult(graph, changed, stats, decisions)
