"""Shared helpers of the passes that rewrite linear sites from data (lowrank, monarch).

- :func:`weight_readers`: who reads each constant tensor (tied weights show up as two readers);
- :func:`site_bias`: the bias tensor of an ``aten.linear`` site, if any;
- :func:`run_tapped`: run a graph on one calibration sample, handing the input and output of each
  watched node to a sink (covariances, teacher and student features);
- :func:`site_params`, :func:`flops_text`, :func:`calibration_samples`: the per-layer table's
  figures and the samples (with the original's outputs) a pass measures on.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree

from slimline.ir.graph import Graph
from slimline.passes.base import PassContext

__all__ = ["weight_readers", "site_bias", "site_params", "run_tapped", "flops_text",
           "calibration_samples"]


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
            first = node.args[0] if node.args else None  # a get_attr's is its name
            self.sink(key, self.env[first] if isinstance(first, fx.Node) else None, value)
        return value


def run_tapped(module: fx.GraphModule, sample: tuple, watched: dict, sink: Callable) -> Any:
    """Run ``module`` on ``sample = (args, kwargs)``; ``sink(watched[node], input, output)``."""
    args, kwargs = sample
    spec = getattr(module, "_in_spec", None)
    flat = fx_pytree.tree_flatten_spec((args, kwargs), spec) if spec is not None else list(args)
    output = _Tap(module, watched, sink).run(*flat, enable_io_processing=False)
    return module.graph._codegen.process_outputs(output)


def site_params(graph: Graph, node: fx.Node) -> int:
    """Weight and bias elements of a linear site."""
    weight = graph.attribute(node.args[1]) if isinstance(node.args[1], fx.Node) else None
    bias = site_bias(graph, node)
    return (0 if weight is None else weight.numel()) + (0 if bias is None else bias.numel())


def flops_text(nodes: list[fx.Node], graph: Graph) -> str:
    """The nodes' FLOPs as sympy text, or ``"?"`` without shape metadata."""
    from slimline.ir.cost import node_cost

    try:
        return str(sum((node_cost(n, graph.rename).flops for n in nodes), 0))
    except Exception:  # no shape metadata: the report says so rather than guessing
        return "?"


def calibration_samples(graph: Graph, context: PassContext) -> tuple[list, list]:
    """The calibration samples (default: the example inputs) and the original's outputs on them."""
    samples = list(context.calibration or []) or [(graph.example_args, graph.example_kwargs)]
    references = context.reference_outputs
    if references is None or len(references) != len(samples):
        references = [graph.run(a, k) for a, k in samples]
    return samples, list(references)
