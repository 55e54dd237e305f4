"""Dequant-GEMV/GEMM Triton kernels on the GPU: speed against bf16 cuBLAS, bandwidth against a
measured copy, correctness against the torch form. Self-checking; about 2-3 minutes on an H200.

Shapes are the decode-step linears of issue 7's ~1B Llama-shaped decoder (hidden 2048, 16
layers, 32 heads, MLP 5632, vocab 32000), Q/K/V and gate/up fused as the decode benchmark
(``quant_decode_gpu.py``) runs them: qkv 6144x2048, o 2048x2048, gate_up 11264x2048, down
2048x5632, lm_head 32000x2048. For each width (2 bits in groups of 64; 3, 4, 5, 6 bits in
groups of 128, asymmetric; 8 bits per channel, symmetric) and row count (M = 1 and 16: GEMV;
M = 512: GEMM, for the widths in ``--gemm-bits``) the candidate configs are measured
(``local_search``) and the fastest correct one is kept. Every candidate is compiled first in
parallel worker processes (Triton's disk cache then serves the timing process), so the run is
bounded by timing, not by compiling. Figures:

* ``ratio``: kernel time / ``F.linear`` in bf16 (cuBLAS) on the dense weight, same x;
* ``GB/s`` and ``of copy``: (packed codes + scales + zeros + x + y bytes) / time, and that over
  the copy bandwidth measured in this run (device-to-device ``copy_`` of 1 GiB);
* ``decode step``: the sum over one decoder layer's 4 linears at M = 1, times 16 layers, plus
  the LM head, against bf16 — the linears only; the whole model under torch.compile + CUDA
  graph is ``quant_decode_gpu.py``, which reuses the configs chosen here (``chosen`` in the JSON);
* ``compiled torch form`` (``--compiled-torch-form``): ``torch.compile(quantized_linear)`` at M = 1.

A result whose relative error against the torch form exceeds 2e-2 (bf16) fails the run (exit
status 1). ``--interpret`` runs a tiny version on the CPU under ``TRITON_INTERPRET=1`` (fp32;
timings meaningless) to check the script itself.

    PYTHONPATH=. python benchmarks/quant_gpu.py [--interpret] [--bits 2,3,4,5,6,8] [--rows 1,16]
        [--gemm-bits 4] [--out PATH]

Writes ``benchmarks/results/quant_gpu.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LAYER_SHAPES = {"qkv": (6144, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632),
                "lm_head": (32000, 2048)}
PER_STEP = {"qkv": 16, "o": 16, "gate_up": 16, "down": 16, "lm_head": 1}  # times per decode step
RTOL = 2e-2
GROUPS = {2: 64, 3: 128, 4: 128, 5: 128, 6: 128, 8: None}  # None: per channel (symmetric)


def scheme_for(bits: int):
    from slimline.quant.scheme import QuantScheme

    return QuantScheme(bits, GROUPS[bits], bits == 8)


def _precompile_jobs(jobs: list, device: str = "cuda") -> int:
    """Worker process: launch each (shape, bits, M, config) once on dummy data, so Triton
    compiles it into its disk cache. Returns how many compiled."""
    import torch

    from slimline.backends.cuda.quant_gemv import GemvConfig, quant_gemv
    from slimline.backends.cuda.quant_kernels import KernelConfig, quant_matmul
    from slimline.quant.pack import default_layout, packed_shape

    done = 0
    for out_features, in_features, bits, m, fields, kernel in jobs:
        try:
            scheme = scheme_for(bits)
            layout = default_layout(bits)
            group = scheme.group(in_features)
            groups = scheme.padded(in_features) // group
            packed = torch.zeros(packed_shape(out_features, in_features, bits, layout), dtype=torch.uint8,
                                 device=device)
            scales = torch.ones(out_features, groups, device=device)
            zeros = None if scheme.symmetric else torch.zeros(out_features, groups, dtype=torch.uint8,
                                                              device=device)
            x = torch.randn(m, in_features, device=device,
                            dtype=torch.bfloat16 if device == "cuda" else torch.float32)
            function, config = (quant_gemv, GemvConfig(*fields)) if kernel == "gemv" else \
                (quant_matmul, KernelConfig(*fields))
            function(x, packed, scales, zeros, None, bits=bits, layout=layout, group_size=group,
                     in_features=in_features, config=config)
            done += 1
        except Exception:  # noqa: BLE001 - the timing pass reports what does not compile
            pass
    if device == "cuda":
        torch.cuda.synchronize()
    return done


def precompile(shapes: dict, bits_list: list, rows_of, workers: int, device: str = "cuda") -> dict:
    """Compile every candidate in ``workers`` spawned processes; {jobs, compiled, seconds}."""
    import dataclasses
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from slimline.backends.cuda.quant_gemv import gemv_configs, supports
    from slimline.backends.cuda.quant_kernels import candidate_configs
    from slimline.quant.pack import default_layout

    jobs = set()
    for out_features, in_features in shapes.values():
        for bits in bits_list:
            layout, group = default_layout(bits), scheme_for(bits).group(in_features)
            for m in rows_of(bits):
                for config in candidate_configs(m, out_features, in_features, bits):
                    jobs.add((out_features, in_features, bits, m, dataclasses.astuple(config), "dot"))
                if supports(bits, layout, group, in_features, m) is None:
                    for config in gemv_configs(out_features, in_features, bits, layout, group):
                        jobs.add((out_features, in_features, bits, m, dataclasses.astuple(config), "gemv"))
    # jobs that compile the same kernel (same width, config, M == 1 or not) go to one worker
    kernels: dict[tuple, list] = {}
    for job in sorted(jobs):
        kernels.setdefault((job[2], job[3] == 1, job[4], job[5]), []).append(job)
    chunks = [[] for _ in range(workers)]
    for i, same in enumerate(kernels.values()):
        chunks[i % workers] += same
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        compiled = sum(pool.map(functools.partial(_precompile_jobs, device=device), chunks))
    return {"jobs": len(jobs), "compiled": compiled, "workers": workers,
            "seconds": time.perf_counter() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1")
    parser.add_argument("--bits", default="2,3,4,5,6,8")
    parser.add_argument("--rows", default="1", help="GEMV row counts, every width")
    parser.add_argument("--m16-bits", default="3,4,8", help="widths also timed at M = 16")
    parser.add_argument("--gemm-bits", default="4", help="widths also timed at M = 512 (GEMM)")
    parser.add_argument("--compiled-torch-form", action="store_true")
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--out", default=None)
    options = parser.parse_args()
    if options.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F
    import triton

    from slimline.backends.cuda.quant_gemv import gemv_configs, quant_gemv, supports
    from slimline.backends.cuda.quant_kernels import local_search, quant_matmul
    from slimline.quant.linear import quantized_linear
    from slimline.quant.pack import default_layout
    from slimline.quant.scheme import quantize_rtn

    device = "cpu" if options.interpret else "cuda"
    dtype = torch.float32 if options.interpret else torch.bfloat16
    shapes = {"tiny": (48, 160)} if options.interpret else LAYER_SHAPES
    rows_list = [1, 20] if options.interpret else [int(r) for r in options.rows.split(",")]
    bits_list = [int(b) for b in options.bits.split(",")]
    gemm_bits = {int(b) for b in options.gemm_bits.split(",") if b}
    m16_bits = {int(b) for b in options.m16_bits.split(",") if b}

    def rows_of(bits: int) -> list[int]:
        extra = ([16] if bits in m16_bits and 16 not in rows_list else []) + \
                ([512] if bits in gemm_bits and not options.interpret else [])
        return rows_list + extra

    def timed(function) -> float:
        if options.interpret:
            start = time.perf_counter()
            function()
            return (time.perf_counter() - start) * 1e3
        from triton.testing import do_bench
        return do_bench(function, warmup=10, rep=50)

    copy_gbps = None
    if not options.interpret:
        source = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        target = torch.empty_like(source)
        copy_ms = timed(lambda: target.copy_(source))
        copy_gbps = 2 * source.numel() / copy_ms / 1e6
        del source, target

    def write(rows: list, chosen: dict, failures: list) -> dict:
        decode = {}
        for bits in bits_list:
            fastest: dict[str, dict] = {}
            for r in rows:
                if r["bits"] == bits and r["M"] == 1 and (r["shape"] not in fastest
                                                          or r["kernel_ms"] < fastest[r["shape"]]["kernel_ms"]):
                    fastest[r["shape"]] = r
            step = list(fastest.values())  # the faster kernel per shape
            if len(step) == len(shapes):
                kernel = sum(r["kernel_ms"] * PER_STEP.get(r["shape"], 1) for r in step)
                dense = sum(r["bf16_ms"] * PER_STEP.get(r["shape"], 1) for r in step)
                moved = sum(r["GBps"] * r["kernel_ms"] * PER_STEP.get(r["shape"], 1) for r in step)
                decode[bits] = {"kernel_ms": kernel, "bf16_ms": dense, "ratio": kernel / dense,
                                "kernels": {r["shape"]: r.get("kernel", "dot") for r in step},
                                "GBps": moved / kernel,
                                "of_copy": moved / kernel / copy_gbps if copy_gbps else None}
        gemv = [r for r in rows if r["M"] == 1 and r["of_copy"]]

        result = {"benchmark": "quant_gpu", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "device": "cpu (interpreter)" if options.interpret else torch.cuda.get_device_name(),
                  "versions": {"torch": torch.__version__, "triton": triton.__version__,
                               "python": platform.python_version()},
                  "copy_GBps": copy_gbps, "groups": GROUPS, "precompile": compiling,
                  "decode_step_linears": decode,
                  "gemv_M1_best_of_copy": {b: max((r["of_copy"] for r in gemv if r["bits"] == b), default=None)
                                           for b in bits_list},
                  "chosen": chosen, "failures": failures, "seconds": time.perf_counter() - started,
                  "rows": rows}
        name = "quant_gpu_interpret.json" if options.interpret else "quant_gpu.json"
        path = Path(options.out) if options.out else RESULTS / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str))
        return result

    rows, failures, chosen = [], [], {}
    started = time.perf_counter()
    compiling = None
    if not options.interpret and options.workers > 1:
        compiling = precompile(shapes, bits_list, rows_of, options.workers)
        print(f"precompiled {compiling['compiled']}/{compiling['jobs']} kernels in "
              f"{compiling['seconds']:.0f} s on {compiling['workers']} processes", flush=True)
    for name, (out_features, in_features) in shapes.items():
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
        dense = weight.to(device, dtype)
        for bits in bits_list:
            quantized = quantize_rtn(weight.to(device), scheme_for(bits))
            layout = default_layout(bits)
            packed = quantized.pack(layout).to(device)
            scales = quantized.scales.to(device)
            zeros = quantized.zeros.to(device) if quantized.zeros is not None else None
            options_q = {"bits": bits, "layout": layout, "group_size": quantized.group_size,
                         "in_features": in_features}
            weight_bytes = packed.numel() + 4 * scales.numel() + (zeros.numel() if zeros is not None else 0)
            for m in rows_of(bits):
                x = torch.randn(m, in_features, generator=generator).to(device, dtype)
                reference = quantized_linear(x, packed, scales, zeros, None,
                                             padded_features=quantized.codes.shape[1], **options_q)
                config, trials = local_search(x, packed, scales, zeros, None, reference=reference,
                                              rtol=RTOL, **options_q)
                best = min((t for t in trials if t.get("correct")), key=lambda t: t["ms"])
                kernel_ms = timed(lambda: quant_matmul(x, packed, scales, zeros, None, config=config,
                                                       **options_q))
                dense_ms = timed(lambda: F.linear(x, dense))
                moved = weight_bytes + x.numel() * x.element_size() + m * out_features * x.element_size()
                gbps = moved / kernel_ms / 1e6
                row = {"shape": name, "N": out_features, "K": in_features, "bits": bits, "M": m,
                       "config": config.label, "kernel_ms": kernel_ms, "bf16_ms": dense_ms,
                       "ratio": kernel_ms / dense_ms, "GBps": gbps,
                       "of_copy": gbps / copy_gbps if copy_gbps else None,
                       "rel_error": best["rel_error"], "candidates": trials}
                if m == 1 and options.compiled_torch_form and not options.interpret:
                    try:
                        compiled = torch.compile(quantized_linear, mode="max-autotune-no-cudagraphs")
                        call = lambda: compiled(x, packed, scales, zeros, None,  # noqa: E731
                                                padded_features=quantized.codes.shape[1], **options_q)
                        call()
                        row["compiled_torch_form_ms"] = timed(call)
                    except Exception as error:
                        row["compiled_torch_form_ms"] = f"{type(error).__name__}: {error}"[:200]
                row["kernel"] = "dot"
                rows.append(row)
                chosen[f"{out_features}x{in_features}/{bits}/{m}"] = dataclasses.astuple(config)
                group = quantized.group_size
                if supports(bits, layout, group, in_features, m) is None:
                    trials_g, best_g = [], None
                    for gconfig in gemv_configs(out_features, in_features, bits, layout, group):
                        call = lambda c=gconfig: quant_gemv(x, packed, scales, zeros, None, config=c,  # noqa: E731
                                                            **options_q)
                        try:
                            error = float((call().float() - reference.float()).abs().max()
                                          / reference.float().abs().max())
                            milliseconds = timed(call)
                        except Exception as failure:  # noqa: BLE001 - a config that does not compile
                            trials_g.append({"config": gconfig.label, "error": f"{type(failure).__name__}"})
                            continue
                        trials_g.append({"config": gconfig.label, "ms": milliseconds, "rel_error": error})
                        if error <= RTOL and (best_g is None or milliseconds < best_g[0]):
                            best_g = (milliseconds, gconfig, error)
                    if best_g is None:
                        failures.append(f"{name} {bits}-bit M={m}: no correct gemv config {trials_g[:2]}")
                    else:
                        gbps_g = moved / best_g[0] / 1e6
                        rows.append({"shape": name, "N": out_features, "K": in_features, "bits": bits, "M": m,
                                     "kernel": "gemv", "config": best_g[1].label, "kernel_ms": best_g[0],
                                     "bf16_ms": dense_ms, "ratio": best_g[0] / dense_ms, "GBps": gbps_g,
                                     "of_copy": gbps_g / copy_gbps if copy_gbps else None,
                                     "rel_error": best_g[2], "candidates": trials_g})
                        chosen[f"gemv/{out_features}x{in_features}/{bits}/{m}"] = dataclasses.astuple(best_g[1])
                        print(f"{name:8} {bits}-bit M={m:<4} {best_g[0] * 1e3:8.1f} us  gemv "
                              f"{gbps_g:6.0f} GB/s  {best_g[1].label}", flush=True)
                print(f"{name:8} {bits}-bit M={m:<4} {kernel_ms * 1e3:8.1f} us  bf16 {dense_ms * 1e3:8.1f} us  "
                      f"{gbps:6.0f} GB/s  {config.label}", flush=True)
                if best["rel_error"] is not None and best["rel_error"] > RTOL:
                    failures.append(f"{name} {bits}-bit M={m}: relative error {best['rel_error']:.2e}")
                write(rows, chosen, failures)  # after each row: a run cut short keeps its rows

    result = write(rows, chosen, failures)
    print(f"{result['device']}; copy {copy_gbps or float('nan'):.0f} GB/s")
    print(f"{'shape':8} {'bits':>4} {'M':>4} {'kernel':>6} {'kernel ms':>10} {'bf16 ms':>9} {'ratio':>6} "
          f"{'GB/s':>7} {'of copy':>7} {'rel err':>8}  config")
    for r in rows:
        of_copy = f"{r['of_copy']:.2f}" if r["of_copy"] else "-"
        print(f"{r['shape']:8} {r['bits']:4} {r['M']:4} {r.get('kernel', 'dot'):>6} {r['kernel_ms']:10.4f} {r['bf16_ms']:9.4f} "
              f"{r['ratio']:6.2f} {r['GBps']:7.0f} {of_copy:>7} {r['rel_error']:8.1e}  {r['config']}")
    for bits, figures in result["decode_step_linears"].items():
        of_copy = f", {figures['of_copy']:.0%} of copy" if figures["of_copy"] else ""
        print(f"decode-step linears, {bits}-bit: {figures['kernel_ms']:.3f} ms vs bf16 "
              f"{figures['bf16_ms']:.3f} ms (x{figures['ratio']:.2f}{of_copy})")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
