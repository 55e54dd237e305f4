"""Fuse normalisations written by hand into ``aten.rms_norm`` / ``aten.layer_norm``.

Exact (up to float reassociation). Independent of the other passes; run it before passes that
look for norms. transformers writes RMSNorm by hand (Llama, Qwen2, Mistral, Mixtral, T5's
"LayerNorm"); research code writes LayerNorm by hand. One op each is one kernel in torch and one
ONNX node (``RMSNormalization`` at opset ≥ 23, ``LayerNormalization`` at opset ≥ 17).

Shape letters: N every leading dimension, D the normalised (last) dimension.

Rules, as pattern + check + replacement (``x_ND`` the input, ``w_D``/``b_D`` constant weights)::

    x · rsqrt(mean(x², -1, keepdim) + eps)              -> rms_norm(x, [D], None, eps)
    rms_norm(x, [D], None, eps) · w                      -> rms_norm(x, [D], w, eps)
    (x - μ) · rsqrt(var + eps)   μ = mean(x, -1, keepdim) -> layer_norm(x, [D], None, None, eps)
    (x - μ) / sqrt(var + eps)    var = mean((x - μ)², -1, keepdim) or var(x, -1, correction=0)
    layer_norm(x, [D], None, None, eps) · w (+ b)        -> layer_norm(x, [D], w, b, eps)

``x²`` is ``pow(x, 2)`` or ``x · x``; ``eps`` a Python number. A weight folds in only when nothing
but the multiply reads the normalised value and no dtype cast sits between them: Llama in bf16
computes the norm in float32, casts to bf16, then multiplies by the bf16 weight, and that cast and
multiply stay as they are. A cast of the input to its own dtype (a no-op) is looked through.
Refusals are counted in ``stats`` by reason (``refused: ...``); the report lists norms as no site
of its own, so no :class:`LayerDecision` is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from slimline.ir.graph import Graph, stamp
from slimline.passes.base import PassContext, PassResult, Reason, tunable

__all__ = ["NAME", "EXACT", "TARGETS", "Config", "run"]

NAME = "fuse_norm"
EXACT = True
TARGETS = {"cpu", "cuda", "onnxruntime"}

aten = torch.ops.aten
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.type_as.default}
_ASSERTS = {aten._assert_tensor_metadata.default}


@dataclass
class Config:
    rms_norm: bool = tunable(True, (True, False), "fuse x·rsqrt(mean(x²)+eps) into aten.rms_norm")
    layer_norm: bool = tunable(True, (True, False), "fuse (x-μ)·rsqrt(var+eps) into aten.layer_norm")
    fold_weights: bool = tunable(True, (True, False), "fold a following ·w (+b) into the fused op")


def _call(node: Any, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _users(node: fx.Node) -> list[fx.Node]:
    return [user for user in node.users if user.target not in _ASSERTS]


def _other(node: fx.Node, one: Any) -> Any:
    first, second = node.args[:2]
    return second if first is one else first


def _is_last_dim_mean(node: Any) -> bool:
    if not _call(node, aten.mean.dim):
        return False
    dims = node.args[1]
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    rank = _val(node.args[0]).dim() if _val(node.args[0]) is not None else 0
    return bool(keep) and rank > 0 and len(dims) == 1 and int(dims[0]) % rank == rank - 1 \
        and node.kwargs.get("dtype") is None


def _square_of(node: Any) -> fx.Node | None:
    """``x`` when ``node`` is ``pow(x, 2)`` or ``x · x``."""
    if _call(node, aten.pow.Tensor_Scalar) and node.args[1] == 2:
        return node.args[0]
    if _call(node, aten.mul.Tensor) and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def _before_upcasts(node: Any) -> Any:
    """Look through casts that keep every value (to a dtype at least as wide)."""
    while _call(node, *_CASTS) and isinstance(node.args[0], fx.Node) and _val(node) is not None \
            and _val(node.args[0]) is not None and _val(node).dtype.is_floating_point \
            and _val(node.args[0]).dtype.is_floating_point \
            and _val(node).dtype.itemsize >= _val(node.args[0]).dtype.itemsize:
        node = node.args[0]
    return node


def _through_noop_cast(node: fx.Node) -> fx.Node:
    """Look through ``x.to(x.dtype)``."""
    while _call(node, *_CASTS) and isinstance(node.args[0], fx.Node) and _val(node) is not None \
            and _val(node.args[0]) is not None and _val(node).dtype == _val(node.args[0]).dtype:
        node = node.args[0]
    return node


# ---------------------------------------------------------------------------------------------
# pattern + check: anchored on the inverse standard deviation


@dataclass
class NormMatch:
    kind: str                # "rms_norm" | "layer_norm"
    source: fx.Node          # x, the tensor normalised
    output: fx.Node          # the node the fused op replaces
    eps: float
    width: int               # D


def _inverse_std(node: fx.Node) -> tuple[fx.Node, float, fx.Node, str] | None:
    """``(variance, eps, the node dividing or multiplying by it, "mul"|"div")``:
    ``x · rsqrt(var + eps)`` or ``x / sqrt(var + eps)``."""
    if _call(node, aten.rsqrt.default):
        users = _users(node)
        if len(users) == 1 and _call(users[0], aten.mul.Tensor):
            inner, applied, how = node.args[0], users[0], "mul"
        else:
            return None
    elif _call(node, aten.sqrt.default):
        users = _users(node)
        if len(users) == 1 and _call(users[0], aten.div.Tensor) and users[0].args[1] is node:
            inner, applied, how = node.args[0], users[0], "div"
        else:
            return None
    else:
        return None
    if not _call(inner, aten.add.Tensor) or len(_users(inner)) != 1 or inner.kwargs:
        return None
    tensors = [a for a in inner.args[:2] if isinstance(a, fx.Node)]
    numbers = [a for a in inner.args[:2] if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if len(tensors) != 1 or len(numbers) != 1:
        return None                     # var + tensor: not a constant eps
    return tensors[0], float(numbers[0]), applied, how


def match_norm(anchor: fx.Node, config: Config) -> NormMatch | Reason | None:
    """Match the norm whose inverse standard deviation ``anchor`` (rsqrt or sqrt) computes."""
    found = _inverse_std(anchor)
    if found is None:
        return None
    variance, eps, applied, how = found
    if not _call(variance, aten.mean.dim, aten.var.correction, aten.var.dim):
        return None
    scaled = applied.args[0] if how == "div" else _other(applied, anchor)
    if not isinstance(scaled, fx.Node) or _val(scaled) is None or _val(applied) is None:
        return None
    width = _val(scaled).shape[-1]
    if not isinstance(width, int):
        return Reason("the normalised dimension is symbolic")
    if len(_users(variance)) != 1:
        return Reason("the variance is also used outside the norm")
    # LayerNorm: (x - μ) · rsqrt(var + eps); checked first, since it is also the RMSNorm of x - μ
    centred = _call(scaled, aten.sub.Tensor) and isinstance(scaled.args[1], fx.Node) \
        and _is_last_dim_mean(scaled.args[1]) and scaled.args[1].args[0] is scaled.args[0]
    if not centred:
        # RMSNorm: x · rsqrt(mean(x²) + eps), x² maybe of x upcast (T5 squares x.float())
        squared = _square_of(variance.args[0]) if _call(variance, aten.mean.dim) else None
        if squared is not None and _before_upcasts(squared) is _before_upcasts(scaled):
            if not config.rms_norm:
                return None
            if not _is_last_dim_mean(variance) or len(_users(variance.args[0])) != 1:
                return Reason("the mean of squares is not over the last dim alone")
            if _val(squared) is None or _val(squared).dtype != _val(applied).dtype:
                return Reason("the norm's result is narrower than the squares it averages")
            return NormMatch("rms_norm", squared, applied, eps, width)
        return None
    if not config.layer_norm:
        return None
    source, centre = scaled.args[:2]
    if _call(variance, aten.mean.dim):
        if not (_is_last_dim_mean(variance) and _square_of(variance.args[0]) is scaled):
            return Reason("the variance is not the mean of the centred squares over the last dim")
    else:  # var(x, [-1], correction=0 | unbiased=False, keepdim=True)
        if variance.args[0] is not source:
            return Reason("the variance is not of the normalised input")
        correction = variance.kwargs.get("correction", 1) if variance.target == aten.var.correction \
            else (1 if (variance.args[2] if len(variance.args) > 2 else True) else 0)
        keep = variance.kwargs.get("keepdim", variance.args[3] if len(variance.args) > 3 else False)
        dims = variance.args[1] if len(variance.args) > 1 else variance.kwargs.get("dim")
        rank = _val(source).dim()
        if correction != 0:
            return Reason("the variance is unbiased (divides by D - 1); layer_norm divides by D")
        if not keep or dims is None or len(dims) != 1 or int(dims[0]) % rank != rank - 1:
            return Reason("the variance is not over the last dim alone")
    for inside in (scaled, centre):
        extra = [u for u in _users(inside) if u not in (applied, variance, scaled)
                 and _square_of(u) is None]
        if extra:
            return Reason("a partial result of the norm is used outside it")
    return NormMatch("layer_norm", source, applied, eps, width)


# ---------------------------------------------------------------------------------------------
# replacement


def _constant_vector(graph: Graph, node: Any, width: int, dtype: torch.dtype) -> bool:
    tensor = graph.attribute(node) if isinstance(node, fx.Node) else None
    return tensor is not None and tuple(tensor.shape) == (width,) and tensor.dtype == dtype


def _fold_weights(graph: Graph, fused: fx.Node, kind: str, width: int) -> tuple[fx.Node, int]:
    """rms_norm(x)·w -> rms_norm(x, w); layer_norm(x)·w + b -> layer_norm(x, w, b)."""
    dtype = _val(fused).dtype
    users = _users(fused)
    target = fused
    if len(users) == 1 and _call(users[0], *_CASTS) and _val(users[0]) is not None \
            and _val(users[0]).dtype == dtype and len(_users(users[0])) == 1:
        target = users[0]               # Llama's .to(input_dtype) when it changes nothing
        users = _users(target)
    if len(users) != 1 or not _call(users[0], aten.mul.Tensor):
        return fused, 0
    multiply = users[0]
    weight = _other(multiply, target)
    if not _constant_vector(graph, weight, width, dtype) or _val(multiply).shape != _val(fused).shape:
        return fused, 0
    folded, absorbed = 1, multiply
    bias = None
    if kind == "layer_norm":
        adds = _users(multiply)
        if len(adds) == 1 and _call(adds[0], aten.add.Tensor) and not adds[0].kwargs \
                and _constant_vector(graph, _other(adds[0], multiply), width, dtype):
            bias, absorbed = _other(adds[0], multiply), adds[0]
            folded += 1
    arguments = list(fused.args)
    arguments[2] = weight
    if kind == "layer_norm":
        arguments[3] = bias
    fused.args = tuple(arguments)
    absorbed.replace_all_uses_with(fused)
    for node in dict.fromkeys((absorbed, multiply, target)):
        if node is not fused and not node.users:
            graph.fx.erase_node(node)
    return fused, folded


def _replace(graph: Graph, match: NormMatch) -> fx.Node:
    source = _through_noop_cast(match.source)
    with graph.fx.inserting_before(match.output):
        if match.kind == "rms_norm":
            fused = graph.fx.call_function(aten.rms_norm.default,
                                           (source, [match.width], None, match.eps))
        else:
            fused = graph.fx.call_function(aten.layer_norm.default,
                                           (source, [match.width], None, None, match.eps))
    value = _val(match.output)
    fused.meta["val"] = value
    stamp(fused, NAME, match.output)
    match.output.replace_all_uses_with(fused)
    return fused


def run(graph: Graph, config: Config, context: PassContext) -> PassResult:
    stats: dict[str, float] = {"rms_norm": 0, "layer_norm": 0, "weights_folded": 0}
    for node in list(graph.fx.nodes):
        if node.graph is not graph.fx or not _call(node, aten.rsqrt.default, aten.sqrt.default):
            continue
        found = match_norm(node, config)
        if found is None:
            continue
        if isinstance(found, Reason):
            key = f"refused: {found}"
            stats[key] = stats.get(key, 0) + 1
            continue
        if _val(found.source) is None or _val(found.source).dtype != _val(found.output).dtype:
            key = "refused: the norm changes the dtype"
            stats[key] = stats.get(key, 0) + 1
            continue
        fused = _replace(graph, found)
        stats[found.kind] += 1
        if config.fold_weights:
            _fused, folded = _fold_weights(graph, fused, found.kind, found.width)
            stats["weights_folded"] += folded
    changed = stats["rms_norm"] + stats["layer_norm"] > 0
    if changed:
        _erase_dead(graph)
        graph.recompile()
    return PassResult(graph, changed, stats)


def _erase_dead(graph: Graph) -> None:
    """Drop what the fused ops replaced, with the dtype asserts export hung on it."""
    for node in reversed(list(graph.fx.nodes)):
        if node.target in _ASSERTS and isinstance(node.args[0], fx.Node) \
                and not _users(node.args[0]) and node.args[0].op == "call_function":
            graph.fx.erase_node(node)
    graph.fx.eliminate_dead_code()
