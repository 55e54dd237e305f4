"""Implementation choice on gpt-small: the per-layer mix against each technique applied alone.

One budget for all: ``Budget(metric="bits_per_byte", max_loss=--budget, inputs=<calibration text>)``
where the calibration text is, by default, a slice of the validation stream *after* the held-out bytes
(``--calibration-source train`` takes the training stream's first bytes instead: text the model
has memorised, on which every lossy change looks cheaper than on new text). Variants, each through
``slimline.optimize(..., mode="balanced", target=--target)``:

    dense       the original model, uncompiled (the anchor of both columns)
    lossless    mode="lossless": the same layers through the target's backend (on cuda Inductor +
                CUDA graphs), so the lossy variants' gains can be read apart from the compiler's
    mix         default balanced passes: the implementation choice picks dense / low-rank /
                Monarch (/ int8 / int4 on cuda) per layer under the budget
    lowrank     passes={"lowrank": {}}: low-rank alone, ranks spent by its own budget search
    monarch     passes={"monarch": {}}: Monarch alone, gated by SVD and the budget
    quantize    passes={"quantize": {}} (cuda only): int8 weights alone

Judged on data the choice never saw: bits/byte on the first --heldout-bytes of the stdlib
*validation* stream. Speed: the optimized model's call at the example shape (``--batch`` rows of 128 bytes, default 2),
all variants timed round-robin in one process (CPU: median process CPU time per call, wall
times beside it; CUDA: CUDA events, median), as a ratio to dense.

    PYTHONPATH=. python benchmarks/choose_gpt_small.py --target cpu --out benchmarks/results/choose_gpt_small_cpu.json

Prints a table and writes JSON (device, versions, date, per-variant metrics, the mix's per-layer
choice table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
import traceback
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def _versions() -> dict:
    import onnxruntime

    found = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
             "python": platform.python_version()}
    try:
        import triton
        found["triton"] = triton.__version__
    except ImportError:
        pass
    return found


def _timed(calls: dict, device: str, rounds: int) -> dict:
    names = list(calls)
    samples = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for name in names:
        calls[name]()  # warm (compiles on cuda)
    for _ in range(rounds):
        for name in names:
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                calls[name]()
                end.record()
                torch.cuda.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                begin, begin_cpu = time.perf_counter(), time.process_time()
                calls[name]()
                samples[name].append((time.perf_counter() - begin) * 1e3)
                cpu[name].append((time.process_time() - begin_cpu) * 1e3)
    if device == "cuda":
        return {n: {"ms": statistics.median(s), "spread": [min(s), max(s)]} for n, s in samples.items()}
    # on a shared CPU the wall clock measures the neighbours too: the ratio column uses the
    # process CPU time per call (median), which preemption inflates far less; wall times beside it
    return {n: {"ms": statistics.median(cpu[n]), "wall_min_ms": min(s),
                "wall_median_ms": statistics.median(s)} for n, s in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-small")
    parser.add_argument("--target", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--calibration-bytes", type=int, default=4096)
    parser.add_argument("--calibration-source", choices=("validation", "train"), default="validation",
                        help="validation: the stream's bytes after the held-out part; train: training text")
    parser.add_argument("--heldout-bytes", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2,
                        help="example batch (rows of 128 bytes): the shape optimized and timed")
    parser.add_argument("--variants", default="lossless,mix,lowrank,monarch,quantize")
    parser.add_argument("--tune", default="lite", choices=("lite", "max", "cache"),
                        help="cache: the choice ranks layers by the roofline model instead of timing them")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import slimline
    from slimline.budget import Budget
    from slimline.models import REFERENCE_MODELS, reference_dynamic_shapes
    from slimline.models.corpus import build_corpus
    from slimline.models.quality import TextEvalSet, evaluate_text, held_out_text, text_eval_set

    torch.manual_seed(0)
    model, example = REFERENCE_MODELS[args.model](weights=args.model)   # the trained checkpoint
    model = model.float().eval()
    window = 128
    corpus = build_corpus()
    if args.calibration_source == "train":
        stream, offset, label = corpus.train, 0, "stdlib training stream"
    else:   # never scored: the held-out set is the validation stream's first --heldout-bytes
        stream, offset, label = held_out_text(), args.heldout_bytes + 1, "stdlib validation stream"
    calibration = TextEvalSet.from_bytes(stream[offset: offset + args.calibration_bytes + 1], window, 8,
                                         None, f"{label}, bytes {offset}..{offset + args.calibration_bytes}")
    heldout = text_eval_set(args.model, max_bytes=args.heldout_bytes, window=window)
    budget = Budget("bits_per_byte", args.budget, inputs=calibration)
    device = "cuda" if args.target == "cuda" else "cpu"
    if args.batch != example[0].shape[0]:
        # rows of training text at the asked batch: the passes fit (whitening, recovery) on the
        # example, so it must share no bytes, and no files, with the text that judges the budget
        # (bytes next to the calibration slice come from the same files, and a fit to them passed
        # the budget on the calibration text and broke it on the held-out part)
        start = args.calibration_bytes + 1 if args.calibration_source == "train" else 0
        rows_text = corpus.train[start: start + args.batch * window]
        example = (torch.tensor(list(rows_text), dtype=torch.int64).view(args.batch, window),) + tuple(example[1:])
    example = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in example)

    variants = [v for v in args.variants.split(",") if v]
    if args.target != "cuda":
        variants = [v for v in variants if v != "quantize"]
    passes = {"lossless": None, "mix": None, "lowrank": {"lowrank": {}}, "monarch": {"monarch": {}},
              "quantize": {"quantize": {}}}
    rows: dict[str, dict] = {}
    runners: dict[str, object] = {}
    dense_model = model.to(device)

    def on_device(module):
        return lambda: module(*example)

    with torch.no_grad():
        base = evaluate_text(dense_model, heldout)["bits_per_byte"]
    rows["dense"] = {"heldout_bits_per_byte": base, "relative": 0.0, "optimize_seconds": 0.0}
    runners["dense"] = on_device(dense_model)
    for name in variants:
        print(f"== {name}", flush=True)
        begin = time.perf_counter()
        try:
            optimized = slimline.optimize(model.cpu() if args.target != "cuda" else model,
                                          example, target=args.target,
                                          mode="lossless" if name == "lossless" else "balanced",
                                          passes=passes[name],
                                          budget=None if name == "lossless" else budget, tune=args.tune,
                                          dynamic_shapes=reference_dynamic_shapes(args.model))
        except Exception as error:
            rows[name] = {"failed": f"{type(error).__name__}: {error}"[:400],
                          "traceback": traceback.format_exc(limit=4)[-1500:]}
            print("   failed:", rows[name]["failed"], flush=True)
            continue
        seconds = time.perf_counter() - begin
        with torch.no_grad():
            after = evaluate_text(optimized, heldout)["bits_per_byte"]
        report = optimized.report
        rows[name] = {
            "heldout_bits_per_byte": after, "relative": (after - base) / base,
            "within_budget": (after - base) / base <= args.budget, "optimize_seconds": seconds,
            "passes": {p.name: [p.status, p.reason[:160]] for p in report.passes},
            "params_after": report.cost.get("params_after"),
            "choice": report.tuning.get("implementations"),
        }
        runners[name] = on_device(optimized)
        print(f"   held-out bits/byte {after:.4f} ({100 * (after - base) / base:+.2f}%), "
              f"{seconds:.0f} s", flush=True)
    with torch.no_grad():
        times = _timed(runners, device, args.rounds)
    for name, timing in times.items():
        rows[name].update(timing)
        rows[name]["speedup_vs_dense"] = times["dense"]["ms"] / timing["ms"]
    singles = [n for n in ("lowrank", "monarch", "quantize") if n in times]
    best_single = min(singles, key=lambda n: times[n]["ms"]) if singles else None
    verdict = {
        "mix_within_budget_heldout": rows.get("mix", {}).get("within_budget"),
        "fastest_single": best_single,
        "mix_vs_fastest_single": (times[best_single]["ms"] / times["mix"]["ms"]
                                  if best_single and "mix" in times else None),
        "mix_vs_lossless": (times["lossless"]["ms"] / times["mix"]["ms"]
                            if "lossless" in times and "mix" in times else None),
    }
    result = {"benchmark": "choose_gpt_small", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
              "target": args.target, "tune": args.tune, "batch": args.batch, "versions": _versions(), "load_average": os.getloadavg(),
              "model": args.model, "example_shape": [list(t.shape) for t in example if isinstance(t, torch.Tensor)],
              "budget": {"metric": "bits_per_byte", "max_loss": args.budget,
                         "calibration": calibration.description, "heldout": heldout.description},
              "rows": rows, "verdict": verdict}
    print(f"\n{'variant':10s} {'bits/byte':>10s} {'rel':>8s} {'ms':>9s} {'x dense':>8s}")
    for name, row in rows.items():
        if "failed" in row:
            print(f"{name:10s} failed: {row['failed'][:80]}")
            continue
        print(f"{name:10s} {row['heldout_bits_per_byte']:10.4f} {100 * row['relative']:+7.2f}% "
              f"{row.get('ms', math.nan):9.3f} {row.get('speedup_vs_dense', math.nan):8.3f}")
    print("verdict:", verdict)
    suffix = "" if args.batch == 2 else f"_b{args.batch}"
    out = Path(args.out) if args.out else RESULTS / f"choose_{args.model}_{args.target}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(out)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
