"""Dead-code elimination: drop nodes whose results nobody uses.

Exact. Runs last, and after any pass that leaves orphans behind. Nodes with side effects (export's
input guards, in-place writes, asserts) are kept: torch.fx's own ``eliminate_dead_code`` knows
which ops are impure. Weights no longer read by any node are dropped from the module.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimline.ir.graph import Graph
from slimline.passes.base import PassContext, PassResult

NAME = "dead_code"
EXACT = True
TARGETS = {"cpu", "cuda", "onnxruntime"}


@dataclass
class Config:
    drop_unused_weights: bool = True


def run(graph: Graph, config: Config, context: PassContext) -> PassResult:
    before = len(graph.fx.nodes)
    graph.fx.eliminate_dead_code()
    removed_nodes = before - len(graph.fx.nodes)
    removed_weights = 0
    if config.drop_unused_weights:
        used = {str(n.target) for n in graph.fx.nodes if n.op == "get_attr"}
        for name, _buffer in list(graph.module.named_buffers(recurse=False)):
            if name.startswith("slimline_") and name not in used:
                delattr(graph.module, name)
                removed_weights += 1
    graph.recompile()
    changed = removed_nodes > 0 or removed_weights > 0
    return PassResult(graph, changed, {"nodes_removed": removed_nodes,
                                       "weights_dropped": removed_weights})
