"""A Triton dense matmul ``y = x · wᵀ`` for the autotuner's dense family (cuBLAS is its rival).

Shape letters: M rows of x, N out features, K in features; x (M, K), w (N, K), y (M, N).

One kernel body, tile sizes as compile-time constants (one config per launch; no multi-config
``@triton.autotune``, which breaks the interpreter). Program ids are grouped ``GROUP_M`` tiles
tall so that consecutive programs share x and w tiles in L2. ``SPLIT_K > 1`` (decode: few rows,
too few output tiles to fill the SMs) splits K: each split writes an fp32 partial (SPLIT_K, M, N)
and one torch sum reduces them. Accumulation is fp32; 16-bit inputs use tensor cores, fp32
inputs an IEEE dot (tests under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["DenseConfig", "dense_matmul", "KERNELS"]


@dataclass(frozen=True)
class DenseConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    @property
    def label(self) -> str:
        return (f"triton[m{self.block_m} n{self.block_n} k{self.block_k} g{self.group_m} s{self.split_k} "
                f"w{self.num_warps} st{self.num_stages}]")


@triton.jit
def _dense_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ys, stride_ym,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % rows_in_group
    pid_n = (pid % in_group) // rows_in_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_s * k_span
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, tl.minimum(k_begin + k_span, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)           # (BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)           # (BLOCK_N, BLOCK_K)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    out = y_ptr + pid_s * stride_ys + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


KERNELS = (_dense_kernel,)


def dense_matmul(x: torch.Tensor, w: torch.Tensor, config: DenseConfig) -> torch.Tensor:
    """``x (..., K) @ w (N, K)ᵀ`` with one tile config; x and w share a dtype."""
    lead = x.shape[:-1]
    x_MK = x.reshape(-1, x.shape[-1])
    if x_MK.stride(-1) != 1:
        x_MK = x_MK.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    M, K = x_MK.shape
    N = w.shape[0]
    split = config.split_k
    y = torch.empty((split, M, N) if split > 1 else (M, N), device=x.device,
                    dtype=torch.float32 if split > 1 else x.dtype)
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n), split)
    _dense_kernel[grid](x_MK, w, y, M, N, K, x_MK.stride(0), w.stride(0), y.stride(0) if split > 1 else 0,
                        y.stride(-2), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                        BLOCK_K=config.block_k, GROUP_M=config.group_m, SPLIT_K=split,
                        PRECISION="ieee" if x.dtype == torch.float32 else None,
                        num_warps=config.num_warps, num_stages=config.num_stages)
    if split > 1:
        y = y.sum(0).to(x.dtype)
    return y.reshape(*lead, N)
