"""slimline.generate: greedy and sampled generation on a static KV cache, for the reference GPT and
transformers Llama-family decoders; its errors; and the same through a pruned cache.

References are independent of the loop: slimline.models.gpt.generate (the model's own static
Tm-slot cache) and, for transformers, the model's own forward re-run on the whole sequence.
"""

from __future__ import annotations

import pytest
import torch

from slimline.errors import ConfigError, InputError, SlimlineError
from slimline.generate import generate
from slimline.kv import DecodeSession
from slimline.models.gpt import generate as reference_generate
from slimline.models.quality import trained_model

PROMPT = b"import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n    parser."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny decode steps: a second thread only waits on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt():
    return trained_model("gpt-tiny")


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.tensor([list(PROMPT), list(PROMPT.replace(b"sys", b"re "))])  # (2, P)


def test_greedy_generation_matches_the_models_own_loop(gpt, prompt):
    expected = reference_generate(gpt, prompt, 40)
    tokens, stats = generate(gpt, prompt, 40, return_stats=True)
    assert torch.equal(tokens, expected)
    assert stats["cache_slots"] == prompt.shape[1] + 39  # preallocated: prompt + fed tokens, not the context
    assert stats["evictions"] == 0 and stats["policy"] == "full"


def test_a_full_budget_generates_the_same_tokens(gpt, prompt):
    expected = generate(gpt, prompt, 40)
    for policy in ("keyformer", "h2o", "streaming"):
        assert torch.equal(generate(gpt, prompt, 40, kv_prune={"policy": policy, "budget": 1.0}), expected)


def test_pruned_generation_uses_a_smaller_cache(gpt, prompt):
    tokens, stats = generate(gpt, prompt, 40, kv_prune=0.5, return_stats=True)
    assert tokens.shape == (2, prompt.shape[1] + 40)
    assert stats["policy"] == "keyformer" and stats["evicted_at_prompt"] == prompt.shape[1] // 2
    assert stats["kv_cache_bytes"] < 0.52 * stats["full_kv_cache_bytes"]


@pytest.mark.parametrize("kv_prune", [None, 1.0, {"policy": "h2o", "budget": 20}, {"budget": 20}])
def test_cuda_graph_generation_gives_the_same_tokens(gpt, prompt, kv_prune):
    """Off CUDA the graphed decoder runs its step eagerly: the same tokens as the plain loop."""
    expected, expected_stats = generate(gpt, prompt, 24, kv_prune=kv_prune, return_stats=True)
    tokens, stats = generate(gpt, prompt, 24, kv_prune=kv_prune, return_stats=True, cuda_graph=True)
    assert torch.equal(tokens, expected)
    assert stats["evictions"] == expected_stats["evictions"] and stats["steps"] == 23


def test_cuda_graph_generation_refuses_sampling_and_a_growing_cache(gpt, prompt):
    with pytest.raises(SlimlineError, match="greedily"):
        generate(gpt, prompt, 8, greedy=False, cuda_graph=True)
    with pytest.raises(SlimlineError, match="an int budget"):
        generate(gpt, prompt, 8, kv_prune=0.5, cuda_graph=True)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(gpt, prompt):
    sample = lambda seed, **kw: generate(gpt, prompt, 30, greedy=False, generator=torch.Generator().manual_seed(seed),  # noqa: E731
                                        **kw)
    first, again, other = sample(0, temperature=0.9), sample(0, temperature=0.9), sample(1, temperature=0.9)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(first[:, :prompt.shape[1]], prompt)
    assert torch.equal(sample(3, top_k=1), generate(gpt, prompt, 30))


def test_zero_new_tokens_returns_the_prompt(gpt, prompt):
    assert torch.equal(generate(gpt, prompt, 0), prompt)


@pytest.mark.parametrize("call, error, message", [
    (lambda m, p: generate(m, p.float(), 4), InputError, "integer tensor"),
    (lambda m, p: generate(m, p[0], 4), InputError, "(batch, length)"),
    (lambda m, p: generate(m, p[:, :0], 4), InputError, "non-empty"),
    (lambda m, p: generate(m, p, -1), InputError, "max_new_tokens"),
    (lambda m, p: generate(m, p, 2.5), InputError, "max_new_tokens"),
    (lambda m, p: generate(m, p, 4, greedy=False, temperature=0), ConfigError, "temperature"),
    (lambda m, p: generate(m, p, 4, greedy=False, top_k=0), ConfigError, "top_k"),
    (lambda m, p: generate(m, p, 250), InputError, "exceeds the model's 256 positions"),
    (lambda m, p: generate(torch.nn.Linear(4, 4), p, 4), InputError, "no cached decode loop"),
    (lambda m, p: generate(m, p, 4, kv_prune=0), ConfigError, "at least one token"),
    (lambda m, p: generate(m, p, 4, kv_prune={"budget": 0.5, "window": 2.0}), ConfigError, "longer than the budget"),
])
def test_mistakes_get_slimline_errors(gpt, prompt, call, error, message):
    with pytest.raises(error) as caught:
        call(gpt, prompt)
    assert message in str(caught.value) and caught.value.hint


def test_a_session_refuses_steps_it_was_not_sized_for(gpt, prompt):
    session = DecodeSession(gpt, None, steps=1)
    with pytest.raises(InputError, match="before the prompt"):
        session.step(prompt[:, :1])
    session.prefill(prompt)
    session.step(prompt[:, :1])
    with pytest.raises(InputError, match="more decode steps"):
        session.step(prompt[:, :1])


# ---------------------------------------------------------------------------------------------
# transformers decoders (random weights; grouped-query attention: 4 query heads, 2 key/value heads)


def tiny_transformers(kind: str):
    transformers = pytest.importorskip("transformers")
    options = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=128, max_position_embeddings=128)
    config = (transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config)(**options)
    torch.manual_seed(0)
    return (transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen2ForCausalLM)(config).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@torch.no_grad()
def test_transformers_decoders_generate_what_their_own_forward_predicts(kind):
    model = tiny_transformers(kind)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    tokens = generate(model, ids, 12)
    expected = ids
    for _ in range(12):  # greedy by re-running the whole sequence through transformers
        expected = torch.cat([expected, model(expected).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, expected)
    session = DecodeSession(model, None, steps=0)
    logits = session.adapter.prefill(ids, all_logits=True)[0]
    torch.testing.assert_close(logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_transformers_pruned_cache_keeps_key_value_heads():
    model = tiny_transformers("llama")
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    _, stats = generate(model, ids, 9, kv_prune={"policy": "h2o", "budget": 0.25}, return_stats=True)
    session = DecodeSession(model, {"budget": 0.25}, steps=8)
    session.prefill(ids)
    assert session.cache.keys.shape == (2, 1, 2, session.plan.capacity, 16)  # (L, B, Hkv, S, D)
    assert session.plan.capacity == 13 and stats["kept_after_prompt"] == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generation_matches_cpu(gpt, prompt):
    import copy

    cuda_model = copy.deepcopy(gpt).cuda()
    assert torch.equal(generate(cuda_model, prompt.cuda(), 20).cpu(), generate(gpt, prompt, 20))
    tokens = generate(cuda_model, prompt.cuda(), 20, kv_prune=0.5)
    assert tokens.is_cuda and tokens.shape == (2, prompt.shape[1] + 20)

