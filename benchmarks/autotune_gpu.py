"""The autotuner on the kernels of a ~1B Llama-shaped decoder: tuning time and pick quality.

The model: hidden 2048, 16 layers, 32 heads, MLP 5632, vocab 32000, bf16; its distinct linear
shapes (N x K): qkv 6144x2048 (fused), o 2048x2048, gate_up 11264x2048 (fused), down 2048x5632,
lm_head 32000x2048, each at decode (M = 1) and prefill (M = 4096). Families per shape: dense
(cuBLAS through torch against slimline's Triton tiles), int4 (groups of 128, asymmetric) and
int8 (per channel, symmetric) dequant GEMV/GEMM, and Monarch (4 blocks; not the LM head). Calls
per model step weight the budget: 16 per layer shape (1 for the head) at prefill, x 128 decode
tokens at decode.

Three runs, one process:

1. ``lite`` from an empty cache (a fresh cache directory, shipped defaults off, a fresh Triton
   cache) with ``time_budget_s=--budget`` (target: done in <= 60 s);
2. ``lite`` again, warm: every problem must be a cache hit (target <= 5 s);
3. ``max`` into another fresh cache with ``time_budget_s=--max-budget``: its rows time every
   candidate it reached, the lite pick among them, side by side in one run. Per problem:
   ratio = (lite pick's median in the max run) / (fastest median in the max run); target: <= 1.05
   on >= 90% of the problems. ``max_coverage`` says how much of the max space was reached.

Writes JSON (device, versions, date, per-problem rows with medians and spreads) to ``--out`` and
the shipped-defaults file (the best measured pick per problem) to ``--defaults-out``. Exit
status 1 if a self-check fails: a problem with no candidate passing the correctness gate, or a
warm run that measured anything.

    PYTHONPATH=. python benchmarks/autotune_gpu.py --out $OUT/autotune_gpu.json --defaults-out $OUT
    TRITON_INTERPRET=1 python benchmarks/autotune_gpu.py --smoke    # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, FFN, VOCAB, LAYERS, DECODE_TOKENS = 2048, 5632, 32000, 16, 128
SHAPES = {"qkv": (3 * HIDDEN, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * FFN, HIDDEN),
          "down": (HIDDEN, FFN), "lm_head": (VOCAB, HIDDEN)}
SMOKE_SHAPES = {"qkv": (96, 32), "down": (32, 64)}


def instances(smoke: bool):
    from slimline.autotune import KernelInstance, Problem

    shapes = SMOKE_SHAPES if smoke else SHAPES
    rows = (1, 20) if smoke else (1, 4096)
    dtype = "fp32" if smoke else "bf16"
    found = []
    for name, (n, k) in shapes.items():
        per_step = 1 if name == "lm_head" else LAYERS
        for m in rows:
            calls = per_step * (DECODE_TOKENS if m == 1 else 1)
            phase = "decode" if m == 1 else "prefill"
            found.append(KernelInstance(f"{name} {phase} dense", Problem.make("dense_matmul", M=m, N=n, K=k, dtype=dtype), calls))
            found.append(KernelInstance(f"{name} {phase} int4", Problem.make("quant_matmul", M=m, N=n, K=k, bits=4,
                                                                             group=128 if not smoke else 32, dtype=dtype), calls))
            found.append(KernelInstance(f"{name} {phase} int8", Problem.make("quant_matmul", M=m, N=n, K=k, bits=8,
                                                                             group=0, dtype=dtype), calls))
            if name != "lm_head":
                found.append(KernelInstance(f"{name} {phase} monarch", Problem.make("monarch_matmul", M=m, N=n, K=k,
                                                                                    nblocks=4, dtype=dtype), calls))
    return found


def versions() -> dict:
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--max-budget", type=float, default=120.0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--defaults-out", default=None, help="folder for the shipped-defaults file")
    options = parser.parse_args()
    if options.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    scratch = Path(tempfile.mkdtemp(prefix="slimline_autotune_"))
    os.environ["TRITON_CACHE_DIR"] = str(scratch / "triton")          # an empty Triton cache too
    import torch

    from slimline.autotune import H200, DeviceLimits, Protocol, TuningCache, tune

    gpu = torch.cuda.is_available() and not options.smoke
    limits = DeviceLimits.from_torch() if gpu else H200
    device_info = {"limits": limits.__dict__, "fingerprint": limits.fingerprint.slug}
    if gpu:
        props = torch.cuda.get_device_properties(0)
        device_info["properties"] = {name: getattr(props, name) for name in dir(props)
                                     if not name.startswith("_") and isinstance(getattr(props, name), (int, float, str))}
    protocol = Protocol(first_samples=2, max_samples=4) if options.smoke else Protocol()
    extra = {} if gpu else {"timer": __import__("slimline.autotune.measure", fromlist=["CpuTimer"]).CpuTimer(),
                            "limits": H200}
    work = instances(options.smoke)
    failures: list[str] = []

    cold_cache = TuningCache(limits.fingerprint, scratch / "cold", defaults_dir=None)
    started = time.time()
    lite = tune(work, "lite", options.budget, cache=cold_cache, use_defaults=False, protocol=protocol,
                compile_workers=options.workers, **extra)
    cold_s = time.time() - started
    started = time.time()
    warm = tune(work, "lite", options.budget, cache=TuningCache(limits.fingerprint, scratch / "cold", defaults_dir=None),
                use_defaults=False, protocol=protocol, **extra)
    warm_s = time.time() - started
    missed = [w.name for c, w in zip(lite, warm) if c.source == "measured" and not w.cache_hit]
    if missed:
        failures.append(f"warm run missed the cache on problems the cold run measured: {missed}")
    warm_measured = sum(1 for r in warm if not r.cache_hit)   # left unmeasured cold: tuned now
    out = options.out or str(Path(__file__).resolve().parent / "results" /
                             ("autotune_smoke.json" if options.smoke else "autotune_gpu.json"))
    header = {"benchmark": "autotune_gpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": device_info, "versions": versions(), "smoke": options.smoke,
              "options": {"budget": options.budget, "max_budget": options.max_budget, "protocol": protocol.__dict__}}
    partial = {"cold_lite_s": cold_s, "warm_lite_s": warm_s, "warm_misses_tuned": warm_measured,
               "lite_summary": lite.summary, "warm_summary": warm.summary}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(dict(header, summary=partial, failures=failures, partial=True,
                                         rows=[r.to_json() for r in lite]), indent=1, default=str) + "\n")
    if options.defaults_out:  # a first defaults file now, in case the max run does not finish
        cold_cache.export_defaults(Path(options.defaults_out) / f"{limits.fingerprint.slug}.json")
    print(f"lite: cold {cold_s:.1f} s, warm {warm_s:.2f} s (partial results in {out})", flush=True)
    max_cache = TuningCache(limits.fingerprint, scratch / "max", defaults_dir=None)
    started = time.time()
    wide = tune(work, "max", options.max_budget, cache=max_cache, use_defaults=False, protocol=protocol,
                compile_workers=options.workers, precompile_share=0.75, **extra)  # the reference run: compile more
    max_s = time.time() - started

    rows, seen = [], set()
    for small, big in zip(lite, wide):
        if small.problem_key + small.family in seen:
            continue
        seen.add(small.problem_key + small.family)
        timed = {row["candidate"]: row for row in big.candidates if "ms" in row}
        best = min(timed.values(), key=lambda row: row["ms"]) if timed else None
        pick = timed.get(small.winner)
        ratio = pick["ms"] / best["ms"] if pick and best else None
        if small.source == "measured" and not any(row.get("ok") for row in small.candidates):
            failures.append(f"{small.name}: no candidate passed the correctness gate")
        rows.append({
            "instance": small.name, "family": small.family, "problem": small.problem_key, "calls": small.calls,
            "lite_source": small.source, "lite_winner": small.winner, "lite_winner_ms": small.winner_ms,
            "baseline": small.baseline, "baseline_ms": small.baseline_ms, "lite_gain": small.gain,
            "lite_tried": small.candidates_tried, "lite_space": len(small.candidates) or None,
            "lite_budget_s": small.budget_s, "lite_seconds": small.seconds, "lite_notes": small.notes,
            "max_winner": big.winner, "max_best": best["candidate"] if best else None,
            "max_best_ms": best["ms"] if best else None, "max_best_iqr_ms": best.get("iqr_ms") if best else None,
            "lite_pick_in_max_ms": pick["ms"] if pick else None, "lite_pick_in_max_iqr_ms": pick.get("iqr_ms") if pick else None,
            "ratio_lite_to_max_best": ratio, "max_tried": big.candidates_tried, "max_space": len(big.candidates),
            "max_seconds": big.seconds, "max_notes": big.notes,
            "lite_candidates": small.candidates, "max_candidates": big.candidates})
    compared = [r for r in rows if r["ratio_lite_to_max_best"] is not None]
    within = [r for r in compared if r["ratio_lite_to_max_best"] <= 1.05]
    summary = {**partial, "max_s": max_s, "problems": len(rows),
               "compared": len(compared), "within_5pct": len(within),
               "fraction_within_5pct": len(within) / len(compared) if compared else None,
               "target_cold_le_60s": cold_s <= 60.0, "target_warm_le_5s": warm_s <= 5.0,
               "target_within_5pct_on_90pct": bool(compared) and len(within) >= 0.9 * len(rows),
               "max_summary": wide.summary}

    # the shipped defaults: per problem the faster of the lite pick and the max run's winner
    defaults = TuningCache(limits.fingerprint, scratch / "defaults", defaults_dir=None)
    entries = {}
    for key, entry in max_cache.entries().items():
        entries[key] = entry
    for key, entry in cold_cache.entries().items():
        other = entries.get(key)
        if other is None or (entry.get("winner_ms") or 1e9) < (other.get("winner_ms") or 1e9):
            entries[key] = entry
    defaults.store_many({k: {f: v for f, v in e.items() if f not in ("validators", "stored")} for k, e in entries.items()})
    if options.defaults_out:
        path = Path(options.defaults_out) / f"{limits.fingerprint.slug}.json"
        defaults.export_defaults(path)
        print(f"defaults: {len(entries)} entries -> {path}")

    print(f"\n{'instance':<24} {'lite winner':<44} {'gain':>6} {'tried':>5} {'max best':<44} {'ratio':>6} {'cov':>7}")
    for r in rows:
        gain = f"{r['lite_gain']:.2f}" if r["lite_gain"] else "-"
        ratio = f"{r['ratio_lite_to_max_best']:.3f}" if r["ratio_lite_to_max_best"] else "-"
        print(f"{r['instance']:<24} {r['lite_winner'][:44]:<44} {gain:>6} {r['lite_tried']:>5} "
              f"{(r['max_best'] or '-')[:44]:<44} {ratio:>6} {r['max_tried']:>3}/{r['max_space']:<3}")
    print(f"\ncold lite {cold_s:.1f} s (target <= 60), warm {warm_s:.2f} s (target <= 5; {warm_measured} problems "
          f"the cold run left unmeasured were tuned in it), max {max_s:.1f} s")
    print(f"lite pick within 5% of the max run's best: {len(within)}/{len(compared)} compared "
          f"({len(rows)} problems; target >= 90%)")
    print(f"precompile: {lite.summary.get('precompile')}")
    for failure in failures:
        print("FAIL:", failure)

    result = dict(header, summary=summary, failures=failures, partial=False, rows=rows)
    Path(out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
