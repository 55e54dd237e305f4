"""Long causal convolution on this CPU: direct conv1d vs slimline's fft_conv rewrite.

    PYTHONPATH=. python3 benchmarks/fft_conv_cpu.py [--threads 1] [--out benchmarks/results/fft_conv_cpu.json]

One run. Each case is a depthwise causal convolution in Hyena's form,
``conv1d(x, w, padding=K-1, groups=C)[..., :T]``, captured with torch.export; the direct form
is that graph as captured, the FFT form the same graph after the ``fft_conv`` pass (forced on:
``min_kernel=1``, no measuring), so the numbers are the code slimline emits. Both are checked
against each other (fp32 relative error) before timing, then timed in interleaved rounds for
about ``--budget`` seconds (at least three rounds; in a round a fast form runs up to 25 times,
so it is not judged on three samples beside a seconds-long direct convolution); medians, spread
(min, quartiles, max) and the ratio of medians direct / FFT are written as JSON with the machine,
versions and date.

Parts: the headline at T = K = 8192; kernel sweeps at T = 8192 and T = 1024 (the Hyena reference
model's length) for the crossover kernel length, each with the FFT size rounded to a power of
two (the pass's default) and to a 2·3·5-smooth length.

The machine is shared: runs default to one thread (with two, OpenMP's barrier waits stall for tens
of milliseconds whenever a neighbour holds the other core), and the load average is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimline.ir.capture import capture
from slimline.passes import fft_conv
from slimline.passes.base import PassContext

HEADLINE = (8192, 8192)  # (T, K)


class CausalLongConv(nn.Module):
    def __init__(self, channels: int, kernel: int):
        super().__init__()
        lag = torch.linspace(0.0, 1.0, kernel)
        taps = torch.randn(channels, kernel) * torch.exp(-torch.logspace(-0.5, 1.5, channels)[:, None] * lag)
        self.weight = nn.Parameter((taps / kernel ** 0.5).flip(-1)[:, None, :])  # (C, 1, K)

    def forward(self, x):  # (B, C, T) -> (B, C, T)
        kernel = self.weight.shape[-1]
        return F.conv1d(x, self.weight, padding=kernel - 1, groups=x.shape[1])[..., :x.shape[-1]]


def _rewritten(graph, rule: str):
    result = fft_conv.run(graph.copy(), fft_conv.Config(min_kernel=1, measure=False, fft_size=rule),
                          PassContext("cpu", "lossless"))
    assert result.stats["rewritten"] == 1, result.stats
    n = next(node.args[1] for node in result.graph.fx.nodes
             if node.target == torch.ops.aten.fft_rfft.default)
    return result.graph.module, n


def _relative_error(expected, actual) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def _timed(functions: dict, rounds: int, runs_per_round: dict) -> dict:
    """Interleaved rounds after one warm-up each; in a round, each function runs
    ``runs_per_round[name]`` times (fast forms more often, so they get as many samples as a
    slow direct convolution allows). Per function, seconds of every run."""
    times = {name: [] for name in functions}
    with torch.no_grad():
        for function in functions.values():
            function()
        for _ in range(rounds):
            for name, function in functions.items():
                for _ in range(runs_per_round[name]):
                    start = time.perf_counter()
                    function()
                    times[name].append(time.perf_counter() - start)
    return times


def _summary(seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    quartiles = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "q1_ms": quartiles[0],
            "q3_ms": quartiles[2], "max_ms": ms[-1], "runs": len(ms)}


def measure_case(batch: int, channels: int, length: int, kernel: int, budget_s: float,
                 min_rounds: int = 3, max_rounds: int = 51, rules=("pow2", "smooth")) -> dict:
    torch.manual_seed(kernel * 7919 + length)
    model = CausalLongConv(channels, kernel).eval()
    x = torch.randn(batch, channels, length)
    graph = capture(model, (x,))
    direct = graph.module
    forms = {"direct": lambda: direct(x)}
    sizes = {}
    for rule in rules:
        module, sizes[rule] = _rewritten(graph, rule)
        forms[f"fft_{rule}"] = (lambda module=module: module(x))
    with torch.no_grad():
        reference = forms["direct"]()
        errors = {name: _relative_error(reference, function()) for name, function in forms.items()
                  if name != "direct"}
    probe = {}
    with torch.no_grad():
        for name, function in forms.items():
            start = time.perf_counter()
            function()
            probe[name] = time.perf_counter() - start
    slowest = max(probe.values())
    runs_per_round = {name: max(1, min(25, int(slowest / max(t, 1e-6)))) for name, t in probe.items()}
    one_round = sum(probe[name] * runs for name, runs in runs_per_round.items())
    rounds = max(min_rounds, min(max_rounds, int(budget_s / one_round)))
    times = _timed(forms, rounds, runs_per_round)
    row = {"batch": batch, "channels": channels, "length": length, "kernel": kernel,
           "fft_size": sizes, "max_rel_error": errors}
    for name, seconds in times.items():
        row[name] = _summary(seconds)
    for rule in rules:
        row[f"ratio_direct_over_fft_{rule}"] = row["direct"]["median_ms"] / row[f"fft_{rule}"]["median_ms"]
    return row


def crossover_kernel(rows: list[dict], rule: str = "pow2") -> int | None:
    """The smallest kernel from which FFT is faster at every longer kernel measured."""
    found = None
    for row in sorted(rows, key=lambda r: r["kernel"], reverse=True):
        if row[f"fft_{rule}"]["median_ms"] < row["direct"]["median_ms"]:
            found = row["kernel"]
        else:
            break
    return found


def _environment(threads: int) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": cpu, "logical_cpus": os.cpu_count(), "torch_threads": threads,
            "torch": torch.__version__, "python": platform.python_version(),
            "mkl": torch.backends.mkl.is_available(), "slimline_commit": commit,
            "load_average_start": list(os.getloadavg())}


def _print_row(row: dict) -> None:
    print(f"  T={row['length']:5d} K={row['kernel']:5d}  direct {row['direct']['median_ms']:10.3f} ms"
          f"  fft(pow2 N={row['fft_size']['pow2']}) {row['fft_pow2']['median_ms']:8.3f} ms"
          f"  fft(smooth N={row['fft_size']['smooth']}) {row['fft_smooth']['median_ms']:8.3f} ms"
          f"  ratio {row['ratio_direct_over_fft_pow2']:8.1f}x", flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fft_conv_cpu.json"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--budget", type=float, default=3.0,
                        help="seconds of interleaved timing per case (at least 3 runs each)")
    parser.add_argument("--sweep", type=lambda s: [int(v) for v in s.split(",")],
                        default=[8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--short-length", type=int, default=1024)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = {"benchmark": "fft_conv_cpu", "environment": _environment(args.threads),
              "form": "conv1d(x, w, padding=K-1, groups=C)[..., :T], fp32"}

    print("headline:")
    length, kernel = HEADLINE
    headline = measure_case(args.batch, args.channels, length, kernel, args.budget)
    _print_row(headline)
    result["headline"] = headline

    sweeps = {}
    for sweep_length in (length, args.short_length):
        print(f"sweep at T={sweep_length}:")
        rows = []
        for sweep_kernel in [k for k in args.sweep if k <= sweep_length]:
            rows.append(measure_case(args.batch, args.channels, sweep_length, sweep_kernel, args.budget))
            _print_row(rows[-1])
        if sweep_length == length:
            rows.append(headline)  # K = 8192 closes the T = 8192 sweep
        sweeps[str(sweep_length)] = {"rows": rows,
                                     "crossover_kernel_pow2": crossover_kernel(rows, "pow2"),
                                     "crossover_kernel_smooth": crossover_kernel(rows, "smooth")}
    result["sweeps"] = sweeps
    result["environment"]["load_average_end"] = list(os.getloadavg())
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["summary"] = {
        "ratio_direct_over_fft_at_8192_8192": headline["ratio_direct_over_fft_pow2"],
        "fft_ms_at_8192_8192": headline["fft_pow2"]["median_ms"],
        "direct_ms_at_8192_8192": headline["direct"]["median_ms"],
        "crossover_kernel": {t: s["crossover_kernel_pow2"] for t, s in sweeps.items()},
        "crossover_kernel_smooth": {t: s["crossover_kernel_smooth"] for t, s in sweeps.items()},
        "max_rel_error": max(e for s in sweeps.values() for r in s["rows"]
                             for e in r["max_rel_error"].values()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
