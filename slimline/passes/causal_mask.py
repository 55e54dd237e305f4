"""Constant attention masks: is this one causal, or all zero? The check behind ``fuse_attention``.

Not a pass: :mod:`slimline.passes.fuse_attention` calls :func:`classify_mask` for the mask of each
site it fuses (and of each SDPA call already in the graph). A causal mask becomes
``is_causal=True``, an all-zero one goes; either way the SDPA call has no explicit mask, which
lets CUDA run the flash kernel (an explicit float mask rules it out) and saves the mask tensor.
transformers' own ``sdpa`` build does the same.

Shape letters: B batch, H heads, L query length, S key length.

What is checked, step by step:

1. **The mask is a constant of the graph** (:func:`size_only_program`). Walking back from the
   mask, no placeholder may be read for its *values*, and no op outside that walk may write
   into what it computes (export's training IR keeps in-place ops). Sizes are allowed: ``sym_size`` and SymInt
   arithmetic, and tensors read only for their metadata (``new_ones(x, ...)``, ``zeros_like(x)``).
   Weights and buffers (``get_attr``) are constants. Random ops and sizes taken from data
   (unbacked SymInts, from ``.item()``) make the mask not constant. transformers' causal mask
   (``arange``, compares, ``index``, ``cumsum`` over the position ids it builds itself) passes; a
   padding mask from the ``attention_mask`` input, or a decode step's mask from ``input_pos``,
   does not ("depends on data").
2. **Evaluated at concrete sizes.** The mask's subgraph is cut out into a GraphModule of its own
   whose inputs are the sizes (ints) and the metadata-only tensors (zeros of the right shape,
   dtype and device), so it runs at any sizes, not only the captured ones.
3. **Its values.** ``ZERO``: the additive mask is exactly 0 everywhere (boolean: all True).
   ``CAUSAL``: L == S as size expressions, and the mask is exactly 0 where key ≤ query and
   ``-inf`` or absorbing (≤ -1e30, so ``score + m`` rounds to ``m`` and its ``exp`` to 0) above
   the diagonal, over every batch and head it broadcasts to (boolean: True exactly on and below
   the diagonal). Then the softmax equals the causally masked one bit for bit in the masked
   positions, and no row is empty (the diagonal stays). L == S because torch's ``is_causal`` (and
   ONNX ``Attention``'s) keeps the *top-left* triangle: with L != S (a prefill against a longer
   cache, a decode step) the model's mask is usually aligned differently, and it stays.

What is proven, for which sizes (about the captured graph, which is what runs):

- **Static shapes:** the graph accepts one size, and the mask is evaluated there: proven.
- **Dynamic shapes, small ranges:** when every symbol the mask and the scores' shape depend on
  has a finite range and all combinations number at most ``max_points`` (and fit an element
  budget), the mask is evaluated at every combination the captured graph accepts (the symbols'
  ranges, the shape environment's guards and runtime asserts): proven for every input the
  optimized model will run on. ``ConstantMask.exhaustive`` is True.
- **Dynamic shapes, large ranges:** a *test*, not a proof. The mask is evaluated at the captured
  sizes and at a sample: per symbol its lower bound and the one above, the neighbours of its
  captured value, about twice it, the middle of its range and its upper bound and the one below
  (an unbounded symbol: about four times the captured value), each symbol varied alone and then
  all together, skipping sizes that cost more than ``POINT_BUDGET`` elements. Sliding windows and
  other size thresholds between sampled sizes are not excluded. ``exhaustive`` is False and
  ``fuse_attention`` counts such sites (``mask_sampled_sizes``).

Refusals are :class:`Reason` s short enough to count in stats (``mask kept: ...``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import sympy
import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from slimline.ir.graph import Graph
from slimline.passes.base import Reason

__all__ = ["ConstantMask", "ZERO", "CAUSAL", "classify_mask", "SizeOnlyProgram",
           "size_only_program", "size_points", "ABSORBING_MASK", "ELEMENT_BUDGET", "POINT_BUDGET"]

aten = torch.ops.aten

ABSORBING_MASK = -1e30      # a masked entry at or below this adds to any finite score as itself
ELEMENT_BUDGET = 1 << 27    # tensor elements an exhaustive check may compute, summed over sizes
POINT_BUDGET = 1 << 24      # elements one sampled size may compute (the captured size is exempt)

_SIZES = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)

# (op, argument positions read only for shape, dtype and device)
_METADATA_ARGUMENTS: dict[Any, tuple[int, ...]] = {
    aten.new_ones.default: (0,), aten.new_zeros.default: (0,), aten.new_full.default: (0,),
    aten.new_empty.default: (0,), aten.zeros_like.default: (0,), aten.ones_like.default: (0,),
    aten.full_like.default: (0,), aten.empty_like.default: (0,), aten.fill.Scalar: (0,),
    aten.fill.Tensor: (0,),
}
# ops whose values are whatever memory held: a mask read from them is not a constant, unless
# every reader fills them in place first (export's training IR keeps ``empty(...).fill_(v)``)
_UNINITIALIZED = {aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default,
                  aten.empty_strided.default, aten.new_empty_strided.default}
_FILLS_IN_PLACE = {aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default}


ZERO = "zero"        # keeps every score: the mask can go
CAUSAL = "causal"    # keeps key <= query: the mask can become is_causal=True


@dataclass(frozen=True)
class ConstantMask:
    """What a constant mask is (``ZERO`` or ``CAUSAL``) at every size checked;
    ``exhaustive``: the sizes checked are every size the captured graph accepts."""

    kind: str
    sizes_checked: int
    exhaustive: bool


# ---------------------------------------------------------------------------------------------
# step 1: the mask as a program of sizes and constants


@dataclass
class SizeOnlyProgram:
    """The subgraph that computes some nodes from sizes and constants alone.

    ``module(*inputs)`` returns those nodes' values; :meth:`inputs` builds its inputs at a point
    (symbol → int): first one int per size leaf, then one zero tensor per metadata-only tensor.
    """

    module: fx.GraphModule
    size_leaves: list[sympy.Expr]                          # SymInt/SymFloat/SymBool values
    size_kinds: list[type]
    like_leaves: list[tuple[list[sympy.Expr], torch.dtype, torch.device]]
    computed_shapes: list[list[sympy.Expr]]                # of every node the program computes
    symbols: frozenset

    def inputs(self, point: dict) -> list[Any]:
        sizes = [kind(_concrete(expr, point)) for expr, kind in zip(self.size_leaves, self.size_kinds)]
        likes = [torch.zeros([int(_concrete(e, point)) for e in shape], dtype=dtype, device=device)
                 for shape, dtype, device in self.like_leaves]
        return sizes + likes

    def elements(self, point: dict) -> int:
        """Tensor elements the program computes at ``point``: what evaluating it there costs."""
        return sum(math.prod(int(_concrete(e, point)) for e in shape) for shape in self.computed_shapes)

    def __call__(self, point: dict) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(self.module(*self.inputs(point)))


def _expr(size: Any) -> sympy.Expr:
    if isinstance(size, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return size.node.expr
    if isinstance(size, bool):
        return sympy.true if size else sympy.false
    return sympy.sympify(size)


def _concrete(expr: sympy.Expr, point: dict) -> Any:
    value = sympy.sympify(expr.xreplace(point) if point else expr)
    if value in (sympy.true, sympy.false):
        return bool(value)
    if not value.is_number:
        raise ValueError(f"size {expr} is not fixed by {point}")
    return int(value) if value.is_integer else float(value)


def _shape_exprs(value: torch.Tensor) -> list[sympy.Expr]:
    return [_expr(size) for size in value.shape]


def size_only_program(graph: Graph, outputs: list[fx.Node]) -> SizeOnlyProgram | Reason:
    """Cut out the subgraph computing ``outputs``, or say why they are not constants of the graph
    (they read some input's values)."""
    shape_env = _shape_env(graph)
    backed = set(_captured_sizes(shape_env)) if shape_env is not None else set()
    computed: set[fx.Node] = set()     # evaluated by value
    sizes: list[fx.Node] = []          # SymInt-valued nodes: fed as ints
    metadata: list[fx.Node] = []       # tensors read only for their metadata: fed as zeros
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if node in computed or node in sizes:
            continue
        value = node.meta.get("val")
        if node.op == "placeholder":
            return Reason("depends on data")
        if isinstance(value, _SIZES) and not isinstance(value, torch.Tensor):
            sizes.append(node)
            continue
        if node.op == "get_attr":
            computed.add(node)
            continue
        if node.op != "call_function" or value is None:
            return Reason("computed by an op without recorded shapes")
        if torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ()):
            return Reason("random")
        if node.target in _UNINITIALIZED and \
                not all(user.target in _FILLS_IN_PLACE for user in node.users):
            return Reason("reads uninitialized memory")
        computed.add(node)
        shape_only = _METADATA_ARGUMENTS.get(node.target, ())
        for index, argument in enumerate(node.args):
            if index in shape_only and isinstance(argument, fx.Node):
                metadata.append(argument)
            else:
                stack.extend(_nodes_in(argument))
        for argument in node.kwargs.values():
            stack.extend(_nodes_in(argument))
    metadata = [n for n in dict.fromkeys(metadata) if n not in computed]
    if _mutated_elsewhere(graph, computed):
        return Reason("mutated in place")
    for node in metadata:
        if not isinstance(node.meta.get("val"), torch.Tensor):
            return Reason("computed by an op without recorded shapes")

    size_leaves = [_expr(n.meta["val"]) for n in sizes]
    like_leaves = [(_shape_exprs(n.meta["val"]), n.meta["val"].dtype, n.meta["val"].device)
                   for n in metadata]
    computed_shapes = [_shape_exprs(v) for n in computed
                       for v in _tensors_in(n.meta.get("val"))]
    symbols = frozenset().union(*(e.free_symbols for e in size_leaves),
                                *(e.free_symbols for shape, _, _ in like_leaves for e in shape),
                                *(e.free_symbols for shape in computed_shapes for e in shape))
    if any(symbol not in backed for symbol in symbols):
        return Reason("depends on data")    # a size read from a tensor's values (unbacked)

    program = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for index, node in enumerate(sizes):
        env[node] = program.placeholder(f"size_{index}")
    for index, node in enumerate(metadata):
        env[node] = program.placeholder(f"like_{index}")
    for node in graph.fx.nodes:        # graph order is a topological order
        if node in computed:
            env[node] = program.node_copy(node, lambda n: env[n])
    program.output(tuple(env[n] for n in outputs))
    module = fx.GraphModule(graph.module, program)
    kinds = [_kind(n.meta["val"]) for n in sizes]
    return SizeOnlyProgram(module, size_leaves, kinds, like_leaves, computed_shapes, symbols)


def _mutated_elsewhere(graph: Graph, computed: set[fx.Node]) -> bool:
    """Does an op outside the program write into a tensor the program computes (or a view of
    one)? Export's training IR keeps in-place ops; the program copies only the mask's
    ancestors, so such a write would be missed. In-place ops among the ancestors run in order."""
    aliases, stack = set(computed), list(computed)
    while stack:                        # views of computed tensors share their memory
        for user in stack.pop().users:
            if user not in aliases and _returns_alias(user):
                aliases.add(user)
                stack.append(user)
    for node in graph.fx.nodes:
        if node.op != "call_function" or node in computed:
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is None or not schema.is_mutable:
            continue
        for index, argument in enumerate(schema.arguments):
            written = argument.alias_info is not None and argument.alias_info.is_write
            value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
            if written and any(n in aliases for n in _nodes_in(value)):
                return True
    return False


def _returns_alias(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and \
        any(r.alias_info is not None for r in schema.returns)


def _nodes_in(argument: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(argument, found.append)
    return found


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    return []


def _captured_sizes(shape_env: Any) -> dict:
    """symbol -> the size it had at capture, for the symbols of input sizes (backed)."""
    if hasattr(shape_env, "backed_var_to_val"):
        return shape_env.backed_var_to_val
    return shape_env.var_to_val


def _kind(value: Any) -> type:
    if isinstance(value, (torch.SymBool, bool)):
        return bool
    if isinstance(value, (torch.SymFloat, float)):
        return float
    return int


def _shape_env(graph: Graph) -> Any:
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.fx.nodes
                                  if isinstance(n.meta.get("val"), torch.Tensor)])
    return getattr(fake_mode, "shape_env", None)


# ---------------------------------------------------------------------------------------------
# step 3's sizes: every accepted combination when few, else a sample


def _accepts(shape_env: Any, point: dict) -> bool:
    """Does the captured graph accept these sizes (ranges, guards, runtime asserts)?"""
    for symbol, value in point.items():
        bounds = shape_env.var_to_range.get(symbol)
        if bounds is not None and not (bounds.lower <= value <= bounds.upper):
            return False
    full = {**_captured_sizes(shape_env), **{s: sympy.Integer(v) for s, v in point.items()}}
    expressions = [guard.expr for guard in getattr(shape_env, "guards", [])]
    for asserts in getattr(shape_env, "deferred_runtime_asserts", {}).values():
        expressions.extend(a.expr for a in asserts)
    for expression in expressions:
        try:
            if expression.xreplace(full) is not sympy.true:
                return False
        except (TypeError, ValueError, ZeroDivisionError):
            return False
    return True


def _candidates(low: int, high: int | None, captured: int) -> list[int]:
    """Sizes worth trying for one symbol: its bounds and neighbours of the captured size
    (``high`` None: unbounded)."""
    picks = [low, low + 1, captured - 1, captured + 1, 2 * captured - 1, 2 * captured + 1]
    picks += [(low + high) // 2, high - 1, high] if high is not None else [4 * captured + 3]
    inside = [p for p in picks if low <= p and (high is None or p <= high) and p != captured]
    return sorted(set(inside))


def _bounds(shape_env: Any, symbol: sympy.Symbol) -> tuple[int, int | None]:
    bounds = shape_env.var_to_range[symbol]
    low = int(bounds.lower) if bounds.lower.is_finite else 0
    return max(low, 0), (int(bounds.upper) if bounds.upper.is_finite else None)


def size_points(shape_env: Any, symbols: Iterable, cost: Callable[[dict], int],
                max_points: int) -> tuple[list[dict], bool]:
    """The sizes to check, the captured ones first, and whether they are every accepted size."""
    symbols = sorted(symbols, key=lambda s: s.name)
    captured = {s: int(_captured_sizes(shape_env)[s]) for s in symbols}
    if not symbols:
        return [captured], True
    bounds = [_bounds(shape_env, s) for s in symbols]
    if all(high is not None for _, high in bounds):
        count = math.prod(high - low + 1 for low, high in bounds)
        if count <= max_points:
            every = [dict(zip(symbols, values)) for values in
                     itertools.product(*(range(low, high + 1) for low, high in bounds))]
            every = [p for p in every if _accepts(shape_env, p)]
            largest = {s: high for s, (_, high) in zip(symbols, bounds)}
            if len(every) * cost(largest) <= ELEMENT_BUDGET:   # sizes grow with the symbols
                return [captured] + [p for p in every if p != captured], True
    limit = max(POINT_BUDGET, cost(captured))
    options = {s: _candidates(low, high, captured[s]) for s, (low, high) in zip(symbols, bounds)}
    points = [captured]
    for symbol in symbols:                          # each symbol varied alone
        points += [{**captured, symbol: value} for value in options[symbol]]
    longest = max(len(values) for values in options.values())
    for index in range(longest):                    # and all of them together
        points.append({s: options[s][index % len(options[s])] if options[s] else captured[s]
                       for s in symbols})
    unique = list({tuple(sorted(p.items(), key=lambda i: i[0].name)): p for p in points}.values())
    chosen = [unique[0]] + [p for p in unique[1:] if _accepts(shape_env, p) and cost(p) <= limit]
    return chosen[:max_points] if max_points > 0 else chosen[:1], False


# ---------------------------------------------------------------------------------------------
# the check


def classify_mask(graph: Graph, mask_nodes: list[fx.Node],
                  combine: Callable[[list[torch.Tensor]], torch.Tensor],
                  scores_shape: tuple, max_points: int) -> ConstantMask | Reason:
    """Is ``combine(values of mask_nodes)`` all zero, or the causal mask, for scores of
    ``scores_shape`` (``(..., L, S)``) at every size checked? ``combine`` turns the nodes' values
    into the additive float mask (``0`` kept, ``-inf`` masked) or the boolean one (``True``
    kept). A mask that is both (L = S = 1 at every size) counts as zero."""
    program = size_only_program(graph, mask_nodes)
    if isinstance(program, Reason):
        return program
    query_length, key_length = (_expr(s) for s in scores_shape[-2:])
    square = sympy.simplify(query_length - key_length) == 0
    shape_env = _shape_env(graph)
    shape = [_expr(s) for s in scores_shape]
    symbols = program.symbols.union(*(e.free_symbols for e in shape))
    if symbols and shape_env is None:
        return Reason("sizes without a shape environment")
    if any(symbol not in _captured_sizes(shape_env) for symbol in symbols):
        return Reason("depends on data")     # the scores' shape comes from a tensor's values
    points, exhaustive = size_points(shape_env, symbols, program.elements, max_points) \
        if symbols else ([{}], True)
    kinds = {ZERO, CAUSAL} if square else {ZERO}
    for number, point in enumerate(points):
        try:
            mask = combine(program(point))
        except Exception:  # noqa: BLE001 - a mask we cannot evaluate is a mask we keep
            return Reason("could not be evaluated")
        concrete = [int(_concrete(e, point)) for e in shape]
        kinds = {kind for kind in kinds if _is(kind, mask, concrete)}
        if not kinds and number == 0:
            return Reason("not causal" if square else "not zero, and query and key lengths differ")
        if not kinds:
            return Reason("not causal at every size")
    return ConstantMask(ZERO if ZERO in kinds else CAUSAL, len(points), exhaustive)


def _is(kind: str, mask: torch.Tensor, scores_shape: list[int]) -> bool:
    """Is ``mask`` (additive float, or boolean keep-mask) all-keep (ZERO) or causal (CAUSAL) for
    scores of ``scores_shape``, over every batch and head it broadcasts to?"""
    try:
        if list(torch.broadcast_shapes(mask.shape, scores_shape)) != scores_shape:
            return False               # the mask would enlarge the scores
    except RuntimeError:
        return False
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        return False
    if kind == ZERO:
        return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())
    length, keys = scores_shape[-2:]
    key_position = torch.arange(keys, device=mask.device)
    keep_LS = key_position[None, :] <= torch.arange(length, device=mask.device)[:, None]
    if mask.dtype == torch.bool:
        return bool((mask == keep_LS).all())
    return bool(torch.where(keep_LS, mask == 0, mask <= ABSORBING_MASK).all())
