"""CPU backend: run the rewritten graph in torch, with each dense layer's kernel chosen by measurement.

The GraphModule runs eagerly, op by op. With ``tune`` other than ``"off"``, every float32
``aten.linear`` whose weight is a constant becomes a kernel instance of the autotuner's
``cpu_linear`` family (``F.linear``, the incumbent; ``x @ Wᵀ`` on a pre-transposed weight; oneDNN
on a pre-packed weight), keyed by its shape at the example inputs; where the tuner's winner beats
``F.linear`` beyond the measured noise, a private copy of the graph calls that implementation
instead. The user's weights are never written: transposed and packed weights are new tensors.
The choices are exact (the same products, summed by another kernel: differences at rounding
level), and the final check of :func:`slimline.optimize` compares the result with the model.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.fx as fx

from slimline.ir.graph import Graph, module_path, stamp

__all__ = ["build", "linear_instances", "TIME_BUDGET_S"]

aten = torch.ops.aten

# seconds of measurement per optimize() call: a CPU layer's candidates differ by percents, and
# measuring is cheap once the persistent cache holds the shapes
TIME_BUDGET_S = {"lite": 3.0, "max": 20.0, "cache": 0.0}


def build(graph: Graph, workdir: Any = None, tune: str = "off") -> tuple[Callable, dict]:
    """A callable that runs ``graph`` on the CPU, and facts about it for the report."""
    facts: dict[str, Any] = {"runtime": "torch eager (FX GraphModule)"}
    if tune == "off":
        return graph.module, facts
    sites = linear_instances(graph)
    if not sites:
        return graph.module, facts
    from slimline.autotune import tune as run_tuner
    from slimline.autotune.tuner import report_rows

    records = run_tuner([instance for _node, instance in sites], mode=tune,
                        time_budget_s=TIME_BUDGET_S.get(tune, 0.0), min_share_s=0.05)
    facts["kernels"] = report_rows(records)
    facts["kernel_summary"] = {k: v for k, v in records.summary.items()
                               if isinstance(v, (int, float, str)) or v is None}
    choices = {node.name: record.config.get("impl", "linear") for (node, _i), record in zip(sites, records)}
    if all(impl == "linear" for impl in choices.values()):
        return graph.module, facts
    tuned = graph.copy()
    counts = _apply(tuned, choices)
    facts["runtime"] = ("torch eager (FX GraphModule), dense layers by measurement: "
                        + ", ".join(f"{impl} ×{count}" for impl, count in sorted(counts.items())))
    return tuned.module, facts


def linear_instances(graph: Graph) -> list[tuple[fx.Node, Any]]:
    """``(node, KernelInstance)`` for every float32 linear with a constant 2-D weight."""
    from slimline.autotune.space import Problem
    from slimline.autotune.tuner import KernelInstance

    found = []
    for node in graph.fx.nodes:
        if node.op != "call_function" or node.target != aten.linear.default:
            continue
        x, weight = node.args[0], graph.attribute(node.args[1])
        value = x.meta.get("val") if isinstance(x, fx.Node) else None
        if weight is None or weight.dim() != 2 or weight.dtype != torch.float32 or value is None:
            continue
        rows = _example_rows(value)
        if rows is None:
            continue
        out_features, in_features = weight.shape
        problem = Problem.make("cpu_linear", M=rows, N=int(out_features), K=int(in_features),
                               dtype="fp32")
        found.append((node, KernelInstance(module_path(node) or node.name, problem)))
    return found


def _example_rows(value: Any) -> int | None:
    """Rows of the matmul (the product of the leading sizes) at the example inputs."""
    sizes = []
    for size in value.shape[:-1]:
        if isinstance(size, torch.SymInt):
            hint = size.node.hint
            if hint is None:
                return None
            size = hint
        sizes.append(int(size))
    return max(1, math.prod(sizes))


def _apply(graph: Graph, choices: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in list(graph.fx.nodes):
        impl = choices.get(node.name, "linear")
        if impl == "linear" or node.op != "call_function" or node.target != aten.linear.default:
            continue
        x, weight_node = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        weight = graph.attribute(weight_node)
        with graph.fx.inserting_before(node):
            if impl == "matmul_t":
                transposed = graph.add_parameter("linear_wt", weight.t().contiguous(), before=node)
                if bias is not None:
                    new = graph.fx.call_function(aten.addmm.default, (bias, x, transposed)) \
                        if _is_2d(x) else graph.fx.call_function(
                            aten.add.Tensor, (graph.fx.call_function(aten.matmul.default, (x, transposed)), bias))
                else:
                    new = graph.fx.call_function(aten.matmul.default, (x, transposed))
            elif impl == "mkldnn":
                rows = _example_rows(x.meta["val"]) or 1
                packed = graph.add_parameter("linear_packed",
                                             torch.ops.mkldnn._reorder_linear_weight(weight, rows),
                                             before=node)
                new = graph.fx.call_function(torch.ops.mkldnn._linear_pointwise.default,
                                             (x, packed, bias, "none", [], ""))
            else:
                continue
        new.meta["val"] = node.meta.get("val")
        stamp(new, "cpu_backend", node)
        node.replace_all_uses_with(new)
        graph.fx.erase_node(node)
        counts[impl] = counts.get(impl, 0) + 1
    graph.fx.eliminate_dead_code()
    graph.recompile()
    return counts


def _is_2d(x: Any) -> bool:
    value = x.meta.get("val") if isinstance(x, fx.Node) else None
    return value is not None and value.dim() == 2
