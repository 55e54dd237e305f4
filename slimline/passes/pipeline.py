"""The pipeline: every pass, in the order it runs, one line each.

After each pass the graph is verified: exact passes at tight tolerance, approximate passes
against their share of the accuracy budget. A pass that raises or breaks its check is rolled
back (the graph before it is kept) and the report says why. ``lossless`` runs exact passes only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

from slimline.errors import ConfigError, SlimlineError
from slimline.ir.graph import Graph
from slimline.passes import canonicalize_linear, dead_code, fuse_attention, fuse_norm
from slimline.passes import fft_conv
from slimline.passes import lowrank
from slimline.passes import monarch
from slimline.passes import quantize
from slimline.passes import fuse_qkv
from slimline.passes.base import LayerDecision, PassContext, PassSpec, pass_spec
from slimline.report import PassRecord, Report
from slimline.verify import Verification

__all__ = ["PIPELINE", "CLEANUPS", "MODES", "select_passes", "run_pipeline", "PipelineStep"]

PIPELINE: list[PassSpec] = [
    pass_spec(canonicalize_linear),  # one form for dense layers: aten.linear(x, W, b)
    pass_spec(fuse_attention),       # hand-written softmax(Q·Kᵀ·scale + mask)·V -> one SDPA call
    pass_spec(fuse_qkv),             # Q, K, V projections of one attention site -> one linear + split
    pass_spec(fuse_norm),            # hand-written RMSNorm / LayerNorm chains -> one norm op
    pass_spec(fft_conv),             # long depthwise/grouped conv1d -> rfft · filter spectrum -> irfft
    pass_spec(lowrank),              # dense W -> two thinner linears B·A, ranks inside the budget
    pass_spec(monarch),              # dense W -> block-diagonal R, permute, block-diagonal L (Monarch), gated by SVD and budget
    pass_spec(quantize),             # dense W -> 2-8-bit packed weights (RTN/GPTQ), sensitive layers kept
    pass_spec(dead_code),            # drop nodes and weights nobody reads
]

# passes that always run, whatever `passes=` asks for: later passes rely on them
CLEANUPS = frozenset({"canonicalize_linear", "dead_code"})
MODES = ("lossless", "balanced", "max")


@dataclass
class PipelineStep:
    spec: PassSpec
    config: Any


@dataclass
class History:
    """The graph after each applied pass, for bisecting a failing final check."""

    original: Graph
    applied: list[tuple[str, Graph]] = field(default_factory=list)


def select_passes(mode: str, passes: Any, target: str) -> list[PipelineStep]:
    """The steps to run for a mode, optionally narrowed by ``passes``.

    ``passes`` is None (the mode's preset), a list of pass names, or a dict of pass name →
    config overrides (a dict of field values, or a Config instance).
    """
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}", stage="configure", where="optimize(mode=...)",
                          hint=f"use one of: {', '.join(MODES)}")
    by_name = {spec.name: spec for spec in PIPELINE}
    overrides: dict[str, Any] = {}
    if passes is not None:
        requested = dict(passes) if isinstance(passes, dict) else {name: None for name in passes}
        unknown = sorted(set(requested) - set(by_name))
        if unknown:
            raise ConfigError(f"unknown pass name(s): {', '.join(map(repr, unknown))}",
                              stage="configure", where="optimize(passes=...)",
                              hint=f"valid passes: {', '.join(by_name)}")
        overrides = requested
    steps = []
    for spec in PIPELINE:
        wanted = spec.name in CLEANUPS or (spec.name in overrides if passes is not None
                                           else (spec.exact or mode != "lossless"))
        if not wanted:
            continue
        steps.append(PipelineStep(spec, _config(spec, overrides.get(spec.name))))
    return steps


def _config(spec: PassSpec, override: Any) -> Any:
    if override is None:
        return spec.config_type()
    if isinstance(override, spec.config_type):
        return override
    if isinstance(override, dict):
        known = {f.name for f in fields(spec.config_type)}
        unknown = sorted(set(override) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for pass {spec.name!r}",
                              stage="configure", where=f"passes[{spec.name!r}]",
                              hint=f"options of {spec.name}: {', '.join(sorted(known))}")
        return replace(spec.config_type(), **override)
    raise ConfigError(f"config for pass {spec.name!r} must be a dict or {spec.config_type.__name__}",
                      stage="configure", where=f"passes[{spec.name!r}]")


def run_pipeline(graph: Graph, steps: list[PipelineStep], context: PassContext,
                 check: Callable[[Graph, bool, float], Verification], report: Report
                 ) -> tuple[Graph, History, list[LayerDecision]]:
    """Run ``steps`` in order, verifying after each; roll back a pass that fails its check.

    ``check(graph, exact, budget_share)`` compares the graph with the original model.
    """
    history = History(graph)
    decisions: list[LayerDecision] = []
    approximate = [s for s in steps if not s.spec.exact]
    share = 1.0 / len(approximate) if approximate else 1.0
    group = _choice_group(steps, context)
    lossy_before = False
    for step in steps:
        spec = step.spec
        if group and step in group:
            if step is group[0]:
                before = graph
                graph = _run_choice(graph, group, context, check, report, history, decisions,
                                    share * len(group))
                lossy_before = lossy_before or graph is not before
            continue
        if context.target not in spec.targets:
            report.passes.append(PassRecord(spec.name, spec.exact, "skipped",
                                            f"does not serve target {context.target!r}"))
            continue
        start = time.perf_counter()
        candidate = graph.copy()
        context.budget_share = None if spec.exact else share
        try:
            result = spec.run(candidate, step.config, context)
        except SlimlineError as error:
            report.passes.append(PassRecord(spec.name, spec.exact, "rolled back",
                                            f"refused: {error.message}",
                                            time.perf_counter() - start))
            continue
        except Exception as error:  # a pass bug must not take the user's run down
            report.passes.append(PassRecord(spec.name, spec.exact, "rolled back",
                                            f"pass raised {type(error).__name__}: {error}"[:300],
                                            time.perf_counter() - start))
            continue
        if not result.changed:
            report.passes.append(PassRecord(spec.name, spec.exact, "unchanged", "",
                                            time.perf_counter() - start, result.stats))
            decisions.extend(result.decisions)
            continue
        if spec.exact and lossy_before and context.calibration:
            # an exact pass after a lossy one: judged against the graph it was given (the
            # original model is already approximated away)
            verification = _same_as(graph, result.graph, context.calibration)
        else:
            verification = check(result.graph, spec.exact, share)
        seconds = time.perf_counter() - start
        if not verification.passed:
            report.passes.append(PassRecord(spec.name, spec.exact, "rolled back",
                                            f"broke its check: {verification.verdict}", seconds,
                                            result.stats, verification.to_json()))
            continue
        graph = result.graph
        lossy_before = lossy_before or not spec.exact
        history.applied.append((spec.name, graph))
        decisions.extend(result.decisions)
        report.passes.append(PassRecord(spec.name, spec.exact, "applied", "", seconds,
                                        result.stats, verification.to_json()))
    return graph, history, decisions


def _choice_group(steps: list[PipelineStep], context: PassContext) -> list[PipelineStep]:
    """The lossy structural passes the implementation choice runs together, or [] for none.

    It runs when asked (``context.extra["choose"]``: ``tune`` is not ``"off"``), when at least two
    techniques it offers on this target are selected, and when none of them was given a config
    of its own (a user who sets a pass's knobs gets that pass, run its own way).
    """
    if not context.extra.get("choose") or context.mode == "lossless":
        return []
    from slimline.autotune.choose import default_options

    offered = {option.technique for option in default_options(context.target)}
    group = [step for step in steps if step.spec.name in offered and not step.spec.exact
             and context.target in step.spec.targets]
    if len(group) < 2 or any(step.config != step.spec.config_type() for step in group):
        return []
    return group


def _run_choice(graph: Graph, group: list[PipelineStep], context: PassContext,
                check: Callable[[Graph, bool, float], Verification], report: Report,
                history: History, decisions: list[LayerDecision], share: float) -> Graph:
    """Dense / low-rank / Monarch / low-bit per layer under the group's budget share."""
    from slimline.autotune.choose import choose
    from slimline.budget import MODE_BUDGETS, Budget

    start = time.perf_counter()
    budget = context.extra.get("budget") or MODE_BUDGETS.get(context.mode) or Budget("cosine", 0.01)
    budget = replace(budget, max_loss=budget.max_loss * share)
    timing = "modelled" if context.extra.get("tune") == "cache" else "measured"
    specs = {step.spec.name: step.spec for step in group}
    try:
        result = choose(graph, specs, context, budget, timing=timing)
    except SlimlineError as error:
        for step in group:
            report.passes.append(PassRecord(step.spec.name, False, "rolled back",
                                            f"implementation choice refused: {error.message}",
                                            time.perf_counter() - start))
        return graph
    report.tuning["implementations"] = result.to_json()
    seconds = time.perf_counter() - start
    by_technique = {name: [r for t, r in result.results if t == name] for name in specs}
    verification = check(result.graph, False, share) if result.changed else None
    if verification is not None and not verification.passed:
        for step in group:
            report.passes.append(PassRecord(step.spec.name, False, "rolled back",
                                            f"implementation choice broke its check: "
                                            f"{verification.verdict}", seconds))
        return graph
    for step in group:
        results = by_technique[step.spec.name]
        changed = any(r.changed for r in results)
        stats: dict[str, float] = {}
        for r in results:
            for key, value in r.stats.items():
                if isinstance(value, (int, float)):
                    stats[key] = stats.get(key, 0) + value
        for r in results:
            decisions.extend(d for d in r.decisions if d.why_not is None)
        report.passes.append(PassRecord(
            step.spec.name, False, "applied" if changed else "unchanged",
            "" if changed else "the implementation choice gave it no layer", seconds / len(group),
            stats, verification.to_json() if changed and verification is not None else None))
    if result.changed:
        history.applied.append(("+".join(specs), result.graph))
        return result.graph
    return graph


def _same_as(before: Graph, after: Graph, samples: list) -> Verification:
    """Exact comparison of two graphs on the calibration samples."""
    from slimline.verify import compare_outputs, merge_verifications

    return merge_verifications(compare_outputs(before.run(a, k), after.run(a, k), exact=True)
                               for a, k in samples)
