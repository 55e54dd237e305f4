"""The measurement protocol: check, compile, time, halve, decide.

For one problem and its candidates (the incumbent first):

1. **Compile** every candidate by running it once. On a GPU (not under the interpreter) the first
   calls go through a thread pool, so Triton's compiles (its ptxas step runs outside the GIL)
   overlap. Past the deadline no new candidate is started once the incumbent and one other ran.
2. **Correctness gate**: each candidate's output, on poisoned memory (NaN written to a block of
   the output's size just before, so an unwritten element shows), against the reference, by
   ``‖y − ref‖ / ‖ref‖`` ≤ the workload's tolerance. A wrong or failing candidate is reported with
   its reason and never timed.
3. **Timing**: CUDA events around each call with an L2 flush before it, outside the events (a
   write of 1.25 × L2 bytes, then a read of as many, so no dirty line is left for the timed call
   to write back). Each round first queues ``warmup_ms`` of GPU work (the clocks ramp up
   from idle; they are read, never set) and then samples the candidates interleaved (sample i of
   each, then sample i + 1), so drift hits all alike; one synchronisation per round. The queued
   work also keeps the GPU ahead of the CPU while a round is enqueued, so the events time the
   GPU's work, not the host's launch latency. A kernel under ``graph_below_ms`` (20 µs) is timed through CUDA graphs
   instead, launch gaps removed: a graph of ``R × (flush, call)`` against a graph of ``R × flush``,
   replayed alternately, per-call time = the difference / R. On the CPU ``time.perf_counter``.
4. **Successive halving**: every survivor gets ``first_samples`` samples; the faster half (by
   median) goes on with twice the samples, down to two, until a round reaches ``max_samples``
   (or the deadline passes); the incumbent always goes on.
5. **Decision**: the fastest median wins unless its gain over the incumbent is within the noise
   (half the sum of both interquartile ranges, and at least ``min_gain`` of the incumbent's
   median): then the incumbent stays. GPU clocks and settings are never touched.

:class:`Timer` is the seam for tests: a fake timer returns chosen samples.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from slimline.autotune.space import Candidate, Workload, _relative_error

__all__ = ["Protocol", "Timer", "CpuTimer", "CudaTimer", "Measurement", "measure", "summarize"]


@dataclass(frozen=True)
class Protocol:
    first_samples: int = 5
    max_samples: int = 40
    graph_below_ms: float = 0.020
    graph_calls: int = 10           # calls per graph replay
    warmup_ms: float = 20.0         # GPU work queued before each timed round (clocks ramp up from idle)
    min_gain: float = 0.01          # a challenger must beat the incumbent by this much, at least
    flush_factor: float = 1.25      # L2 flush writes this many times the L2 size
    compile_workers: int = 8
    version: int = 1


class Timer:
    """Samples (ms) of one no-argument callable; ``prepare`` once per candidate."""

    def prepare(self, function: Callable[[], object]) -> None:
        pass

    def samples(self, function: Callable[[], object], count: int) -> list[float]:
        raise NotImplementedError

    def samples_round(self, functions: Sequence[Callable[[], object]], count: int) -> list[list[float]]:
        """``count`` samples of each function (a GPU timer interleaves them in one batch)."""
        return [self.samples(function, count) for function in functions]

    def release(self, function: Callable[[], object]) -> None:
        pass


class CpuTimer(Timer):
    def samples(self, function, count):
        function()  # warm
        found = []
        for _ in range(count):
            start = time.perf_counter()
            function()
            found.append((time.perf_counter() - start) * 1e3)
        return found


class CudaTimer(Timer):
    """CUDA events, an L2 flush between timed calls, CUDA graphs for short kernels."""

    def __init__(self, l2_bytes: int, protocol: Protocol = Protocol(), device: torch.device | None = None):
        self.protocol = protocol
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        size = int(l2_bytes * protocol.flush_factor) // 4
        self.flush_buffer = torch.empty(size, dtype=torch.float32, device=self.device)
        self.clean_buffer = torch.ones(size, dtype=torch.float32, device=self.device)
        self._graphs: dict[int, tuple] = {}
        self._flush_graph = None
        self.graph_failures: list[str] = []
        self._flush()
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            self._flush()
        end.record()
        torch.cuda.synchronize(self.device)
        self.flush_ms = max(start.elapsed_time(end) / 20, 1e-3)

    def _flush(self) -> None:
        """Write more than L2 holds, then read as much: L2 ends holding clean lines of neither
        input, so the timed call pays no write-back of the flush's dirty lines."""
        self.flush_buffer.fill_(1.0)
        self.clean_buffer.amax()

    def _spin(self, milliseconds: float) -> None:
        """Queue about ``milliseconds`` of memory-bound work, so the timed calls run at speed."""
        for _ in range(max(1, min(2000, int(milliseconds / self.flush_ms)))):
            self._flush()

    def _event_samples(self, function, count) -> list[float]:
        pairs = []
        for _ in range(count):
            self._flush()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in pairs]

    def _capture(self, body: Callable[[], None]):
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            body()                                   # warm on the side stream, as capture needs
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph):
            body()
        torch.cuda.synchronize(self.device)
        return graph

    def prepare(self, function) -> None:
        """Time a few plain calls; a short kernel gets its graphs captured now."""
        self._spin(self.protocol.warmup_ms / 4)
        quick = statistics.median(self._event_samples(function, 3))
        if quick >= self.protocol.graph_below_ms:
            return
        calls = self.protocol.graph_calls
        try:
            if self._flush_graph is None:
                self._flush_graph = self._capture(lambda: [self._flush() for _ in range(calls)])

            def body():
                for _ in range(calls):
                    self._flush()
                    function()

            self._graphs[id(function)] = (self._capture(body), function)
        except Exception as error:  # some callables cannot be captured: events then
            self.graph_failures.append(f"{type(error).__name__}: {str(error)[:120]}")
            torch.cuda.synchronize(self.device)

    def samples(self, function, count):
        found = self._graphs.get(id(function))
        if found is None:
            return self._event_samples(function, count)
        graph, _ = found
        events = []
        for _ in range(count):
            for replayed in (self._flush_graph, graph):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                replayed.replay()
                end.record()
                events.append((start, end))
        torch.cuda.synchronize(self.device)
        times = [s.elapsed_time(e) for s, e in events]
        calls = self.protocol.graph_calls
        return [max(times[i + 1] - times[i], 0.0) / calls for i in range(0, len(times), 2)]

    def samples_round(self, functions, count):
        """Interleaved: sample i of every function, then sample i + 1; one sync at the end."""
        self._spin(self.protocol.warmup_ms)
        calls = self.protocol.graph_calls
        pending: list[list[tuple]] = [[] for _ in functions]
        for _ in range(count):
            for slot, function in enumerate(functions):
                found = self._graphs.get(id(function))
                if found is None:
                    self._flush()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    function()
                    end.record()
                    pending[slot].append(("event", start, end))
                    continue
                marks = []
                for replayed in (self._flush_graph, found[0]):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    replayed.replay()
                    end.record()
                    marks.append((start, end))
                pending[slot].append(("graph", *marks))
        torch.cuda.synchronize(self.device)
        results = []
        for marks in pending:
            found = []
            for mark in marks:
                if mark[0] == "event":
                    found.append(mark[1].elapsed_time(mark[2]))
                else:
                    flush_only = mark[1][0].elapsed_time(mark[1][1])
                    with_calls = mark[2][0].elapsed_time(mark[2][1])
                    found.append(max(with_calls - flush_only, 0.0) / calls)
            results.append(found)
        return results

    def release(self, function) -> None:
        self._graphs.pop(id(function), None)


@dataclass
class Measurement:
    """The outcome for one problem: the rows per candidate, the winner, the baseline."""

    rows: list[dict]
    winner: Candidate | None
    incumbent: Candidate
    winner_ms: float | None = None
    baseline_ms: float | None = None
    kept_incumbent: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def gain(self) -> float | None:
        if self.winner_ms and self.baseline_ms:
            return self.baseline_ms / self.winner_ms
        return None

    @property
    def tried(self) -> int:
        return sum(1 for row in self.rows if row.get("ran"))


def summarize(samples: Sequence[float]) -> tuple[float, float]:
    """(median, interquartile range) of samples."""
    ordered = sorted(samples)
    if len(ordered) < 4:
        return statistics.median(ordered), (ordered[-1] - ordered[0]) if ordered else 0.0
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive")
    return statistics.median(ordered), quartiles[2] - quartiles[0]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _poison(reference: torch.Tensor, device: torch.device) -> None:
    """NaN into a freed block of the output's size: the next same-size allocation likely reuses it."""
    block = torch.full(reference.shape, float("nan"), dtype=torch.float32, device=device)
    del block


def measure(workload: Workload, candidates: Sequence[Candidate], timer: Timer, *,
            protocol: Protocol = Protocol(), deadline: float | None = None,
            device: torch.device | None = None, parallel_compile: bool | None = None,
            output_dtype: torch.dtype | None = None) -> Measurement:
    """Run the protocol (module doc) over ``candidates``; ``candidates[0]`` is the incumbent."""
    started = time.time()
    device = device or workload.reference.device
    incumbent = candidates[0]
    rows = [{"candidate": c.label, "config": c.as_dict(), "ran": False, "ok": False} for c in candidates]
    functions: dict[int, Callable] = {}
    for index, candidate in enumerate(candidates):
        try:
            functions[index] = workload.run(candidate)
        except Exception as error:
            rows[index]["why"] = f"{type(error).__name__}: {str(error).strip()[:200]}"

    def out_of_time(index: int) -> bool:
        """Past the deadline, once the incumbent and one challenger passed, start nothing new."""
        if deadline is None or time.time() <= deadline or index == 0:
            return False
        return any(row["ok"] for row in rows[1:])

    # 1. compile (parallel on a GPU) -------------------------------------------------------------
    use_pool = parallel_compile if parallel_compile is not None else (
        device.type == "cuda" and not _interpreting() and protocol.compile_workers > 1)
    if use_pool:
        def warm(index: int):
            if deadline is not None and time.time() > deadline and index > 1:
                return "not tried: tuning time budget spent"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            try:
                functions[index]()
            except Exception as error:  # one config's compile failure must not stop the rest
                return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
            return None

        with concurrent.futures.ThreadPoolExecutor(protocol.compile_workers) as pool:
            results = dict(zip(functions, pool.map(warm, list(functions))))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        for index, why in results.items():
            if why is not None:
                rows[index]["why"] = why
                functions.pop(index)

    # 2. correctness gate --------------------------------------------------------------------------
    for index in list(functions):
        if out_of_time(index):
            rows[index]["why"] = "not tried: tuning time budget spent"
            functions.pop(index)
            continue
        rows[index]["ran"] = True
        try:
            _poison(workload.reference, device)
            out = functions[index]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            error = _relative_error(workload.reference, out)
        except Exception as failure:
            text = str(failure).strip().splitlines()
            rows[index]["why"] = f"{type(failure).__name__}: {text[0][:200] if text else ''}"
            functions.pop(index)
            continue
        rows[index]["rel_error"] = error
        if not math.isfinite(error) or error > workload.tolerance:
            rows[index]["why"] = f"wrong: relative error {error:.3g} > {workload.tolerance:g}"
            functions.pop(index)
        else:
            rows[index]["ok"] = True

    notes = []
    if not functions:
        return Measurement(rows, None, incumbent, seconds=time.time() - started,
                           notes=["no candidate passed the correctness gate"])

    # 3 + 4. time with successive halving -----------------------------------------------------------
    samples: dict[int, list[float]] = {}
    for index in list(functions):
        try:
            timer.prepare(functions[index])
        except Exception as failure:
            rows[index].update(ok=False, why=f"timing failed: {type(failure).__name__}: {str(failure)[:150]}")
            functions.pop(index)
    alive = list(functions)
    count = protocol.first_samples
    while alive:
        for index, found in zip(alive, timer.samples_round([functions[i] for i in alive], count)):
            samples.setdefault(index, []).extend(found)
        if count >= protocol.max_samples or (deadline is not None and time.time() > deadline):
            break
        ranked = sorted(alive, key=lambda i: summarize(samples[i])[0])
        keep = ranked[: max(2, len(ranked) // 2)]            # the last two go on, with more samples
        if 0 in alive and 0 not in keep:
            keep.append(0)                                         # the incumbent always goes on
        for index in alive:
            if index not in keep:
                rows[index]["halved_out"] = True
        alive = keep
        count = min(count * 2, protocol.max_samples)
    for index, found in samples.items():
        median, spread = summarize(found)
        rows[index].update(ms=median, iqr_ms=spread, samples=len(found))
    for index in functions:
        timer.release(functions[index])

    # 5. decide --------------------------------------------------------------------------------------
    timed = [i for i in samples]
    best = min(timed, key=lambda i: (rows[i]["ms"], i))
    winner, winner_ms = best, rows[best]["ms"]
    baseline_ms = rows[0].get("ms")
    kept = False
    if best != 0 and baseline_ms is not None:
        noise = 0.5 * (rows[best]["iqr_ms"] + rows[0]["iqr_ms"])
        if baseline_ms - winner_ms <= max(noise, protocol.min_gain * baseline_ms):
            winner, winner_ms, kept = 0, baseline_ms, True
            notes.append(f"kept the incumbent: {candidates[best].label} was {baseline_ms / rows[best]['ms']:.3f}x, "
                         "within the measured noise")
    for index, row in enumerate(rows):
        row["winner"] = index == winner
    return Measurement(rows, candidates[winner], incumbent, winner_ms, baseline_ms, kept,
                       time.time() - started, notes)
