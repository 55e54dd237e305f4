"""kv_prune: budgets and their errors, a cache that really shrinks, positions kept right by
eviction, a 100% budget that changes nothing, and the decode step on a pruned cache in ORT.

The reference for "positions stay right" is the model's own code: GPT blocks attending over the
full, position-indexed cache with the evicted positions masked to -inf. StreamingLLM keeps the
same positions in every layer and head, so that mask is one (T, Tk) bias and the comparison runs
for many steps; Keyformer and H2O keep different tokens per head, checked by permuting slots.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU

from slimline import SlimlineError
from slimline.kv import CompactDecodeStep, DecodeSession
from slimline.models.gpt import causal_bias
from slimline.models.quality import held_out_text, trained_model
from slimline.passes.kv_prune import Config, check_config, make_plan

PROMPT, STEPS = 96, 24


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decode steps are many tiny ops: on a busy 2-core machine a second thread only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt():
    return trained_model("gpt-tiny")


@pytest.fixture(scope="module")
def text() -> torch.Tensor:
    stream = held_out_text()
    rows = [list(stream[start:start + PROMPT + STEPS + 1]) for start in (1000, 40000)]
    return torch.tensor(rows)  # (2, P + N + 1) held-out bytes


def teacher_forced(gpt, text, kv_prune, steps=STEPS):
    """Logits (B, N, V) of N teacher-forced decode steps after the prompt, and the session."""
    session = DecodeSession(gpt, kv_prune, steps=steps)
    session.prefill(text[:, :PROMPT])
    logits = [session.step(text[:, PROMPT + i:PROMPT + i + 1]) for i in range(steps)]
    return torch.stack(logits, dim=1), session


# ---------------------------------------------------------------------------------------------
# budgets


@pytest.mark.parametrize("options, message", [
    ({"budget": 0}, "at least one token"),
    ({"budget": 0.0}, "not a fraction in (0, 1]"),
    ({"budget": -0.5}, "not a fraction in (0, 1]"),
    ({"budget": -3}, "at least one token"),
    ({"budget": 1.5}, "not a fraction in (0, 1]"),
    ({"budget": float("nan")}, "not a fraction"),
    ({"budget": "half"}, "must be a number"),
    ({"budget": True}, "must be a number"),
    ({"window": 1.2}, "longer than the budget"),
    ({"budget": 16, "window": 17}, "longer than the budget of 16 tokens"),
    ({"window": -1}, "negative"),
    ({"policy": "lru"}, "unknown policy"),
    ({"budget": 3, "policy": "streaming"}, "4 sink tokens do not fit"),
    ({"tau_init": 0.0}, "tau_init must be a positive number"),
    ({"recent": 0.3}, "unknown kv_prune option"),
    ({"mean_score": 1}, "mean_score must be True or False"),
])
def test_bad_configs_get_clear_errors(options, message):
    with pytest.raises(SlimlineError, match="kv_prune") as caught:
        check_config(options)
    assert message in caught.value.message
    assert caught.value.hint


def test_a_window_longer_than_the_resolved_budget_is_refused():
    with pytest.raises(SlimlineError, match=r"window 40 tokens is longer than the budget: 32 tokens"):
        make_plan({"budget": 0.5, "window": 40}, prompt_length=64, steps=8)
    make_plan({"budget": 0.5, "window": 32}, prompt_length=64, steps=8)  # equal is fine


def test_bad_budgets_fail_before_any_work(gpt, text):
    with pytest.raises(SlimlineError, match="not a fraction"):
        DecodeSession(gpt, {"budget": 1.01}, steps=4)


def test_plan_sizes_windows_and_temperatures():
    plan = make_plan(Config(budget=0.3), prompt_length=10, steps=20)
    assert [plan.size(n) for n in (1, 2, 10, 11, 20)] == [1, 1, 3, 4, 6]  # ceil(0.3 n), exact at 0.3·10
    assert plan.window(10) == 3 and plan.window(3) == 1 and plan.window(1) == 1  # floor(0.3 S), >= 1
    assert plan.temperature(0) == 1.0 and plan.temperature(20) == 2.0 and plan.temperature(10) == 1.5
    count = make_plan(Config(budget=16, window=4), prompt_length=64, steps=8)
    assert count.size(64) == 16 and count.size(72) == 16 and count.size(8) == 8 and count.capacity == 17
    assert make_plan(Config(budget=1.0), prompt_length=50, steps=10).capacity == 60  # never evicts
    assert make_plan(Config(budget=0.5), prompt_length=100, steps=0).capacity == 50


# ---------------------------------------------------------------------------------------------
# the cache really shrinks


@pytest.mark.parametrize("policy", ["keyformer", "h2o", "streaming"])
def test_the_cache_tensors_shrink_to_the_budget(gpt, text, policy):
    _, full = teacher_forced(gpt, text, None)
    _, pruned = teacher_forced(gpt, text, {"policy": policy, "budget": 0.5})
    L, B, H, D = 5, 2, 4, 32
    # allocated: half the slots of a full cache (P + N), +1 for the token written before eviction
    assert full.cache.keys.shape == (L, B, H, PROMPT + STEPS, D)
    assert pruned.cache.keys.shape == (L, B, H, pruned.plan.capacity, D)
    assert pruned.plan.capacity == (PROMPT + STEPS) // 2 + 1
    assert pruned.stats["kv_cache_bytes"] == full.stats["kv_cache_bytes"] * pruned.plan.capacity // (PROMPT + STEPS)
    # attention read about half the keys (the FLOPs of q·Kᵀ and p·V fall with them)
    reads, full_reads = pruned.stats["attention_key_reads"], pruned.stats["full_attention_key_reads"]
    assert full_reads == full.stats["attention_key_reads"] == sum(range(PROMPT + 1, PROMPT + STEPS + 1))
    assert 0.5 <= reads / full_reads <= 0.52
    assert pruned.stats["evicted_at_prompt"] == PROMPT // 2 and pruned.stats["evictions"] == STEPS // 2
    # every slot in use holds a distinct, real position; the window of recent tokens is all there
    kept = pruned.kept_positions()
    assert kept.shape[-1] == pruned.plan.size(PROMPT + STEPS)
    assert (kept >= 0).all() and (kept.diff(dim=-1) > 0).all()
    window = pruned.plan.window(kept.shape[-1])
    recent = torch.arange(PROMPT + STEPS - window, PROMPT + STEPS)
    assert torch.isin(recent, kept[0, 0, 0]).all()
    if policy == "streaming":  # sinks + the most recent tokens, the same in every layer and head
        expected = torch.cat([torch.arange(4), torch.arange(PROMPT + STEPS - kept.shape[-1] + 4, PROMPT + STEPS)])
        assert (kept == expected).all()
    else:  # score-based: layers and heads choose differently
        chosen = kept.flatten(0, 2)
        assert len({tuple(row.tolist()) for row in chosen}) > 1


def test_a_token_count_budget_keeps_a_fixed_size(gpt, text):
    _, session = teacher_forced(gpt, text, {"budget": 24, "window": 6})
    assert session.cache.keys.shape[3] == 25 and session.cache.filled == 25
    assert session.stats["attention_key_reads"] == 25 * STEPS
    assert session.kept_positions().shape == (5, 2, 4, 24)  # one slot freed by the last eviction


# ---------------------------------------------------------------------------------------------
# a 100% budget changes nothing


@pytest.mark.parametrize("policy", ["keyformer", "h2o", "streaming"])
def test_a_full_budget_reproduces_the_full_cache_exactly(gpt, text, policy):
    full_logits, _ = teacher_forced(gpt, text, None)
    logits, session = teacher_forced(gpt, text, {"policy": policy, "budget": 1.0})
    assert torch.equal(logits, full_logits)
    assert session.stats["evictions"] == 0 and session.stats["evicted_at_prompt"] == 0


def test_the_full_cache_matches_the_model_run_on_the_whole_sequence(gpt, text):
    logits, _ = teacher_forced(gpt, text, None)
    reference = gpt(text[:, :PROMPT + STEPS])[:, PROMPT:]  # (B, N, V)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# positions: keys are cached after rotary, so eviction keeps every q·k right


def masked_full_cache_logits(gpt, text, keep_mask: torch.Tensor) -> torch.Tensor:
    """The GPT's own blocks over its position-indexed static cache; keys where keep_mask (N, Tk), or
    per layer and head (N, L, B, H, Tk), is False masked to -inf at decode step i. Returns (B, N, V)
    teacher-forced logits."""
    k_cache, v_cache = gpt.new_kv_cache(text.shape[0])
    _, k_cache, v_cache = gpt.forward_with_cache(text[:, :PROMPT], torch.arange(PROMPT), k_cache, v_cache)
    outputs = []
    for i in range(STEPS):
        position = torch.tensor([PROMPT + i])
        x = gpt.token_embedding(text[:, PROMPT + i:PROMPT + i + 1])
        cos, sin = gpt.rope_cos[position], gpt.rope_sin[position]
        bias = causal_bias(position, torch.arange(k_cache.shape[3]), x.dtype)  # (1, Tm)
        keys, values = [], []
        for layer, block in enumerate(gpt.blocks):
            keep = keep_mask[i, None] if keep_mask.dim() == 2 else keep_mask[i, layer, :, :, None]  # (.., 1, Tk)
            layer_bias = bias.masked_fill(~keep[..., : k_cache.shape[3]], float("-inf"))
            x, k, v = block(x, cos, sin, layer_bias, position, k_cache[layer], v_cache[layer])
            keys.append(k)
            values.append(v)
        k_cache, v_cache = torch.stack(keys), torch.stack(values)
        outputs.append(gpt.head(gpt.ln_final(x))[:, -1])
    return torch.stack(outputs, dim=1)


@torch.no_grad()
def test_streaming_pruned_cache_equals_the_masked_full_cache_at_every_step(gpt, text):
    budget = {"policy": "streaming", "budget": 0.3}
    logits, session = teacher_forced(gpt, text, budget)
    plan = session.plan
    keep = torch.zeros(STEPS, gpt.config.context_length, dtype=torch.bool)
    for i in range(STEPS):  # what the cache held while decoding step i: sinks + the newest
        seen = PROMPT + i + 1
        kept_before = plan.size(seen - 1)
        keep[i, :4] = True
        keep[i, seen - (kept_before - 4) - 1:seen] = True
    reference = masked_full_cache_logits(gpt, text, keep)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits, teacher_forced(gpt, text, None)[0], atol=1e-3)  # pruning did act


@torch.no_grad()
@pytest.mark.parametrize("policy", ["keyformer", "h2o"])
def test_scored_pruned_cache_equals_the_per_head_masked_full_cache(gpt, text, policy):
    """Keyformer and H2O leave different gaps in every layer and head: each key keeps its own rotary
    position, so the compact cache computes what the full cache does with the evicted keys masked."""
    session = DecodeSession(gpt, {"policy": policy, "budget": 0.3}, steps=STEPS)
    session.prefill(text[:, :PROMPT])
    L, B, H = session.cache.positions.shape[:3]
    keep = torch.zeros(STEPS, L, B, H, gpt.config.context_length + 1, dtype=torch.bool)
    logits = []
    for i in range(STEPS):
        held = session.cache.positions[..., : session.cache.filled]  # (L, B, H, S), -1 = the freed slot
        keep[i].scatter_(-1, held.clamp(min=-1) % keep.shape[-1], True)  # -1 lands in the spare last column
        keep[i, ..., PROMPT + i] = True  # the token being decoded
        logits.append(session.step(text[:, PROMPT + i:PROMPT + i + 1]))
    keep = keep[..., :-1]
    gaps = keep[-1, ..., :PROMPT].float().mean(-1)  # (L, B, H) share of the prompt kept at the end
    assert gaps.max() < 0.5 and not torch.equal(keep[-1, 0, 0, 0], keep[-1, 0, 0, 1])  # pruned, per head
    reference = masked_full_cache_logits(gpt, text, keep)
    torch.testing.assert_close(torch.stack(logits, dim=1), reference, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_slot_order_does_not_matter(gpt, text):
    """Per-head permutations of a Keyformer-pruned cache give the same next-token logits."""
    session = DecodeSession(gpt, {"budget": 0.4}, steps=1)
    session.prefill(text[:, :PROMPT])
    keys, values = session.cache.views()
    permutation = torch.rand(keys.shape[:4]).argsort(-1)  # (L, B, H, S)
    index = permutation.unsqueeze(-1).expand_as(keys)
    token, position = text[:, PROMPT:PROMPT + 1], torch.tensor([PROMPT])
    adapter = session.adapter
    free_slot = keys.shape[3]  # decode into one extra slot, as the loop does
    pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:3], 1, t.shape[-1])], dim=3)  # noqa: E731
    straight = adapter.decode(token, position, pad(keys), pad(values), free_slot)[0]
    shuffled = adapter.decode(token, position, pad(keys.gather(3, index)), pad(values.gather(3, index)), free_slot)[0]
    torch.testing.assert_close(straight, shuffled, rtol=1e-5, atol=1e-5)


def test_keyformer_is_seeded_and_its_noise_changes_the_choice(gpt, text):
    first, a = teacher_forced(gpt, text, {"budget": 0.3, "seed": 1})
    again, b = teacher_forced(gpt, text, {"budget": 0.3, "seed": 1})
    assert torch.equal(first, again) and torch.equal(a.kept_positions(), b.kept_positions())
    _, other_seed = teacher_forced(gpt, text, {"budget": 0.3, "seed": 2})
    _, h2o = teacher_forced(gpt, text, {"policy": "h2o", "budget": 0.3})
    assert not torch.equal(a.kept_positions(), other_seed.kept_positions())
    assert not torch.equal(a.kept_positions(), h2o.kept_positions())


def test_one_shared_prefill_serves_several_policies_exactly(gpt, text):
    from slimline.kv.session import prefill_together

    # Keyformer seed 5 and H2O appear twice: the second of each shares the first's prompt scores
    configs = [None, {"budget": 0.3, "seed": 5}, {"policy": "h2o", "budget": 0.5}, {"policy": "streaming", "budget": 0.3},
               {"budget": 0.5, "seed": 5, "window": 0.5}, {"policy": "h2o", "budget": 0.3}, {"budget": 0.3, "seed": 6}]
    together = [DecodeSession(gpt, config, steps=2) for config in configs]
    prefill_together(together, text[:, :PROMPT])
    assert [session._prompt_leader for session in together] == [None] * 7  # released after the prefill
    for config, shared in zip(configs, together):
        alone = DecodeSession(gpt, config, steps=2)
        alone.prefill(text[:, :PROMPT])
        assert torch.equal(shared.kept_positions(), alone.kept_positions())
        assert torch.equal(shared.cache.scores, alone.cache.scores)
        for i in range(2):  # the second step draws Keyformer noise after the prompt's: the same draws
            token = text[:, PROMPT + i:PROMPT + i + 1]
            assert torch.equal(shared.step(token), alone.step(token))
            assert torch.equal(shared.cache.scores, alone.cache.scores)


# ---------------------------------------------------------------------------------------------
# ONNX: the decode step takes the pruned (smaller) cache


@torch.no_grad()
def test_the_decode_step_on_a_pruned_cache_exports_and_runs_in_onnxruntime(tmp_path):
    from slimline.backends.onnx_export import export_onnx_model
    from slimline.backends.onnxruntime import OrtModule
    from slimline.models.gpt import GPT, GPTConfig

    small = GPT(GPTConfig(context_length=64, n_layer=2, n_head=2, d_model=32)).eval()  # export time
    prompt = torch.randint(0, 256, (2, 40))
    session = DecodeSession(small, {"budget": 0.3}, steps=1)
    session.prefill(prompt)
    keys, values = (t.clone() for t in session.cache.views())  # (L, B, H, 12, D): 0.3 of the prompt
    assert keys.shape[3] == 12
    step = CompactDecodeStep(small).eval()
    slot = torch.randint(0, keys.shape[3], keys.shape[:3])  # a different slot per layer and head
    args = (torch.randint(0, 256, (2, 1)), torch.tensor([40]), keys, values, slot)
    slots = torch.export.Dim("slots", min=2, max=small.config.context_length)
    dynamic = {"idx": None, "input_pos": None, "k_cache": {3: slots}, "v_cache": {3: slots}, "write_slot": None}
    export_onnx_model(step, args, {}, tmp_path / "decode.onnx", dynamic_shapes=dynamic)
    ort_step = OrtModule(tmp_path / "decode.onnx")
    for size in (12, 5):  # the exported step serves any pruned size
        sized = (args[0], args[1], keys[..., :size, :].contiguous(), values[..., :size, :].contiguous(),
                 slot.clamp(max=size - 1))
        expected = step(*sized)
        actual = ort_step(*sized)
        assert actual[1].shape == (2, 2, 2, size, 16)
        for e, a in zip(expected, actual):
            torch.testing.assert_close(torch.as_tensor(a), e, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# the Triton decode kernel (CUDA's default; here under the interpreter) against the torch form

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or (os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available()),
    reason="needs triton and a GPU or the Triton interpreter")


@needs_triton
@pytest.mark.parametrize("B, H, Hkv, S, D, capacity", [
    (2, 4, 2, 300, 32, 320),  # grouped heads, a strided view of a larger buffer, a ragged last block
    (1, 2, 2, 1, 16, 4),      # one slot
    (1, 3, 3, 256, 24, 256),  # whole splits; a head size that is not a power of two
])
def test_triton_decode_kernel_matches_the_torch_form(B, H, Hkv, S, D, capacity):
    from slimline.kv.attention import decode_attention_torch
    from slimline.kv.triton_attention import decode_attention_triton

    generator = torch.Generator().manual_seed(S)
    buffers = torch.randn(2, B, Hkv, capacity, D, generator=generator)
    key, value = buffers[0, :, :, :S], buffers[1, :, :, :S]
    query = torch.randn(B, H, 1, D, generator=generator)
    expected, expected_logits = decode_attention_torch(query, key, value, D ** -0.5)
    out, logits = decode_attention_triton(query, key, value, D ** -0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert decode_attention_triton(query, key, value, D ** -0.5, want_logits=False)[1] is None


@needs_triton
def test_the_loop_runs_the_same_with_the_triton_kernel(gpt, text):
    expected, reference = teacher_forced(gpt, text, {"budget": 0.5}, steps=2)
    session = DecodeSession(gpt, {"budget": 0.5}, steps=2)
    session.adapter.kernel = "triton"
    session.prefill(text[:, :PROMPT])
    logits = torch.stack([session.step(text[:, PROMPT + i:PROMPT + i + 1]) for i in range(2)], dim=1)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(session.kept_positions(), reference.kept_positions())


# ---------------------------------------------------------------------------------------------
# Keyformer as the paper and its reference code define it, re-derived over absolute positions


class TableAdapter:
    """Stands in for a model: the attention logit of query position q on key position j in layer l,
    sequence b, head h is ``table[l, b, h, q, j]``. Cached keys carry their position in channel 0,
    so the compact cache's logits are looked up by the position each slot holds."""

    def __init__(self, table: torch.Tensor, model):
        self.table = table  # (L, B, H, T, T)
        self.n_layer, _, self.n_kv_head = table.shape[:3]
        self.n_head, self.head_size, self.model = self.n_kv_head, 2, model
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def check_length(self, total):
        assert total <= self.table.shape[-1]

    def prefill(self, idx, observe=None, all_logits=False):
        L, B, H = self.table.shape[:3]
        P = idx.shape[1]
        future = torch.ones(P, P, dtype=torch.bool).triu(1)
        for layer in range(L):
            if observe is not None:
                observe(layer, self.table[layer, :, :, :P, :P].masked_fill(future, float("-inf")).unsqueeze(2))
        keys = torch.zeros(L, B, H, P, 2)
        keys[..., 0] = torch.arange(P, dtype=torch.float32)
        return torch.zeros(B, 1, 8), keys, keys.clone()

    def decode(self, idx, input_pos, keys, values, slot, want_attention=False, in_place=True, length=None):
        L, B, H = self.table.shape[:3]
        position = int(input_pos)
        if isinstance(slot, int):
            keys[..., slot, 0] = position
        else:
            keys[..., 0].scatter_(-1, slot.unsqueeze(-1), float(position))
        held = keys[..., 0].long()  # (L, B, H, S)
        logits = self.table[:, :, :, position].gather(-1, held)  # (L, B, H, S)
        return torch.zeros(B, 1, 8), logits.unsqueeze(3), keys, values


def keyformer_by_masks(table, prompt, steps, budget, window, temperature, mean_rank=False):
    """The selection of Keyformer's reference code, written over absolute positions with a keep
    mask (no compaction): score = column sums of softmax(logits / τ) over the prompt's queries,
    unnormalised (``mean_rank``: ranked by the score divided by the number of queries that could see
    each key — *not* the paper's choice; Config.mean_score); dropped tokens take no part
    in later softmaxes and keep no score; after the prompt keep the ``window`` newest + the top
    (budget - window) older ones; every decode step adds the new token, accumulates, and evicts
    the lowest-scored token older than the window. Returns the kept positions (L, B, H, budget)
    after the prompt and after each step."""
    L, B, H, T, _ = table.shape
    P = prompt
    logits = table[..., :P, :P].masked_fill(torch.ones(P, P, dtype=torch.bool).triu(1), float("-inf"))
    score = torch.softmax(logits / temperature(0), dim=-1).sum(dim=-2)  # (L, B, H, P)
    rank = score / torch.arange(P, 0, -1) if mean_rank else score  # key j was seen by P - j queries
    older = rank[..., : P - window]
    keep = torch.zeros(L, B, H, T, dtype=torch.bool)
    keep[..., P - window:P] = True
    keep[..., : P - window].scatter_(-1, older.topk(budget - window, dim=-1).indices, True)
    score = torch.cat([score, torch.zeros(L, B, H, T - P)], dim=-1) * keep
    kept = [keep.nonzero()[:, -1].view(L, B, H, budget)]
    for t in range(1, steps + 1):
        q = P + t - 1
        keep[..., q] = True
        row = table[..., q, :].masked_fill(~keep, float("-inf"))
        step_score = torch.softmax(row / temperature(t), dim=-1)
        score = score + step_score
        candidates = keep & (torch.arange(T) <= q - window)
        rank = score / (q + 1 - torch.arange(T)).clamp(min=1) if mean_rank else score
        victim = rank.masked_fill(~candidates, float("inf")).argmin(dim=-1, keepdim=True)
        keep.scatter_(-1, victim, False)
        score = score * keep
        kept.append(keep.nonzero()[:, -1].view(L, B, H, budget))
    return kept


@pytest.mark.parametrize("policy, mean_score", [("keyformer", False), ("h2o", False), ("keyformer", True)])
def test_selection_matches_the_papers_algorithm_per_layer_and_head(gpt, monkeypatch, policy, mean_score):
    """Per layer and head, prompt column sums, unnormalised accumulation, the window of the current
    cache, one eviction per step at a fixed budget (Keyformer's noise is zeroed here to compare
    choices exactly; its draws are checked on their own below)."""
    from slimline.kv.keyformer import Keyformer

    monkeypatch.setattr(Keyformer, "gumbel_noise", lambda self, like, generator=None: torch.zeros(like.shape))
    L, B, H, P, N, budget = 3, 2, 4, 40, 20, 16
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(L, B, H, P + N, P + N, generator=generator) * 2
    table[..., 5] += 3  # a few heavy hitters, so scores, not recency, decide
    session = DecodeSession(gpt, {"policy": policy, "budget": budget, "window": 0.3, "mean_score": mean_score},
                            steps=N)
    session.adapter = TableAdapter(table, gpt)
    session.prefill(torch.zeros(B, P, dtype=torch.int64))
    plan = session.plan
    window = plan.window(budget)
    temperature = plan.temperature if policy == "keyformer" else (lambda step: 1.0)
    expected = keyformer_by_masks(table, P, N, budget, window, temperature, mean_score)
    assert window == 4 and plan.temperature(N) == 2.0
    assert torch.equal(session.kept_positions(), expected[0])
    for t in range(1, N + 1):
        session.step(torch.zeros(B, 1, dtype=torch.int64))
        assert torch.equal(session.kept_positions(), expected[t]), f"step {t}"
    assert session.stats["evictions"] == N and session.cache.capacity == budget + 1
    per_head = expected[-1].flatten(0, 2)
    assert len({tuple(row.tolist()) for row in per_head}) == L * B * H  # every head chose its own
    other = keyformer_by_masks(table, P, N, budget, window, temperature, not mean_score)
    assert not all(torch.equal(a, b) for a, b in zip(expected, other))  # the test tells sum and mean apart


def test_keyformer_weights_are_a_gumbel_softmax_at_the_scheduled_temperature():
    from slimline.kv.keyformer import Keyformer

    plan = make_plan(Config(budget=8), prompt_length=16, steps=10)
    policy = Keyformer(plan.temperature, seed=3, device=torch.device("cpu"))
    logits = torch.randn(2, 3, 1, 1, 50)
    logits[..., 7] = float("-inf")  # a dropped key
    noise = Keyformer(plan.temperature, seed=3, device=torch.device("cpu")).gumbel_noise(
        logits, torch.Generator().manual_seed(3))
    weights = policy.weights(logits, 5)
    torch.testing.assert_close(weights, torch.softmax((logits + noise) / 1.5, dim=-1))
    assert (weights[..., 7] == 0).all() and torch.allclose(weights.sum(-1), torch.ones(2, 3, 1, 1))
    draws = policy.gumbel_noise(torch.empty(200_000), torch.Generator().manual_seed(1))
    assert abs(float(draws.mean()) - 0.5772) < 0.01 and abs(float(draws.var()) - torch.pi ** 2 / 6) < 0.03


# ---------------------------------------------------------------------------------------------
# the fixed-size decoder (one CUDA graph a step on a GPU) computes what the session computes


@pytest.mark.parametrize("kv_prune", [None, {"policy": "keyformer", "budget": 40},
                                      {"policy": "h2o", "budget": 40, "window": 0.5},
                                      {"policy": "streaming", "budget": 40}])
def test_the_fixed_size_decoder_computes_what_the_session_does(gpt, text, kv_prune):
    from slimline.kv.graphed import FixedSizeDecoder

    expected, reference = teacher_forced(gpt, text, kv_prune)
    session = DecodeSession(gpt, kv_prune, steps=STEPS)
    session.prefill(text[:, :PROMPT])
    decoder = FixedSizeDecoder(session, graph=False)
    logits = torch.stack([decoder.step(text[:, PROMPT + i:PROMPT + i + 1]) for i in range(STEPS)], dim=1)
    if kv_prune is None:  # attention over the whole buffer up to a length: the same up to rounding
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    else:  # the same ops on the same slots: bit for bit, and the same tokens kept
        assert torch.equal(logits, expected)
        assert torch.equal(session.kept_positions(), reference.kept_positions())
        assert session.stats["evictions"] == STEPS and session.cache.keys.shape[3] == 41
    assert session.stats["attention_key_reads"] == reference.stats["attention_key_reads"]
    # greedy, fed back on the device
    first = DecodeSession(gpt, kv_prune, steps=8)
    start = first.prefill(text[:, :PROMPT]).argmax(-1, keepdim=True)
    tokens = FixedSizeDecoder(first, graph=False).greedy(start, 8)
    second = DecodeSession(gpt, kv_prune, steps=8)
    token = second.prefill(text[:, :PROMPT]).argmax(-1, keepdim=True)
    picks = []
    for _ in range(8):
        token = second.step(token).argmax(-1, keepdim=True)
        picks.append(token)
    assert torch.equal(tokens, torch.cat(picks, dim=1))


def test_the_fixed_size_decoder_refuses_a_growing_cache(gpt, text):
    from slimline.kv.graphed import FixedSizeDecoder

    session = DecodeSession(gpt, {"budget": 0.5}, steps=STEPS)
    session.prefill(text[:, :PROMPT])
    with pytest.raises(SlimlineError, match="an int budget"):
        FixedSizeDecoder(session, graph=False)


@needs_triton
def test_triton_decode_kernel_reads_only_up_to_a_device_length():
    from slimline.kv.attention import decode_attention_torch
    from slimline.kv.triton_attention import decode_attention_triton

    generator = torch.Generator().manual_seed(9)
    key, value = torch.randn(2, 1, 2, 600, 16, generator=generator)
    query = torch.randn(1, 4, 1, 16, generator=generator)
    for length in (1, 255, 300, 600):  # inside the first block; a split boundary; ragged; all
        expected, expected_logits = decode_attention_torch(query, key[:, :, :length], value[:, :, :length], 0.25)
        out, logits = decode_attention_triton(query, key, value, 0.25, length=torch.tensor([length]))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[..., :length], expected_logits, rtol=1e-5, atol=1e-5)
        assert (logits[..., length:] == float("-inf")).all()
        torch_out, torch_logits = decode_attention_torch(query, key, value, 0.25, torch.tensor([length]))
        torch.testing.assert_close(torch_out, expected, rtol=1e-5, atol=1e-5)
