"""The cached decode loop: one prefill, then one step per token, over a static compact KV cache.

``DecodeSession`` is what :func:`slimline.generate` and the quality benchmark drive::

    session = DecodeSession(model, kv_prune=Config(policy="keyformer", budget=0.5), steps=N)
    logits_BV = session.prefill(prompt_BP)     # full attention over the prompt, then prune to budget
    logits_BV = session.step(token_B1)         # N times: write, attend, score, evict one

With ``kv_prune=None`` nothing is scored or evicted and the cache holds P + N slots: plain
generation on a preallocated cache. With a config, the cache is preallocated at the plan's
capacity (about budget · (P + N) slots for a fractional budget) and the policy runs between
steps (see :mod:`slimline.passes.kv_prune` for the contract).

``stats`` counts what happened (tokens, slots, bytes, evictions, keys read by attention against
what a full cache would have read); nothing is printed.

Shape legend: L layers, B batch, Hkv key/value heads, G query heads per key/value head,
S slots in use, P prompt length, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch

from slimline.errors import InputError
from slimline.kv.base import EvictionPolicy
from slimline.kv.cache import EMPTY, CompactKVCache, keep_indices, protected_slots
from slimline.kv.decoders import DecoderAdapter, adapter_for
from slimline.kv.h2o import H2O
from slimline.kv.keyformer import Keyformer
from slimline.kv.streaming import StreamingLLM
from slimline.passes.kv_prune import Plan, check_config, make_plan

__all__ = ["DecodeSession", "make_policy", "prefill_together"]


def make_policy(plan: Plan, device: torch.device) -> EvictionPolicy:
    name = plan.config.policy
    if name == "keyformer":
        policy = Keyformer(plan.temperature, plan.config.seed, device)
    elif name == "h2o":
        policy = H2O()
    else:
        return StreamingLLM()
    policy.mean_score = plan.config.mean_score
    return policy


class DecodeSession:
    def __init__(self, model: Any, kv_prune: Any = None, *, steps: int):
        self.adapter: DecoderAdapter = adapter_for(model)
        self.config = None if kv_prune is None else check_config(kv_prune)
        if not isinstance(steps, int) or steps < 0:
            raise InputError(f"steps must be an int >= 0, got {steps!r}", stage="generate",
                             where="DecodeSession(steps=...)", hint="the number of decode steps after the prompt")
        self.steps = steps
        self.plan: Plan | None = None
        self.policy: EvictionPolicy | None = None
        self.cache: CompactKVCache | None = None
        self.seen = 0  # tokens through the model so far = the next token's position
        self.step_index = 0
        self.stats: dict[str, Any] = {}
        self._prompt_scores: torch.Tensor | None = None
        self._prompt_leader: DecodeSession | None = None

    @property
    def pruning(self) -> bool:
        return self.plan is not None

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run the prompt (B, P); return the last position's logits (B, V) (all: (B, P, V))."""
        return prefill_together([self], idx, all_logits)

    def _begin(self, B: int, P: int, shared: dict | None = None):
        """Plan and policy for a prompt of P tokens; returns this session's prefill observer or None.

        ``shared`` maps a policy's :meth:`~slimline.kv.base.EvictionPolicy.prompt_key` to the session
        already scoring the prompt that way: a session whose policy would compute the same prompt
        weights shares that session's scores (and, after the prefill, its policy state) and
        observes nothing itself.
        """
        if self.cache is not None:
            raise InputError("this session already has a prompt", stage="generate", where="DecodeSession.prefill",
                             hint="start a new DecodeSession per prompt")
        adapter = self.adapter
        adapter.check_length(P + self.steps)
        self._prompt_scores = None
        self._prompt_leader = None
        if self.config is None:
            return None
        self.plan = make_plan(self.config, P, self.steps)
        self.policy = make_policy(self.plan, adapter.device)
        if not self.policy.needs_attention:
            return None
        key = self.policy.prompt_key()
        if shared is not None and key is not None:
            if key in shared:
                self._prompt_leader = shared[key]
                self._prompt_scores = shared[key]._prompt_scores  # read-only here: the cache copies it
                return None
            shared[key] = self
        scores = torch.zeros(adapter.n_layer, B, adapter.n_kv_head, P, dtype=torch.float32, device=adapter.device)
        self._prompt_scores = scores

        def observe(layer: int, logits: torch.Tensor) -> None:  # (B, Hkv, G, Tq, P)
            scores[layer] += self.policy.weights(logits, 0).sum(dim=(2, 3))

        return observe

    def _finish(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the budget's worth of the prompt's keys/values (L, B, Hkv, P, D) in a new compact cache."""
        L, B, H, P, _ = keys.shape
        scores, keep, size, capacity = self._prompt_scores, None, P, P + self.steps
        if self.plan is not None:
            size, capacity = self.plan.size(P), self.plan.capacity
            if size < P:
                positions = torch.arange(P, device=keys.device).expand(L, B, H, P)
                rank = self.policy.rank(scores if scores is not None else torch.zeros(positions.shape, device=keys.device),
                                        positions)
                protected = protected_slots(positions, P - 1, self.plan.window(size), self.plan.sinks)
                keep = keep_indices(rank, protected, size)  # (L, B, Hkv, size)
        self.cache = CompactKVCache.from_prompt(keys, values, scores, keep, capacity)
        if self._prompt_leader is not None:
            self.policy.after_shared_prompt(self._prompt_leader.policy)
        self._prompt_scores = self._prompt_leader = None
        self.seen = P
        full_bytes = keys.element_size() * keys[:, :, :, :1].numel() * 2 * (P + self.steps)
        self.stats = {"policy": self.config.policy if self.config else "full", "prompt_tokens": P,
                      "batch": B, "steps": 0, "kept_after_prompt": size, "evicted_at_prompt": P - size,
                      "cache_slots": self.cache.capacity, "full_cache_slots": P + self.steps,
                      "kv_cache_bytes": self.cache.nbytes, "full_kv_cache_bytes": full_bytes,
                      "bookkeeping_bytes": self.cache.bookkeeping_nbytes if self.pruning else 0,
                      "evictions": 0, "attention_key_reads": 0, "full_attention_key_reads": 0}

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed token (B, 1) at the next position; return its logits (B, V)."""
        cache, adapter = self.cache, self.adapter
        if cache is None:
            raise InputError("decode step before the prompt", stage="generate", where="DecodeSession.step",
                             hint="call prefill(prompt) first")
        if self.step_index >= self.steps:
            raise InputError(f"more decode steps than the {self.steps} this session was sized for",
                             stage="generate", where="DecodeSession.step", hint="create the session with more steps")
        position = self.seen
        slot = cache.next_slot()
        keys, values = cache.views()  # (L, B, Hkv, S, D)
        want_attention = self.policy is not None and self.policy.needs_attention
        input_pos = torch.tensor([position], device=adapter.device)
        logits, attention, _, _ = adapter.decode(token.to(adapter.device), input_pos, keys, values, slot,
                                                 want_attention=want_attention)
        self.seen += 1
        self.step_index += 1
        cache.record(slot, position)
        if self.plan is not None:
            if want_attention:
                cache.accumulate(self.policy.weights(attention, self.step_index).sum(dim=3))  # (L, B, Hkv, S)
            size = self.plan.size(self.seen)
            if cache.filled > size:  # one token over: evict one per (layer, sequence, head)
                positions = cache.positions[..., : cache.filled]
                rank = self.policy.rank(cache.scores[..., : cache.filled], positions)
                cache.evict(rank, protected_slots(positions, position, self.plan.window(size), self.plan.sinks))
                self.stats["evictions"] += 1
        stats = self.stats
        stats["steps"] += 1
        stats["attention_key_reads"] += keys.shape[3]
        stats["full_attention_key_reads"] += position + 1
        return logits[:, -1]

    def kept_positions(self) -> torch.Tensor:
        """(L, B, Hkv, kept) positions of the tokens in the cache, ascending (freed or unused slots left out)."""
        positions = self.cache.positions[..., : self.cache.filled].sort(dim=-1).values
        empty = int((positions.flatten(0, 2)[0] == EMPTY).sum())  # as many in every layer, sequence and head
        return positions[..., empty:]


@torch.no_grad()
def prefill_together(sessions: list[DecodeSession], idx: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
    """Prefill several sessions of one model on one prompt with a single forward pass.

    Each session's policy observes the same attention logits, in the same order, as it would in
    its own prefill (so Keyformer's noise draws are the same too); each then keeps its own budget.
    Sessions whose policies would weigh the prompt identically (H2O at any budget; Keyformer with
    the same seed and starting temperature) share one scoring of it.
    For comparing policies on one prompt at the cost of one prefill. Returns the logits as
    :meth:`DecodeSession.prefill` does.
    """
    adapter = sessions[0].adapter
    if any(session.adapter.model is not adapter.model for session in sessions):
        raise InputError("prefill_together needs sessions of one model", stage="generate",
                         where="prefill_together", hint="group sessions by model")
    B, P = idx.shape
    shared: dict = {}
    observers = [session._begin(B, P, shared) for session in sessions]
    observers = [observer for observer in observers if observer is not None]

    def observe(layer: int, logits: torch.Tensor) -> None:
        for observer in observers:
            observer(layer, logits)

    logits, keys, values = adapter.prefill(idx.to(adapter.device), observe if observers else None,
                                           all_logits=all_logits)
    for session in sessions:
        session._finish(keys, values)
    return logits if all_logits else logits[:, -1]
