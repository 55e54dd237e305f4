"""Triton kernels for the quantized linear ``y = x · dequant(packed)ᵀ + bias``: the codes are
unpacked and dequantized in registers, tile by tile, and never written back as a float weight.

They read exactly what the quantize pass stores (:mod:`slimline.quant.pack`,
:mod:`slimline.quant.scheme`): packed bytes viewed as little-endian int32 words, float32 scales
``(N, G)``, uint8 zero points ``(N, G)`` or none (symmetric: ``2**(bits-1)``). Code ``k`` of row
``n`` sits at

    bytes  (2, 4, 8 bits):  word[n, k // P] >> (bits · (k % P)),  P = 32 // bits codes a word
    planes (3, 5, 6 bits):  bit b is word[b, n, k // 32] >> (k % 32), one plane per bit

and means ``(q − zero[n, k // g]) · scale[n, k // g]``. A tile of codes is loaded as the words
that hold it (each word once per code it holds: the same cache line, so DRAM traffic is the
packed bytes), shifted and masked in registers, scaled, cast to ``x``'s dtype and fed to
``tl.dot`` with fp32 accumulation.

Two regimes, one kernel body, different tiles (:func:`candidate_configs`, derived by the
autotuner from the device's limits; :func:`cached_config` answers from its cache):

``gemv`` (decode, M ≤ 16): BLOCK_M = 16 rows of x (masked), narrow BLOCK_N, long BLOCK_K, and
    optional SPLIT_K: split programs write fp32 partials ``(SPLIT_K, M, N)``, summed by one small
    torch reduction. The weight bytes are read once in all.
``gemm`` (prefill): square-ish tiles, x re-read per N tile, weights per M tile.

One config per launch (no multi-config ``@triton.autotune``: it breaks the interpreter);
:func:`local_search` measures the candidates on the GPU. Tested on the CPU under
``TRITON_INTERPRET=1`` in fp32 (the interpreter's bf16 ``tl.dot`` is wrong); bf16/fp16 on the
GPU. Written for triton ≥ 3.6.

Shape legend:  M rows of x,  N out_features,  K in_features,  Kp K padded to 32,  G groups per
row,  g group size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["KernelConfig", "quant_matmul", "candidate_configs", "cached_config", "local_search",
           "interpreting", "compile_for_target", "GEMV_MAX_M"]

GEMV_MAX_M = 16


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    @property
    def label(self) -> str:
        return (f"m{self.block_m}n{self.block_n}k{self.block_k}s{self.split_k}"
                f"w{self.num_warps}p{self.num_stages}")


@triton.jit
def _codes_tile(words_ptr, offs_n, mask_n, k0, words_per_row, stride_plane, stride_n,
                BITS: tl.constexpr, PLANES: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Codes (BLOCK_N, BLOCK_K) int32 of rows ``offs_n``, inputs ``k0 … k0 + BLOCK_K``.

    Each word is loaded once and fanned out in registers: (BLOCK_N, words) → shift by every
    field position → (BLOCK_N, words, codes per word) → reshape, which keeps input order.
    ``k0`` is a multiple of BLOCK_K, itself a multiple of 32, so tiles start on a word.
    """
    if PLANES:
        offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        mask = mask_n[:, None] & (offs_w < words_per_row)[None, :]
        positions = tl.arange(0, 32)
        fields = tl.zeros((BLOCK_N, BLOCK_K // 32, 32), dtype=tl.int32)
        for b in tl.static_range(BITS):
            words = tl.load(words_ptr + b * stride_plane + offs_n[:, None] * stride_n + offs_w[None, :],
                            mask=mask, other=0)  # (BLOCK_N, BLOCK_K/32)
            fields |= ((words[:, :, None] >> positions[None, None, :]) & 1) << b
        codes = tl.reshape(fields, (BLOCK_N, BLOCK_K))
    else:  # an explicit else: the compiler prunes only the branch a constexpr rules out
        PER_WORD: tl.constexpr = 32 // BITS
        offs_w = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
        mask = mask_n[:, None] & (offs_w < words_per_row)[None, :]
        words = tl.load(words_ptr + offs_n[:, None] * stride_n + offs_w[None, :], mask=mask, other=0)
        shifts = tl.arange(0, PER_WORD) * BITS
        fields = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # (BLOCK_N, words, PER_WORD)
        codes = tl.reshape(fields, (BLOCK_N, BLOCK_K))
    return codes


@triton.jit
def _group_tile(ptr, offs_n, mask_n, k0, offs_k, mask_k, groups_per_row, stride_n, GROUP: tl.constexpr,
                SCALE_MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-group values (scales or zero points) spread over a (BLOCK_N, BLOCK_K) tile.

    SCALE_MODE 0: one group covers the tile's valid inputs (per channel, or GROUP a multiple
    of BLOCK_K): a (BLOCK_N,) load. 1: BLOCK_K a multiple of GROUP: (BLOCK_N, BLOCK_K/GROUP)
    loads, fanned out. 2: anything else: one (cached) load per element.
    """
    if SCALE_MODE == 0:
        values = tl.load(ptr + offs_n * stride_n + k0 // GROUP, mask=mask_n, other=0)
        spread = tl.broadcast_to(values[:, None], (BLOCK_N, BLOCK_K))
    elif SCALE_MODE == 1:
        offs_g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        values = tl.load(ptr + offs_n[:, None] * stride_n + offs_g[None, :],
                         mask=mask_n[:, None] & (offs_g < groups_per_row)[None, :], other=0)
        spread = tl.reshape(tl.broadcast_to(values[:, :, None], (BLOCK_N, BLOCK_K // GROUP, GROUP)),
                            (BLOCK_N, BLOCK_K))
    else:
        group = offs_k // GROUP
        spread = tl.load(ptr + offs_n[:, None] * stride_n + group[None, :],
                         mask=mask_n[:, None] & mask_k[None, :], other=0)
    return spread


@triton.jit
def _quant_matmul_kernel(x_ptr, words_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
                         M, N, K, words_per_row, groups_per_row, stride_xm, stride_plane,
                         stride_wn, stride_sn, stride_zn, stride_os, stride_om,
                         BITS: tl.constexpr, PLANES: tl.constexpr, GROUP: tl.constexpr,
                         SCALE_MODE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # each split's K range, whole tiles
    k_begin = pid_s * k_span
    for k0 in range(k_begin, tl.minimum(k_begin + k_span, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        codes = _codes_tile(words_ptr, offs_n, mask_n, k0, words_per_row, stride_plane, stride_wn,
                            BITS, PLANES, BLOCK_N, BLOCK_K)
        scale = _group_tile(scales_ptr, offs_n, mask_n, k0, offs_k, mask_k, groups_per_row, stride_sn, GROUP,
                            SCALE_MODE, BLOCK_N, BLOCK_K)
        if HAS_ZEROS:
            zero = _group_tile(zeros_ptr, offs_n, mask_n, k0, offs_k, mask_k, groups_per_row, stride_zn, GROUP,
                               SCALE_MODE, BLOCK_N, BLOCK_K).to(tl.float32)
        else:
            zero = (1 << (BITS - 1)) * 1.0
        weight = ((codes.to(tl.float32) - zero) * scale).to(x.dtype)  # (BLOCK_N, BLOCK_K)
        acc += tl.dot(x, tl.trans(weight))
    if HAS_BIAS:
        if pid_s == 0:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _scale_mode(group: int, in_features: int, block_k: int) -> int:
    if group >= in_features or group % block_k == 0:
        return 0
    if block_k % group == 0:
        return 1
    return 2


def candidate_configs(m: int, n: int, k: int, bits: int, group: int = 128, limits=None,
                      mode: str = "lite") -> list[KernelConfig]:
    """The lite search space for one shape: about ten configs that can run.

    Derived by the autotuner (:class:`slimline.autotune.space.QuantMatmul`) from the device's
    limits (``limits``; default: this GPU, or the fixed H200 description without one): shared
    memory, registers per thread, enough programs to fill the SMs, split-K only for GEMV rows.
    """
    from slimline.autotune.space import Problem, family

    problem = Problem.make("quant_matmul", M=m, N=n, K=k, bits=bits, group=group, dtype="bf16")
    found = family("quant_matmul").candidates(problem, _limits(limits), mode)
    configs = [_from_autotune(c.as_dict()) for c in found if c.as_dict().get("impl") == "triton"]
    return configs or [_default_config(m, n, k, bits)]


def _limits(limits=None):
    from slimline.autotune.space import H200, DeviceLimits

    if limits is not None:
        return limits
    return DeviceLimits.from_torch() if torch.cuda.is_available() else H200


def _from_autotune(config: dict) -> KernelConfig:
    return KernelConfig(config["block_m"], config["block_n"], config["block_k"], config["split_k"],
                        config["num_warps"], config["num_stages"])


def cached_config(m: int, n: int, k: int, bits: int, group: int = 128, dtype: str = "bf16",
                  mode: str = "cache") -> KernelConfig:
    """The autotuner's pick for this shape: its cache, the shipped defaults, else its model's.

    ``mode="cache"`` never measures (no GPU needed). When the pick is the torch form (dequantize
    + matmul), the model's best Triton config is returned: a caller asking for the kernel gets one.
    """
    from slimline.autotune import KernelInstance, Problem, tune
    from slimline.autotune.space import family

    problem = Problem.make("quant_matmul", M=m, N=n, K=k, bits=bits, group=group, dtype=dtype)
    record = tune([KernelInstance("quant_matmul", problem)], mode)[0]
    if record.config.get("impl") == "triton":
        return _from_autotune(record.config)
    return _from_autotune(family("quant_matmul").perf_model_pick(problem, _limits()).as_dict())


def _default_config(m: int, n: int, k: int, bits: int) -> KernelConfig:
    if m <= GEMV_MAX_M:
        return KernelConfig(16, 32, 128, 1, 4, 3)
    return KernelConfig(64, 64, 64, 1, 4, 3)


def quant_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, bias: torch.Tensor | None, *, bits: int, layout: str,
                 group_size: int, in_features: int, config: KernelConfig | None = None,
                 padded_features: int | None = None) -> torch.Tensor:
    """``x (..., K) -> (..., N)``: the same numbers as :func:`slimline.quant.linear.quantized_linear`
    up to the order of the sums (``padded_features`` is accepted for the same call signature)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    planes = layout == "planes"
    words = packed.contiguous().view(torch.int32)  # (N, Kp·bits/32) or (bits, N, Kp/32)
    n = words.shape[1] if planes else words.shape[0]
    config = config or _default_config(m, n, k, bits)
    split = config.split_k
    out_dtype = torch.float32 if split > 1 else x.dtype
    out = torch.empty((split, m, n) if split > 1 else (m, n), device=x.device, dtype=out_dtype)
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), split)
    _quant_matmul_kernel[grid](
        x2, words, scales, zeros if zeros is not None else scales, bias if bias is not None else scales,
        out, m, n, in_features, words.shape[-1], scales.shape[1], x2.stride(0),
        words.stride(0) if planes else 0, words.stride(1) if planes else words.stride(0),
        scales.stride(0), zeros.stride(0) if zeros is not None else 0,
        out.stride(0) if split > 1 else 0, out.stride(-2),
        BITS=bits, PLANES=planes, GROUP=group_size,
        SCALE_MODE=_scale_mode(group_size, in_features, config.block_k), HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, SPLIT_K=split, num_warps=config.num_warps,
        num_stages=config.num_stages)
    if split > 1:
        out = out.sum(0).to(x.dtype)
    return out.reshape(*lead, n)


def local_search(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, bias: torch.Tensor | None, *, bits: int, layout: str,
                 group_size: int, in_features: int, reference: torch.Tensor | None = None,
                 rtol: float = 2e-2) -> tuple[KernelConfig, list[dict]]:
    """Measure every candidate config; the fastest that is correct, and every timing.

    Uses the autotuner's protocol (:func:`slimline.autotune.measure.measure`): a correctness gate
    (‖y − ref‖ / ‖ref‖ ≤ ``rtol``), CUDA events after an L2 flush (graphs for short kernels),
    successive halving. Under the interpreter the "timing" is one wall-clock call: it checks the
    search, not speed.
    """
    from slimline.autotune.measure import CpuTimer, CudaTimer, Protocol, measure
    from slimline.autotune.space import Candidate, Workload

    m = x.reshape(-1, x.shape[-1]).shape[0]
    n = scales.shape[0]
    configs = candidate_configs(m, n, in_features, bits, group_size)
    by_label = {config.label: config for config in configs}

    def run(candidate):
        config = by_label[candidate.label]
        return lambda: quant_matmul(x, packed, scales, zeros, bias, bits=bits, layout=layout,
                                    group_size=group_size, in_features=in_features, config=config)

    if reference is None:  # no reference given: the first config's output stands in
        reference = run(Candidate(configs[0].label))()
    workload = Workload(reference.float(), run, rtol)
    gpu = x.device.type == "cuda" and not interpreting()
    protocol = Protocol() if gpu else Protocol(first_samples=1, max_samples=1)
    timer = CudaTimer(_limits().l2_bytes, protocol, x.device) if gpu else CpuTimer()
    outcome = measure(workload, [Candidate(c.label) for c in configs], timer, protocol=protocol, device=x.device)
    results = []
    for row in outcome.rows:
        if "ms" in row:
            results.append({"config": row["candidate"], "ms": row["ms"], "rel_error": row.get("rel_error"),
                            "correct": row["ok"]})
        else:
            results.append({"config": row["candidate"], "error": row.get("why", "not run"),
                            "rel_error": row.get("rel_error"), "correct": False})
    good = [r for r in results if r.get("correct")]
    if not good:
        raise RuntimeError(f"no correct config among {len(results)}: {results[:3]}")
    best = min(good, key=lambda r: r["ms"])
    return by_label[best["config"]], results


def compile_for_target(bits: int, layout: str, group_size: int, in_features: int,
                       config: KernelConfig, *, dtype: torch.dtype = torch.bfloat16,
                       has_zeros: bool = True, has_bias: bool = False, arch: int = 90) -> dict:
    """Compile one config for ``sm_{arch}`` without a GPU (not under ``TRITON_INTERPRET``):
    catches what the interpreter lets through (layouts, dot shapes) and reports resources.

    Pointers are marked 16-divisible, as Triton's launcher specialises them. Returns the
    registers per thread, spilled bytes and shared memory of the compiled kernel.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    element = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    pointers = {"x_ptr": element, "words_ptr": "i32", "scales_ptr": "fp32", "zeros_ptr": "u8",
                "bias_ptr": element, "out_ptr": "fp32" if config.split_k > 1 else element}
    constants = {"BITS": bits, "PLANES": layout == "planes", "GROUP": group_size,
                 "SCALE_MODE": _scale_mode(group_size, in_features, config.block_k),
                 "HAS_ZEROS": has_zeros, "HAS_BIAS": has_bias, "BLOCK_M": config.block_m,
                 "BLOCK_N": config.block_n, "BLOCK_K": config.block_k, "SPLIT_K": config.split_k}
    kernel = _quant_matmul_kernel
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    metadata = compiled.metadata
    return {"config": config.label, "shared_bytes": getattr(metadata, "shared", None),
            "registers": getattr(compiled, "n_regs", None), "spills": getattr(compiled, "n_spills", None),
            "asm_keys": sorted(compiled.asm)}
