"""KV-cache pruning (``kv_prune``): Keyformer eviction for the decode step; H2O and StreamingLLM as baselines.

Approximate. **Not a graph rewrite**: the eviction policy lives in the runtime decode loop
(:class:`slimline.kv.session.DecodeSession`, driven by :func:`slimline.generate`), and this file
is its contract: the config, its checks, and the plan that turns a budget into cache sizes.
Why the loop and not the graph: choosing the tokens to keep is a top-k / arg-min over scores
accumulated across decode steps, and the kept set differs per layer, sequence and head, so the
cache is ragged in *which* tokens it holds though not in how many. A graph step can carry that
state as extra inputs and outputs, but the full-sequence graph that ``slimline.optimize``
captures has no cache and no step to put it in, and the decode graphs' verification (same
inputs → same outputs) has no meaning for a rewrite whose effect only shows across steps. So:

* the decode step is a plain graph over a **smaller cache tensor** — ``(L, B, Hkv, S, D)`` with
  S the budget, not the context length — and takes any S (it exports to ONNX with S dynamic and
  runs in onnxruntime; see :class:`slimline.kv.decoders.CompactDecodeStep`);
* the loop owns the policy: it writes each new key/value into a free slot, accumulates the
  policy's score from the step's attention logits, and evicts one slot per (layer, sequence,
  head) when the cache is over budget. An ONNX Runtime user runs the same loop around the
  exported step (docs/kv_prune.md).

Rotary positions: keys are cached *after* rotary embedding, so a cached key carries its own
position; dropping other keys, or storing the survivors in any slot order, leaves every q·k the
model would have computed untouched (tests check a pruned cache against the full cache with the
evicted positions masked out). Positions are never renumbered: unlike StreamingLLM's rolling
positions, a sequence may not run past the model's context length.

Policies (``Config.policy``), one per file in ``slimline/kv/``:

    keyformer   Keyformer (Adnan et al., MLSys 2024, arXiv:2403.09054): score = Σ over steps of
                softmax((logits + Gumbel noise) / τ), τ rising linearly from tau_init to tau_end
                over the generation; keep the recent window + the top-scored "key tokens"
    h2o         H2O (Zhang et al., NeurIPS 2023, arXiv:2306.14048): score = Σ softmax(logits),
                the same accumulation without the noise or the temperature
    streaming   StreamingLLM (Xiao et al., ICLR 2024, arXiv:2309.17453): the first ``sinks``
                tokens (attention sinks) + the most recent ones; needs no attention scores

Scores are summed over the query heads that share a key/value head (grouped-query attention) and,
during the prompt, over every prompt query (each key's column sum of the causal attention).

Budget: a float f in (0, 1] keeps ⌈f·n⌉ of the n tokens seen so far (prompt and generated): right
after the prompt that is the fraction f of the prompt, Keyformer's setting; during decoding the
cache then grows by one slot every 1/f tokens, so memory and attention FLOPs stay at f of the
full cache however long the generation runs, and f = 1 never evicts (it reproduces full-cache
generation). An int n is a fixed token count. Window: a float is a fraction of the budget
(Keyformer's default 0.3, rounded down), an int a token count; the token just decoded is always
kept. ``sinks`` defaults to 4 for streaming and 0 otherwise. ``mean_score`` (off by default, not
part of either paper) ranks Keyformer/H2O tokens by their score divided by the number of queries
that could attend to them, so old tokens are not favoured for having been seen more often.

Shape legend: L layers, B batch, Hkv key/value heads, G query heads per key/value head, S cache
slots, D head size, P prompt length, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from slimline.errors import ConfigError
from slimline.passes.base import tunable

__all__ = ["NAME", "EXACT", "TARGETS", "POLICIES", "Config", "Plan", "check_config", "make_plan"]

NAME = "kv_prune"
EXACT = False
# onnxruntime: the decode step with a pruned cache exports and runs there; the loop stays in Python
TARGETS = {"cpu", "cuda", "onnxruntime"}

POLICIES = ("keyformer", "h2o", "streaming")
STREAMING_SINKS = 4  # StreamingLLM's default number of attention sinks


@dataclass(frozen=True)
class Config:
    policy: str = tunable("keyformer", POLICIES, "which tokens to keep: Keyformer, H2O or StreamingLLM")
    budget: float | int = tunable(0.5, (0.2, 0.3, 0.5, 0.7),
                                  "cache size: a fraction in (0, 1] of the tokens seen, or an int token count")
    window: float | int = tunable(0.3, (0.1, 0.2, 0.3, 0.5),
                                  "recent window: a fraction of the budget, or an int token count")
    sinks: int | None = tunable(None, (0, 1, 4),
                                "first tokens always kept; None = 4 for streaming, 0 otherwise")
    tau_init: float = tunable(1.0, (0.5, 1.0, 2.0), "Keyformer: softmax temperature at the prompt")
    tau_end: float = tunable(2.0, (1.0, 2.0, 4.0), "Keyformer: temperature at the last decode step")
    seed: int = tunable(0, None, "Keyformer: seed of the Gumbel noise")
    mean_score: bool = tunable(False, (False, True),
                               "rank by the mean weight per query that could see a token, not the sum "
                               "(an experiment, not the papers' choice: their sum favours old tokens)")

    @property
    def sink_count(self) -> int:
        if self.sinks is not None:
            return self.sinks
        return STREAMING_SINKS if self.policy == "streaming" else 0


def _error(message: str, where: str, hint: str) -> ConfigError:
    return ConfigError(message, stage=NAME, where=where, hint=hint)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_config(config: Any) -> Config:
    """A checked :class:`Config` from a Config, a dict of its fields, or a bare budget (0.5, 512)."""
    if _is_number(config):
        config = Config(budget=config)
    elif isinstance(config, dict):
        known = {f.name for f in fields(Config)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise _error(f"unknown kv_prune option(s) {unknown}", "kv_prune=...",
                         f"options: {', '.join(sorted(known))}")
        config = replace(Config(), **config)
    elif not isinstance(config, Config):
        raise _error(f"kv_prune must be a Config, a dict or a budget, got {type(config).__name__}",
                     "kv_prune=...", "kv_prune={'policy': 'keyformer', 'budget': 0.5}")

    if config.policy not in POLICIES:
        raise _error(f"unknown policy {config.policy!r}", "kv_prune policy", f"use one of: {', '.join(POLICIES)}")
    budget, window = config.budget, config.window
    budget_hint = "a fraction in (0, 1] (0.5 keeps half the tokens) or an int token count >= 1"
    if not _is_number(budget):
        raise _error(f"budget must be a number, got {type(budget).__name__}", "kv_prune budget", budget_hint)
    if _is_int(budget):
        if budget < 1:
            raise _error(f"budget {budget} tokens: the cache must keep at least one token",
                         "kv_prune budget", budget_hint)
    elif not (0.0 < budget <= 1.0) or math.isnan(budget):
        raise _error(f"budget {budget} is not a fraction in (0, 1]", "kv_prune budget",
                     budget_hint + "; to keep everything, use budget=1.0 or kv_prune=None")
    window_hint = "a fraction of the budget in [0, 1] (Keyformer: 0.3) or an int token count <= the budget"
    if not _is_number(window) or (isinstance(window, float) and math.isnan(window)):
        raise _error(f"window must be a number, got {window!r}", "kv_prune window", window_hint)
    if window < 0:
        raise _error(f"window {window} is negative", "kv_prune window", window_hint)
    if isinstance(window, float) and window > 1.0:
        raise _error(f"window {window} is longer than the budget (a window fraction is of the budget)",
                     "kv_prune window", window_hint)
    if _is_int(window) and _is_int(budget) and window > budget:
        raise _error(f"window {window} tokens is longer than the budget of {budget} tokens",
                     "kv_prune window", window_hint)
    sinks = config.sinks
    if sinks is not None and (not _is_int(sinks) or sinks < 0):
        raise _error(f"sinks must be an int >= 0, got {sinks!r}", "kv_prune sinks", "sinks=4")
    if _is_int(budget) and config.sink_count > budget:
        raise _error(f"{config.sink_count} sink tokens do not fit a budget of {budget} tokens",
                     "kv_prune sinks", "fewer sinks, or a larger budget")
    if not isinstance(config.mean_score, bool):
        raise _error(f"mean_score must be True or False, got {config.mean_score!r}", "kv_prune mean_score",
                     "mean_score=False is Keyformer's (and H2O's) own ranking")
    for name in ("tau_init", "tau_end"):
        value = getattr(config, name)
        if not _is_number(value) or not value > 0 or math.isinf(value):
            raise _error(f"{name} must be a positive number, got {value!r}", f"kv_prune {name}",
                         "Keyformer uses tau_init=1.0, tau_end=2.0")
    return config


@dataclass(frozen=True)
class Plan:
    """A checked config applied to one generation: cache sizes, window, temperature per step."""

    config: Config
    prompt_length: int
    steps: int  # decode steps after the prompt

    def size(self, seen: int) -> int:
        """Tokens kept once ``seen`` tokens (prompt + generated) have been through the model."""
        budget = self.config.budget
        if _is_int(budget):
            return min(seen, budget)
        return min(seen, max(1, math.ceil(round(budget * seen, 9))))  # round: 0.3·10 is 3.0000000000000004

    def window(self, size: int) -> int:
        """Recent tokens always kept in a cache of ``size`` tokens (at least the newest)."""
        window = self.config.window
        tokens = window if _is_int(window) else math.floor(round(window * size, 9))
        return max(1, min(tokens, size))

    @property
    def sinks(self) -> int:
        return self.config.sink_count

    def temperature(self, step: int) -> float:
        """Keyformer's τ: tau_init at the prompt (step 0), rising linearly to tau_end at the last step."""
        start, end = self.config.tau_init, self.config.tau_end
        return start + (end - start) * min(step, self.steps) / max(1, self.steps)

    @property
    def capacity(self) -> int:
        """Slots the static cache needs: the most tokens it ever holds at once, the new one included.

        Each decode step writes its token into the slot freed by the previous step's eviction, or
        appends one; it evicts when the cache then holds more than :meth:`size` allows.
        """
        filled = self.size(self.prompt_length)
        most, has_free = filled, False
        for step in range(1, self.steps + 1):
            filled += 0 if has_free else 1
            most = max(most, filled)
            has_free = filled > self.size(self.prompt_length + step)
        return most


def make_plan(config: Any, prompt_length: int, steps: int) -> Plan:
    """Check ``config`` against a prompt: a token-count window or sinks may not exceed the budget."""
    config = check_config(config)
    plan = Plan(config, prompt_length, steps)
    size = plan.size(prompt_length)
    if _is_int(config.window) and config.window > size:
        raise _error(f"window {config.window} tokens is longer than the budget: {size} tokens "
                     f"({config.budget} of a {prompt_length}-token prompt)", "kv_prune window",
                     "a smaller window, a fractional window (0.3), or a larger budget")
    if plan.sinks > size:
        raise _error(f"{plan.sinks} sink tokens do not fit the budget: {size} tokens "
                     f"({config.budget} of a {prompt_length}-token prompt)", "kv_prune sinks",
                     "fewer sinks, or a larger budget")
    return plan
