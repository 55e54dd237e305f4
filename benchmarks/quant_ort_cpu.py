"""MiniLM in ONNX Runtime on the CPU: slimline's int8 export against its float32 export.

Both files come from the same slimline flow (attention, QKV and norm fusion; the int8 one adds the
quantize pass: int8 per-channel weights, int8 dynamic activations, lowered to ORT's
``DynamicQuantizeMatMul``). Timing: one batch of docstring sentences (32 x 64 tokens), runs of
the two sessions interleaved (the order alternating round by round), the same session settings
for both. The figure judged is the median of the per-round ratios fp32 / int8 (``paired``):
on this shared 2-core machine the load swings by tens of percent between rounds, and a ratio
taken within one round cancels most of it; the ratio of the two medians is reported beside it,
with the load average before and after. A short ORT profile of each session (kernel time per
op type) says what still runs in float32 in the int8 graph. Quality: the mean and worst cosine of the int8 model's embeddings against the
float32 PyTorch model, over held-out sentences not used for calibration.

    python benchmarks/quant_ort_cpu.py [--threads 2] [--rounds 30] [--sentences 512]

Prints a table and writes ``benchmarks/results/quant_ort_cpu.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SPEED_TARGET = 2.0
COSINE_TARGET = 0.99


def _versions() -> dict:
    import onnxruntime

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def _calibration(count: int, skip: int, batch_size: int) -> list:
    from slimline.models.minilm import MAX_LENGTH, docstring_sentences, load_tokenizer

    sentences = docstring_sentences(skip + count)[skip:]
    tokens = load_tokenizer()(sentences, padding="max_length", truncation=True,
                              max_length=MAX_LENGTH, return_tensors="pt")
    ids, mask = tokens["input_ids"].long(), tokens["attention_mask"].long()
    return [(ids[i:i + batch_size], mask[i:i + batch_size]) for i in range(0, count, batch_size)]


def _op_profile(settings, path: Path, feed: dict, runs: int, workdir: Path) -> dict:
    """Kernel milliseconds per op type, per run, from ORT's profiler (largest first)."""
    import collections

    import onnxruntime as ort

    if runs <= 0:
        return {}
    options = settings.options()
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / f"profile_{path.parent.name}")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(settings.disabled_optimizers))
    session.run(None, feed)
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            totals[event["args"].get("op_name", "?")] += event["dur"]
    return {op: micros / 1e3 / (runs + 1) for op, micros in totals.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--calibration", type=int, default=128, help="calibration sentences")
    parser.add_argument("--no-unfused-qkv", dest="unfused_qkv", action="store_false",
                        help="build only the fused-Q/K/V pair")
    parser.add_argument("--profile-runs", type=int, default=3, help="profiled runs per session (0: none)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    import slimline
    from slimline.backends.onnx_quant import export_quantized_onnx
    from slimline.backends.onnxruntime import input_feed
    from slimline.onnx.session import default_settings
    from slimline.models.minilm import load_minilm, sentence_embeddings, sentence_eval_set

    model = load_minilm()
    eval_set = sentence_eval_set(options.sentences)
    batch = (eval_set.input_ids[:32], eval_set.attention_mask[:32])
    calibration = _calibration(options.calibration, options.sentences, 32)
    reference = sentence_embeddings(model, eval_set)
    # two pass sets: Q/K/V fused into one linear + Split, or left as three linears (in the int8
    # graph the Split of the fused output costs more than three int8 matmuls quantizing one input)
    pass_sets = {"": {"fuse_attention": {}, "fuse_qkv": {}, "fuse_norm": {}}}
    if options.unfused_qkv:
        pass_sets[" unfused-qkv"] = {"fuse_attention": {}, "fuse_norm": {}}
    workdir = Path(tempfile.mkdtemp(prefix="quant-ort-"))

    clock = time.perf_counter()
    paths, summaries, records = {}, {}, {}
    for suffix, common in pass_sets.items():
        float_opt = slimline.optimize(model, batch, target="onnxruntime", mode="lossless",
                                      passes=common, workdir=workdir / f"fp32{suffix.strip()}")
        paths["fp32" + suffix] = Path(float_opt.report.export["path"])
        quant_opt = slimline.optimize(model, batch, target="cpu", mode="balanced",
                                      passes={**common, "quantize": {"bits": 8, "allow_slower": True,
                                                                     "activations": "dynamic_int8"}},
                                      calibration=calibration)
        int8_path = workdir / f"int8{suffix.strip()}" / "model.onnx"
        int8_path.parent.mkdir()
        summaries["int8" + suffix] = export_quantized_onnx(quant_opt.graph.module, batch, {}, int8_path,
                                                           check_inputs=[(c, {}) for c in calibration[:1]])
        paths["int8" + suffix] = int8_path
        records["int8" + suffix] = next(p for p in quant_opt.report.passes if p.name == "quantize")
    build_seconds = time.perf_counter() - clock

    # one setting for all: the project's measured default (spinning off, SkipLayerNorm unfused)
    settings = default_settings(options.threads)
    sessions = {name: settings.session(path) for name, path in paths.items()}
    feeds = {name: input_feed(session, batch, {}) for name, session in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, session in sessions.items():  # warm up
        session.run(None, feeds[name])
    load_before = os.getloadavg()
    for index in range(options.rounds):
        order = list(sessions) if index % 2 == 0 else list(reversed(list(sessions)))
        for name in order:
            start = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()
    medians = {name: statistics.median(values) for name, values in times.items()}
    quartiles = {name: statistics.quantiles(values, n=4) for name, values in times.items()}
    # judged: the faster int8 file against the faster float32 file (by median), paired per round
    best_float = min((n for n in medians if n.startswith("fp32")), key=medians.get)
    best_int8 = min((n for n in medians if n.startswith("int8")), key=medians.get)
    ratio_of_medians = medians[best_float] / medians[best_int8]
    per_round = [a / b for a, b in zip(times[best_float], times[best_int8])]
    speedup = statistics.median(per_round)
    paired_all = {f"{f} / {i}": statistics.median(a / b for a, b in zip(times[f], times[i]))
                  for f in medians if f.startswith("fp32") for i in medians if i.startswith("int8")}
    float_path, int8_path, summary = paths[best_float], paths[best_int8], summaries[best_int8]
    quantize_record = records[best_int8]
    profiles = {name: _op_profile(settings, paths[name], feeds[name], options.profile_runs, workdir)
                for name in (best_float, best_int8)}

    quality = {}
    def runner(session):
        def run(ids, mask):
            outputs = session.run(None, input_feed(session, (ids, mask), {}))
            return torch.from_numpy(outputs[0])
        return run

    for name, session in sessions.items():
        embeddings = sentence_embeddings(runner(session), eval_set)
        cosines = torch.nn.functional.cosine_similarity(embeddings.double(), reference.double(), dim=-1)
        quality[name] = {"mean_cosine": float(cosines.mean()), "min_cosine": float(cosines.min())}

    result = {
        "benchmark": "quant_ort_cpu", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "threads": options.threads, "rounds": options.rounds, "batch": list(batch[0].shape),
        "session": settings.describe(), "load_average": {"before": load_before, "after": load_after},
        "versions": _versions(), "build_seconds": build_seconds,
        "median_ms": {k: v * 1e3 for k, v in medians.items()},
        "quartiles_ms": {k: [q * 1e3 for q in v] for k, v in quartiles.items()},
        "anchor": best_float, "judged_int8": best_int8, "paired_ratios": paired_all,
        "speedup": speedup, "speedup_measure": "median of per-round ratios, faster fp32 file / faster int8 file (paired)",
        "speedup_ratio_of_medians": ratio_of_medians,
        "per_round_ratio_quartiles": statistics.quantiles(per_round, n=4),
        "kernel_ms_by_op_type": profiles, "quality_vs_torch_fp32": quality,
        "file_bytes": {name: path.stat().st_size for name, path in paths.items()},
        "int8_ops": summary["op_histogram"], "lowering": summary["quantized"],
        "quantize_pass": {"status": quantize_record.status, "stats": quantize_record.stats},
        "targets": {"speedup": SPEED_TARGET, "cosine": COSINE_TARGET},
        "met": {"speedup": speedup >= SPEED_TARGET,
                "cosine": quality[best_int8]["mean_cosine"] >= COSINE_TARGET},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quant_ort_cpu.json").write_text(json.dumps(result, indent=2, default=str))

    print(f"MiniLM, ORT {result['versions']['onnxruntime']} CPU, batch {tuple(batch[0].shape)}, "
          f"{settings.describe()}, {options.rounds} interleaved rounds, load {os.getloadavg()[0]:.1f}")
    print(f"{'model':18} {'median ms':>10} {'IQR ms':>16} {'MB':>7} {'mean cos':>9} {'min cos':>9}")
    for name in sessions:
        low, _, high = quartiles[name]
        print(f"{name:18} {medians[name] * 1e3:10.1f} {low * 1e3:7.1f}-{high * 1e3:<8.1f} "
              f"{result['file_bytes'][name] / 1e6:7.1f} {quality[name]['mean_cosine']:9.5f} "
              f"{quality[name]['min_cosine']:9.5f}")
    for name, profile in profiles.items():
        top = ", ".join(f"{op} {ms:.0f}" for op, ms in list(profile.items())[:6])
        print(f"{name} kernel ms by op type: {top}")
    print(f"speedup {best_int8} vs {best_float}: {speedup:.2f}x paired ({ratio_of_medians:.2f}x ratio of medians; "
          f"target >= {SPEED_TARGET}x), load {load_before[0]:.1f} -> {load_after[0]:.1f}; "
          f"lowered: {summary['quantized']['forms']}, plain: {summary['quantized']['plain']}")


if __name__ == "__main__":
    main()
