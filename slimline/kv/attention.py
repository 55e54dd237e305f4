"""Attention for the cached steps, written out by hand so the policy can see the logits.

``prefill_attention`` runs causal attention over a whole prompt in chunks of queries, handing each
chunk's logits to an observer (the policy's scorer) before the softmax. ``decode_attention`` runs
one new token's query against the cache: ``softmax(q·Kᵀ·scale)·V`` over every slot given to it —
the compact cache holds only kept tokens, all in the past, so there is no mask. On CUDA it runs
as one split-K Triton kernel that also writes the logits (:mod:`slimline.kv.triton_attention`),
falling back to the torch form if Triton is missing or its kernel fails to build (counted in
``KERNEL_COUNTS``; ``SLIMLINE_KV_TRITON=0`` forces torch).

Grouped-query attention is computed without repeating K/V: the G query heads that share a
key/value head become a dimension of their own.

Shape legend: B batch, H query heads, Hkv key/value heads, G = H / Hkv, T prompt length,
Tq queries in a chunk, S cache slots, D head size.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

__all__ = ["prefill_attention", "decode_attention", "decode_attention_torch", "KERNEL_COUNTS",
           "PREFILL_CHUNK_ELEMENTS"]

# logits elements per prefill chunk (B·H·Tq·T): 2^24 float32 = 64 MiB of scores at a time
PREFILL_CHUNK_ELEMENTS = 1 << 24


def prefill_attention(
    query: torch.Tensor,  # (B, H, T, D)
    key: torch.Tensor,  # (B, Hkv, T, D)
    value: torch.Tensor,  # (B, Hkv, T, D)
    scale: float,
    observe: Callable[[torch.Tensor], None] | None = None,  # gets logits (B, Hkv, G, Tq, T), -inf above the diagonal
    chunk_elements: int = PREFILL_CHUNK_ELEMENTS,
) -> torch.Tensor:  # (B, H, T, D)
    B, H, T, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    query_BHkvGTD = query.view(B, Hkv, G, T, D)
    keyT_BHkvDT = key.transpose(-2, -1)
    chunk = max(1, min(T, chunk_elements // max(1, B * H * T)))
    key_positions = torch.arange(T, device=query.device)
    outputs = []
    for start in range(0, T, chunk):
        stop = min(T, start + chunk)
        Tq = stop - start
        # the G heads of a group and the chunk's queries share one matmul: (B, Hkv, G·Tq, D)
        query_chunk = query_BHkvGTD[:, :, :, start:stop].reshape(B, Hkv, G * Tq, D)
        logits = (torch.matmul(query_chunk, keyT_BHkvDT) * scale).view(B, Hkv, G, Tq, T)
        future = key_positions[None, :] > torch.arange(start, stop, device=query.device)[:, None]  # (Tq, T)
        logits = logits.masked_fill(future, float("-inf"))
        if observe is not None:
            observe(logits)
        probs = torch.softmax(logits.float(), dim=-1).to(value.dtype).view(B, Hkv, G * Tq, T)
        outputs.append(torch.matmul(probs, value).view(B, Hkv, G, Tq, D))
    return torch.cat(outputs, dim=3).view(B, H, T, D)


def decode_attention_torch(
    query: torch.Tensor,  # (B, H, 1, D)
    key: torch.Tensor,  # (B, Hkv, S, D) the cache, the new token already written
    value: torch.Tensor,  # (B, Hkv, S, D)
    scale: float,
    length: torch.Tensor | None = None,  # (1,) int: slots [length, S) are unused (logits -inf)
) -> tuple[torch.Tensor, torch.Tensor]:  # (B, H, 1, D), logits (B, Hkv, G, S)
    B, H, _, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    query_BHkvGD = query.view(B, Hkv, H // Hkv, D)  # the G query heads of a group act as G queries
    logits = torch.matmul(query_BHkvGD, key.transpose(-2, -1)) * scale  # (B, Hkv, G, S)
    if length is not None:
        logits = logits.masked_fill(torch.arange(S, device=key.device) >= length, float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value)  # (B, Hkv, G, D)
    return out.view(B, H, 1, D), logits


def decode_attention(
    query: torch.Tensor,  # (B, H, 1, D)
    key: torch.Tensor,  # (B, Hkv, S, D)
    value: torch.Tensor,  # (B, Hkv, S, D)
    scale: float,
    want_logits: bool = True,
    kernel: str | None = None,
    length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # (B, H, 1, D), logits (B, Hkv, G, S) or None
    """``kernel``: "torch", "triton" (CUDA; :mod:`slimline.kv.triton_attention`), or None = triton
    on CUDA when it is installed and has not failed here, else torch. ``KERNEL_COUNTS`` says which ran.
    ``length``: a (1,) device tensor; only slots below it hold tokens (a cache filling up inside one
    captured CUDA graph), the rest get -inf logits and are not read by the Triton kernel."""
    if kernel is None:
        kernel = "triton" if query.is_cuda and _triton_usable() else "torch"
    if kernel == "triton":
        from slimline.kv.triton_attention import decode_attention_triton

        try:
            result = decode_attention_triton(query, key, value, scale, want_logits, length)
            KERNEL_COUNTS["triton"] += 1
            return result
        except Exception as error:  # a kernel that cannot build here must not stop generation
            if KERNEL_COUNTS.get("triton_failed") is None:
                KERNEL_COUNTS["triton_failed"] = f"{type(error).__name__}: {error}"[:300]
    KERNEL_COUNTS["torch"] += 1
    out, logits = decode_attention_torch(query, key, value, scale, length)
    return out, (logits if want_logits else None)


KERNEL_COUNTS: dict = {"triton": 0, "torch": 0, "triton_failed": None}


def _triton_usable() -> bool:
    if KERNEL_COUNTS["triton_failed"] is not None or os.environ.get("SLIMLINE_KV_TRITON", "1") == "0":
        return False
    from slimline.kv.triton_attention import AVAILABLE

    return AVAILABLE
