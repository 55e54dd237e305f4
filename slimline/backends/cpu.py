"""CPU backend: run the rewritten graph in torch.

The GraphModule runs eagerly, op by op, exactly as the passes left it. Its weights are shared
with the user's model, read-only.
"""

from __future__ import annotations

from typing import Any, Callable

from slimline.ir.graph import Graph

__all__ = ["build"]


def build(graph: Graph, workdir: Any = None) -> tuple[Callable, dict]:
    """A callable that runs ``graph`` on the CPU, and facts about it for the report."""
    return graph.module, {"runtime": "torch eager (FX GraphModule)"}
