"""The attention itself on the GPU: GPT-2's eager attention core vs slimline's fused form.

The core as transformers' GPT-2 eager path computes it, with the causal mask built inside from
constants: softmax(Q·Kᵀ/√d + causal) · V, at batch 8, 16 heads, head size 64, bf16. slimline
captures it (mode="lossless", target="cuda") and the fuse_attention pass turns it into one
scaled_dot_product_attention with is_causal=True. Interleaved CUDA-event timings, medians and
spread, peak memory, output agreement; JSON to --out.

    PYTHONPATH=. python benchmarks/attention_core_gpu.py --out $OUT/attention_core_gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics

import torch

import slimline


class EagerCausalAttention(torch.nn.Module):
    """softmax(Q·Kᵀ·scale + causal mask) · V, written by hand."""

    def forward(self, query, key, value):  # (B, nh, T, hs) each
        length = query.shape[-2]
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
        allowed = torch.tril(torch.ones(length, length, dtype=torch.bool, device=query.device))
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probabilities = torch.softmax(scores, dim=-1)
        return torch.matmul(probabilities, value)  # (B, nh, T, hs)


def _time(fn, args, reps, warmup):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _peak_gb(fn, args):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        fn(*args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", default="1024,4096")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/attention_core_gpu.json")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    for seq in [int(s) for s in args.seqs.split(",")]:
        torch.manual_seed(0)
        qkv = [torch.randn(8, 16, seq, 64, device=device, dtype=dtype) for _ in range(3)]
        eager = EagerCausalAttention()
        fused = slimline.optimize(eager, tuple(qkv), target="cuda", mode="lossless", name="gpt2-attention-core")
        stats = next(p.stats for p in fused.report.passes if p.name == "fuse_attention")
        with torch.no_grad():
            reference = eager(*qkv).float()
            out = fused(*qkv).float()
            times = {"eager": [], "slimline fused": []}
            for _ in range(args.reps):  # interleaved
                times["eager"] += _time(eager, qkv, 1, 1 if not times["eager"] else 0)
                times["slimline fused"] += _time(fused, qkv, 1, 1 if not times["slimline fused"] else 0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"seq": seq, "shape_BHTD": [8, 16, seq, 64], "fusion_stats": stats,
                     "rel_error": float((out - reference).abs().max() / reference.abs().max()),
                     "median_ms": med, "min_ms": {k: min(v) for k, v in times.items()},
                     "max_ms": {k: max(v) for k, v in times.items()},
                     "peak_gb": {"eager": _peak_gb(eager, qkv), "slimline fused": _peak_gb(fused, qkv)},
                     "speedup": med["eager"] / med["slimline fused"]})
        del fused, qkv
        torch.cuda.empty_cache()
    record = {"benchmark": "attention_core_gpu", "date": datetime.datetime.now().isoformat(),
              "device": torch.cuda.get_device_name(),
              "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "python": platform.python_version()}, "dtype": "bfloat16", "results": rows}
    with open(args.out, "w") as stream:
        json.dump(record, stream, indent=2)
    print(f"{'seq':>5} {'eager ms':>9} {'fused ms':>9} {'speedup':>8} {'peak GB eager/fused':>20} rel.err  fusion")
    for r in rows:
        print(f"{r['seq']:>5} {r['median_ms']['eager']:9.3f} {r['median_ms']['slimline fused']:9.3f} "
              f"{r['speedup']:8.1f} {r['peak_gb']['eager']:9.2f}/{r['peak_gb']['slimline fused']:<9.2f} "
              f"{r['rel_error']:.1e}  {r['fusion_stats']}")


if __name__ == "__main__":
    main()
