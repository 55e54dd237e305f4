"""Bisect: when the final check fails, name the first pass and the first layer that broke it.

The pass: binary search over the graphs the pipeline kept after each applied pass, for the first
one whose outputs fail the check. The layer: run the graph before that pass and the graph after
it side by side, record the output of the last node of every module path, and name the first
module path (in execution order) whose output moved beyond tolerance.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from slimline.ir.graph import Graph, module_path

__all__ = ["bisect_failure", "first_diverging_layer"]


def bisect_failure(history: Any, fails: Callable[[Graph], bool]) -> dict | None:
    """The first applied pass after which ``fails(graph)`` holds, and the layer it broke."""
    applied = history.applied
    if not applied or not fails(applied[-1][1]):
        return None
    low, high = 0, len(applied) - 1  # invariant: applied[high] fails
    while low < high:
        middle = (low + high) // 2
        if fails(applied[middle][1]):
            high = middle
        else:
            low = middle + 1
    name, broken = applied[low]
    before = applied[low - 1][1] if low > 0 else history.original
    layer, detail = first_diverging_layer(before, broken)
    return {"pass": name, "layer": layer, "detail": detail}


def _module_outputs(graph: Graph) -> dict[str, torch.Tensor]:
    """The value of the last node of each module path, in execution order."""
    values: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            result = super().run_node(node)
            if node.op == "call_function" and isinstance(result, torch.Tensor):
                path = module_path(node)
                if path:
                    values.pop(path, None)  # keep insertion order = last write
                    values[path] = result.detach()
            return result

    flat_args = pytree.tree_leaves((graph.example_args, graph.example_kwargs))
    with torch.no_grad():
        Recorder(graph.module).run(*flat_args)
    return values


def first_diverging_layer(before: Graph, after: Graph, rtol: float = 1e-4) -> tuple[str, str]:
    try:
        reference = _module_outputs(before)
        candidate = _module_outputs(after)
    except Exception as error:  # the layer search is best effort; the pass name stands
        return "", f"layer search failed: {type(error).__name__}"
    for path, value in candidate.items():
        ref = reference.get(path)
        if ref is None or ref.shape != value.shape or not ref.is_floating_point():
            continue
        scale = float(ref.abs().max()) or 1.0
        error = float((value.double() - ref.double()).abs().max()) / scale
        if not error <= rtol:
            return path, f"output of {path!r} moved by relative error {error:.2e}"
    return "", "no single layer's output moved beyond tolerance; the error accumulates"
