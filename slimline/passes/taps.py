"""Shared helpers of the passes that rewrite linear sites from data (lowrank, monarch).

- :func:`weight_readers`: who reads each constant tensor (tied weights show up as two readers);
- :func:`site_bias`: the bias tensor of an ``aten.linear`` site, if any;
- :func:`run_tapped`: run a graph on one calibration sample, handing the input and output of each
  watched node to a sink (covariances, teacher and student features).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree

from slimline.ir.graph import Graph

__all__ = ["weight_readers", "site_bias", "run_tapped"]


def weight_readers(graph: Graph) -> dict[int, list[fx.Node]]:
    """Users of every constant tensor, keyed by the tensor's storage (tied weights share one)."""
    readers: dict[int, list[fx.Node]] = {}
    for node in graph.fx.nodes:
        tensor = graph.attribute(node)
        if tensor is not None:
            readers.setdefault(tensor.untyped_storage().data_ptr(), []).extend(node.users)
    return readers


def site_bias(graph: Graph, node: fx.Node) -> torch.Tensor | None:
    """The bias of a linear site, or None."""
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return graph.attribute(bias) if isinstance(bias, fx.Node) else None


class _Tap(fx.Interpreter):
    """Runs a graph and hands the input and output of each watched node to ``sink(key, x, y)``."""

    def __init__(self, module: fx.GraphModule, watched: dict[fx.Node, Any], sink: Callable):
        super().__init__(module, garbage_collect_values=True)
        self.watched, self.sink = watched, sink

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        key = self.watched.get(node)
        if key is not None:
            self.sink(key, self.env[node.args[0]] if node.args else None, value)
        return value


def run_tapped(module: fx.GraphModule, sample: tuple, watched: dict, sink: Callable) -> Any:
    """Run ``module`` on ``sample = (args, kwargs)``; ``sink(watched[node], input, output)``."""
    args, kwargs = sample
    spec = getattr(module, "_in_spec", None)
    flat = fx_pytree.tree_flatten_spec((args, kwargs), spec) if spec is not None else list(args)
    output = _Tap(module, watched, sink).run(*flat, enable_io_processing=False)
    return module.graph._codegen.process_outputs(output)
