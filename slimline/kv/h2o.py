"""H2O's heavy-hitter score (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models", NeurIPS 2023, arXiv:2306.14048).

Per step, each key's weight is its attention probability softmax(x)_i, summed over the step's
queries and accumulated over steps: Keyformer's score without the Gumbel noise and the
temperature. Keeps the recent window plus the highest accumulated scores ("heavy hitters").
"""

from __future__ import annotations

import torch

from slimline.kv.base import EvictionPolicy

__all__ = ["H2O"]


class H2O(EvictionPolicy):
    name = "h2o"
    needs_attention = True

    def weights(self, logits_K: torch.Tensor, step: int) -> torch.Tensor:
        return torch.softmax(logits_K.float(), dim=-1)

    def prompt_key(self) -> tuple:
        return (self.name,)
