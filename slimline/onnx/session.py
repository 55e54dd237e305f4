"""onnxruntime session options, chosen by measurement, and the runner that applies them.

What is chosen (CPU provider):

- ``intra_op_threads`` among 1 and every core this process may use;
- ``allow_spinning`` (``session.intra_op.allow_spinning``) when more than one thread: idle pool
  threads spin for work instead of sleeping. On an idle machine spinning shaves wake-up latency;
  on a shared one it burns the cores other work needs. Measured on this project's 2-core machine
  at load average ~7 (MiniLM, sequence 128, 2 threads, 40 interleaved runs): 127 ms median with
  spinning off, 219 ms with it on;
- ``disabled_optimizers``: ORT's ``SkipLayerNormFusion`` is off by default, because its CPU
  ``SkipLayerNormalization`` kernel is ~5x slower than the Add + LayerNormalization it replaces
  (see :mod:`slimline.onnx.unfuse_skip_layer_norm`); the measurement re-checks it per model when
  the graph holds an Add feeding a LayerNormalization;
- ``graph_optimization_level``: ``all`` (ORT's default) or ``extended`` (no layout rewrites).

:func:`choose_settings` measures in two stages so that at most three sessions are alive at once
(a GPT-2-sized model holds ~1 GB per session): threads and spinning first, then the optimizer
set and level at the chosen threads. Candidates of a stage run interleaved, round by round, and
the lowest median wall time wins, except that the first candidate of a stage (the default) is
kept unless another beats it by :data:`MARGIN` (5%): at load average ~8 on 2 cores, medians of a
few runs of the same settings differ by more than that, and a coin toss should not move the
choice away from the measured-once default. The rounds stop at a time budget per stage (``tune="lite"``:
1.5 s, ``"max"``: 8 s) after at least 5. ``tune="cache"`` / ``"off"`` measure nothing and take
:func:`default_settings`. Every measured median is kept in the :class:`SessionChoice` for the
report, with the load average, since a shared machine moves these numbers by tens of percent.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import torch.utils._pytree as pytree

from slimline.backends.onnxruntime import OPTIMIZATION_LEVELS, OrtModule
from slimline.errors import BackendError, ConfigError

__all__ = [
    "SessionSettings",
    "SessionChoice",
    "TunedOrtModule",
    "available_cores",
    "default_settings",
    "choose_settings",
    "SETTINGS_KEY",
]

SETTINGS_KEY = "slimline.ort_session"  # ONNX metadata: the chosen settings as JSON
SKIP_LAYER_NORM_FUSION = "SkipLayerNormFusion"
STAGE_BUDGET_S = {"lite": 1.5, "max": 8.0}
MIN_ROUNDS, MAX_ROUNDS = 5, 200
MARGIN = 0.05  # a candidate must beat the stage's default by this fraction to replace it
_CPU = ["CPUExecutionProvider"]


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class SessionSettings:
    """Options for one onnxruntime CPU session."""

    intra_op_threads: int
    allow_spinning: bool = False
    disabled_optimizers: tuple[str, ...] = (SKIP_LAYER_NORM_FUSION,)
    graph_optimization_level: str = "all"

    def options(self) -> ort.SessionOptions:
        if self.graph_optimization_level not in OPTIMIZATION_LEVELS:
            raise ConfigError(f"unknown graph optimization level {self.graph_optimization_level!r}",
                              stage="onnxruntime", where="SessionSettings",
                              hint=f"use one of {sorted(OPTIMIZATION_LEVELS)}")
        options = ort.SessionOptions()
        options.graph_optimization_level = OPTIMIZATION_LEVELS[self.graph_optimization_level]
        options.intra_op_num_threads = int(self.intra_op_threads)
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if self.allow_spinning else "0")
        options.log_severity_level = 3
        return options

    def session(self, model: str | os.PathLike | bytes) -> ort.InferenceSession:
        source = model if isinstance(model, bytes) else str(model)
        return ort.InferenceSession(source, self.options(), providers=_CPU,
                                    disabled_optimizers=list(self.disabled_optimizers))

    def describe(self) -> str:
        fusions = ("ORT fusions minus " + ", ".join(self.disabled_optimizers)
                   if self.disabled_optimizers else "all ORT fusions")
        return (f"{self.intra_op_threads} thread{'s' if self.intra_op_threads > 1 else ''}, "
                f"spinning {'on' if self.allow_spinning else 'off'}, level "
                f"{self.graph_optimization_level}, {fusions}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["disabled_optimizers"] = list(self.disabled_optimizers)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SessionSettings":
        return cls(int(data["intra_op_threads"]), bool(data.get("allow_spinning", False)),
                   tuple(data.get("disabled_optimizers", ())),
                   str(data.get("graph_optimization_level", "all")))


def default_settings(threads: int | None = None) -> SessionSettings:
    """Every usable core, spinning off, ORT's SkipLayerNormFusion off: what measurement on this
    project's shared machines chose for the transformer models it was tried on."""
    return SessionSettings(intra_op_threads=threads or available_cores())


@dataclass
class SessionChoice:
    """The settings chosen and, when measured, what each candidate measured."""

    settings: SessionSettings
    source: str  # "measured" or "default: …"
    measurements: list[dict[str, Any]] = field(default_factory=list)
    load_average: tuple[float, float, float] | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings.to_json(), "describe": self.settings.describe(),
                "source": self.source, "measurements": self.measurements,
                "load_average": list(self.load_average) if self.load_average else None,
                "seconds": self.seconds}


def _load_average() -> tuple[float, float, float] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None


def measure(sessions: dict[str, Callable[[], Any]], budget_s: float,
            min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS) -> dict[str, list[float]]:
    """Wall seconds per call of each callable, run interleaved round by round until the budget
    is spent (after at least ``min_rounds``)."""
    times: dict[str, list[float]] = {key: [] for key in sessions}
    for run in sessions.values():  # warm up: first runs allocate and page weights in
        run()
    started = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - started < budget_s):
        for key, run in sessions.items():
            clock = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - clock)
        rounds += 1
    return times


def _candidates_threads(cores: int, base: SessionSettings) -> list[SessionSettings]:
    """``base`` first (the default), then one thread, then spinning on."""
    found = [base, replace(base, intra_op_threads=1, allow_spinning=False)]
    if cores > 1:
        found.append(replace(base, intra_op_threads=cores, allow_spinning=True))
    return found


def _candidates_graph(chosen: SessionSettings, add_feeds_norm: bool) -> list[SessionSettings]:
    found = [chosen, replace(chosen, graph_optimization_level="extended")]
    if add_feeds_norm:
        found.append(replace(chosen, disabled_optimizers=()))
    return found


def choose_settings(model_path: str | os.PathLike, feed: dict[str, np.ndarray], tune: str, *,
                    add_feeds_norm: bool = True, threads: int | None = None) -> SessionChoice:
    """Measure a few session settings on ``model_path`` with ``feed``; keep the fastest.

    ``threads`` pins the thread count (only spinning and the graph options are measured then).
    ``add_feeds_norm`` says whether ORT's SkipLayerNormFusion could fire on this graph.
    """
    base = default_settings(threads)
    if tune not in STAGE_BUDGET_S:
        return SessionChoice(base, f"default: tune={tune!r} measures nothing")
    started = time.perf_counter()
    budget = STAGE_BUDGET_S[tune]
    load_before = _load_average()
    stage_one = _candidates_threads(threads or available_cores(), base)
    if threads is not None:
        stage_one = [s for s in stage_one if s.intra_op_threads == threads] or [base]
    measurements: list[dict[str, Any]] = []
    chosen = _fastest(model_path, feed, stage_one, budget, measurements, "threads")
    stage_two = _candidates_graph(chosen, add_feeds_norm)
    chosen = _fastest(model_path, feed, stage_two, budget, measurements, "graph")
    return SessionChoice(chosen, "measured", measurements, load_before,
                         time.perf_counter() - started)


def _fastest(model_path: str | os.PathLike, feed: dict[str, np.ndarray],
             candidates: list[SessionSettings], budget: float, measurements: list[dict],
             stage: str) -> SessionSettings:
    unique = list(dict.fromkeys(candidates))
    if len(unique) == 1:
        return unique[0]
    runs: dict[str, Callable[[], Any]] = {}
    by_key: dict[str, SessionSettings] = {}
    for settings in unique:
        key = settings.describe()
        try:
            session = settings.session(model_path)
        except Exception as error:  # a candidate ORT refuses is not a candidate
            measurements.append({"stage": stage, "settings": settings.to_json(),
                                 "error": str(error).splitlines()[0][:200]})
            continue
        runs[key] = (lambda session=session: session.run(None, feed))
        by_key[key] = settings
    if not runs:
        raise BackendError(f"onnxruntime cannot load {Path(model_path).name} with any of the "
                           f"candidate session settings", stage="onnxruntime",
                           where=str(model_path), hint="check the file with onnx.checker")
    times = measure(runs, budget)
    medians = {key: statistics.median(values) for key, values in times.items()}
    incumbent = next(iter(medians))  # the stage's default
    best = min(medians, key=medians.get)
    chosen = best if medians[best] < (1.0 - MARGIN) * medians[incumbent] else incumbent
    for key, values in times.items():
        measurements.append({"stage": stage, "settings": by_key[key].to_json(),
                             "describe": key, "median_ms": medians[key] * 1e3,
                             "runs": len(values), "chosen": key == chosen})
    return by_key[chosen]


# ---------------------------------------------------------------------------------------------


class TunedOrtModule(OrtModule):
    """An :class:`~slimline.backends.onnxruntime.OrtModule` whose session uses ``settings``.

    Called like the torch model the file came from (torch tensors in, the model's output
    structure out); :meth:`run_numpy` takes and returns numpy arrays by input name order.
    """

    def __init__(self, path: str | os.PathLike, settings: SessionSettings, *,
                 output_spec: pytree.TreeSpec | None = None):
        self.settings = settings
        self._open(path, settings.session, output_spec,
                   hint="re-run slimline.optimize; it checks the file in ORT")

    def run_feed(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run on numpy arrays keyed by input name."""
        return self.session.run(None, feed)

    def __repr__(self) -> str:
        return (f"TunedOrtModule({str(self.path)!r}, {self.settings.describe()}, "
                f"inputs={self.input_names}, outputs={self.output_names})")
