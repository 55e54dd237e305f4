"""StreamingLLM's cache (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
ICLR 2024, arXiv:2309.17453): the first few tokens (attention sinks) plus the most recent ones.

No attention scores: a token's rank is its position, so the loop keeps the sinks (protected) and
evicts the oldest of the rest. Positions keep their original values (the paper re-numbers
positions inside the cache to run past the trained length; slimline stays inside it).
"""

from __future__ import annotations

import torch

from slimline.kv.base import EvictionPolicy

__all__ = ["StreamingLLM"]


class StreamingLLM(EvictionPolicy):
    name = "streaming"
    needs_attention = False

    def rank(self, scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return positions.to(torch.float32)  # newer = higher = kept
