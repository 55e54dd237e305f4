"""What an eviction policy is: a score per cached token, accumulated from attention logits.

A policy turns one step's attention logits into a weight per key (``weights``); the decode loop
sums those weights into each cached token's score and, when the cache is over budget, evicts the
token whose ``rank`` is lowest among those not protected (the sinks and the recent window).
Policies hold no cache state: :class:`slimline.kv.cache.CompactKVCache` does.

Shape legend: ``...`` any leading dimensions (layers, batch, key/value heads, query heads, query
positions), K keys.
"""

from __future__ import annotations

import torch

__all__ = ["EvictionPolicy"]


class EvictionPolicy:
    """Base: no scores, evict the oldest unprotected token."""

    name = "base"
    needs_attention = False  # whether the decode step must hand over its attention logits

    def weights(self, logits_K: torch.Tensor, step: int) -> torch.Tensor:
        """(..., K) attention logits (masked keys at -inf) -> (..., K) float32 weights to accumulate.

        ``step`` is 0 for the prompt and t for the t-th decode step.
        """
        raise NotImplementedError

    mean_score = False  # rank by the mean weight per query that saw the token (Config.mean_score)

    def rank(self, scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Higher = keep. Default: the accumulated score; with ``mean_score``, that score divided by
        the number of queries that could attend to the token (newest position + 1 - its position)."""
        if not self.mean_score:
            return scores
        newest = positions.amax(dim=-1, keepdim=True)
        return scores / (newest + 1 - positions).clamp(min=1)

    def prompt_key(self) -> tuple | None:
        """Equal keys = equal prompt weights from the same logits (one prefill may score for both); None: unique."""
        return None

    def after_shared_prompt(self, leader: "EvictionPolicy") -> None:
        """Take over whatever state scoring the prompt left in ``leader`` (as if this policy had scored it)."""
