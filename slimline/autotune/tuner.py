"""``tune``: choose an implementation for every kernel instance of a model, within a time budget.

    records = tune(instances, mode="lite", time_budget_s=60)

An *instance* is one kernel problem the model runs (a family, its problem, how many calls per
model step, a name for the report). Identical problems are tuned once; their calls add up.

Modes:

``off``    the incumbent (the library pick) everywhere; nothing read, nothing measured.
``cache``  the user's cache, then the shipped defaults, then the family's perf-model pick. Never
           measures, never needs a GPU: the device is the GPU if there is one, else ``limits``
           (default: the fixed H200 description), so the answer is deterministic.
``lite``   cache hits as in ``cache``; misses are measured over the lite space (~10 candidates);
``max``    the same over the wider space. Winners are written to the cache.

The budget: misses are tuned in order of the time the model spends in them (the roofline time
of one call, from FLOPs and bytes, × calls), each given a share of what is left in proportion to
that time, at least ``min_share_s``; an instance whose share would fall under ``min_share_s``
gets the perf-model pick (or the shipped default when there is one). What an instance does not
use flows back to the rest.

Every instance gets a record for the report: candidates tried, winner, baseline (the incumbent),
both medians, gain, whether the cache answered, and where the choice came from.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from slimline.autotune.cache import DEFAULTS_DIR, TuningCache, entry_key
from slimline.autotune.measure import CpuTimer, CudaTimer, Protocol, Timer, measure
from slimline.autotune.space import H200, Candidate, DeviceLimits, KernelFamily, Problem, family
from slimline.errors import ConfigError

__all__ = ["KernelInstance", "TuneRecord", "TuneResult", "tune", "TUNE_MODES", "DEFAULT_BUDGET_S", "report_rows"]

TUNE_MODES = ("lite", "max", "cache", "off")
DEFAULT_BUDGET_S = {"lite": 60.0, "max": 600.0, "cache": 0.0, "off": 0.0}


@dataclass(frozen=True)
class KernelInstance:
    """One kernel problem of the model: ``calls`` per model step (weights the budget)."""

    name: str
    problem: Problem
    calls: float = 1.0


@dataclass
class TuneRecord:
    """What the report shows for one instance."""

    name: str
    family: str
    problem_key: str
    mode: str
    source: str                      # measured | cache | defaults | perf-model | off
    cache_hit: bool
    winner: str
    config: dict
    baseline: str
    winner_ms: float | None = None
    baseline_ms: float | None = None
    candidates_tried: int = 0
    candidates: list[dict] = field(default_factory=list)
    budget_s: float = 0.0
    seconds: float = 0.0
    calls: float = 1.0
    estimated_ms: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def gain(self) -> float | None:
        if self.winner_ms and self.baseline_ms:
            return self.baseline_ms / self.winner_ms
        return None

    def to_json(self) -> dict:
        data = {k: v for k, v in self.__dict__.items()}
        data["gain"] = self.gain
        return data


def _context(kind: str, mode: str, limits: DeviceLimits | None, device: torch.device | str | None,
             cache: TuningCache | None, use_defaults: bool) -> tuple[torch.device, DeviceLimits, TuningCache | None]:
    """Device, limits and cache for families that run on ``kind`` ("cuda" or "cpu")."""
    if kind == "cpu":
        device, limits = torch.device("cpu"), (limits if limits is not None and limits.kind == "cpu"
                                               else DeviceLimits.host())
    else:
        if device is not None:
            device = torch.device(device)
        else:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        if limits is None or limits.kind != "cuda":
            if device is not None and device.type == "cuda":
                limits = DeviceLimits.from_torch(device)
            else:
                limits = H200          # no GPU here: the fixed description (cache mode, tests)
        if device is None:
            device = torch.device("cpu")   # measuring CUDA families here needs TRITON_INTERPRET
    if cache is None and mode != "off":
        cache = TuningCache(limits.fingerprint, defaults_dir=DEFAULTS_DIR if use_defaults else None)
    elif cache is not None and not use_defaults:
        cache.defaults_path, cache._defaults = None, {}
    return device, limits, cache


class TuneResult(list):
    """The records, in the instances' order, plus ``summary`` (times, counts, precompile)."""

    summary: dict


def _now() -> float:  # the tuner's clock (tests replace it)
    return time.time()


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cached_candidate(fam: KernelFamily, entry: dict) -> Candidate:
    config = dict(entry["config"])
    return Candidate.make(entry.get("label") or config.get("label", "?"), **config)


def tune(instances: Sequence[KernelInstance], mode: str = "lite", time_budget_s: float | None = None, *,
         limits: DeviceLimits | None = None, device: torch.device | str | None = None,
         cache: TuningCache | None = None, timer: Timer | None = None, protocol: Protocol = Protocol(),
         min_share_s: float = 1.0, use_defaults: bool = True, write_cache: bool = True,
         compile_workers: int | None = None, precompile_share: float = 0.5) -> TuneResult:
    """Choose an implementation per instance (module doc); one record per instance, in order.

    ``compile_workers`` (default: up to 12, by CPU count; 0: none) worker processes compile the
    misses' Triton candidates first (:mod:`slimline.autotune.precompile`), for at most
    ``precompile_share`` of the budget, when a GPU measures them.
    """
    tune_started = _now()
    summary: dict = {"mode": mode, "budget_s": None, "precompile": None}
    if mode not in TUNE_MODES:
        raise ConfigError(f"unknown tune mode {mode!r}", stage="tune", where="tune(mode=...)",
                          hint=f"use one of: {', '.join(TUNE_MODES)}")
    budget = DEFAULT_BUDGET_S[mode] if time_budget_s is None else float(time_budget_s)
    if budget < 0:
        raise ConfigError(f"time_budget_s must be ≥ 0, got {time_budget_s}", stage="tune",
                          where="tune(time_budget_s=...)", hint="pass a number of seconds, e.g. 60")
    contexts: dict[str, tuple] = {}

    def context(fam: KernelFamily) -> tuple[torch.device, DeviceLimits, TuningCache | None]:
        if fam.device_kind not in contexts:
            contexts[fam.device_kind] = _context(fam.device_kind, mode, limits, device, cache, use_defaults)
        return contexts[fam.device_kind]

    # group identical problems: one decision each, their calls summed
    groups: dict[str, dict[str, Any]] = {}
    for instance in instances:
        fam = family(instance.problem.family)
        key = entry_key(fam.name, fam.kernel_hash(), fam.problem_key(instance.problem))
        group = groups.setdefault(key, {"family": fam, "problem": instance.problem, "calls": 0.0, "members": []})
        group["calls"] += instance.calls
        group["members"].append(instance)

    decided: dict[str, TuneRecord] = {}
    pending = []
    for key, group in groups.items():
        fam, problem = group["family"], group["problem"]
        _, fam_limits, fam_cache = context(fam)
        problem_key = fam.problem_key(problem)
        estimated = fam.estimated_ms(problem, fam_limits)
        incumbent = fam.incumbent(problem, fam_limits)

        def record(source, chosen: Candidate, hit=False, entry=None, group=group, fam=fam,
                   problem_key=problem_key, incumbent=incumbent, estimated=estimated) -> TuneRecord:
            return TuneRecord(name=", ".join(m.name for m in group["members"]), family=fam.name,
                              problem_key=problem_key, mode=mode, source=source, cache_hit=hit,
                              winner=chosen.label, config=chosen.as_dict(), baseline=incumbent.label,
                              winner_ms=(entry or {}).get("winner_ms"), baseline_ms=(entry or {}).get("baseline_ms"),
                              calls=group["calls"], estimated_ms=estimated)

        if mode == "off":
            decided[key] = record("off", incumbent)
            continue
        entry, where = fam_cache.lookup(fam.name, fam.kernel_hash(), problem_key)
        if where == "cache" or (where == "defaults" and mode == "cache"):
            decided[key] = record(where, _cached_candidate(fam, entry), hit=True, entry=entry)
            continue
        fam_device = context(fam)[0]
        if mode == "cache" or (fam.device_kind == "cuda" and fam_device.type != "cuda" and not _interpreting()):
            chosen = record("defaults", _cached_candidate(fam, entry), hit=True, entry=entry) if entry else \
                record("perf-model", fam.perf_model_pick(problem, fam_limits))
            if mode != "cache":
                chosen.notes.append("not measured: no GPU here")
            decided[key] = chosen
            continue
        pending.append((key, group, estimated * group["calls"], entry, record))

    # misses: measured, the most expensive first, each with its share of what is left
    if pending:
        timers: dict[str, Timer] = {}
        pending.sort(key=lambda item: -item[2])
        workers = compile_workers if compile_workers is not None else min(12, max(0, (os.cpu_count() or 1) - 2))
        gpu_pending = [item for item in pending if item[1]["family"].device_kind == "cuda"
                       and context(item[1]["family"])[0].type == "cuda"]
        if workers > 0 and gpu_pending and not _interpreting() and len(gpu_pending) > 1:
            from slimline.autotune.precompile import precompile

            jobs = []
            for _, group, _, _, _ in gpu_pending:
                fam, problem = group["family"], group["problem"]
                for candidate in fam.candidates(problem, context(fam)[1], mode):
                    if candidate.as_dict().get("impl") != "torch":
                        jobs.append((fam.name, problem.params, candidate.label, candidate.config))
            summary["precompile"] = precompile(jobs, workers, _now() + precompile_share * budget)
        remaining_weight = sum(item[2] for item in pending) or 1.0
        started = tune_started                 # the precompile step counts against the budget too
        to_store = {}
        for key, group, weight, default_entry, record in pending:
            fam, problem = group["family"], group["problem"]
            fam_device, fam_limits, fam_cache = context(fam)
            if fam.device_kind not in timers:
                timers[fam.device_kind] = timer or (CudaTimer(fam_limits.l2_bytes, protocol, fam_device)
                                                    if fam_device.type == "cuda" else CpuTimer())
            left = budget - (_now() - started)
            share = max(min_share_s, left * weight / remaining_weight) if remaining_weight else left
            share = min(share, left)
            remaining_weight -= weight
            if share < min_share_s:
                if default_entry is not None:
                    chosen = record("defaults", _cached_candidate(fam, default_entry), hit=True, entry=default_entry)
                else:
                    chosen = record("perf-model", fam.perf_model_pick(problem, fam_limits))
                chosen.notes.append("no tuning time left in the budget")
                decided[key] = chosen
                continue
            begun = _now()
            candidates = fam.candidates(problem, fam_limits, mode)
            try:
                workload = fam.workload(problem, fam_device)
                outcome = measure(workload, candidates, timers[fam.device_kind], protocol=protocol,
                                  deadline=begun + share, device=fam_device)
            except Exception as error:  # a family that cannot run here falls back, never fails tune()
                chosen = record("perf-model", fam.perf_model_pick(problem, fam_limits))
                chosen.notes.append(f"measuring failed: {type(error).__name__}: {str(error)[:200]}")
                chosen.budget_s, chosen.seconds = share, _now() - begun
                decided[key] = chosen
                continue
            finally:
                if fam_device.type == "cuda":
                    torch.cuda.empty_cache()
            if outcome.winner is None:
                chosen = record("perf-model", fam.incumbent(problem, fam_limits))
            else:
                chosen = record("measured", outcome.winner)
                chosen.winner_ms, chosen.baseline_ms = outcome.winner_ms, outcome.baseline_ms
            # timings under the Triton interpreter say nothing about the GPU: kept out of a default cache
            if outcome.winner is not None and (cache is not None or fam_device.type == fam.device_kind):
                to_store.setdefault(id(fam_cache), (fam_cache, {}))[1][key] = {"config": outcome.winner.as_dict(), "label": outcome.winner.label,
                                 "winner_ms": outcome.winner_ms, "baseline_ms": outcome.baseline_ms,
                                 "baseline": outcome.incumbent.label, "mode": mode,
                                 "tried": outcome.tried, "kept_incumbent": outcome.kept_incumbent}
            chosen.candidates, chosen.candidates_tried = outcome.rows, outcome.tried
            chosen.notes.extend(outcome.notes)
            chosen.budget_s, chosen.seconds = share, _now() - begun
            decided[key] = chosen
        if write_cache:
            for fam_cache, entries in to_store.values():
                fam_cache.store_many(entries)

    records = TuneResult()
    for instance in instances:
        fam = family(instance.problem.family)
        key = entry_key(fam.name, fam.kernel_hash(), fam.problem_key(instance.problem))
        shared = decided[key]
        records.append(TuneRecord(**{**shared.__dict__, "name": instance.name, "calls": instance.calls,
                                     "candidates": list(shared.candidates), "notes": list(shared.notes)}))
    summary.update(budget_s=budget, seconds=_now() - tune_started, instances=len(instances), problems=len(groups),
                   measured=sum(1 for r in decided.values() if r.source == "measured"),
                   cache_hits=sum(1 for r in decided.values() if r.cache_hit))
    records.summary = summary
    return records


def report_rows(records: Sequence[TuneRecord]) -> list[dict]:
    """Short rows for a report table: instance, family, winner, baseline, gain, tried, cache hit."""
    return [{"instance": r.name, "family": r.family, "problem": r.problem_key, "winner": r.winner,
             "baseline": r.baseline, "winner_ms": r.winner_ms, "baseline_ms": r.baseline_ms,
             "gain": r.gain, "tried": r.candidates_tried, "cache_hit": r.cache_hit, "source": r.source}
            for r in records]
