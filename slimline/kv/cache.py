"""The compact KV cache: static, preallocated buffers of S slots, S the budget (not the context).

Slots hold tokens in no particular order; each slot records its token's position and score.
Slots ``[0, filled)`` are in use. A decode step writes its token into the slot the previous
eviction freed, or appends one; the loop then evicts at most one token per (layer, sequence,
key/value head), leaving that slot free for the next token. So the tensors handed to attention
are views ``[..., :filled, :]`` of the buffers: no copies, and attention reads only kept tokens.

Shape legend: L layers, B batch, Hkv key/value heads, C capacity (slots), S slots in use,
P prompt length, D head size.
"""

from __future__ import annotations

import torch

__all__ = ["CompactKVCache", "protected_slots", "keep_indices"]

EMPTY = -1  # position recorded in a slot that holds no token


def protected_slots(positions: torch.Tensor, newest: int, window: int, sinks: int) -> torch.Tensor:
    """Bool mask of slots never evicted: the ``window`` newest positions and the first ``sinks``."""
    return (positions > newest - window) | ((positions >= 0) & (positions < sinks))


def keep_indices(rank: torch.Tensor, protected: torch.Tensor, size: int) -> torch.Tensor:
    """(..., P) -> (..., size) indices of the protected tokens plus the best-ranked others, in order."""
    rank = rank.masked_fill(protected, float("inf"))
    return rank.topk(size, dim=-1, sorted=False).indices.sort(dim=-1).values


class CompactKVCache:
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 scores: torch.Tensor, filled: int):
        self.keys = keys  # (L, B, Hkv, C, D)
        self.values = values  # (L, B, Hkv, C, D)
        self.positions = positions  # (L, B, Hkv, C) int64, EMPTY where unused
        self.scores = scores  # (L, B, Hkv, C) float32, accumulated policy weights
        self.filled = filled
        self.free_slot: torch.Tensor | None = None  # (L, B, Hkv) int64, freed by the last eviction

    @classmethod
    def from_prompt(cls, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None,
                    keep: torch.Tensor | None, capacity: int) -> "CompactKVCache":
        """Buffers of ``capacity`` slots holding the prompt's tokens ``keep`` (L, B, Hkv, S); None keeps all."""
        L, B, H, P, D = keys.shape
        kept = P if keep is None else keep.shape[-1]
        if kept > capacity:
            raise ValueError(f"{kept} tokens do not fit {capacity} slots")
        device = keys.device
        key_buffer = keys.new_zeros((L, B, H, capacity, D))
        value_buffer = values.new_zeros((L, B, H, capacity, D))
        positions = torch.full((L, B, H, capacity), EMPTY, dtype=torch.int64, device=device)
        score_buffer = torch.zeros((L, B, H, capacity), dtype=torch.float32, device=device)
        if keep is None:
            key_buffer[..., :P, :] = keys
            value_buffer[..., :P, :] = values
            positions[..., :P] = torch.arange(P, device=device)
            if scores is not None:
                score_buffer[..., :P] = scores
        else:
            index = keep.unsqueeze(-1).expand(L, B, H, kept, D)
            key_buffer[..., :kept, :] = keys.gather(3, index)
            value_buffer[..., :kept, :] = values.gather(3, index)
            positions[..., :kept] = keep
            if scores is not None:
                score_buffer[..., :kept] = scores.gather(3, keep)
        return cls(key_buffer, value_buffer, positions, score_buffer, kept)

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes of the K and V buffers (the positions and scores are bookkeeping, reported apart)."""
        return self.keys.numel() * self.keys.element_size() * 2

    @property
    def bookkeeping_nbytes(self) -> int:
        return self.positions.numel() * self.positions.element_size() + \
            self.scores.numel() * self.scores.element_size()

    def next_slot(self) -> int | torch.Tensor:
        """Where the next token goes: the freed slot (L, B, Hkv), or the first unused slot (an int)."""
        if self.free_slot is not None:
            slot, self.free_slot = self.free_slot, None
            return slot
        if self.filled >= self.capacity:
            raise RuntimeError(f"compact cache full ({self.capacity} slots) and nothing evicted")
        self.filled += 1
        return self.filled - 1

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, B, Hkv, S, D) views of the slots in use."""
        return self.keys[..., : self.filled, :], self.values[..., : self.filled, :]

    def record(self, slot: int | torch.Tensor, position: int) -> None:
        """Bookkeeping for a token just written into ``slot``: its position, a zero score."""
        if isinstance(slot, int):
            self.positions[..., slot] = position
            self.scores[..., slot] = 0.0
        else:
            index = slot.unsqueeze(-1)  # (L, B, Hkv, 1)
            self.positions.scatter_(-1, index, position)
            self.scores.scatter_(-1, index, 0.0)

    def accumulate(self, weights: torch.Tensor) -> None:
        """Add one step's policy weights (L, B, Hkv, S) to the slots in use."""
        self.scores[..., : self.filled] += weights

    def evict(self, rank: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
        """Free the lowest-ranked unprotected slot of every (layer, sequence, head); returns it (L, B, Hkv)."""
        victim = rank.masked_fill(protected, float("inf")).argmin(dim=-1)  # (L, B, Hkv)
        self.positions.scatter_(-1, victim.unsqueeze(-1), EMPTY)
        self.free_slot = victim
        return victim
