"""The pass contract.

A pass is one file in ``slimline/passes/`` exposing one entry point::

    NAME = "lowrank"                 # the name users and the report know it by
    EXACT = False                    # exact rewrites are checked at tight tolerance
    TARGETS = {"cpu", "cuda", "onnxruntime"}

    @dataclass
    class Config: ...                # defaults and tunable ranges side by side (see `tunable`)

    def run(graph: Graph, config: Config, context: PassContext) -> PassResult

``run`` receives a private copy of the graph (see :meth:`Graph.copy`) and may edit it in place;
it never writes into existing weight tensors. Every node it creates is stamped with
:func:`slimline.ir.graph.stamp`. What it did is counted in ``stats`` (counters, not prints); what
it decided per layer goes into ``decisions``, and a refusal carries its reason in ``why_not``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

from slimline.ir.graph import Graph

__all__ = ["PassContext", "PassResult", "LayerDecision", "Reason", "tunable", "pass_spec",
           "PassSpec"]


class Reason(str):
    """A refusal: a check that fails returns one of these instead of ``False``."""


def tunable(default: Any, choices: Any = None, doc: str = "") -> Any:
    """A config field whose default and tunable range are declared together."""
    return field(default=default, metadata={"choices": choices, "doc": doc})


@dataclass
class LayerDecision:
    """One line of the per-layer table: what a pass decided for one site, and why."""

    module_path: str
    op: str
    decision: str
    pass_name: str
    params_before: int = 0
    params_after: int = 0
    flops_before: str = "0"
    flops_after: str = "0"
    error: float | None = None
    why_not: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PassContext:
    """What a pass may know about the run it is part of."""

    target: str
    mode: str
    calibration: list | None = None
    budget_share: float | None = None
    reference_outputs: Any = None
    extra: dict = field(default_factory=dict)


@dataclass
class PassResult:
    graph: Graph
    changed: bool
    stats: dict[str, float] = field(default_factory=dict)
    decisions: list[LayerDecision] = field(default_factory=list)


@dataclass(frozen=True)
class PassSpec:
    """A pass module seen through its contract."""

    name: str
    exact: bool
    targets: frozenset
    config_type: type
    run: Callable[[Graph, Any, PassContext], PassResult]
    doc: str


def pass_spec(module: ModuleType) -> PassSpec:
    """Read a pass module's contract (NAME, EXACT, TARGETS, Config, run)."""
    return PassSpec(name=module.NAME, exact=module.EXACT, targets=frozenset(module.TARGETS),
                    config_type=module.Config, run=module.run,
                    doc=(module.__doc__ or "").strip().splitlines()[0])
