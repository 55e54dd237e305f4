"""Dequant-GEMV/GEMM Triton kernels on the GPU: speed against bf16 cuBLAS, bandwidth against a
measured copy, correctness against the torch form. Self-checking; about 2-3 minutes on an H200.

Shapes are the linears of a ~1B Llama-shaped decoder (hidden 2048, MLP 8192, 8 KV heads of
64): q/o 2048x2048, k/v 512x2048, gate/up 8192x2048, down 2048x8192. For each width (2, 3, 4
bits with groups of 128, asymmetric; 8 bits per channel, symmetric) and row count (M = 1 and
16: GEMV; M = 512: GEMM) the candidate configs are measured (``local_search``) and the fastest
correct one is kept. Figures:

* ``ratio``: kernel time / ``F.linear`` in bf16 (cuBLAS) on the dense weight, same x;
* ``GB/s`` and ``of copy``: (packed codes + scales + zeros + x + y bytes) / time, and that over
  the copy bandwidth measured in this run (device-to-device ``copy_`` of 1 GiB);
* ``decode step``: the sum over one decoder layer's 7 linears at M = 1, times 16 layers,
  against bf16 — the linears only; the whole-model figure under torch.compile + CUDA graph is
  another benchmark's job;
* ``compiled torch form``: ``torch.compile(quantized_linear)`` at M = 1, for comparison.

A result whose relative error against the torch form exceeds 2e-2 (bf16) fails the run (exit
status 1). ``--interpret`` runs a tiny version on the CPU under ``TRITON_INTERPRET=1`` (fp32;
timings meaningless) to check the script itself.

    PYTHONPATH=. python benchmarks/quant_gpu.py [--interpret] [--bits 2,3,4,8] [--rows 1,16,512]

Writes ``benchmarks/results/quant_gpu.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LAYER_SHAPES = {"q/o": (2048, 2048), "k/v": (512, 2048), "gate/up": (8192, 2048), "down": (2048, 8192)}
PER_LAYER = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}
LAYERS = 16
RTOL = 2e-2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1")
    parser.add_argument("--bits", default="2,3,4,8")
    parser.add_argument("--rows", default="1,16,512")
    options = parser.parse_args()
    if options.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F
    import triton

    from slimline.backends.cuda.quant_kernels import local_search, quant_matmul
    from slimline.quant.linear import quantized_linear
    from slimline.quant.pack import default_layout
    from slimline.quant.scheme import QuantScheme, quantize_rtn

    device = "cpu" if options.interpret else "cuda"
    dtype = torch.float32 if options.interpret else torch.bfloat16
    shapes = {"tiny": (48, 96)} if options.interpret else LAYER_SHAPES
    rows_list = [1, 20] if options.interpret else [int(r) for r in options.rows.split(",")]
    bits_list = [int(b) for b in options.bits.split(",")]

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

    rows, failures = [], []
    started = time.perf_counter()
    for name, (out_features, in_features) in shapes.items():
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
        dense = weight.to(device, dtype)
        for bits in bits_list:
            scheme = QuantScheme(bits, None if bits == 8 else 128, bits == 8)
            quantized = quantize_rtn(weight, scheme)
            layout = default_layout(bits)
            packed = quantized.pack(layout).to(device)
            scales = quantized.scales.to(device)
            zeros = quantized.zeros.to(device) if quantized.zeros is not None else None
            options_q = {"bits": bits, "layout": layout, "group_size": quantized.group_size,
                         "in_features": in_features}
            weight_bytes = packed.numel() + 4 * scales.numel() + (zeros.numel() if zeros is not None else 0)
            for m in rows_list:
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
                if m == 1 and not options.interpret:
                    try:
                        compiled = torch.compile(quantized_linear, mode="max-autotune-no-cudagraphs")
                        call = lambda: compiled(x, packed, scales, zeros, None,  # noqa: E731
                                                padded_features=quantized.codes.shape[1], **options_q)
                        call()
                        row["compiled_torch_form_ms"] = timed(call)
                    except Exception as error:
                        row["compiled_torch_form_ms"] = f"{type(error).__name__}: {error}"[:200]
                rows.append(row)
                if best["rel_error"] is not None and best["rel_error"] > RTOL:
                    failures.append(f"{name} {bits}-bit M={m}: relative error {best['rel_error']:.2e}")

    decode = {}
    for bits in bits_list:
        step = [r for r in rows if r["bits"] == bits and r["M"] == 1]
        if len(step) == len(shapes):
            kernel = LAYERS * sum(r["kernel_ms"] * PER_LAYER.get(r["shape"], 1) for r in step)
            dense = LAYERS * sum(r["bf16_ms"] * PER_LAYER.get(r["shape"], 1) for r in step)
            decode[bits] = {"kernel_ms": kernel, "bf16_ms": dense, "ratio": kernel / dense}

    result = {"benchmark": "quant_gpu", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": "cpu (interpreter)" if options.interpret else torch.cuda.get_device_name(),
              "versions": {"torch": torch.__version__, "triton": triton.__version__,
                           "python": platform.python_version()},
              "copy_GBps": copy_gbps, "rows": rows, "decode_step_linears": decode,
              "failures": failures, "seconds": time.perf_counter() - started}
    RESULTS.mkdir(exist_ok=True)
    name = "quant_gpu_interpret.json" if options.interpret else "quant_gpu.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2, default=str))

    print(f"{result['device']}; copy {copy_gbps or float('nan'):.0f} GB/s")
    print(f"{'shape':8} {'bits':>4} {'M':>4} {'kernel ms':>10} {'bf16 ms':>9} {'ratio':>6} "
          f"{'GB/s':>7} {'of copy':>7} {'rel err':>8}  config")
    for r in rows:
        of_copy = f"{r['of_copy']:.2f}" if r["of_copy"] else "-"
        print(f"{r['shape']:8} {r['bits']:4} {r['M']:4} {r['kernel_ms']:10.4f} {r['bf16_ms']:9.4f} "
              f"{r['ratio']:6.2f} {r['GBps']:7.0f} {of_copy:>7} {r['rel_error']:8.1e}  {r['config']}")
    for bits, figures in decode.items():
        print(f"decode-step linears, {bits}-bit: {figures['kernel_ms']:.3f} ms vs bf16 "
              f"{figures['bf16_ms']:.3f} ms (x{figures['ratio']:.2f})")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
