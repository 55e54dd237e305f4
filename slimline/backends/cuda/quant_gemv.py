"""A dequant-GEMV for decode (a few rows of x): a reduction, no ``tl.dot``, no reshapes.

The kernel of :mod:`slimline.backends.cuda.quant_kernels` feeds ``tl.dot`` with a
``(BLOCK_N, BLOCK_K)`` weight tile rebuilt from packed words by a 3-D fan-out and a reshape; on
the H200 (``benchmarks/results/quant_gpu.json``, 2026-11-29) that reached only 5-28% of the
copy bandwidth at M = 1, slower than bf16 cuBLAS on 2-4x the bytes. This kernel keeps the
fan-out 3-D and never reshapes: it loads x in the same ``(words, codes per word)`` order as the
codes and reduces, so no register shuffles or shared-memory layout conversions are needed.
Per tile, for output row n (one program: BLOCK_N rows, one row m of x, one K split)::

    codes  (BLOCK_N, W, P)   P = 32 // bits codes per word (bytes layout), 32 (bit-planes)
    x      (W, P)            x[k0 + w·P + p], float32
    qx     (BLOCK_N, W)      = Σ_p codes · x
    acc   += Σ_w scale[n, group(w)] · (qx − zero[n, group(w)] · Σ_p x)

which is ``Σ_k (q − zero) · scale · x`` with one scale multiply per word, not per code. Each
word lies in one group: the group size must be a multiple of P (or cover all of K).

Same storage as the quantize pass (:mod:`slimline.quant.pack`, :mod:`slimline.quant.scheme`);
same call signature as :func:`~slimline.backends.cuda.quant_kernels.quant_matmul`. Tested under
``TRITON_INTERPRET=1`` against the torch form (``tests/quant/test_quant_gemv.py``); measured on
the GPU by ``benchmarks/quant_gpu.py`` (the ``gemv`` rows).

Shape legend:  M rows of x,  N out_features,  K in_features,  W words per tile,  P codes per word.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from slimline.errors import ConfigError

__all__ = ["GemvConfig", "quant_gemv", "gemv_configs", "supports", "GEMV_MAX_ROWS"]

GEMV_MAX_ROWS = 16  # each row of x re-reads the weights (from L2 when rows run together)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 8
    block_k: int = 512
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    @property
    def label(self) -> str:
        return f"gemv n{self.block_n}k{self.block_k}s{self.split_k}w{self.num_warps}p{self.num_stages}"


def codes_per_word(bits: int, layout: str) -> int:
    return 32 if layout == "planes" else 32 // bits


def supports(bits: int, layout: str, group_size: int, in_features: int, rows: int) -> str | None:
    """None if the kernel serves this layer, else the reason it does not."""
    if rows > GEMV_MAX_ROWS:
        return f"{rows} rows > {GEMV_MAX_ROWS}: use the GEMM kernel"
    if group_size < in_features and group_size % codes_per_word(bits, layout):
        return f"groups of {group_size} split {codes_per_word(bits, layout)}-code words"
    return None


@triton.jit
def _gemv_kernel(x_ptr, words_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
                 N, K, words_per_row, groups_per_row, stride_xm, stride_plane, stride_wn,
                 stride_sn, stride_zn, stride_os, stride_om,
                 BITS: tl.constexpr, PLANES: tl.constexpr, GROUP: tl.constexpr,
                 HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, P: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    row = tl.program_id(2)
    W: tl.constexpr = BLOCK_K // P
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = tl.arange(0, W)
    offs_p = tl.arange(0, P)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_s * k_span
    for k0 in range(k_begin, tl.minimum(k_begin + k_span, K), BLOCK_K):
        word = k0 // P + offs_w  # (W,)
        mask_w = mask_n[:, None] & (word < words_per_row)[None, :]  # (BLOCK_N, W)
        if PLANES:
            codes = tl.zeros((BLOCK_N, W, P), dtype=tl.int32)
            for b in tl.static_range(BITS):
                words = tl.load(words_ptr + b * stride_plane + offs_n[:, None] * stride_wn + word[None, :],
                                mask=mask_w, other=0)
                codes |= ((words[:, :, None] >> offs_p[None, None, :]) & 1) << b
        else:
            words = tl.load(words_ptr + offs_n[:, None] * stride_wn + word[None, :], mask=mask_w, other=0)
            codes = (words[:, :, None] >> (offs_p * BITS)[None, None, :]) & ((1 << BITS) - 1)
        k_index = k0 + offs_w[:, None] * P + offs_p[None, :]  # (W, P)
        x = tl.load(x_ptr + row * stride_xm + k_index, mask=k_index < K, other=0.0).to(tl.float32)
        qx = tl.sum(codes.to(tl.float32) * x[None, :, :], axis=2)  # (BLOCK_N, W)
        group = (k0 + offs_w * P) // GROUP  # (W,)
        mask_g = mask_w & (group < groups_per_row)[None, :]
        scale = tl.load(scales_ptr + offs_n[:, None] * stride_sn + group[None, :], mask=mask_g, other=0.0)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + offs_n[:, None] * stride_zn + group[None, :], mask=mask_g,
                           other=0).to(tl.float32)
        else:
            zero = (1 << (BITS - 1)) * 1.0
        acc += tl.sum(scale * (qx - zero * tl.sum(x, axis=1)[None, :]), axis=1)
    if HAS_BIAS:
        if pid_s == 0:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_s * stride_os + row * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty),
             mask=mask_n)


def gemv_configs(n: int, k: int, bits: int, layout: str, group_size: int) -> list[GemvConfig]:
    """The candidates for one shape: tiles whose words line up with the groups, from few long
    programs to many short ones (an H200 has 132 multiprocessors)."""
    per_word = codes_per_word(bits, layout)
    configs = []
    for block_n in (4, 8, 16, 32):
        for block_k in (256, 512, 1024):
            if block_k < per_word or block_k > max(k, per_word) * 2:
                continue
            for split_k in (1, 2, 4):
                if block_k * split_k > max(k, block_k) or (split_k > 1 and -(-n // block_n) >= 264):
                    continue
                if block_n * block_k > 16384:  # registers: the (BLOCK_N, W, P) code tile
                    continue
                configs.append(GemvConfig(block_n, block_k, split_k, 4 if block_n * block_k <= 8192 else 8))
    # programs closest to two waves first
    configs.sort(key=lambda c: (abs(-(-n // c.block_n) * c.split_k - 264), -c.block_k))
    return configs[:12] or [GemvConfig()]


def quant_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor | None, bias: torch.Tensor | None, *, bits: int, layout: str,
               group_size: int, in_features: int, config: GemvConfig | None = None,
               padded_features: int | None = None) -> torch.Tensor:
    """``x (..., K) -> (..., N)``: :func:`slimline.quant.linear.quantized_linear`'s numbers up to
    the order of the sums, for at most :data:`GEMV_MAX_ROWS` rows of x."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    reason = supports(bits, layout, group_size, in_features, m)
    if reason:
        raise ConfigError(f"dequant-GEMV cannot run this layer: {reason}", stage="backend",
                          where="quant_gemv", hint="use quant_kernels.quant_matmul")
    planes = layout == "planes"
    words = packed.contiguous().view(torch.int32)  # (N, Kp·bits/32) or (bits, N, Kp/32)
    n = words.shape[1] if planes else words.shape[0]
    config = config or gemv_configs(n, in_features, bits, layout, group_size)[0]
    split = config.split_k
    out = torch.empty((split, m, n) if split > 1 else (m, n), device=x.device,
                      dtype=torch.float32 if split > 1 else x.dtype)
    grid = (triton.cdiv(n, config.block_n), split, m)
    _gemv_kernel[grid](
        x2, words, scales, zeros if zeros is not None else scales, bias if bias is not None else scales,
        out, n, in_features, words.shape[-1], scales.shape[1], x2.stride(0),
        words.stride(0) if planes else 0, words.stride(1) if planes else words.stride(0),
        scales.stride(0), zeros.stride(0) if zeros is not None else 0,
        out.stride(0) if split > 1 else 0, out.stride(-2),
        BITS=bits, PLANES=planes, GROUP=group_size, HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None, P=codes_per_word(bits, layout), BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=split,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if split > 1:
        out = out.sum(0).to(x.dtype)
    return out.reshape(*lead, n)
