"""The tuner: budget split, modes, cache use, records; a fake family and a fake measurer."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import slimline.autotune.tuner as tuner_module  # noqa: E402
from slimline.autotune import space  # noqa: E402
from slimline.autotune.cache import TuningCache  # noqa: E402
from slimline.autotune.measure import Measurement, Protocol  # noqa: E402
from slimline.autotune.space import CPU_HOST, H200, Candidate, KernelFamily, Problem, Workload  # noqa: E402
from slimline.autotune.tuner import KernelInstance, report_rows, tune  # noqa: E402
from slimline.errors import ConfigError  # noqa: E402


class Toy(KernelFamily):
    """A CPU family whose cost is its ``work`` parameter (ms at 1 FLOP/ms)."""

    name = "toy"
    device_kind = "cpu"

    def kernel_hash(self):
        return "toy1"

    def problem_key(self, problem):
        return f"w{problem['work']}"

    def incumbent(self, problem, limits):
        return Candidate.make("lib", impl="lib")

    def candidates(self, problem, limits, mode="lite"):
        return [self.incumbent(problem, limits)] + [Candidate.make(f"c{i}", impl=f"c{i}")
                                                    for i in range(3 if mode == "lite" else 6)]

    def perf_model_pick(self, problem, limits):
        return Candidate.make("c0", impl="c0")

    def cost(self, problem):
        return float(problem["work"]) * limits_flops_per_ms(), 0.0

    def workload(self, problem, device, seed=0):
        return Workload(torch.zeros(1), lambda c: (lambda: torch.zeros(1)), 1e-6)


def limits_flops_per_ms():
    return CPU_HOST.peak_tflops * 1e9


@pytest.fixture
def toy(monkeypatch, tmp_path):
    monkeypatch.setitem(space.FAMILIES, "toy", Toy())
    monkeypatch.setenv("SLIMLINE_CACHE_DIR", str(tmp_path))
    calls = []
    clock = [1000.0]
    monkeypatch.setattr(tuner_module, "_now", lambda: clock[0])

    def fake_measure(workload, candidates, timer, *, protocol, deadline, device):
        share = deadline - clock[0]
        calls.append({"labels": [c.label for c in candidates], "share": share})
        clock[0] += 0.9 * share                                    # spends 90% of its share
        rows = [{"candidate": c.label, "ran": True, "ok": True, "ms": 1.0 / (i + 1)} for i, c in enumerate(candidates)]
        return Measurement(rows, candidates[-1], candidates[0], 1.0 / len(candidates), 1.0)

    monkeypatch.setattr(tuner_module, "measure", fake_measure)
    return calls


def _instances(works_and_calls):
    return [KernelInstance(f"layer{i}", Problem.make("toy", work=w), calls)
            for i, (w, calls) in enumerate(works_and_calls)]


def test_budget_follows_time_spent_and_starved_instances_get_the_perf_model_pick(toy):
    instances = _instances([(1, 1), (30, 2), (10, 1), (0.01, 1)])   # model time: 1, 60, 10, 0.01
    records = tune(instances, "lite", time_budget_s=40, min_share_s=1.0)
    shares = [call["share"] for call in toy]
    assert len(toy) == 3                          # the 0.01 one is left without time
    first = 40 * 60 / 71.01                       # the expensive one first, its share of the time
    second = (40 - 0.9 * first) * 10 / 11.01      # then a share of what is left
    third = (40 - 0.9 * (first + second)) * 1 / 1.01
    assert shares == pytest.approx([first, second, third], rel=1e-6)
    by_name = {r.name: r for r in records}
    assert by_name["layer3"].source == "perf-model" and by_name["layer3"].winner == "c0"
    assert "no tuning time left" in by_name["layer3"].notes[0]
    assert by_name["layer1"].source == "measured" and by_name["layer1"].winner == "c2"
    assert by_name["layer1"].gain == pytest.approx(4.0) and by_name["layer1"].candidates_tried == 4


def test_identical_problems_are_tuned_once_and_max_widens_the_space(toy):
    records = tune(_instances([(5, 1), (5, 3)]), "max", time_budget_s=10)
    assert len(toy) == 1 and len(toy[0]["labels"]) == 7
    assert [r.name for r in records] == ["layer0", "layer1"] and [r.calls for r in records] == [1, 3]
    assert records[0].winner == records[1].winner == "c5"


def test_second_run_is_a_cache_hit_and_cache_mode_never_measures(toy, monkeypatch):
    instances = _instances([(5, 1), (2, 1)])
    first = tune(instances, "lite", time_budget_s=10)
    assert [r.cache_hit for r in first] == [False, False] and len(toy) == 2
    second = tune(instances, "lite", time_budget_s=10)
    assert [r.cache_hit for r in second] == [True, True] and len(toy) == 2
    assert [r.winner for r in second] == [r.winner for r in first]

    def never(*args, **kwargs):
        raise AssertionError("cache mode measured")

    monkeypatch.setattr(tuner_module, "measure", never)
    again = tune(instances + _instances([(7, 1)]), "cache")
    assert [r.source for r in again] == ["cache", "cache", "perf-model"]
    assert [r.winner for r in tune(instances, "off")] == ["lib", "lib"]


def test_cache_mode_on_cuda_families_without_a_gpu_is_deterministic(monkeypatch, tmp_path):
    def never(*args, **kwargs):
        raise AssertionError("cache mode measured")

    monkeypatch.setattr(tuner_module, "measure", never)
    instances = [KernelInstance("q", Problem.make("dense_matmul", M=1, N=2048, K=2048, dtype="bf16")),
                 KernelInstance("d", Problem.make("quant_matmul", M=1, N=2048, K=2048, bits=4, group=128,
                                                  dtype="bf16"))]
    cache = TuningCache(H200.fingerprint, tmp_path, defaults_dir=None)
    first = tune(instances, "cache", limits=H200, cache=cache)
    second = tune(instances, "cache", limits=H200, cache=cache)
    assert [r.config for r in first] == [r.config for r in second]
    assert all(r.source == "perf-model" for r in first)


def test_bad_mode_and_budget_raise_config_errors():
    with pytest.raises(ConfigError, match="unknown tune mode"):
        tune([], "fast")
    with pytest.raises(ConfigError, match="time_budget_s"):
        tune([], "lite", time_budget_s=-1)


def test_end_to_end_on_the_cpu_with_real_timing(tmp_path):
    instances = [KernelInstance("fc", Problem.make("cpu_linear", M=8, N=64, K=64, dtype="fp32"), 2)]
    cache = TuningCache(CPU_HOST.fingerprint, tmp_path, defaults_dir=None)
    records = tune(instances, "lite", time_budget_s=5, cache=cache, protocol=Protocol(first_samples=3, max_samples=6))
    record = records[0]
    assert record.source == "measured" and record.candidates_tried >= 2 and record.baseline_ms > 0
    assert record.winner in {row["candidate"] for row in record.candidates if row["ok"]}
    row = report_rows(records)[0]
    assert set(row) >= {"instance", "winner", "baseline", "gain", "tried", "cache_hit"}
    assert tune(instances, "lite", time_budget_s=5, cache=cache)[0].cache_hit


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
def test_dense_family_under_the_interpreter(tmp_path):
    """The Triton dense candidates pass the correctness gate (fp32, tiny shapes)."""
    from slimline.autotune.measure import CpuTimer

    instances = [KernelInstance("tiny", Problem.make("dense_matmul", M=20, N=48, K=64, dtype="fp32"))]
    cache = TuningCache(H200.fingerprint, tmp_path, defaults_dir=None)
    record = tune(instances, "lite", time_budget_s=30, limits=H200, cache=cache, timer=CpuTimer(),
                  protocol=Protocol(first_samples=1, max_samples=1))[0]
    failed = [row for row in record.candidates if row["ran"] and not row["ok"]]
    assert record.candidates_tried >= 3 and not failed, failed


def test_cache_mode_uses_the_shipped_h200_defaults_without_a_gpu(monkeypatch, tmp_path):
    """The defaults file from the project's H200 run answers the 1B decoder's problems."""
    def never(*args, **kwargs):
        raise AssertionError("cache mode measured")

    monkeypatch.setattr(tuner_module, "measure", never)
    monkeypatch.setenv("SLIMLINE_CACHE_DIR", str(tmp_path))          # an empty user cache
    instances = [KernelInstance("lm_head decode int4", Problem.make("quant_matmul", M=1, N=32000, K=2048, bits=4,
                                                                     group=128, dtype="bf16")),
                 KernelInstance("o decode dense", Problem.make("dense_matmul", M=1, N=2048, K=2048, dtype="bf16"))]
    records = tune(instances, "cache", limits=H200)
    assert [r.source for r in records] == ["defaults", "defaults"] and all(r.cache_hit for r in records)
    assert records[0].config["impl"] == "triton" and records[0].winner_ms > 0
