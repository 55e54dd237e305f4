"""``slimline.generate``: token-by-token generation on a static, preallocated KV cache.

    tokens = slimline.generate(model, input_ids, max_new_tokens=64)                     # greedy
    tokens = slimline.generate(model, input_ids, 64, greedy=False, temperature=0.8, top_k=40,
                               generator=torch.Generator().manual_seed(0))           # sampled
    tokens, stats = slimline.generate(model, input_ids, 64, kv_prune={"policy": "keyformer",
                                      "budget": 0.5}, return_stats=True)            # pruned cache

Serves slimline's reference GPT and transformers Llama / Mistral / Qwen2 causal LMs, on the
device their weights are on (CPU or CUDA). One prefill over the prompt, then one decode step per
new token (:class:`slimline.kv.session.DecodeSession`). ``kv_prune`` (a budget such as 0.5, a
dict, or a :class:`slimline.passes.kv_prune.Config`) evicts tokens from the cache as it goes —
Keyformer by default, or the H2O / StreamingLLM baselines; the cache tensors are allocated at the
budget's size. ``kv_prune=None`` (or a budget of 1.0) keeps every token. ``stats`` counts cache
slots, bytes, evictions and the keys attention read, against a full cache.
"""

from __future__ import annotations

from typing import Any

import torch

from slimline.errors import ConfigError, InputError
from slimline.kv.session import DecodeSession

__all__ = ["generate"]


def _check(input_ids: Any, max_new_tokens: Any, temperature: Any, top_k: Any) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
            or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise InputError(f"input_ids must be a non-empty (batch, length) integer tensor, got {shape}",
                         stage="generate", where="generate(input_ids=...)",
                         hint="torch.tensor([[...token ids...]]) — add a batch dimension with [None]")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}", stage="generate",
                         where="generate(max_new_tokens=...)", hint="max_new_tokens=64")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature!r}", stage="generate",
                          where="generate(temperature=...)", hint="greedy=True for argmax decoding")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k must be an int >= 1 or None, got {top_k!r}", stage="generate",
                          where="generate(top_k=...)", hint="top_k=40, or None for the full distribution")


def _pick(logits: torch.Tensor, greedy: bool, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) -> (B, 1) next tokens."""
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)


@torch.no_grad()
def generate(model: Any, input_ids: torch.Tensor, max_new_tokens: int, *, greedy: bool = True,
             temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None,
             kv_prune: Any = None, return_stats: bool = False,
             cuda_graph: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict]:
    """Extend input_ids (B, P) by max_new_tokens tokens; returns (B, P + max_new_tokens).

    ``greedy`` takes the argmax; otherwise samples from softmax(logits / temperature), restricted
    to the ``top_k`` most likely tokens if given, drawing from ``generator`` (on the model's
    device). ``return_stats`` also returns the session's counters. ``cuda_graph`` (greedy only, a
    cache of one size: ``kv_prune=None`` or an int budget) runs each decode step, eviction included,
    as one CUDA graph replay on a GPU (:class:`slimline.kv.graphed.FixedSizeDecoder`; eagerly
    elsewhere, with the same results).
    """
    _check(input_ids, max_new_tokens, temperature, top_k)
    if cuda_graph and not greedy:
        raise ConfigError("cuda_graph=True decodes greedily (the argmax is fed back inside the graph)",
                          stage="generate", where="generate(cuda_graph=...)", hint="greedy=True, or cuda_graph=False")
    # the last token is produced but never fed back: max_new_tokens - 1 decode steps
    session = DecodeSession(model, kv_prune, steps=max(0, max_new_tokens - 1))
    if max_new_tokens == 0:
        session.adapter.check_length(input_ids.shape[1])
        return (input_ids, {}) if return_stats else input_ids
    input_ids = input_ids.to(session.adapter.device)
    next_token = _pick(session.prefill(input_ids), greedy, temperature, top_k, generator)
    if cuda_graph:
        from slimline.kv.graphed import FixedSizeDecoder

        rest = FixedSizeDecoder(session).greedy(next_token, max_new_tokens - 1)
        output = torch.cat([input_ids, next_token, rest], dim=1)
        return (output, session.stats) if return_stats else output
    tokens = [input_ids, next_token]
    for _ in range(max_new_tokens - 1):
        next_token = _pick(session.step(next_token), greedy, temperature, top_k, generator)
        tokens.append(next_token)
    output = torch.cat(tokens, dim=1)
    return (output, session.stats) if return_stats else output
