"""Keyformer's key-token score (Adnan et al., "Keyformer: KV Cache Reduction through Key Tokens
Selection for Efficient Generative Inference", MLSys 2024, arXiv:2403.09054).

Per step, each key's weight is the Gumbel-softmax of the unnormalised attention logits x:

    f(x_i) = exp((x_i + ζ_i) / τ) / Σ_j exp((x_j + ζ_j) / τ),   ζ ~ Gumbel(0, 1) i.i.d.

summed over the queries of the step (all prompt queries at prefill) and accumulated over steps.
The noise regularises the choice for the keys already discarded (their mass is missing from the
softmax); τ rises linearly from ``tau_init`` at the prompt to ``tau_end`` at the last decode step,
flattening the distribution as more tokens have been dropped (Keyformer's defaults: 1 → 2).
The noise is drawn from a seeded generator, so a run is reproducible.
"""

from __future__ import annotations

from typing import Callable

import torch

from slimline.kv.base import EvictionPolicy

__all__ = ["Keyformer"]


class Keyformer(EvictionPolicy):
    name = "keyformer"
    needs_attention = True

    def __init__(self, temperature: Callable[[int], float], seed: int, device: torch.device):
        self.temperature = temperature  # step -> τ
        self.seed = seed
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def gumbel_noise(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # ζ = -log(E), E ~ Exponential(1)
        exponential = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        return exponential.exponential_(generator=generator).log_().neg_()

    def weights(self, logits_K: torch.Tensor, step: int) -> torch.Tensor:
        return self.weights_at(logits_K, self.temperature(step), self.generator)

    def weights_at(self, logits_K: torch.Tensor, temperature: float | torch.Tensor,
                   generator: torch.Generator | None) -> torch.Tensor:
        """The weights at a given τ (a float, or a device tensor a captured CUDA graph reads), noise
        drawn from ``generator`` (None: the device's default generator, which CUDA graphs replay)."""
        noisy = logits_K.float() + self.gumbel_noise(logits_K, generator)  # -inf stays -inf
        return torch.softmax(noisy / temperature, dim=-1)

    def prompt_key(self) -> tuple:
        return (self.name, self.seed, self.temperature(0), self.generator.device.type)

    def after_shared_prompt(self, leader: EvictionPolicy) -> None:
        self.generator.set_state(leader.generator.get_state())  # the noise the prompt drew, drawn
