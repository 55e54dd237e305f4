"""Attention fusion on the GPU: slimline's fused model against transformers' own SDPA build.

A GPT-2-medium-shaped transformers model (n_embd 1024, 24 layers, 16 heads, random weights) is
built with ``attn_implementation="eager"``; slimline optimizes it (mode="lossless", target="cuda"),
which rewrites every matmul-softmax-matmul into scaled_dot_product_attention. Side by side, in
one run, interleaved: eager, the same weights built with ``attn_implementation="sdpa"``, and
slimline's fused graph, at batch 8 × sequence 1024 and 4096, bf16. Then the attention layer alone
(one GPT2Attention, eager vs slimline-fused). Medians and spread over timed repeats (CUDA events),
peak memory, output agreement; JSON to --out.

    PYTHONPATH=. python benchmarks/attention_fusion_gpu.py --out $OUT/attention_fusion_gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

import slimline


def _time(fn, args, reps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        fn(*args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


class _OutputOnly(torch.nn.Module):
    """The attention layer's output alone: the probabilities are not returned, so not kept."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden):
        return self.layer(hidden)[0]


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, (tuple, list)):
        return _first_tensor(output[0])
    return next(v for v in output.values() if isinstance(v, torch.Tensor))


def _rel(a, b):
    a, b = _first_tensor(a).float(), _first_tensor(b).float()
    return float((a - b).abs().max() / b.abs().max())


def _summary(times):
    times = sorted(times)
    return {"median_ms": statistics.median(times), "min_ms": times[0], "max_ms": times[-1],
            "p25_ms": times[len(times) // 4], "p75_ms": times[(3 * len(times)) // 4], "n": len(times)}


def _fused_count(report):
    for record in report.passes:
        if record.name == "fuse_attention":
            return {"status": record.status, "stats": record.stats, "reason": record.reason}
    return {"status": "absent"}


def run(seqs, batch, reps, warmup):
    from transformers import GPT2Config, GPT2Model

    device, dtype = torch.device("cuda"), torch.bfloat16
    results = []
    for seq in seqs:
        config = GPT2Config(n_embd=1024, n_layer=24, n_head=16, n_positions=seq, vocab_size=50257,
                            use_cache=False, attn_implementation="eager")
        torch.manual_seed(0)
        eager = GPT2Model(config).to(device, dtype).eval()
        sdpa_config = GPT2Config(**{**config.to_dict(), "attn_implementation": "sdpa"})
        sdpa = GPT2Model(sdpa_config).to(device, dtype).eval()
        sdpa.load_state_dict(eager.state_dict())
        ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)

        t0 = time.perf_counter()
        fused = slimline.optimize(eager, (ids,), target="cuda", mode="lossless", name="gpt2-medium")
        optimize_s = time.perf_counter() - t0
        variants = {"eager": eager, "sdpa (transformers)": sdpa, "slimline fused": fused}
        with torch.no_grad():
            outputs = {name: fn(ids) for name, fn in variants.items()}
            for _ in range(warmup):
                for fn in variants.values():
                    fn(ids)
            times = {name: [] for name in variants}
            for _ in range(reps):  # interleaved, one call of each per round
                for name, fn in variants.items():
                    times[name].extend(_time(fn, (ids,), 1))
        peaks = {name: _peak_gb(fn, (ids,)) for name, fn in variants.items()}
        row = {"what": "model", "batch": batch, "seq": seq, "optimize_s": optimize_s,
               "fusion": _fused_count(fused.report),
               "verification": fused.report.verification["verdict"],
               "rel_error_vs_eager": {n: _rel(o, outputs["eager"]) for n, o in outputs.items()},
               "timings": {n: _summary(t) for n, t in times.items()}, "peak_gb": peaks}
        med = {n: row["timings"][n]["median_ms"] for n in variants}
        row["ratio_fused_over_sdpa"] = med["slimline fused"] / med["sdpa (transformers)"]
        row["speedup_fused_over_eager"] = med["eager"] / med["slimline fused"]

        # the attention layer alone
        layer = _OutputOnly(eager.h[0].attn)  # GPT2Attention also returns the probabilities
        hidden = torch.randn(batch, seq, config.n_embd, device=device, dtype=dtype)
        fused_layer = slimline.optimize(layer, (hidden,), target="cuda", mode="lossless",
                                        name="GPT2Attention")
        layer_variants = {"eager attention layer": layer, "slimline fused attention layer": fused_layer}
        with torch.no_grad():
            layer_out = {n: fn(hidden) for n, fn in layer_variants.items()}
            for _ in range(warmup):
                for fn in layer_variants.values():
                    fn(hidden)
            layer_times = {n: [] for n in layer_variants}
            for _ in range(reps):
                for n, fn in layer_variants.items():
                    layer_times[n].extend(_time(fn, (hidden,), 1))
        layer_peaks = {n: _peak_gb(fn, (hidden,)) for n, fn in layer_variants.items()}
        lmed = {n: statistics.median(t) for n, t in layer_times.items()}
        results.append(row)
        results.append({"what": "attention layer", "batch": batch, "seq": seq,
                        "fusion": _fused_count(fused_layer.report),
                        "rel_error": _rel(layer_out["slimline fused attention layer"],
                                          layer_out["eager attention layer"]),
                        "timings": {n: _summary(t) for n, t in layer_times.items()},
                        "peak_gb": layer_peaks,
                        "speedup_fused_over_eager": lmed["eager attention layer"]
                        / lmed["slimline fused attention layer"]})
        del eager, sdpa, fused, fused_layer, outputs, layer_out
        torch.cuda.empty_cache()
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", default="1024,4096")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/attention_fusion_gpu.json")
    args = parser.parse_args()
    import transformers

    results = run([int(s) for s in args.seqs.split(",")], args.batch, args.reps, args.warmup)
    record = {"benchmark": "attention_fusion_gpu", "date": datetime.datetime.now().isoformat(),
              "device": torch.cuda.get_device_name(), "versions": {
                  "torch": torch.__version__, "cuda": torch.version.cuda,
                  "transformers": transformers.__version__, "python": platform.python_version()},
              "dtype": "bfloat16", "results": results}
    with open(args.out, "w") as stream:
        json.dump(record, stream, indent=2, default=str)
    print(f"{'what':16} {'seq':>5} {'variant':32} {'median ms':>10} {'p25–p75':>16} {'peak GB':>8}")
    for row in results:
        for name, timing in row["timings"].items():
            print(f"{row['what']:16} {row['seq']:>5} {name:32} {timing['median_ms']:10.2f} "
                  f"{timing['p25_ms']:7.2f}–{timing['p75_ms']:<7.2f} {row['peak_gb'][name]:8.2f}")
        extra = {k: row[k] for k in ("ratio_fused_over_sdpa", "speedup_fused_over_eager", "rel_error",
                                     "rel_error_vs_eager") if k in row}
        print(f"   fusion: {row['fusion']}  {extra}")


if __name__ == "__main__":
    main()
