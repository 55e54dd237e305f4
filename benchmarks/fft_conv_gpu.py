"""Long causal convolution on a GPU: direct conv1d vs FFT vs FFT-as-matmul on tensor cores.

    PYTHONPATH=. python3 benchmarks/fft_conv_gpu.py --out $OUT/fft_conv_gpu.json

One run, four parts, each a ratio measured in this run (CUDA events, medians and spread):

1. headline, sequence T = 8192 and kernel K = 8192 (Hyena's causal depthwise form,
   ``conv1d(x, w, padding=K-1, groups=C)[..., :T]``, B×C = 4×512 rows): direct ``F.conv1d``
   vs torch's FFT convolution (what slimline's ``fft_conv`` pass emits: ``irfft(rfft(x, N) ·
   W, N)[..., :T]`` with the filter spectrum W precomputed, N = 16384);
2. the crossover: the same at T = 8192 for kernel lengths 16 … 8192;
3. FFT as matmuls on tensor cores (FlashFFTConv's Monarch decomposition, order 2: a DFT of
   length N = N1·N2 is an N1-point DFT matmul, a twiddle product, an N2-point DFT matmul), in
   fp32, fp16 and bf16, vs torch's FFT convolution, at T = K = 8192 and at shorter lengths;
   reported against FlashFFTConv's headline "up to 7.93× over PyTorch" (Fu et al. 2023);
4. every variant is checked against the fp32 direct convolution (TF32 off) *before* it is
   timed; a variant that fails its check is reported and not timed.

The Monarch variant here is plain torch (cuBLAS batched GEMMs plus elementwise twiddles, ~10
kernels, every intermediate through HBM). FlashFFTConv fuses the whole convolution into one
kernel that keeps a row on chip; this script measures the tensor-core DFT *arithmetic*, not that
fusion, so a ratio below 1 here says "unfused matmul DFT loses to cuFFT", not "Monarch loses".

Math (order-2 Monarch / four-step Cooley–Tukey). With n = N2·n1 + n2 and k = k1 + N1·k2,
``ω = exp(-2πi/N)``::

    X[k1 + N1·k2] = Σ_n2 ω_N2^(n2·k2) · ω^(n2·k1) · Σ_n1 ω_N1^(n1·k1) · x[N2·n1 + n2]
                  = ((F_N1 · A) ⊙ T) · F_N2           A = x viewed as (N1, N2), T[k1, n2] = ω^(k1·n2)

so the spectrum comes out as a (k1, k2) matrix; the filter's spectrum is laid out the same way,
the product is elementwise, and the inverse runs the steps backwards with conjugates:
``y = Re(conj(F_N1) · ((Y · conj(F_N2)) ⊙ conj(T))) / N``. Here F_N1, F_N2 are scaled by
1/√N1, 1/√N2 both ways (unitary steps), which absorbs the 1/N and keeps every intermediate at the
input's magnitude — what fp16's range needs.
Complex products are real GEMMs on stacked operands, ``[Br | Bi] · [[Fr, Fi], [-Fi, Fr]]``.

Shape letters: B batch, C channels, R = B·C rows, T sequence, K kernel, N FFT size, N1·N2 = N.

Needs only torch (runs on torch 2.11 / Python 3.12); ``--device cpu`` with small sizes is a
smoke test of every code path on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HEADLINE_CLAIM = 7.93  # FlashFFTConv: "speeds up exact FFT convolutions by up to 7.93× over PyTorch"
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}  # max |err| / max |ref| vs fp32 direct
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# the convolutions


def causal_filter(channels: int, kernel: int, device, generator) -> torch.Tensor:
    """(C, 1, K) conv1d weights like Hyena's: decaying noise, time-reversed for conv1d."""
    lag = torch.linspace(0.0, 1.0, kernel)
    rates = torch.logspace(math.log10(0.3), math.log10(30.0), channels)
    taps = torch.randn(channels, kernel, generator=generator) * torch.exp(-rates[:, None] * lag)
    return (taps / math.sqrt(kernel)).flip(-1)[:, None, :].to(device)


def direct_causal_conv(x_BCT: torch.Tensor, weight_C1K: torch.Tensor) -> torch.Tensor:
    kernel = weight_C1K.shape[-1]
    return F.conv1d(x_BCT, weight_C1K, padding=kernel - 1, groups=x_BCT.shape[1])[..., :x_BCT.shape[-1]]


def fft_size(length: int) -> int:
    return 1 << (length - 1).bit_length()


def filter_spectrum_causal(weight_C1K: torch.Tensor, n: int) -> torch.Tensor:
    """rfft of the reversed (convolution-order) filter, computed in float64: (C, N/2+1)."""
    taps_CK = weight_C1K.detach().double().flip(-1)[:, 0, :]
    wide = weight_C1K.dtype == torch.float64
    return torch.fft.rfft(taps_CK, n=n).to(torch.complex128 if wide else torch.complex64)


def torch_fft_causal_conv(x_BCT: torch.Tensor, spectrum_CF: torch.Tensor, n: int) -> torch.Tensor:
    """What slimline's fft_conv pass emits for a causal depthwise convolution."""
    length = x_BCT.shape[-1]
    spectrum = spectrum_CF.to(torch.complex128 if x_BCT.dtype == torch.float64 else torch.complex64)
    return torch.fft.irfft(torch.fft.rfft(x_BCT, n=n) * spectrum, n=n)[..., :length]


def monarch_split(n: int) -> tuple[int, int]:
    """N = N1·N2 with N1 <= N2 as close to √N as powers of two allow."""
    if n < 4 or n & (n - 1):
        raise ValueError(f"Monarch split needs a power of two >= 4, got {n}")
    n1 = 1 << (n.bit_length() - 1) // 2
    return n1, n // n1


def _dft(n: int) -> torch.Tensor:
    index = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * torch.outer(index, index) / n)  # (n, n) complex128


def _complex_block(matrix: torch.Tensor) -> torch.Tensor:
    """[[Mr, Mi], [-Mi, Mr]]: right-multiplying [Ar | Ai] by it gives [Re | Im] of A·M."""
    real, imag = matrix.real, matrix.imag
    return torch.cat([torch.cat([real, imag], 1), torch.cat([-imag, real], 1)], 0)


class MonarchConv:
    """Causal depthwise convolution with FFTs as DFT matmuls (order-2 Monarch), in ``dtype``.

    ``weight_C1K`` is the conv1d weight (time-reversed filter); ``__call__(x_BCT)`` returns the
    causal convolution (B, C, T) in float32 (float64 for float64). N = N1·N2 >= T + K - 1.
    """

    def __init__(self, weight_C1K: torch.Tensor, n1: int, n2: int, dtype=torch.bfloat16):
        device = weight_C1K.device
        self.n1, self.n2, self.n, self.dtype = n1, n2, n1 * n2, dtype
        channels, _one, kernel = weight_C1K.shape
        dft1, dft2 = _dft(n1) / math.sqrt(n1), _dft(n2) / math.sqrt(n2)  # unitary: values stay O(x)
        k1, m2 = torch.arange(n1, dtype=torch.float64), torch.arange(n2, dtype=torch.float64)
        twiddle = torch.exp(-2j * math.pi * torch.outer(k1, m2) / self.n)  # (N1, N2): ω^(k1·n2)
        cast = lambda t: t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
        self.dft1_stacked = cast(torch.cat([dft1.real, dft1.imag], 0))          # (2N1, N1)
        self.dft1_real_row = cast(torch.cat([dft1.real, dft1.imag], 1))         # (N1, 2N1)
        self.dft2_block = cast(_complex_block(dft2))                            # (2N2, 2N2)
        self.dft2_conj_block = cast(_complex_block(dft2.conj()))
        self.twiddle_real, self.twiddle_imag = cast(twiddle.real), cast(twiddle.imag)
        # the filter's spectrum in the (k1, k2) layout the forward steps produce; with unitary
        # DFT steps, y = U^H (U x ⊙ H) needs H itself, unscaled (no 1/N to underflow fp16)
        taps_CK = weight_C1K.detach().double().cpu().flip(-1)[:, 0, :]
        spectrum_CN = torch.fft.fft(taps_CK, n=self.n)                          # natural order k
        spectrum_CN1N2 = spectrum_CN.reshape(channels, n2, n1).transpose(1, 2)  # [k1, k2] = X[k1 + N1·k2]
        self.filter_real, self.filter_imag = cast(spectrum_CN1N2.real), cast(spectrum_CN1N2.imag)

    def __call__(self, x_BCT: torch.Tensor) -> torch.Tensor:
        batch, channels, length = x_BCT.shape
        n1, n2 = self.n1, self.n2
        a_BCN1N2 = F.pad(x_BCT, (0, self.n - length)).to(self.dtype).view(batch, channels, n1, n2)
        # forward: B = F_N1 · A (real input: one GEMM gives [Br; Bi]), twiddle, C = B' · F_N2
        b_BC2N1N2 = torch.matmul(self.dft1_stacked, a_BCN1N2)
        b_real, b_imag = b_BC2N1N2[..., :n1, :], b_BC2N1N2[..., n1:, :]
        t_real = b_real * self.twiddle_real - b_imag * self.twiddle_imag
        t_imag = b_real * self.twiddle_imag + b_imag * self.twiddle_real
        c_BCN1_2N2 = torch.matmul(torch.cat([t_real, t_imag], -1), self.dft2_block)
        c_real, c_imag = c_BCN1_2N2[..., :n2], c_BCN1_2N2[..., n2:]
        # pointwise product with the filter's spectrum (same layout)
        y_real = c_real * self.filter_real - c_imag * self.filter_imag
        y_imag = c_real * self.filter_imag + c_imag * self.filter_real
        # inverse: D = Y · conj(F_N2), conj twiddle, y = Re(conj(F_N1) · D')
        d_BCN1_2N2 = torch.matmul(torch.cat([y_real, y_imag], -1), self.dft2_conj_block)
        d_real, d_imag = d_BCN1_2N2[..., :n2], d_BCN1_2N2[..., n2:]
        e_real = d_real * self.twiddle_real + d_imag * self.twiddle_imag
        e_imag = d_imag * self.twiddle_real - d_real * self.twiddle_imag
        y_BCN1N2 = torch.matmul(self.dft1_real_row, torch.cat([e_real, e_imag], -2))
        out = torch.float64 if self.dtype == torch.float64 else torch.float32
        return y_BCN1N2.reshape(batch, channels, self.n)[..., :length].to(out)


# ---------------------------------------------------------------------------------------------
# measurement


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    expected, actual = expected.double(), actual.double()
    return float((actual - expected).abs().max() / expected.abs().max())


def time_call(function, device: torch.device, budget_s: float, min_reps: int = 3,
              max_reps: int = 50) -> dict:
    """Per-call times (ms) after warm-up, as many as fit in ``budget_s``: median and spread."""
    function()
    _sync(device)
    start = time.perf_counter()
    function()
    _sync(device)
    first = time.perf_counter() - start
    reps = max(min_reps, min(max_reps, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            function()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            function()
            times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "min_ms": times[0], "max_ms": times[-1],
            "p10_ms": times[len(times) // 10], "p90_ms": times[(len(times) * 9) // 10],
            "reps": reps}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fp32_reference(x_BCT: torch.Tensor, weight_C1K: torch.Tensor) -> torch.Tensor:
    """Direct convolution in full fp32 (no TF32), the yardstick for every variant."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            return direct_causal_conv(x_BCT, weight_C1K)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


# ---------------------------------------------------------------------------------------------
# the parts


def headline(args, device, generator, deadline) -> dict:
    """T = K = args.length: direct vs torch FFT vs Monarch fp32/fp16/bf16, checked, then timed."""
    length, kernel = args.length, args.kernel
    x = torch.randn(args.batch, args.channels, length, generator=generator).to(device)
    weight = causal_filter(args.channels, kernel, device, generator)
    n = fft_size(length + kernel - 1)
    n1, n2 = monarch_split(n)
    reference = _fp32_reference(x, weight)
    spectrum = filter_spectrum_causal(weight, n).to(device)
    variants = {"direct_conv1d": lambda: direct_causal_conv(x, weight),
                "torch_fft": lambda: torch_fft_causal_conv(x, spectrum, n)}
    for name in args.monarch_dtypes:
        conv = MonarchConv(weight, n1, n2, DTYPES[name])
        variants[f"monarch_{name}"] = (lambda conv=conv: conv(x))
    result = {"batch": args.batch, "channels": args.channels, "length": length, "kernel": kernel,
              "fft_size": n, "monarch_split": [n1, n2], "variants": {}}
    for name, function in variants.items():
        with torch.no_grad():  # (the direct form is the reference's own kernel, minus TF32)
            error = relative_error(reference, reference if name == "direct_conv1d" else function())
        tolerance = TOLERANCES.get(name.rsplit("_", 1)[-1], TOLERANCES["fp32"])
        entry = {"max_rel_error": error, "tolerance": tolerance, "passed": error <= tolerance}
        if entry["passed"] and time.perf_counter() < deadline:
            with torch.no_grad():
                entry.update(time_call(function, device, args.budget))
        result["variants"][name] = entry
        print(f"  {name:16s} err {error:.2e}  " + (f"{entry['median_ms']:9.3f} ms" if "median_ms" in entry
                                                   else "not timed"), flush=True)
    timed = {k: v["median_ms"] for k, v in result["variants"].items() if "median_ms" in v}
    if "direct_conv1d" in timed and "torch_fft" in timed:
        result["ratio_direct_over_torch_fft"] = timed["direct_conv1d"] / timed["torch_fft"]
    for name in args.monarch_dtypes:
        if f"monarch_{name}" in timed and "torch_fft" in timed:
            result[f"ratio_torch_fft_over_monarch_{name}"] = timed["torch_fft"] / timed[f"monarch_{name}"]
    return result


def crossover(args, device, generator, deadline, headline_result: dict) -> dict:
    """Direct vs torch FFT at T = args.length over kernel lengths (the headline's K is taken
    from the headline, not measured twice); the crossover kernel."""
    length = args.length
    x = torch.randn(args.batch, args.channels, length, generator=generator).to(device)
    rows = []
    for kernel in [k for k in args.sweep if k != args.kernel or length != args.length]:
        if time.perf_counter() > deadline:
            rows.append({"kernel": kernel, "skipped": "time budget"})
            continue
        weight = causal_filter(args.channels, kernel, device, generator)
        n = fft_size(length + kernel - 1)
        spectrum = filter_spectrum_causal(weight, n).to(device)
        with torch.no_grad():
            error = relative_error(_fp32_reference(x, weight), torch_fft_causal_conv(x, spectrum, n))
            direct = time_call(lambda: direct_causal_conv(x, weight), device, args.budget / 2)
            fft = time_call(lambda: torch_fft_causal_conv(x, spectrum, n), device, args.budget / 2)
        rows.append({"kernel": kernel, "fft_size": n, "fft_max_rel_error": error,
                     "direct_ms": direct["median_ms"], "fft_ms": fft["median_ms"],
                     "direct_spread_ms": [direct["p10_ms"], direct["p90_ms"]],
                     "fft_spread_ms": [fft["p10_ms"], fft["p90_ms"]],
                     "ratio_direct_over_fft": direct["median_ms"] / fft["median_ms"]})
        print(f"  K={kernel:5d}  direct {direct['median_ms']:9.3f} ms  fft {fft['median_ms']:8.3f} ms"
              f"  ratio {rows[-1]['ratio_direct_over_fft']:8.2f}", flush=True)
    top = headline_result.get("variants", {})
    if "median_ms" in top.get("direct_conv1d", {}) and "median_ms" in top.get("torch_fft", {}):
        rows.append({"kernel": headline_result["kernel"], "fft_size": headline_result["fft_size"],
                     "fft_max_rel_error": top["torch_fft"]["max_rel_error"],
                     "direct_ms": top["direct_conv1d"]["median_ms"], "fft_ms": top["torch_fft"]["median_ms"],
                     "ratio_direct_over_fft": headline_result["ratio_direct_over_torch_fft"],
                     "from": "headline"})
    return {"length": length, "rows": rows, "crossover_kernel": crossover_kernel(rows)}


def crossover_kernel(rows: list[dict]) -> int | None:
    """The smallest kernel from which FFT is faster at every longer kernel measured."""
    measured = sorted((r for r in rows if "fft_ms" in r), key=lambda r: r["kernel"])
    found = None
    for row in reversed(measured):
        if row["fft_ms"] < row["direct_ms"]:
            found = row["kernel"]
        else:
            break
    return found


def monarch_lengths(args, device, generator, deadline) -> dict:
    """torch FFT vs Monarch at T = K over sequence lengths (FlashFFTConv's comparison)."""
    rows = []
    for length in args.monarch_lengths:
        if time.perf_counter() > deadline:
            rows.append({"length": length, "skipped": "time budget"})
            continue
        x = torch.randn(args.batch, args.channels, length, generator=generator).to(device)
        weight = causal_filter(args.channels, length, device, generator)
        n = fft_size(2 * length - 1)
        n1, n2 = monarch_split(n)
        reference = _fp32_reference(x, weight)
        spectrum = filter_spectrum_causal(weight, n).to(device)
        row = {"length": length, "fft_size": n, "monarch_split": [n1, n2]}
        with torch.no_grad():
            row["torch_fft_ms"] = time_call(lambda: torch_fft_causal_conv(x, spectrum, n), device,
                                            args.budget / 2)["median_ms"]
            for name in args.monarch_dtypes:
                conv = MonarchConv(weight, n1, n2, DTYPES[name])
                error = relative_error(reference, conv(x))
                row[f"monarch_{name}_max_rel_error"] = error
                if error > TOLERANCES[name]:
                    row[f"monarch_{name}"] = "failed its check"
                    continue
                row[f"monarch_{name}_ms"] = time_call(lambda: conv(x), device, args.budget / 2)["median_ms"]
                row[f"ratio_torch_fft_over_monarch_{name}"] = row["torch_fft_ms"] / row[f"monarch_{name}_ms"]
        rows.append(row)
        print("  T=K=%5d  torch fft %.3f ms  " % (length, row["torch_fft_ms"]) + "  ".join(
            f"{name} {row.get(f'ratio_torch_fft_over_monarch_{name}', float('nan')):.2f}x"
            for name in args.monarch_dtypes), flush=True)
    ratios = [v for r in rows for k, v in r.items() if k.startswith("ratio_torch_fft_over_monarch")]
    return {"rows": rows, "best_ratio_torch_fft_over_monarch": max(ratios) if ratios else None,
            "flashfftconv_headline": HEADLINE_CLAIM}


# ---------------------------------------------------------------------------------------------


def _environment(device: torch.device) -> dict:
    facts = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "python": platform.python_version(), "torch": torch.__version__,
             "cuda": torch.version.cuda, "host": platform.node(), "device_type": device.type,
             "cudnn_benchmark": torch.backends.cudnn.benchmark,
             "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
             "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    if device.type == "cuda":
        facts["device"] = torch.cuda.get_device_name(device)
        facts["cudnn"] = torch.backends.cudnn.version()
    else:
        facts["device"] = platform.processor() or platform.machine()
    try:
        import triton
        facts["triton"] = triton.__version__
    except ImportError:
        pass
    return facts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fft_conv_gpu.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--kernel", type=int, default=8192)
    parser.add_argument("--sweep", type=lambda s: [int(v) for v in s.split(",")],
                        default=[16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--monarch-lengths", type=lambda s: [int(v) for v in s.split(",")],
                        default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--monarch-dtypes", type=lambda s: s.split(","), default=["fp32", "fp16", "bf16"])
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument("--max-seconds", type=float, default=150.0,
                        help="stop starting new measurements after this long")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu (and small sizes) for a smoke test")
    deadline = time.perf_counter() + args.max_seconds
    generator = torch.Generator().manual_seed(0)
    result = {"benchmark": "fft_conv_gpu", "environment": _environment(device), "parts": {},
              "errors": {}}
    parts = (("headline", headline),
             ("crossover", lambda *a: crossover(*a, result["parts"].get("headline", {}))),
             ("monarch_vs_torch_fft", monarch_lengths))
    for name, part in parts:
        print(f"{name}:", flush=True)
        try:
            result["parts"][name] = part(args, device, generator, deadline)
        except Exception as error:  # keep the other parts' numbers
            result["errors"][name] = f"{type(error).__name__}: {error}"[:500]
            print(f"  failed: {result['errors'][name]}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["seconds"] = round(args.max_seconds - (deadline - time.perf_counter()), 1)
    summary = result["parts"].get("headline", {})
    result["summary"] = {
        "ratio_direct_over_torch_fft_at_8192": summary.get("ratio_direct_over_torch_fft"),
        "crossover_kernel": result["parts"].get("crossover", {}).get("crossover_kernel"),
        "ratio_torch_fft_over_monarch": {k.rsplit("_", 1)[-1]: v for k, v in summary.items()
                                         if k.startswith("ratio_torch_fft_over_monarch")},
        "best_monarch_ratio_any_length": result["parts"].get("monarch_vs_torch_fft", {}).get(
            "best_ratio_torch_fft_over_monarch"),
        "flashfftconv_headline": HEADLINE_CLAIM,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
