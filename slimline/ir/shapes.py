"""Symbolic tensor shapes as sympy expressions.

`torch.export` records every value's shape in ``node.meta["val"]``: a FakeTensor whose sizes are
Python ints (static dimensions) or ``torch.SymInt`` (dynamic ones).  A SymInt carries a sympy
expression over torch's internal symbols (``s77``); this module turns shapes into tuples of sympy
expressions and swaps the internal symbols for the user's dimension names.

Conventions
-----------
- A shape is a ``tuple[sympy.Expr, ...]``: ints become ``sympy.Integer``, SymInts become their
  expression with the renaming applied (``xreplace``, so it is a pure symbol swap, no rewriting).
- User dimension symbols are made by `dim_symbol`: ``sympy.Symbol(name, integer=True,
  positive=True)``, the same assumptions torch gives its own size symbols.  sympy compares
  symbols by name *and* assumptions, so build user symbols with `dim_symbol` (or pass names as
  strings to `symbol_values` / `slimline.ir.cost.evaluate`, which match by name).
- A renaming is a ``Mapping[sympy.Symbol, sympy.Expr]`` from torch's symbol to the user's
  expression (normally another symbol).  Internal symbols nobody named stay as they are.
- Bytes use the dtype's storage size; the sub-byte dtypes ``torch.int1..int7`` and
  ``torch.uint1..uint7`` count ``bits / 8`` bytes per element (a ``sympy.Rational``), as if packed.
- Placeholder indices are positions among the graph's ``placeholder`` nodes in graph order.  For
  ``ExportedProgram.module()`` those are the flattened user inputs (parameters are ``get_attr``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sympy
import torch
import torch.fx

from slimline.errors import InputError

__all__ = [
    "Rename",
    "dim_symbol",
    "sympy_shape",
    "sympy_numel",
    "dtype_bytes",
    "tensor_bytes",
    "is_tensor_value",
    "placeholder_nodes",
    "rename_map_from_placeholders",
    "symbol_values",
]

Rename = Mapping[sympy.Symbol, sympy.Expr]

_SUB_BYTE_DTYPE = re.compile(r"^torch\.u?int([1-7])$")


def dim_symbol(name: str) -> sympy.Symbol:
    """The sympy symbol slimline uses for the user's dimension ``name`` (integer, positive)."""
    return sympy.Symbol(name, integer=True, positive=True)


def _size_expr(size: int | torch.SymInt, rename: Rename | None) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        expr = sympy.sympify(size.node.expr)
        return expr.xreplace(dict(rename)) if rename else expr
    return sympy.Integer(int(size))


def is_tensor_value(value: Any) -> bool:
    """True for a (fake) tensor: anything `sympy_shape` and `tensor_bytes` accept as a tensor."""
    return isinstance(value, torch.Tensor)


def sympy_shape(value: Any, rename: Rename | None = None) -> tuple[sympy.Expr, ...]:
    """Shape of a (fake) tensor, a ``torch.Size`` or a sequence of ints/SymInts, as sympy.

    >>> sympy_shape(torch.empty(2, 3))
    (2, 3)
    """
    sizes = value.shape if isinstance(value, torch.Tensor) else value
    return tuple(_size_expr(size, rename) for size in sizes)


def sympy_numel(value: Any, rename: Rename | None = None) -> sympy.Expr:
    """Number of elements of a (fake) tensor or shape: the product of `sympy_shape`."""
    return sympy.Mul(*sympy_shape(value, rename))


def dtype_bytes(dtype: torch.dtype) -> sympy.Rational:
    """Bytes per element of ``dtype``; ``bits/8`` for the sub-byte integer dtypes."""
    sub_byte = _SUB_BYTE_DTYPE.match(str(dtype))
    if sub_byte:
        return sympy.Rational(int(sub_byte.group(1)), 8)
    return sympy.Integer(dtype.itemsize)


def tensor_bytes(value: Any, rename: Rename | None = None) -> sympy.Expr:
    """Bytes of a (fake) tensor's logical contents: numel × `dtype_bytes`.

    A tuple/list of tensors counts the sum of its tensors; anything else (SymInt, None) is 0.
    """
    if isinstance(value, torch.Tensor):
        return sympy_numel(value, rename) * dtype_bytes(value.dtype)
    if isinstance(value, (tuple, list)):
        return sympy.Add(*(tensor_bytes(item, rename) for item in value))
    return sympy.Integer(0)


def placeholder_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The graph's placeholder nodes in order (their position is the input index)."""
    return [node for node in gm.graph.nodes if node.op == "placeholder"]


def _placeholder_value(node: torch.fx.Node) -> Any:
    return node.meta.get("val", node.meta.get("example_value"))


def rename_map_from_placeholders(
    gm: torch.fx.GraphModule,
    dynamic_dims: Mapping[tuple[int | str, int], str],
) -> dict[sympy.Symbol, sympy.Symbol]:
    """Map torch's size symbols to the user's dimension names.

    ``dynamic_dims`` says which input dimension the user declared dynamic under which name:
    ``{(0, 0): "batch", (0, 1): "seq", (1, 0): "batch"}``.  An input is named by its placeholder
    index or by the placeholder's name in the graph (export lower-cases argument names:
    ``mask_BS`` becomes ``mask_bs``).  Several inputs may share one torch symbol (the same
    ``Dim`` passed twice, or dimensions export found equal); they must then carry the same name.

    Dimensions whose size is not a plain symbol are skipped: an int (export specialized it, or it
    was never dynamic) or a compound expression such as ``2*s0`` from a derived ``Dim`` (it is
    renamed through its base symbol when that one is named).

    Raises `slimline.errors.InputError` for an unknown input or dimension, for one symbol given
    two names, and for one name given to two different symbols.
    """
    placeholders = placeholder_nodes(gm)
    by_name = {node.name: node for node in placeholders}
    symbol_to_name: dict[sympy.Symbol, str] = {}
    name_to_symbol: dict[str, sympy.Symbol] = {}
    for (which, dim), name in dynamic_dims.items():
        where = f"dynamic dimension {name!r} at input {which!r}, dimension {dim}"
        if isinstance(which, str):
            if which not in by_name:
                raise InputError(f"the graph has no input named {which!r}", stage="capture",
                                 where=where, hint=f"name one of {sorted(by_name)} or use its index")
            node = by_name[which]
        else:
            if not 0 <= which < len(placeholders):
                raise InputError(f"input index {which} is out of range", stage="capture",
                                 where=where,
                                 hint=f"the graph has {len(placeholders)} inputs, counted from 0")
            node = placeholders[which]
        value = _placeholder_value(node)
        if not is_tensor_value(value):
            raise InputError(f"input {node.name!r} is not a tensor", stage="capture", where=where,
                             hint="declare dynamic dimensions on tensor inputs only")
        shape = sympy_shape(value)
        if not -len(shape) <= dim < len(shape):
            raise InputError(f"input {node.name!r} has {len(shape)} dimensions", stage="capture",
                             where=where, hint=f"pick a dimension in 0..{len(shape) - 1}")
        expr = shape[dim]
        if not isinstance(expr, sympy.Symbol):
            continue
        if symbol_to_name.get(expr, name) != name:
            raise InputError(
                f"this dimension is always the same size as the one named "
                f"{symbol_to_name[expr]!r}, so it cannot also be named {name!r}",
                stage="capture", where=where, hint="give both dimensions one name")
        if name_to_symbol.get(name, expr) != expr:
            raise InputError(
                f"the name {name!r} is given to two sizes that export keeps apart "
                f"({name_to_symbol[name]} and {expr})",
                stage="capture", where=where,
                hint="use two names, or pass the same torch.export.Dim for both")
        symbol_to_name[expr] = name
        name_to_symbol[name] = expr
    return {symbol: dim_symbol(name) for symbol, name in symbol_to_name.items()}


def symbol_values(
    gm: torch.fx.GraphModule,
    concrete_inputs: Sequence[Any] | Iterable[Any],
    rename: Rename | None = None,
) -> dict[sympy.Symbol, int]:
    """Values of the size symbols for concrete inputs, ready for ``cost.evaluate``.

    ``concrete_inputs`` are the flattened inputs in placeholder order.  Every placeholder
    dimension whose (renamed) size is a plain symbol is read off the matching concrete tensor;
    keys are the renamed symbols (user names) and, for unnamed ones, torch's own symbols.
    Raises `slimline.errors.InputError` when the count of inputs or of their dimensions is wrong,
    or when two inputs disagree about one symbol.
    """
    inputs = list(concrete_inputs)
    placeholders = placeholder_nodes(gm)
    if len(inputs) != len(placeholders):
        raise InputError(f"got {len(inputs)} concrete inputs for a graph with "
                         f"{len(placeholders)} inputs", stage="cost", where="symbol_values",
                         hint="pass the flattened inputs in the order the graph takes them")
    values: dict[sympy.Symbol, int] = {}
    for node, concrete in zip(placeholders, inputs):
        value = _placeholder_value(node)
        if not (is_tensor_value(value) and isinstance(concrete, torch.Tensor)):
            continue
        shape = sympy_shape(value, rename)
        if len(shape) != concrete.dim():
            raise InputError(f"the graph's input has {len(shape)} dimensions, the concrete "
                             f"tensor {concrete.dim()}", stage="cost", where=f"input {node.name!r}",
                             hint="pass inputs shaped like the example inputs")
        for dim, (expr, size) in enumerate(zip(shape, concrete.shape)):
            if not isinstance(expr, sympy.Symbol):
                continue
            if values.setdefault(expr, int(size)) != int(size):
                raise InputError(
                    f"{expr} = {int(size)} here, but another input says {expr} = {values[expr]}",
                    stage="cost", where=f"input {node.name!r}, dimension {dim}",
                    hint="inputs that share a dimension must agree on its size")
    return values
