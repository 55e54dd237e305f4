"""Triton kernels for one decode step at batch 1: GEMV at bandwidth with the neighbours fused in,
and attention over a static KV cache whose length lives on the device (so one CUDA graph serves
every position).

At batch 1 a decode step is a chain of matrix-vector products: every weight byte is read once
and used for two FLOPs, so the step's floor is weight bytes / memory bandwidth. cuBLAS reaches
about 2.7 of the H200's 4.2 TB/s on bf16 GEMV; the kernels here read each weight tile with wide
loads, keep the partial products in registers, and fold the small ops around each product into
the same launch so that no extra kernel (and no extra round trip through memory) sits between
two products:

    gemv        y = W · f(x) (+ r)       one program per BLOCK_N rows of W (N, K), K walked in
                                         BLOCK_K slices. Prologue f: none, RMSNorm or LayerNorm
                                         of x (each program recomputes the statistics of x: K
                                         values, read from L2). Epilogue: none, SiLU(gate)·up
                                         (W holds [gate; up], (2F, K): a program computes rows n
                                         of both), or GELU; then an optional residual add, which
                                         may write in place over r.
    attention   one program per (query head, split of BLOCK_S·BLOCKS_PER_SPLIT cache slots):
                reads q, k, v of the new token from the fused QKV output, applies the rotary
                embedding at the position read from ``position_ptr``, writes k and v into the
                cache at that position (the split that holds it), and runs an online softmax
                over the slots 0..position of its split; the last split of a head to finish (an
                atomic count per head) merges the splits' partial results (flash-decoding's
                combine, inside the same launch). Splits past the position return at once, but
                the grid is fixed, so the step is graph-capturable.
    advance     the step's end, one program: argmax of the logits (the first maximum, as
                torch.argmax), position += 1, the token into the history, and the token's
                embedding row into x for the next step.

Programmatic dependent launch (Hopper, ``pdl=True``): each kernel lets the next one start as soon
as all its programs are running, and the next one reads what does not depend on its predecessor
(its first weight slice; for attention the cached slots of earlier steps and the rotary tables)
before ``gdc_wait``, so the DRAM latency and launch gap of one product hide behind the tail of
the previous one. Every write comes after the wait. ``advance`` never signals its dependents: the
next step's kernels start after it has finished, so what they read before their own wait (the
position, the cached slots) is settled. Under the interpreter the flag is ignored.

Rounding follows the torch modules these kernels replace (bf16 results rounded where torch
rounds them: norm output, projection output, activation, product, rotary terms), with fp32
accumulation throughout; what differs is the summation order inside each dot product.

Shape legend: N output rows, K input width, F MLP width, H query heads, Hkv key/value heads,
G = H / Hkv, S cache slots, D head size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the decode engine reports it; the rest of the backend does not need Triton
    triton = None
try:  # programmatic dependent launch (Hopper): a kernel starts while its predecessor drains
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
    from triton.language.extra.cuda import gdc_wait as _gdc_wait
except ImportError:
    _gdc_launch_dependents = _gdc_wait = None

__all__ = ["AVAILABLE", "GemvConfig", "GEMV_CANDIDATES", "GEMV_CANDIDATES_THIN", "DEFAULT_GEMV", "NORM_NONE",
           "NORM_RMS", "NORM_LAYER", "ACT_NONE", "ACT_SILU_PAIR", "ACT_GELU", "gemv", "static_decode_attention",
           "ATTENTION_BLOCK_S", "ATTENTION_BLOCKS_PER_SPLIT", "PDL_AVAILABLE", "attention_partials", "advance"]

AVAILABLE = triton is not None
PDL_AVAILABLE = AVAILABLE and _gdc_wait is not None

NORM_NONE, NORM_RMS, NORM_LAYER = 0, 1, 2
ACT_NONE, ACT_SILU_PAIR, ACT_GELU = 0, 1, 2
ATTENTION_BLOCK_S = 64
ATTENTION_BLOCKS_PER_SPLIT = 1


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int

    def to_json(self) -> dict:
        return {"block_n": self.block_n, "block_k": self.block_k, "num_warps": self.num_warps}


# Candidates measured per weight shape on the device (slimline.backends.cuda.decoder tunes them);
# rows x slice sizes between 8 KB and 32 KB of bf16 weights per loop trip.
GEMV_CANDIDATES = (
    GemvConfig(2, 2048, 4),
    GemvConfig(4, 1024, 4),
    GemvConfig(4, 2048, 8),
    GemvConfig(8, 512, 4),
    GemvConfig(2, 1024, 4),
    GemvConfig(4, 512, 4),
    GemvConfig(8, 256, 4),
)
# For thin products (a low-rank factor: few rows, or a short K): slices that waste less on masks.
GEMV_CANDIDATES_THIN = (
    GemvConfig(2, 2048, 4),
    GemvConfig(2, 1024, 4),
    GemvConfig(4, 1024, 4),
    GemvConfig(4, 512, 4),
    GemvConfig(8, 256, 4),
    GemvConfig(8, 512, 4),
)
DEFAULT_GEMV = GemvConfig(8, 512, 4)


if AVAILABLE:

    @triton.jit
    def _round(value, like_ptr):
        """Round fp32 ``value`` to the element type behind ``like_ptr`` and back (torch's rounding)."""
        return value.to(like_ptr.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, res_ptr, g_ptr, b_ptr, N, eps,
                     K: tl.constexpr, NORM: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr,
                     EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
        pid = tl.program_id(0)
        if USE_PDL:
            _gdc_launch_dependents()
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rows = offs_n.to(tl.int64) * K  # (BLOCK_N,) row starts in W
        # the first weight slice does not depend on the previous kernel: load it before waiting
        first_k = tl.arange(0, BLOCK_K)
        first_pointers = w_ptr + rows[:, None] + first_k[None, :]
        first_mask = mask_n[:, None] & (first_k < K)[None, :]
        if EVEN_N and EVEN_K:
            w_first = tl.load(first_pointers)
        else:
            w_first = tl.load(first_pointers, mask=first_mask, other=0.0)
        if ACT == 1:  # the up rows sit N rows below the gate rows
            if EVEN_N and EVEN_K:
                w_up_first = tl.load(first_pointers + N * K)
            else:
                w_up_first = tl.load(first_pointers + N * K, mask=first_mask, other=0.0)
        if USE_PDL:
            _gdc_wait()  # x and the residual come from the previous kernel
        mean = 0.0
        rstd = 1.0
        if NORM != 0:  # statistics of x (K values), recomputed by every program
            total = tl.zeros((BLOCK_K,), tl.float32)
            for k0 in tl.static_range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                xk = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                if NORM == 1:
                    total += xk * xk
                else:
                    total += xk
            if NORM == 1:
                rstd = 1.0 / tl.sqrt(tl.sum(total, axis=0) / K + eps)
            else:
                mean = tl.sum(total, axis=0) / K
                squares = tl.zeros((BLOCK_K,), tl.float32)
                for k0 in tl.static_range(0, K, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    xk = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                    centred = tl.where(offs_k < K, xk - mean, 0.0)
                    squares += centred * centred
                rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            if EVEN_K:
                xk = tl.load(x_ptr + offs_k).to(tl.float32)
            else:
                xk = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            if NORM == 1:  # torch's RMSNorm: (x·rstd) rounded, times the weight, rounded
                g = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                xk = _round(_round(xk * rstd, x_ptr) * g, x_ptr)
            if NORM == 2:  # LayerNorm: computed in fp32, rounded once
                g = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                b = tl.load(b_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                xk = _round((xk - mean) * rstd * g + b, x_ptr)
            if k0 == 0:
                w = w_first
            else:
                pointers = w_ptr + rows[:, None] + offs_k[None, :]
                if EVEN_N and EVEN_K:
                    w = tl.load(pointers)
                else:
                    w = tl.load(pointers, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc += w.to(tl.float32) * xk[None, :]
            if ACT == 1:
                if k0 == 0:
                    w_up = w_up_first
                else:
                    pointers = w_ptr + N * K + rows[:, None] + offs_k[None, :]
                    if EVEN_N and EVEN_K:
                        w_up = tl.load(pointers)
                    else:
                        w_up = tl.load(pointers, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                acc_up += w_up.to(tl.float32) * xk[None, :]
        y = _round(tl.sum(acc, axis=1), out_ptr)  # (BLOCK_N,) the projection, rounded as torch does
        if ACT == 1:  # silu(gate) * up
            up = _round(tl.sum(acc_up, axis=1), out_ptr)
            y = _round(_round(y * tl.sigmoid(y), out_ptr) * up, out_ptr)
        if ACT == 2:  # exact (erf) GELU
            y = _round(0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476)), out_ptr)
        if RESIDUAL:
            r = tl.load(res_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            y = r + y
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _attention_kernel(qkv_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, position_ptr,
                          m_ptr, l_ptr, acc_ptr, counter_ptr, out_ptr, S, G, scale,
                          stride_kh, stride_ks, stride_vh, stride_vs,
                          H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCKS_PER_SPLIT: tl.constexpr, BLOCK_P: tl.constexpr, USE_PDL: tl.constexpr):
        h = tl.program_id(0)
        split = tl.program_id(1)
        num_splits = tl.num_programs(1)
        if USE_PDL:
            _gdc_launch_dependents()
        kv = h // G
        # before the wait: what earlier steps wrote (the position, the cached slots) and the tables
        position = tl.load(position_ptr).to(tl.int32)
        split_size = BLOCK_S * BLOCKS_PER_SPLIT
        active = position // split_size + 1  # the splits that hold slots 0..position; the rest do nothing
        if split < active:
            offs_d = tl.arange(0, D)
            partner = (offs_d + D // 2) % D  # rotate-half: [-x2, x1]
            sign = tl.where(offs_d < D // 2, -1.0, 1.0)
            cos = tl.load(cos_ptr + position * D + offs_d).to(tl.float32)
            sin = tl.load(sin_ptr + position * D + offs_d).to(tl.float32)
            start = split * split_size
            k_base = k_cache_ptr + kv.to(tl.int64) * stride_kh
            v_base = v_cache_ptr + kv.to(tl.int64) * stride_vh
            first_s = start + tl.arange(0, BLOCK_S)
            first_older = first_s < position
            k_first = tl.load(k_base + first_s[:, None].to(tl.int64) * stride_ks + offs_d[None, :],
                              mask=first_older[:, None], other=0.0)
            v_first = tl.load(v_base + first_s[:, None].to(tl.int64) * stride_vs + offs_d[None, :],
                              mask=first_older[:, None], other=0.0)
            if USE_PDL:
                _gdc_wait()  # q, k, v of the new token come from the previous kernel
            q = tl.load(qkv_ptr + h * D + offs_d).to(tl.float32)
            q_partner = tl.load(qkv_ptr + h * D + partner).to(tl.float32) * sign
            q = _round(_round(q * cos, qkv_ptr) + _round(q_partner * sin, qkv_ptr), qkv_ptr) * scale
            k_offset = H * D + kv * D
            k_new = tl.load(qkv_ptr + k_offset + offs_d).to(tl.float32)
            k_partner = tl.load(qkv_ptr + k_offset + partner).to(tl.float32) * sign
            k_new = _round(_round(k_new * cos, qkv_ptr) + _round(k_partner * sin, qkv_ptr), qkv_ptr)
            v_new = tl.load(qkv_ptr + H * D + HKV * D + kv * D + offs_d).to(tl.float32)
            if (h % G == 0) & (position >= start) & (position < start + split_size):  # this split owns the slot
                tl.store(k_base + position.to(tl.int64) * stride_ks + offs_d,
                         k_new.to(k_cache_ptr.dtype.element_ty))
                tl.store(v_base + position.to(tl.int64) * stride_vs + offs_d,
                         v_new.to(v_cache_ptr.dtype.element_ty))
            m = tl.full((), float("-inf"), tl.float32)
            l = tl.zeros((), tl.float32)
            acc = tl.zeros((D,), tl.float32)
            for block in tl.static_range(BLOCKS_PER_SPLIT):
                offs_s = start + block * BLOCK_S + tl.arange(0, BLOCK_S)
                if block == 0:
                    k = k_first.to(tl.float32)
                    v = v_first.to(tl.float32)
                else:
                    older = offs_s < position  # slots already in the cache; the new token comes from registers
                    rows = offs_s[:, None].to(tl.int64)
                    k = tl.load(k_base + rows * stride_ks + offs_d[None, :], mask=older[:, None],
                                other=0.0).to(tl.float32)
                    v = tl.load(v_base + rows * stride_vs + offs_d[None, :], mask=older[:, None],
                                other=0.0).to(tl.float32)
                is_new = (offs_s == position)[:, None]
                k = tl.where(is_new, k_new[None, :], k)
                v = tl.where(is_new, v_new[None, :], v)
                s = tl.sum(k * q[None, :], axis=1)  # (BLOCK_S,)
                s = tl.where(offs_s <= position, s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no slot yet
                alpha = tl.exp(m - m_safe)
                p = tl.exp(s - m_safe)
                acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
                l = l * alpha + tl.sum(p, axis=0)
                m = m_new
            partial = h * num_splits + split
            tl.store(m_ptr + partial, m)
            tl.store(l_ptr + partial, l)
            tl.store(acc_ptr + partial * D + offs_d, acc)
            # the last split of this head to finish merges all of them (flash-decoding's combine, no
            # second launch): every thread's stores, then one release/acquire count per split
            tl.debug_barrier()
            finished = tl.atomic_add(counter_ptr + h, 1, sem="acq_rel", scope="gpu")
            if finished == active - 1:
                offs_p = tl.arange(0, BLOCK_P)
                mask_p = offs_p < active
                base = h * num_splits + offs_p
                m_all = tl.load(m_ptr + base, mask=mask_p, other=float("-inf"), cache_modifier=".cg")
                l_all = tl.load(l_ptr + base, mask=mask_p, other=0.0, cache_modifier=".cg")
                acc_all = tl.load(acc_ptr + base[:, None] * D + offs_d[None, :], mask=mask_p[:, None], other=0.0,
                                  cache_modifier=".cg")
                top = tl.max(m_all, axis=0)  # split 0 always holds slot 0: finite
                weight = tl.where(m_all == float("-inf"), 0.0, tl.exp(m_all - top))
                out = tl.sum(weight[:, None] * acc_all, axis=0) / tl.sum(weight * l_all, axis=0)
                tl.store(out_ptr + h * D + offs_d, out.to(out_ptr.dtype.element_ty))
                tl.atomic_xchg(counter_ptr + h, 0, sem="relaxed", scope="gpu")  # ready for the next call

    @triton.jit
    def _advance_kernel(logits_ptr, embedding_ptr, x_ptr, token_ptr, position_ptr, history_ptr,
                        V: tl.constexpr, C: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
                        USE_PDL: tl.constexpr):
        # No gdc_launch_dependents: the next step's kernels start only when this one has finished,
        # so whatever they read before their own wait (position, cached slots) is this step's.
        if USE_PDL:
            _gdc_wait()
        offs = tl.arange(0, BLOCK_V)
        best = tl.full((BLOCK_V,), float("-inf"), tl.float32)
        best_index = tl.zeros((BLOCK_V,), tl.int32)
        for v0 in tl.static_range(0, V, BLOCK_V):
            offs_v = v0 + offs
            values = tl.load(logits_ptr + offs_v, mask=offs_v < V, other=float("-inf")).to(tl.float32)
            take = values > best  # strict: each lane keeps its first maximum
            best = tl.where(take, values, best)
            best_index = tl.where(take, offs_v, best_index)
        top = tl.max(best, axis=0)
        token = tl.min(tl.where(best == top, best_index, V), axis=0)  # the first index of the maximum, as argmax
        position = tl.load(position_ptr) + 1
        tl.store(position_ptr, position)
        tl.store(token_ptr, token.to(token_ptr.dtype.element_ty))
        tl.store(history_ptr + position, token.to(history_ptr.dtype.element_ty))
        offs_c = tl.arange(0, BLOCK_C)
        row = tl.load(embedding_ptr + token.to(tl.int64) * C + offs_c, mask=offs_c < C)
        tl.store(x_ptr + offs_c, row, mask=offs_c < C)


def _use_pdl(pdl: bool) -> bool:
    """PDL where asked and possible: not under TRITON_INTERPRET (the interpreter has no grid control)."""
    return pdl and PDL_AVAILABLE and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def _launch_options(pdl: bool) -> dict:
    return {"launch_pdl": True} if pdl else {}


def gemv(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, *, norm: int = NORM_NONE,
         norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None, eps: float = 1e-6,
         act: int = ACT_NONE, residual: torch.Tensor | None = None,
         config: GemvConfig = DEFAULT_GEMV, pdl: bool = False) -> torch.Tensor:
    """out (N,) = epilogue(weight (N or 2N, K) · prologue(x (K,))) [+ residual (N,)]; returns out.

    All contiguous. ``out`` may be ``residual`` (updated in place). With ``act=ACT_SILU_PAIR``
    the weight is [gate; up] (2N, K) and out is silu(gate·x)·(up·x). ``pdl``: launch as a
    programmatic dependent launch (the first weight slice is read before waiting for x).
    """
    K = weight.shape[1]
    N = weight.shape[0] // (2 if act == ACT_SILU_PAIR else 1)
    pdl = _use_pdl(pdl)
    grid = (triton.cdiv(N, config.block_n),)
    _gemv_kernel[grid](
        x, weight, out, residual if residual is not None else out,
        norm_weight if norm_weight is not None else x, norm_bias if norm_bias is not None else x,
        N, float(eps), K=K, NORM=norm, ACT=act, RESIDUAL=residual is not None,
        EVEN_N=N % config.block_n == 0, EVEN_K=K % config.block_k == 0,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, USE_PDL=pdl, num_warps=config.num_warps,
        **_launch_options(pdl))
    return out


def static_decode_attention(qkv: torch.Tensor,  # ((H + 2·Hkv)·D,) the fused projection, before rotary
                            k_cache: torch.Tensor,  # (Hkv, S, D), written at position
                            v_cache: torch.Tensor,  # (Hkv, S, D)
                            cos: torch.Tensor, sin: torch.Tensor,  # (S, D) rotary tables
                            position: torch.Tensor,  # (1,) int, on the device
                            out: torch.Tensor,  # (H·D,)
                            partials: tuple,  # m, l (H·P,), acc (H·P, D), counters (H,) int32 zeros
                            n_head: int, n_kv_head: int, scale: float, pdl: bool = False) -> torch.Tensor:
    """Rotary + cache write + attention over slots 0..position, for one token at batch 1; one launch.

    ``partials`` comes from :func:`attention_partials`; its counters must be zero on entry and are
    zero again on return (the last split of each head resets its own).
    """
    Hkv, S, D = k_cache.shape
    pdl = _use_pdl(pdl)
    split = ATTENTION_BLOCK_S * ATTENTION_BLOCKS_PER_SPLIT
    num_splits = triton.cdiv(S, split)
    m, l, acc, counters = partials
    _attention_kernel[(n_head, num_splits)](
        qkv, k_cache, v_cache, cos, sin, position, m, l, acc, counters, out, S, n_head // n_kv_head, float(scale),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        H=n_head, HKV=n_kv_head, D=D, BLOCK_S=ATTENTION_BLOCK_S, BLOCKS_PER_SPLIT=ATTENTION_BLOCKS_PER_SPLIT,
        BLOCK_P=max(2, triton.next_power_of_2(num_splits)), USE_PDL=pdl, num_warps=4, **_launch_options(pdl))
    return out


def attention_partials(n_head: int, slots: int, head_size: int, device: torch.device, layers: int | None = None):
    """Scratch for :func:`static_decode_attention`: m, l (H·P,), acc (H·P, D) fp32 and counters (H,) int32.

    With ``layers``, the counters are (layers, H): pass ``(m, l, acc, counters[i])`` for layer i.
    """
    splits = -(-slots // (ATTENTION_BLOCK_S * ATTENTION_BLOCKS_PER_SPLIT))
    m = torch.empty(n_head * splits, dtype=torch.float32, device=device)
    shape = (n_head,) if layers is None else (layers, n_head)
    return (m, torch.empty_like(m), torch.empty(n_head * splits, head_size, dtype=torch.float32, device=device),
            torch.zeros(shape, dtype=torch.int32, device=device))


def advance(logits: torch.Tensor, embedding: torch.Tensor, x: torch.Tensor, token: torch.Tensor,
            position: torch.Tensor, history: torch.Tensor, pdl: bool = False) -> None:
    """End of a step, one launch: token = argmax(logits) (first maximum), position += 1,
    history[position] = token, x = embedding[token] (the next step's input)."""
    V, C = embedding.shape[0], x.shape[0]
    pdl = _use_pdl(pdl)
    _advance_kernel[(1,)](logits, embedding, x, token, position, history, V=logits.shape[0], C=C,
                          BLOCK_V=min(8192, triton.next_power_of_2(V)), BLOCK_C=triton.next_power_of_2(C),
                          USE_PDL=pdl, num_warps=8, **_launch_options(pdl))
