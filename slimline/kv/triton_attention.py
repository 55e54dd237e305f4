"""Decode attention as one split-K Triton kernel that also writes the logits the policy scores.

One new token's query against a (compact) cache: ``softmax(q·Kᵀ·scale)·V``, with the scaled
logits ``q·Kᵀ·scale`` stored on the side (fp32) because Keyformer and H2O accumulate them. At
batch 1 the torch form (GEMV, scale, cast, softmax, cast, GEMV) spends several small launches
per layer on top of reading K and V; here every K/V byte is read once, by one program, in one
launch, and a second small launch combines the splits (flash-decoding).

    split kernel    program (b, h, split) walks SPLIT = BLOCK_S · BLOCKS_PER_SPLIT keys of head h's
                    key/value head: logits s = K·q·scale (stored), then an online softmax
                    (running max m, sum l, weighted value sum acc) over its keys
    combine kernel  program (b, h): M = max m_i; out = Σ e^(m_i-M)·acc_i / Σ e^(m_i-M)·l_i

With ``length`` (a device tensor, so a CUDA graph can replay one launch while the cache fills)
only slots below it are read; a split, or a block, with no key yet keeps m = -inf, l = 0 and
adds nothing (its exponentials are taken against 0, not -inf, so no NaN); at least one key
must be valid.
Loop bounds are compile-time constants (the interpreter and triton 3.6 both like that). K and V
may be strided views (the compact cache's ``[..., :filled, :]``) with a contiguous last dim.

Shape legend: B batch, H query heads, Hkv key/value heads, G = H / Hkv, S slots, D head size,
P splits.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel is optional: decode_attention falls back to torch
    triton = None

__all__ = ["AVAILABLE", "decode_attention_triton", "interpreting", "BLOCK_S", "BLOCKS_PER_SPLIT"]

AVAILABLE = triton is not None
BLOCK_S = 64
BLOCKS_PER_SPLIT = 4


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if AVAILABLE:

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, logits_ptr, m_ptr, l_ptr, acc_ptr, length_ptr,
                      S, H, G, Hkv, scale,
                      stride_qb, stride_qh,
                      stride_kb, stride_kh, stride_ks,
                      stride_vb, stride_vh, stride_vs,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCKS_PER_SPLIT: tl.constexpr, STORE_LOGITS: tl.constexpr, HAS_LENGTH: tl.constexpr):
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        num_splits = tl.num_programs(1)
        b = pid_bh // H
        h = pid_bh % H
        kv = h // G
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + offs_d, mask=mask_d, other=0.0)
        q = q.to(tl.float32) * scale
        k_base = k_ptr + b.to(tl.int64) * stride_kb + kv.to(tl.int64) * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + kv.to(tl.int64) * stride_vh
        m = tl.full((), float("-inf"), tl.float32)
        l = tl.zeros((), tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        valid = S
        if HAS_LENGTH:  # slots [length, S) are unused: read nothing there, logits -inf
            valid = tl.minimum(tl.load(length_ptr).to(tl.int32), S)
        start = split * (BLOCK_S * BLOCKS_PER_SPLIT)
        for block in range(BLOCKS_PER_SPLIT):
            offs_s = start + block * BLOCK_S + tl.arange(0, BLOCK_S)
            mask_s = offs_s < valid
            mask = mask_s[:, None] & mask_d[None, :]
            k = tl.load(k_base + offs_s[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=mask, other=0.0)
            s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # (BLOCK_S,) scaled logits
            s = tl.where(mask_s, s, float("-inf"))
            if STORE_LOGITS:
                tl.store(logits_ptr + pid_bh.to(tl.int64) * S + offs_s, s, mask=offs_s < S)
            m_new = tl.maximum(m, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no key yet: no NaN
            alpha = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe)
            v = tl.load(v_base + offs_s[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=mask, other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            l = l * alpha + tl.sum(p, axis=0)
            m = m_new
        partial = pid_bh * num_splits + split
        tl.store(m_ptr + partial, m)
        tl.store(l_ptr + partial, l)
        tl.store(acc_ptr + partial.to(tl.int64) * BLOCK_D + offs_d, acc)

    @triton.jit
    def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, num_splits, stride_ob, stride_oh, H,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
        pid_bh = tl.program_id(0)
        b = pid_bh // H
        h = pid_bh % H
        offs_p = tl.arange(0, BLOCK_P)
        mask_p = offs_p < num_splits
        offs_d = tl.arange(0, BLOCK_D)
        m = tl.load(m_ptr + pid_bh * num_splits + offs_p, mask=mask_p, other=float("-inf"))
        l = tl.load(l_ptr + pid_bh * num_splits + offs_p, mask=mask_p, other=0.0)
        rows = (pid_bh * num_splits + offs_p).to(tl.int64) * BLOCK_D
        acc = tl.load(acc_ptr + rows[:, None] + offs_d[None, :], mask=mask_p[:, None], other=0.0)
        top = tl.max(m, axis=0)
        weight = tl.where(mask_p, tl.exp(m - top), 0.0)
        out = tl.sum(weight[:, None] * acc, axis=0) / tl.sum(weight * l, axis=0)
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d,
                 out.to(out_ptr.dtype.element_ty), mask=offs_d < D)


def decode_attention_triton(
    query: torch.Tensor,  # (B, H, 1, D)
    key: torch.Tensor,  # (B, Hkv, S, D), last dim contiguous
    value: torch.Tensor,  # (B, Hkv, S, D), last dim contiguous
    scale: float,
    want_logits: bool = True,
    length: torch.Tensor | None = None,  # (1,) int on the device: only slots [0, length) are read
) -> tuple[torch.Tensor, torch.Tensor | None]:  # (B, H, 1, D), logits (B, Hkv, G, S) float32 (-inf past length)
    B, H, _, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    G = H // Hkv
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    query = query.contiguous()
    split = BLOCK_S * BLOCKS_PER_SPLIT
    num_splits = triton.cdiv(S, split)
    block_d = triton.next_power_of_2(D)
    device = query.device
    logits = torch.empty((B, Hkv, G, S), dtype=torch.float32, device=device) if want_logits else \
        torch.empty((1,), dtype=torch.float32, device=device)
    m = torch.empty((B * H * num_splits,), dtype=torch.float32, device=device)
    l = torch.empty_like(m)
    acc = torch.empty((B * H * num_splits, block_d), dtype=torch.float32, device=device)
    out = torch.empty((B, H, 1, D), dtype=query.dtype, device=device)
    _split_kernel[(B * H, num_splits)](
        query, key, value, logits, m, l, acc, m if length is None else length, S, H, G, Hkv, float(scale),
        query.stride(0), query.stride(1),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        D=D, BLOCK_D=block_d, BLOCK_S=BLOCK_S, BLOCKS_PER_SPLIT=BLOCKS_PER_SPLIT, STORE_LOGITS=want_logits,
        HAS_LENGTH=length is not None)
    _combine_kernel[(B * H,)](
        m, l, acc, out, num_splits, out.stride(0), out.stride(1), H,
        D=D, BLOCK_D=block_d, BLOCK_P=max(2, triton.next_power_of_2(num_splits)))
    return out, (logits if want_logits else None)
