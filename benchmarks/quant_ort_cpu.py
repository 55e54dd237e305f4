"""MiniLM in ONNX Runtime on the CPU: slimline's int8 export against its float32 export.

Both files come from the same slimline flow (attention, QKV and norm fusion; the int8 one adds the
quantize pass: int8 per-channel weights, int8 dynamic activations, lowered to ORT's
``DynamicQuantizeMatMul``). Timing: one batch of docstring sentences (32 x 64 tokens), runs of
the two sessions interleaved, the same intra-op thread count for both; the figure is the ratio
of the medians. Quality: the mean and worst cosine of the int8 model's embeddings against the
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--calibration", type=int, default=128, help="calibration sentences")
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
    common = {"fuse_attention": {}, "fuse_qkv": {}, "fuse_norm": {}}
    workdir = Path(tempfile.mkdtemp(prefix="quant-ort-"))

    clock = time.perf_counter()
    float_opt = slimline.optimize(model, batch, target="onnxruntime", mode="lossless",
                                  passes=common, workdir=workdir / "fp32")
    float_path = Path(float_opt.report.export["path"])
    quant_opt = slimline.optimize(model, batch, target="cpu", mode="balanced",
                                  passes={**common, "quantize": {"bits": 8, "allow_slower": True,
                                                                 "activations": "dynamic_int8"}},
                                  calibration=calibration)
    int8_path = workdir / "int8" / "model.onnx"
    int8_path.parent.mkdir()
    summary = export_quantized_onnx(quant_opt.graph.module, batch, {}, int8_path,
                                    check_inputs=[(c, {}) for c in calibration[:1]])
    build_seconds = time.perf_counter() - clock

    # one setting for both: the project's measured default (spinning off, SkipLayerNorm unfused)
    settings = default_settings(options.threads)
    sessions = {"fp32": settings.session(float_path), "int8": settings.session(int8_path)}
    feeds = {name: input_feed(session, batch, {}) for name, session in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, session in sessions.items():  # warm up
        session.run(None, feeds[name])
    for _ in range(options.rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    quartiles = {name: statistics.quantiles(values, n=4) for name, values in times.items()}
    speedup = medians["fp32"] / medians["int8"]

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

    quantize_record = next(p for p in quant_opt.report.passes if p.name == "quantize")
    result = {
        "benchmark": "quant_ort_cpu", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "threads": options.threads, "rounds": options.rounds, "batch": list(batch[0].shape),
        "session": settings.describe(), "load_average": os.getloadavg(),
        "versions": _versions(), "build_seconds": build_seconds,
        "median_ms": {k: v * 1e3 for k, v in medians.items()},
        "quartiles_ms": {k: [q * 1e3 for q in v] for k, v in quartiles.items()},
        "speedup": speedup, "quality_vs_torch_fp32": quality,
        "file_bytes": {"fp32": float_path.stat().st_size, "int8": summary["file_size"]},
        "int8_ops": summary["op_histogram"], "lowering": summary["quantized"],
        "quantize_pass": {"status": quantize_record.status, "stats": quantize_record.stats},
        "targets": {"speedup": SPEED_TARGET, "cosine": COSINE_TARGET},
        "met": {"speedup": speedup >= SPEED_TARGET,
                "cosine": quality["int8"]["mean_cosine"] >= COSINE_TARGET},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quant_ort_cpu.json").write_text(json.dumps(result, indent=2, default=str))

    print(f"MiniLM, ORT {result['versions']['onnxruntime']} CPU, batch {tuple(batch[0].shape)}, "
          f"{settings.describe()}, {options.rounds} interleaved rounds, load {os.getloadavg()[0]:.1f}")
    print(f"{'model':6} {'median ms':>10} {'IQR ms':>16} {'MB':>7} {'mean cos':>9} {'min cos':>9}")
    for name in sessions:
        low, _, high = quartiles[name]
        print(f"{name:6} {medians[name] * 1e3:10.1f} {low * 1e3:7.1f}-{high * 1e3:<8.1f} "
              f"{result['file_bytes'][name] / 1e6:7.1f} {quality[name]['mean_cosine']:9.5f} "
              f"{quality[name]['min_cosine']:9.5f}")
    print(f"speedup int8 vs fp32: {speedup:.2f}x (target >= {SPEED_TARGET}x); "
          f"lowered: {summary['quantized']['forms']}, plain: {summary['quantized']['plain']}")


if __name__ == "__main__":
    main()
