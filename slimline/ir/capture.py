"""Capture: a user's ``nn.Module`` and example inputs → a slimline :class:`Graph`.

Uses ``torch.export`` (non-strict by default, strict on request) and keeps the unlifted
GraphModule (``ExportedProgram.module()``), whose parameters are ``get_attr`` nodes shared with
the user's model. Dynamic dimensions come from ``dynamic_shapes`` in torch.export's form, where a
dimension may also be given as a plain string: ``{"input_ids": {0: "batch", 1: "seq"}}``. Each
named dimension becomes a sympy symbol of that name on the Graph.

Failures become :class:`~slimline.errors.CaptureError` naming the construct and the module path
where it happened (found from the traceback), with what to try.
"""

from __future__ import annotations

import inspect
import re
import traceback
import warnings
from typing import Any

import sympy
import torch
import torch.utils._pytree as pytree
from torch.export import Dim

from slimline.errors import CaptureError, InputError
from slimline.ir.graph import Graph

__all__ = ["capture", "normalize_inputs", "normalize_dynamic_shapes", "locate_module"]


def normalize_inputs(model: Any, example_inputs: Any) -> tuple[tuple, dict]:
    """Check the model and inputs and return ``(args, kwargs)``.

    ``example_inputs`` is a tuple of positional inputs, a single tensor, a dict of keyword inputs,
    or a pair ``(args_tuple, kwargs_dict)``.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(
            f"expected a torch.nn.Module, got {type(model).__name__}",
            stage="check inputs", where="model argument",
            hint="pass the nn.Module itself (not a function, a state dict or a file path); "
                 "ONNX files go through target='onnxruntime'")
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif (isinstance(example_inputs, tuple) and len(example_inputs) == 2
          and isinstance(example_inputs[0], tuple) and isinstance(example_inputs[1], dict)):
        args, kwargs = example_inputs[0], dict(example_inputs[1])
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise InputError(
            f"example inputs must be a tensor, a tuple of inputs or a dict of keyword inputs, "
            f"got {type(example_inputs).__name__}",
            stage="check inputs", where="example_inputs",
            hint="wrap a single input as (x,)")
    leaves = pytree.tree_leaves((args, kwargs))
    if not any(isinstance(leaf, torch.Tensor) for leaf in leaves):
        raise InputError(
            "example inputs hold no tensor", stage="check inputs", where="example_inputs",
            hint="pass at least one example tensor of the shape the model expects")
    try:
        signature = inspect.signature(model.forward)
        signature.bind(*args, **kwargs)
    except TypeError as error:
        raise InputError(
            f"example inputs do not fit {type(model).__name__}.forward{signature}: {error}",
            stage="check inputs", where=f"{type(model).__name__}.forward",
            hint="pass inputs in the order forward() takes them") from None
    return args, kwargs


def normalize_dynamic_shapes(dynamic_shapes: Any) -> Any:
    """Turn string dimension names into ``torch.export.Dim`` objects (one per name)."""
    if dynamic_shapes is None:
        return None
    dims: dict[str, Any] = {}

    def convert(spec: Any) -> Any:
        if isinstance(spec, str):
            if spec not in dims:
                dims[spec] = Dim(spec)
            return dims[spec]
        if isinstance(spec, dict):
            return {key: convert(value) for key, value in spec.items()}
        if isinstance(spec, (list, tuple)):
            return type(spec)(convert(value) for value in spec)
        return spec

    return convert(dynamic_shapes)


def _dim_name(spec: Any) -> str | None:
    name = getattr(spec, "__name__", None)
    return name if isinstance(name, str) else None


def _declared_dims(model: torch.nn.Module, args: tuple, kwargs: dict,
                   dynamic_shapes: Any) -> list[tuple[int, int, str]]:
    """``(flat input index, dim, name)`` for every dimension the user named dynamic."""
    if dynamic_shapes is None:
        return []
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    if isinstance(dynamic_shapes, dict):
        per_param = dynamic_shapes
    else:
        names = list(bound.arguments)
        per_param = {names[i]: spec for i, spec in enumerate(dynamic_shapes) if i < len(names)}
    # flat order of placeholders = tree_flatten((args, kwargs))
    flat_index: dict[int, int] = {}
    leaves, _ = pytree.tree_flatten((args, kwargs))
    for index, leaf in enumerate(leaves):
        flat_index.setdefault(id(leaf), index)
    declared = []
    for name, spec in per_param.items():
        if name not in bound.arguments or spec is None:
            continue
        value = bound.arguments[name]
        value_leaves = pytree.tree_leaves(value)
        spec_leaves = [spec] if isinstance(value, torch.Tensor) else _spec_leaves(spec)
        for leaf, leaf_spec in zip(value_leaves, spec_leaves):
            if not isinstance(leaf, torch.Tensor) or leaf_spec is None:
                continue
            items = leaf_spec.items() if isinstance(leaf_spec, dict) else enumerate(leaf_spec)
            for dim, dim_spec in items:
                dim_name = _dim_name(dim_spec)
                if dim_name and id(leaf) in flat_index:
                    declared.append((flat_index[id(leaf)], int(dim), dim_name))
    return declared


def _spec_leaves(spec: Any) -> list:
    # a per-tensor spec is a dict {dim: Dim} or a list/tuple of Dim|None; containers hold those
    if isinstance(spec, dict) and all(isinstance(k, int) for k in spec):
        return [spec]
    if isinstance(spec, dict):
        return [leaf for value in spec.values() for leaf in _spec_leaves(value)]
    if isinstance(spec, (list, tuple)):
        if all(s is None or _dim_name(s) for s in spec):
            return [spec]
        return [leaf for value in spec for leaf in _spec_leaves(value)]
    return [spec]


def locate_module(model: torch.nn.Module, error: BaseException) -> str:
    """The deepest submodule of ``model`` whose ``forward`` is on the error's traceback."""
    paths = {id(module): name for name, module in model.named_modules()}
    found = ""
    for frame, _line in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in paths:
            found = paths[id(owner)] or type(model).__name__
    return found


_CONSTRUCT_PATTERNS = [
    (re.compile(r"data.dependent|GuardOnDataDependent|Could not guard on data-dependent", re.I),
     "data-dependent Python control flow (an `if`/loop on a tensor's value)",
     "replace the Python branch with torch.where / torch.cond, or mark the value static"),
    (re.compile(r"Constraints violated|specialized|not dynamic", re.I),
     "a dimension declared dynamic is treated as a constant by the model",
     "drop that dimension from dynamic_shapes, or remove the size check in the model"),
    (re.compile(r"Unsupported|not supported", re.I),
     "a Python construct torch.export does not support",
     "try strict=False (the default), or move the construct out of forward()"),
]


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *,
            dynamic_shapes: Any = None, strict: bool = False) -> Graph:
    """Capture ``model`` with torch.export into a :class:`Graph`."""
    kwargs = kwargs or {}
    dynamic_shapes = normalize_dynamic_shapes(dynamic_shapes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes,
                                           strict=strict)
    except Exception as error:  # torch raises many types; all become a CaptureError
        text = f"{type(error).__name__}: {error}"
        construct, hint = "a construct torch.export could not capture", \
            "simplify the failing module, or call optimize(..., strict=True/False) the other way"
        for pattern, what, what_to_try in _CONSTRUCT_PATTERNS:
            if pattern.search(text):
                construct, hint = what, what_to_try
                break
        where = locate_module(model, error) or type(model).__name__
        first_line = text.strip().splitlines()[0][:300]
        suggested = re.search(r"Suggested fixes:\s*\n(.*?)(?:\n\n|$)", text, re.S)
        if suggested:
            fixes = "; ".join(line.strip() for line in suggested.group(1).splitlines() if line.strip())
            hint = f"{hint} (torch.export suggests: {fixes})"
        detail = re.findall(r"^\s*- (.+)$", text, re.M)
        if detail:
            first_line += " — " + " ".join(detail)[:400]
        raise CaptureError(f"cannot capture {type(model).__name__}: {construct} ({first_line})",
                           stage="capture", where=f"module {where!r}", hint=hint) from error
    module = exported.module()
    graph = Graph(module, tuple(args), dict(kwargs), dynamic_shapes=dynamic_shapes,
                  source_name=type(model).__name__, strict=strict)
    graph.rename = _rename_map(graph, _declared_dims(model, args, kwargs, dynamic_shapes))
    return graph


def _rename_map(graph: Graph, declared: list[tuple[int, int, str]]) -> dict[sympy.Symbol, sympy.Symbol]:
    placeholders = [n for n in graph.fx.nodes if n.op == "placeholder"]
    rename: dict[sympy.Symbol, sympy.Symbol] = {}
    for index, dim, name in declared:
        if index >= len(placeholders):
            continue
        value = placeholders[index].meta.get("val")
        if not isinstance(value, torch.Tensor) or dim >= value.dim():
            continue
        size = value.shape[dim]
        if isinstance(size, torch.SymInt):
            expr = size.node.expr
            if isinstance(expr, sympy.Symbol):
                rename.setdefault(expr, sympy.Symbol(name, integer=True, positive=True))
    return rename
