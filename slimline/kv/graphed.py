"""Decode steps on a cache that stays one size, with everything on the device: one CUDA graph a step.

:meth:`slimline.kv.session.DecodeSession.step` runs the policy from Python; on a GPU at batch 1
the step is then bound by the host (hundreds of small launches), and the attention the pruned
cache saves does not show. When the cache keeps one size for the whole generation — an int
budget (the Keyformer paper's setting: k tokens, one evicted per step), or no pruning — nothing
in a step needs the host, so the whole step is captured once and replayed:

    embed → per layer: q/k/v, write k/v into the free slot (per layer and head), attention over
    the cache (the Triton kernel also writes the logits), MLP → head → record the new token's
    position, zero its score → add the policy's weights (Keyformer: softmax((logits + Gumbel) / τ),
    τ read from a device table) → arg-min of the rank outside the sinks and the recent window
    → that slot is the next step's free slot; position and step counters += 1; greedy: the
    argmax becomes the next input.

Eviction runs every step, vectorised over (layer, sequence, head), on the device. A full cache
(no pruning) is one buffer of P + N slots read up to a device-side length.

    decoder = FixedSizeDecoder(session)       # a DecodeSession just prefilled
    logits = decoder.step(token)              # what session.step(token) returns
    tokens = decoder.greedy(first_token, n)   # (B, n): n steps, each argmax fed back on the device

Off CUDA (or ``graph=False``) the same step runs eagerly: it computes exactly what
``DecodeSession.step`` computes (tests check logits and tokens for every policy), Keyformer's noise
included (drawn from the policy's generator). Captured in a CUDA graph, Keyformer's noise comes
from the device's default generator instead (a graph replays its draws from there): seed it with
``torch.cuda.manual_seed`` to repeat a run.

Shape legend: L layers, B batch, Hkv key/value heads, C cache slots, V vocabulary.
"""

from __future__ import annotations

import torch

from slimline.errors import InputError
from slimline.kv.cache import EMPTY, protected_slots
from slimline.kv.keyformer import Keyformer
from slimline.kv.session import DecodeSession

__all__ = ["FixedSizeDecoder"]


class FixedSizeDecoder:
    def __init__(self, session: DecodeSession, graph: bool | None = None):
        cache, plan = session.cache, session.plan
        where = "FixedSizeDecoder(session)"
        if cache is None or session.step_index != 0:
            raise InputError("the session must be prefilled and not yet stepped", stage="generate", where=where,
                             hint="DecodeSession(...).prefill(prompt), then FixedSizeDecoder(session)")
        adapter = session.adapter
        self.session, self.adapter, self.cache, self.policy = session, adapter, cache, session.policy
        P, steps = session.seen, session.steps
        L, B, H, C, _ = cache.keys.shape
        device = adapter.device
        self.pruning = plan is not None and plan.size(P + steps) < P + steps
        if self.pruning:
            size = plan.size(P)
            if plan.size(P + steps) != size or cache.filled != size or cache.capacity != size + 1:
                raise InputError(f"the cache grows from {plan.size(P)} to {plan.size(P + steps)} tokens during "
                                 "generation; a fixed-size decoder needs one size", stage="generate", where=where,
                                 hint="an int budget (a token count <= the prompt), e.g. "
                                      f"budget={max(1, int(plan.config.budget * P)) if isinstance(plan.config.budget, float) else plan.config.budget}")
            # the first step writes into slot `size` like every later step writes into the freed one
            cache.filled = size + 1
            self.slot = torch.full((L, B, H), size, dtype=torch.int64, device=device)
            cache.free_slot = self.slot  # the session's view of the cache stays whole
            self.length = None
            self.window, self.sinks = plan.window(size), plan.sinks
            if isinstance(self.policy, Keyformer):
                self.tau = torch.tensor([plan.temperature(t) for t in range(steps + 1)], dtype=torch.float32,
                                        device=device)
        else:
            cache.filled = C  # attention reads [0, length) of the whole buffer
            self.slot = torch.full((L, B, H), P, dtype=torch.int64, device=device)
            self.length = torch.full((1,), P + 1, dtype=torch.int64, device=device)
        self.needs_attention = self.pruning and self.policy.needs_attention
        self.position = torch.full((1,), P, dtype=torch.int64, device=device)
        self.step_index = torch.ones((1,), dtype=torch.int64, device=device)  # the session's count, 1-based
        self.token = torch.zeros((B, 1), dtype=torch.int64, device=device)
        self.history = torch.zeros((B, steps + 1), dtype=torch.int64, device=device)  # greedy picks
        self.logits = None
        self.steps_done = 0
        self.graph_requested = device.type == "cuda" if graph is None else graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None  # why capture failed, if it did (the steps then run eagerly)

    # one step, device only ---------------------------------------------------------------------
    def _step(self) -> None:
        cache, adapter = self.cache, self.adapter
        keys, values = cache.keys, cache.values
        logits, attention, _, _ = adapter.decode(self.token, self.position, keys, values, self.slot,
                                                 want_attention=self.needs_attention, length=self.length)
        if self.logits is None:
            self.logits = torch.empty_like(logits[:, -1])
        self.logits.copy_(logits[:, -1])
        if self.pruning:
            index = self.slot.unsqueeze(-1)  # (L, B, Hkv, 1)
            cache.positions.scatter_(-1, index, self.position.view(1, 1, 1, 1).expand(index.shape))
            cache.scores.scatter_(-1, index, 0.0)
            if self.needs_attention:
                if isinstance(self.policy, Keyformer):
                    generator = None if self.graph_requested else self.policy.generator
                    weights = self.policy.weights_at(attention, self.tau[self.step_index], generator)
                else:
                    weights = self.policy.weights(attention, 0)
                cache.scores.add_(weights.sum(dim=3))  # (L, B, Hkv, C)
            rank = self.policy.rank(cache.scores, cache.positions)
            protected = protected_slots(cache.positions, self.position, self.window, self.sinks)
            victim = rank.masked_fill(protected, float("inf")).argmin(dim=-1)  # (L, B, Hkv)
            cache.positions.scatter_(-1, victim.unsqueeze(-1), EMPTY)
            self.slot.copy_(victim)
        else:
            self.cache.positions.scatter_(-1, self.slot.unsqueeze(-1),
                                          self.position.view(1, 1, 1, 1).expand(*self.slot.shape, 1))
            self.slot.add_(1)
            self.length.add_(1)
        pick = self.logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        self.history.scatter_(1, (self.step_index - 1).expand(pick.shape[0], 1), pick)
        self.token.copy_(pick)  # the next input, unless step() is handed another
        self.position.add_(1)
        self.step_index.add_(1)

    def _state(self) -> list[torch.Tensor]:
        state = [self.cache.positions, self.cache.scores, self.slot, self.position, self.step_index, self.token,
                 self.history]
        return state + ([self.length] if self.length is not None else [])

    def _capture(self) -> None:
        saved = [t.clone() for t in self._state()]
        device = self.adapter.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up: Triton compiles, cuBLAS settles; writes only the free slot
            self._step()
        torch.cuda.current_stream(device).wait_stream(stream)
        for tensor, value in zip(self._state(), saved):
            tensor.copy_(value)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step()
            self.graph = graph
        except Exception as error:  # a step that cannot be captured still runs, eagerly; say why
            self.graph_requested = False
            self.graph_error = f"{type(error).__name__}: {error}"[:300]
        finally:
            for tensor, value in zip(self._state(), saved):
                tensor.copy_(value)

    def prepare(self) -> None:
        """Capture the CUDA graph now (else the first step does it)."""
        if self.graph_requested and self.graph is None:
            self._capture()

    def _run(self) -> None:
        if self.steps_done >= self.session.steps:
            raise InputError(f"more decode steps than the {self.session.steps} the session was sized for",
                             stage="generate", where="FixedSizeDecoder.step", hint="create the session with more steps")
        self.prepare()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        self.steps_done += 1
        stats, position = self.session.stats, self.session.seen
        stats["steps"] += 1
        stats["evictions"] += int(self.pruning)
        stats["attention_key_reads"] += self.cache.filled if self.pruning else position + 1
        stats["full_attention_key_reads"] += position + 1
        self.session.seen += 1
        self.session.step_index += 1

    # public ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed token (B, 1) at the next position; return its logits (B, V) (a copy)."""
        self.token.copy_(token)
        self._run()
        return self.logits.clone()

    @torch.no_grad()
    def greedy(self, first_token: torch.Tensor | None, count: int) -> torch.Tensor:
        """Feed first_token (B, 1) (None: the last step's argmax), then each step's argmax, for ``count``
        steps; returns their argmaxes (B, count)."""
        start = self.steps_done
        if first_token is not None:
            self.token.copy_(first_token)
        for _ in range(count):
            self._run()  # each step leaves its argmax as the next input, on the device: no sync
        return self.history[:, start:start + count].clone()
