"""The measurement protocol with a fake timer (exact numbers) and on the CPU (perf_counter)."""

import torch

from slimline.autotune.measure import CpuTimer, Protocol, Timer, measure, summarize
from slimline.autotune.space import Candidate, Workload

QUICK = Protocol(first_samples=3, max_samples=12)


class FakeTimer(Timer):
    """Samples chosen per function: median ``times[label]``, spread ``spread``."""

    def __init__(self, times, labels, spread=0.0):
        self.times, self.labels, self.spread, self.calls = times, labels, spread, []

    def samples(self, function, count):
        label = self.labels[id(function)]
        self.calls.append((label, count))
        base = self.times[label]
        return [base + self.spread * ((i % 3) - 1) for i in range(count)]


def _workload(outputs, tolerance=1e-6):
    reference = torch.arange(6.0)
    functions = {label: (lambda value=value: value) for label, value in outputs.items()}
    return Workload(reference, lambda c: functions[c.label], tolerance), functions


def _run(times, spread=0.0, outputs=None, protocol=QUICK):
    labels = list(times)
    outputs = outputs or {label: torch.arange(6.0) for label in labels}
    workload, functions = _workload(outputs)
    timer = FakeTimer(times, {id(f): label for label, f in functions.items()}, spread)
    candidates = [Candidate.make(label, impl=label) for label in labels]
    return measure(workload, candidates, timer, protocol=protocol), timer


def test_fastest_correct_candidate_wins_and_wrong_ones_are_never_timed():
    wrong = torch.arange(6.0) + 1
    unwritten = torch.full((6,), float("nan"))
    result, timer = _run({"lib": 2.0, "a": 1.0, "b": 0.5, "c": 1.5},
                         outputs={"lib": torch.arange(6.0), "a": torch.arange(6.0), "b": wrong, "c": unwritten})
    assert result.winner.label == "a" and result.gain == 2.0 and not result.kept_incumbent
    timed = {label for label, _ in timer.calls}
    assert timed == {"lib", "a"}
    rows = {row["candidate"]: row for row in result.rows}
    assert "wrong" in rows["b"]["why"] and "ms" not in rows["b"] and "ms" not in rows["c"]


def test_incumbent_kept_when_the_gain_is_within_noise():
    result, _ = _run({"lib": 1.00, "a": 0.97}, spread=0.05)        # 3% faster, IQR 0.05 ms
    assert result.winner.label == "lib" and result.kept_incumbent and "noise" in result.notes[0]
    result, _ = _run({"lib": 1.00, "a": 0.995})                    # no spread but under min_gain
    assert result.winner.label == "lib"
    result, _ = _run({"lib": 1.00, "a": 0.80}, spread=0.05)
    assert result.winner.label == "a"


def test_successive_halving_drops_the_slow_half_but_keeps_the_incumbent():
    times = {"lib": 9.0, **{f"c{i}": float(i + 1) for i in range(8)}}
    result, timer = _run(times, protocol=Protocol(first_samples=2, max_samples=16))
    counts = {}
    for label, count in timer.calls:
        counts[label] = counts.get(label, 0) + count
    assert counts["c0"] > counts["c7"] and counts["lib"] == counts["c0"]   # lib always goes on
    assert result.winner.label == "c0"
    assert sum(1 for row in result.rows if row.get("halved_out")) >= 4


def test_a_failing_candidate_is_reported_and_the_rest_go_on():
    reference = torch.ones(3)

    def broken():
        raise RuntimeError("compile error: out of resources")

    functions = {"lib": lambda: torch.ones(3), "bad": broken}
    workload = Workload(reference, lambda c: functions[c.label], 1e-6)
    result = measure(workload, [Candidate.make("lib"), Candidate.make("bad")],
                     FakeTimer({"lib": 1.0}, {id(functions["lib"]): "lib"}), protocol=QUICK)
    assert result.winner.label == "lib"
    assert "out of resources" in [r for r in result.rows if r["candidate"] == "bad"][0]["why"]


def test_cpu_timing_picks_the_faster_of_two_functions():
    x = torch.randn(48, 48)

    def slow():
        y = x
        for _ in range(40):
            y = x @ x
        return y

    def fast():
        return x @ x

    functions = {"lib": slow, "fast": fast}
    workload = Workload(fast(), lambda c: functions[c.label], 1e-5)
    result = measure(workload, [Candidate.make("lib"), Candidate.make("fast")], CpuTimer(), protocol=QUICK)
    assert result.winner.label == "fast" and result.gain > 3


def test_cpu_timing_keeps_the_incumbent_against_the_same_function():
    x = torch.randn(192, 192)  # ~a millisecond a call: long against a scheduler tick on a loaded machine

    def one():
        return x @ x

    def same():
        return x @ x

    functions = {"lib": one, "same": same}
    workload = Workload(one(), lambda c: functions[c.label], 1e-3)
    # a challenger must beat the incumbent by 50%: the same work never does, whatever the load
    result = measure(workload, [Candidate.make("lib"), Candidate.make("same")], CpuTimer(),
                     protocol=Protocol(first_samples=9, max_samples=9, min_gain=0.5))
    assert result.winner.label == "lib"


def test_summarize():
    assert summarize([1.0, 2.0, 3.0]) == (2.0, 2.0)
    median, spread = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert median == 3.0 and spread < 50
