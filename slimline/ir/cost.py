"""Cost model: FLOPs and bytes moved per node, as sympy expressions over the dimension symbols.

Every rule reads the shapes that ``torch.export`` recorded in ``node.meta["val"]`` (see
`slimline.ir.shapes`), so a graph captured with a dynamic batch and sequence gets costs such as
``2*batch*seq*768*3072``; a static capture gets plain integers.

Shape letters in comments: B batch (all leading dimensions together), M/N rows/columns of a
product, K the contracted dimension, H heads, L query length, S key length, E query/key head
width, Ev value head width, C channels, G groups.

FLOP conventions
----------------
- A multiply-add is 2 FLOPs.  Matrix products (``mm``, ``bmm``, ``matmul``, ``linear``, ``dot``,
  ``mv``) cost ``2 × numel(output) × K``; this covers broadcasting and the 1-D ``matmul`` cases.
- A bias or accumulator add counts 1 FLOP per output element: ``linear`` with bias, ``addmm``,
  ``baddbmm``, ``addmv``, biased convolutions.  So ``linear(x_BK, w_NK, b_N)`` costs
  ``2·B·K·N + B·N``.  The ``alpha``/``beta`` scalings are not counted.  (``torch.utils.
  flop_counter`` counts no bias adds; everything else here matches it.)
- Convolution: ``2 × numel(output) × (C_in/G) × prod(kernel)`` (+ bias); transposed
  convolution: ``2 × numel(input) × (C_out/G) × prod(kernel)`` (+ bias).
- ``scaled_dot_product_attention`` (and the fused ``_scaled_dot_product_*`` variants) counts the
  two products only, ``2·B·H·L·S·E`` for Q·Kᵀ and ``2·B·H·L·S·Ev`` for ·V, with H the *query*
  heads (grouped-query attention does the same arithmetic per query head).  Softmax and scaling
  inside the kernel are not counted, as in the FlashAttention papers and ``torch.utils.
  flop_counter``.  With ``is_causal=True`` and no mask only the unmasked (query, key) pairs are
  counted: ``L(L+1)/2`` when ``S >= L`` (torch aligns the mask top-left); when ``S < L`` it is
  ``S(S+1)/2 + (L-S)·S``; when sympy cannot decide which is larger, the full ``L·S`` is kept.
  An explicit ``attn_mask`` is never assumed to skip work.
- ``einsum`` with two operands: ``2 × numel(output) × prod(contracted sizes)``, or
  ``numel(output)`` without contraction (an outer product); one operand: numel(input) if it
  sums something, else 0.  More operands are uncounted.
- Normalizations and activations cost a small per-element constant × numel (see
  ``PER_ELEMENT_FLOPS``, with the count each number stands for); any other op tagged
  ``torch.Tag.pointwise`` costs 1 × numel(output).  Reductions cost their constant × numel of the
  reduced input (``REDUCTION_FLOPS``).
- ``embedding``, gathers, copies, concatenations, padding, dtype casts and tensor creation cost
  0 FLOPs (data movement only).  Views, ``getitem``, placeholders, ``get_attr``, ``output`` and
  nodes without a tensor result (shape arithmetic, asserts, guards) cost nothing at all.
- Anything else costs 0 FLOPs plus the bytes of its inputs and outputs and is recorded in
  ``Cost.uncounted`` by its op name (``aten.topk.default``), so a report can say what it missed.

Bytes conventions
-----------------
- Each node is costed alone, as if nothing were fused: bytes = every distinct tensor input read
  once + every tensor output written once.  The graph total is therefore the unfused traffic.
- Pure views move 0 bytes.  ``reshape``/``flatten``/``contiguous``/``to`` are views when the
  input is contiguous and the dtype is unchanged, else a copy (read + write).
- Gathers (``embedding``, ``index_select``, ``gather``, ``index``) read only the selected rows of
  their source (as many bytes as the output), plus the indices; the whole table is not read.
- Tensor creation (``zeros``, ``full``, ``ones_like``...) only writes its output; ``empty*``
  moves nothing.
- Attention reads q, k, v (and the mask) and writes the output: the score matrix is assumed
  never to reach memory (a fused kernel).
- An expanded (broadcast) input is read once: dimensions of stride 0 do not multiply its bytes
  (``bmm`` on a weight expanded over the batch reads the weight once).

Expressions are kept cheap: per node they are built by plain arithmetic and ``sympy.expand``ed,
never ``sympy.simplify``ed.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import sympy
import torch
import torch.fx

from slimline.errors import InputError
from slimline.ir.shapes import (
    Rename,
    dtype_bytes,
    is_tensor_value,
    sympy_numel,
    sympy_shape,
    tensor_bytes,
)

__all__ = [
    "Cost",
    "GraphCost",
    "node_cost",
    "graph_cost",
    "evaluate",
    "PER_ELEMENT_FLOPS",
    "REDUCTION_FLOPS",
]

_ZERO = sympy.Integer(0)


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes moved, as sympy expressions; ``uncounted`` names ops with no FLOP rule."""

    flops: sympy.Expr = _ZERO
    bytes: sympy.Expr = _ZERO
    uncounted: frozenset[str] = field(default_factory=frozenset)

    def __add__(self, other: Cost) -> Cost:
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(
            sympy.expand(self.flops + other.flops),
            sympy.expand(self.bytes + other.bytes),
            self.uncounted | other.uncounted,
        )

    def __radd__(self, other: Any) -> Cost:
        # lets sum(costs) start from the integer 0
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented


class GraphCost(NamedTuple):
    """What `graph_cost` returns: unpack as ``total, per_node, uncounted``."""

    total: Cost
    per_node: dict[str, Cost]
    uncounted: tuple[str, ...]


# Per-element FLOPs of normalizations and activations (× numel of the output).
PER_ELEMENT_FLOPS: dict[str, int] = {
    # max, subtract, exp, sum, divide
    "softmax": 5, "_softmax": 5, "log_softmax": 5, "_log_softmax": 5, "_safe_softmax": 5,
    # mean (add), centre (subtract), variance (square, add), normalize (mul by rsqrt),
    # affine (mul, add)
    "layer_norm": 7, "native_layer_norm": 7, "group_norm": 7, "native_group_norm": 7,
    # square, mean (add), scale by rsqrt (mul), weight (mul)
    "rms_norm": 4, "_fused_rms_norm": 4,
    # inference batch norm: subtract mean, scale by rsqrt(var), weight (mul), bias (add)
    "batch_norm": 4, "_native_batch_norm_legit_no_training": 4, "native_batch_norm": 4,
    # x/2 · (1 + erf(x/√2)): erf ≈ 4, then mul, add, mul, mul
    "gelu": 8,
    # x · sigmoid(x): sigmoid (exp, add, divide) + mul
    "silu": 4,
    "sigmoid": 3,  # exp, add, divide
    "tanh": 3,  # exp(2x), then (e - 1) / (e + 1) folded to add, divide
    "mish": 7,  # x · tanh(softplus(x)): softplus 3, tanh 3, mul
    "softplus": 3,  # exp, add, log
    "elu": 3, "selu": 4, "celu": 3,  # exp, subtract, scale (+ scale)
    "hardswish": 4, "hardsigmoid": 3,  # add, clamp, mul (, mul)
}

# Per-input-element FLOPs of reductions (× numel of the reduced input).
REDUCTION_FLOPS: dict[str, int] = {
    "sum": 1, "mean": 1, "amax": 1, "amin": 1, "max": 1, "min": 1, "prod": 1,
    "argmax": 1, "argmin": 1, "any": 1, "all": 1, "cumsum": 1, "cumprod": 1,
    "nansum": 1, "count_nonzero": 1,
    "var": 3, "std": 3, "var_mean": 3, "std_mean": 3,  # subtract mean, square, add
    "linalg_vector_norm": 2, "norm": 2,  # square (or abs), add
    "logsumexp": 3,  # exp, add (max and subtract folded in)
}

# Ops that only ever return views of their input.
_VIEW_OPS = frozenset({
    "view", "_unsafe_view", "_reshape_alias", "permute", "transpose", "t", "expand",
    "expand_as", "unsqueeze", "squeeze", "slice", "select", "as_strided", "alias", "detach",
    "split", "split_with_sizes", "chunk", "unbind", "narrow", "view_as", "diagonal",
    "unflatten", "movedim", "moveaxis", "swapaxes", "swapdims", "unfold", "real", "imag",
    "view_as_real", "view_as_complex", "numpy_T", "mT", "mH", "adjoint", "tensor_split",
    "lift_fresh", "_assert_tensor_metadata",
})

# Views when the input is contiguous and the dtype/device stays, else a copy.
_MAYBE_COPY_OPS = frozenset({"reshape", "flatten", "contiguous", "to", "type_as"})

# 0 FLOPs, inputs read and outputs written.
_COPY_OPS = frozenset({
    "clone", "copy", "_to_copy", "cat", "concat", "concatenate", "stack", "hstack", "vstack",
    "repeat", "tile", "repeat_interleave", "constant_pad_nd", "pad", "reflection_pad1d",
    "reflection_pad2d", "replication_pad1d", "replication_pad2d", "tril", "triu", "flip",
    "roll", "lift_fresh_copy", "scatter", "index_put", "slice_scatter", "select_scatter",
    "masked_scatter", "index_copy", "_unsafe_index_put", "copy_", "detach_copy", "view_copy",
    "permute_copy", "transpose_copy", "expand_copy",
})

# Read the selected part of arg 0 (output-sized), the other inputs, write the output.
_GATHER_OPS = frozenset({"embedding", "index_select", "gather", "index", "_unsafe_index", "take"})

# Creation: write the output only (``empty*`` writes nothing).
_CREATION_OPS = frozenset({
    "zeros", "ones", "full", "arange", "linspace", "scalar_tensor", "rand", "randn",
    "randint", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "new_zeros",
    "new_ones", "new_full", "fill", "eye", "tensor",
})
_EMPTY_OPS = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "empty_permuted"})

# (position, name) of the mask and of is_causal in each attention op; position None: keyword-only;
# a mask entry None: the op takes no mask.
_ATTENTION_ARGUMENTS: dict[str, tuple[tuple[int | None, str] | None, tuple[int, str]]] = {
    "scaled_dot_product_attention": ((3, "attn_mask"), (5, "is_causal")),
    "_scaled_dot_product_attention_math": ((3, "attn_mask"), (5, "is_causal")),
    "_scaled_dot_product_flash_attention": (None, (4, "is_causal")),
    "_scaled_dot_product_flash_attention_for_cpu": ((None, "attn_mask"), (4, "is_causal")),
    "_scaled_dot_product_efficient_attention": ((3, "attn_bias"), (6, "is_causal")),
    "_scaled_dot_product_cudnn_attention": ((3, "attn_bias"), (6, "is_causal")),
}


# ---------------------------------------------------------------------------------------------
# helpers


def _argument(node: torch.fx.Node, position: int | None, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given at ``position`` (None: keyword-only) or by keyword."""
    if position is not None and len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _value(argument: Any) -> Any:
    """The recorded value of a node argument (a FakeTensor for tensor nodes)."""
    if isinstance(argument, torch.fx.Node):
        return argument.meta.get("val")
    return argument


def _tensor_inputs(node: torch.fx.Node) -> Iterator[torch.fx.Node]:
    """Distinct input nodes holding tensors, in argument order."""
    seen: set[torch.fx.Node] = set()
    for input_node in node.all_input_nodes:
        if input_node not in seen and is_tensor_value(input_node.meta.get("val")):
            seen.add(input_node)
            yield input_node


def _stored_bytes(value: torch.Tensor, rename: Rename | None) -> sympy.Expr:
    """Bytes of the distinct elements a tensor reads: broadcast (stride-0) dimensions once."""
    try:
        strides = sympy_shape(value.stride())
    except (RuntimeError, NotImplementedError):  # layouts without strides
        return tensor_bytes(value, rename)
    sizes = sympy_shape(value, rename)
    stored = [size for size, stride in zip(sizes, strides) if stride != 0]
    return sympy.Mul(*stored) * dtype_bytes(value.dtype)


def _read_bytes(node: torch.fx.Node, rename: Rename | None, skip: torch.fx.Node | None = None):
    return sympy.Add(*(
        _stored_bytes(input_node.meta["val"], rename)
        for input_node in _tensor_inputs(node)
        if input_node is not skip
    ))


def _written_bytes(node: torch.fx.Node, rename: Rename | None) -> sympy.Expr:
    return tensor_bytes(node.meta.get("val"), rename)


def _first_tensor(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return next((item for item in value if is_tensor_value(item)), None)
    return value


def _has_tensor(value: Any) -> bool:
    return _first_tensor(value) is not None and is_tensor_value(_first_tensor(value))


def _is_contiguous(value: torch.Tensor) -> bool:
    """Row-major contiguity decided on the symbolic sizes and strides, installing no guards."""
    shape = sympy_shape(value)
    strides = sympy_shape(value.stride())
    expected = sympy.Integer(1)
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1 and sympy.expand(stride - expected) != 0:
            return False
        expected = expected * size
    return True


def _io_cost(node: torch.fx.Node, rename: Rename | None, flops: sympy.Expr = _ZERO) -> Cost:
    return Cost(
        sympy.expand(flops),
        sympy.expand(_read_bytes(node, rename) + _written_bytes(node, rename)),
    )


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__qualname__", getattr(target, "__name__", str(target)))


def _uncounted(node: torch.fx.Node, rename: Rename | None) -> Cost:
    reads = _read_bytes(node, rename) if "val" in node.meta else _ZERO
    return Cost(_ZERO, sympy.expand(reads + _written_bytes(node, rename)),
                frozenset({_op_name(node)}))


# ---------------------------------------------------------------------------------------------
# rules: each takes (node, rename) and returns the node's Cost


def _shape_of(node: torch.fx.Node, position: int, name: str, rename: Rename | None):
    return sympy_shape(_value(_argument(node, position, name)), rename)


def _output_numel(node: torch.fx.Node, rename: Rename | None) -> sympy.Expr:
    return sympy_numel(_first_tensor(node.meta["val"]), rename)


def _matrix_product(node, rename):
    # out = a @ b: 2·numel(out)·K, K = a.shape[-1]
    contracted = _shape_of(node, 0, "self", rename)[-1]
    return _io_cost(node, rename, 2 * _output_numel(node, rename) * contracted)


def _linear(node, rename):
    # y_BN = x_BK @ w_NK.T (+ b_N): 2·B·K·N (+ B·N)
    out = _output_numel(node, rename)
    flops = 2 * out * _shape_of(node, 0, "input", rename)[-1]
    if _argument(node, 2, "bias") is not None:
        flops += out
    return _io_cost(node, rename, flops)


def _add_matrix_product(node, rename):
    # out = beta·c + alpha·(a @ b): 2·numel(out)·K + numel(out); a is argument 1
    out = _output_numel(node, rename)
    contracted = _shape_of(node, 1, "mat1", rename)[-1]
    return _io_cost(node, rename, 2 * out * contracted + out)


def _convolution(node, rename):
    # weight_(C_out, C_in/G, *kernel), or (C_in, C_out/G, *kernel) when transposed
    name = node.target.overloadpacket.__name__
    if name in ("convolution", "_convolution"):
        transposed = bool(_argument(node, 6, "transposed", False))
    else:
        transposed = name.startswith("conv_transpose")
    weight = _shape_of(node, 1, "weight", rename)
    per_element = 2 * sympy.Mul(*weight[1:])
    out = _output_numel(node, rename)
    driving = sympy_numel(_value(_argument(node, 0, "input")), rename) if transposed else out
    flops = driving * per_element
    if _argument(node, 2, "bias") is not None:
        flops += out
    return _io_cost(node, rename, flops)


def _causal_pairs(query_length: sympy.Expr, key_length: sympy.Expr) -> sympy.Expr:
    # top-left aligned causal mask: query row i sees keys 0..i
    surplus = key_length - query_length
    if surplus.is_nonnegative:
        return query_length * (query_length + 1) / 2
    if surplus.is_negative:
        return key_length * (key_length + 1) / 2 + (query_length - key_length) * key_length
    return query_length * key_length


def _attention(node, rename):
    # q_(B,H,L,E) k_(B,Hkv,S,E) v_(B,Hkv,S,Ev): 2·B·H·L·S·E + 2·B·H·L·S·Ev
    mask_argument, causal_argument = _ATTENTION_ARGUMENTS[node.target.overloadpacket.__name__]
    query = _shape_of(node, 0, "query", rename)
    key = _shape_of(node, 1, "key", rename)
    value = _shape_of(node, 2, "value", rename)
    batch_heads = sympy.Mul(*query[:-2])
    query_length, key_length = query[-2], key[-2]
    has_mask = mask_argument is not None and _argument(node, *mask_argument) is not None
    if _argument(node, *causal_argument, False) and not has_mask:
        pairs = _causal_pairs(query_length, key_length)
    else:
        pairs = query_length * key_length
    flops = 2 * batch_heads * pairs * (query[-1] + value[-1])
    return _io_cost(node, rename, flops)


def _einsum_flops(node, rename) -> sympy.Expr | None:
    equation = str(_argument(node, 0, "equation")).replace(" ", "")
    operands = [_value(operand) for operand in _argument(node, 1, "tensors")]
    inputs_spec, arrow, output_spec = equation.partition("->")
    input_specs = inputs_spec.split(",")
    if len(input_specs) != len(operands) or len(operands) > 2:
        return None
    letters = [spec.replace("...", "") for spec in input_specs]
    if not arrow:
        counts = {letter: "".join(letters).count(letter) for letter in "".join(letters)}
        output_spec = "".join(sorted(letter for letter, n in counts.items() if n == 1))
    sizes: dict[str, sympy.Expr] = {}
    for spec, operand in zip(input_specs, operands):
        shape = sympy_shape(operand, rename)
        head, _, tail = spec.partition("...")
        for letter, size in zip(head, shape):
            sizes.setdefault(letter, size)
        for letter, size in zip(reversed(tail), reversed(shape)):
            sizes.setdefault(letter, size)
    contracted = [letter for letter in sizes if letter not in output_spec]
    out = _output_numel(node, rename)
    if len(operands) == 1:
        return sympy_numel(operands[0], rename) if contracted else _ZERO
    if not contracted:
        return out
    return 2 * out * sympy.Mul(*(sizes[letter] for letter in contracted))


def _einsum(node, rename):
    flops = _einsum_flops(node, rename)
    if flops is None:
        return _uncounted(node, rename)
    return _io_cost(node, rename, flops)


def _per_element(node, rename):
    constant = PER_ELEMENT_FLOPS[node.target.overloadpacket.__name__]
    return _io_cost(node, rename, constant * _output_numel(node, rename))


def _pointwise(node, rename):
    return _io_cost(node, rename, _output_numel(node, rename))


def _reduction(node, rename):
    constant = REDUCTION_FLOPS[node.target.overloadpacket.__name__]
    reduced = sympy_numel(_value(_argument(node, 0, "self")), rename)
    return _io_cost(node, rename, constant * reduced)


def _maybe_copy(node, rename):
    source = _value(node.args[0]) if node.args else None
    result = _first_tensor(node.meta["val"])
    if (
        is_tensor_value(source)
        and source.dtype == result.dtype
        and source.device == result.device
        and _is_contiguous(source)
    ):
        return Cost()
    return _io_cost(node, rename)


def _gather(node, rename):
    # read indices + the selected rows (output-sized) of the source, write the output
    source = node.args[0] if node.args else None
    source = source if isinstance(source, torch.fx.Node) else None
    written = _written_bytes(node, rename)
    return Cost(_ZERO, sympy.expand(_read_bytes(node, rename, skip=source) + 2 * written))


def _creation(node, rename):
    return Cost(_ZERO, sympy.expand(_written_bytes(node, rename)))


def _dropout(node, rename):
    if not _argument(node, 2, "train", True):
        return Cost()  # identity in eval
    return _pointwise(node, rename)


def _rules() -> dict[str, Callable[[torch.fx.Node, Rename | None], Cost]]:
    rules: dict[str, Callable[[torch.fx.Node, Rename | None], Cost]] = {}
    rules.update(dict.fromkeys(_VIEW_OPS, lambda node, rename: Cost()))
    rules.update(dict.fromkeys(_MAYBE_COPY_OPS, _maybe_copy))
    rules.update(dict.fromkeys(_COPY_OPS, _io_cost))
    rules.update(dict.fromkeys(_GATHER_OPS, _gather))
    rules.update(dict.fromkeys(_CREATION_OPS, _creation))
    rules.update(dict.fromkeys(_EMPTY_OPS, lambda node, rename: Cost()))
    rules.update(dict.fromkeys(PER_ELEMENT_FLOPS, _per_element))
    rules.update(dict.fromkeys(REDUCTION_FLOPS, _reduction))
    rules.update(dict.fromkeys(_ATTENTION_ARGUMENTS, _attention))
    rules.update(dict.fromkeys(("mm", "bmm", "matmul", "dot", "vdot", "mv", "inner"),
                               _matrix_product))
    rules.update(dict.fromkeys(("addmm", "baddbmm", "addmv"), _add_matrix_product))
    rules.update(dict.fromkeys(
        ("convolution", "_convolution", "conv1d", "conv2d", "conv3d",
         "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"), _convolution))
    rules["linear"] = _linear
    rules["einsum"] = _einsum
    rules["dropout"] = _dropout
    return rules


_RULES = _rules()


def _is_alias_only(target: torch._ops.OpOverload) -> bool:
    """Every result aliases an input without writing it: a view the tables do not list."""
    returns = target._schema.returns
    return bool(returns) and all(
        result.alias_info is not None and not result.alias_info.is_write for result in returns
    )


# ---------------------------------------------------------------------------------------------
# public


def node_cost(node: torch.fx.Node, rename: Rename | None = None) -> Cost:
    """FLOPs and bytes moved by one node of an exported ATen graph (conventions: module doc)."""
    if node.op in ("placeholder", "get_attr", "output"):
        return Cost()
    if "val" not in node.meta:
        # no recorded shape: a call_module guard or a node a pass created without metadata
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            return _uncounted(node, rename)
        return Cost()
    if not _has_tensor(node.meta["val"]):
        return Cost()  # shape arithmetic, asserts: no tensor data
    if node.op != "call_function":
        return _uncounted(node, rename)
    target = node.target
    if target is operator.getitem:
        return Cost()
    if not isinstance(target, torch._ops.OpOverload):
        return _uncounted(node, rename)
    rule = _RULES.get(target.overloadpacket.__name__)
    if rule is not None and target.namespace == "aten":
        return rule(node, rename)
    if torch.Tag.pointwise in target.tags:
        return _pointwise(node, rename)
    if _is_alias_only(target):
        return Cost()
    return _uncounted(node, rename)


def graph_cost(gm: torch.fx.GraphModule, rename: Rename | None = None) -> GraphCost:
    """Cost of every node of ``gm`` and their sum.

    Returns ``(total, per_node, uncounted)``: the summed `Cost`, a dict from node name to its
    `Cost` in graph order, and the sorted names of ops that had no FLOP rule.
    """
    per_node = {node.name: node_cost(node, rename) for node in gm.graph.nodes}
    uncounted = frozenset().union(*(cost.uncounted for cost in per_node.values()))
    total = Cost(
        sympy.expand(sympy.Add(*(cost.flops for cost in per_node.values()))),
        sympy.expand(sympy.Add(*(cost.bytes for cost in per_node.values()))),
        uncounted,
    )
    return GraphCost(total, per_node, tuple(sorted(uncounted)))


def evaluate(expr: sympy.Expr | int, values: Mapping[sympy.Symbol | str, int]) -> int | float:
    """Value of a cost expression at concrete sizes.

    ``values`` maps symbols, or their names, to sizes (e.g. from `shapes.symbol_values`);
    symbols are matched by name, so assumptions need not agree.  Returns an int when the result
    is integral, else a float.  Raises `slimline.errors.InputError` naming any symbol left
    without a value.
    """
    expr = sympy.sympify(expr)
    by_name = {(key if isinstance(key, str) else key.name): value for key, value in values.items()}
    missing = sorted(symbol.name for symbol in expr.free_symbols if symbol.name not in by_name)
    if missing:
        raise InputError(f"no value for {', '.join(missing)}", stage="cost",
                         where=f"evaluating {expr}",
                         hint="give every dimension a size, e.g. from shapes.symbol_values")
    result = expr.xreplace({
        symbol: sympy.Integer(by_name[symbol.name]) for symbol in expr.free_symbols
    })
    if result.is_Integer:
        return int(result)
    return float(result)
