"""Trained checkpoints: files and cards agree, loading works, recorded metrics reproduce; the corpus."""

from __future__ import annotations

import hashlib

import pytest
import torch

from slimline.errors import InputError
from slimline.models import REFERENCE_MODELS
from slimline.models.checkpoint import (CHECKPOINT_DIR, checkpoint_path, load_card, load_into, load_state,
                                        round_trip_dtype, save_checkpoint)
from slimline.models.corpus import FILE_SEPARATOR, _classify, build_corpus, split_of, validation_stream
from slimline.models.gpt import GPT, GPTConfig
from slimline.models.quality import (accuracy, digits_eval_set, evaluate_text, held_out_matches_card,
                                     text_eval_set, trained_model)

TRAINED = ["gpt-tiny", "gpt-small", "vit", "mixer"]
MAX_COMMITTED_BYTES = 50 * 1000**2


def small_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(context_length=32, n_layer=2, n_head=2, d_model=16)).eval()


# ---------------------------------------------------------------------------------------------
# Files and cards


@pytest.mark.parametrize("name", TRAINED)
def test_checkpoint_file_matches_its_card(name):
    card = load_card(name)
    data = checkpoint_path(name).read_bytes()
    assert card["checkpoint"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert card["checkpoint"]["bytes"] == len(data)
    assert (CHECKPOINT_DIR / f"{name}.md").read_text().startswith(f"# {name}")
    assert card["parameters"] == sum(p.numel() for p in trained_model(name).parameters())


def test_committed_weights_fit_the_size_limit():
    total = sum(path.stat().st_size for path in CHECKPOINT_DIR.glob("*.safetensors"))
    assert 0 < total <= MAX_COMMITTED_BYTES


@pytest.mark.parametrize("name", ["gpt-tiny", "gpt-small"])
def test_gpt_cards_name_their_data_and_samples(name):
    card = load_card(name)
    assert card["corpus"]["python_version"].startswith("CPython 3.")
    assert len(card["corpus"]["sha256_validation"]) == 64
    assert len(card["samples"]) == 3 and all(len(s["text"]) > len(s["prompt"]) for s in card["samples"])
    assert card["metrics"]["val_bits_per_byte"] < 2.5
    assert card["training"]["train_seconds"] <= 600


# ---------------------------------------------------------------------------------------------
# Loading


def test_registry_factories_load_bundled_checkpoints():
    model, _ = REFERENCE_MODELS["gpt-tiny"](weights="gpt-tiny")
    tensors, _ = load_state("gpt-tiny")
    assert torch.equal(model.blocks[0].mlp.up.weight, tensors["blocks.0.mlp.up.weight"].float())
    assert model.head.weight is model.token_embedding.weight  # still tied after loading
    random_model, _ = REFERENCE_MODELS["gpt-tiny"]()
    assert not torch.equal(random_model.blocks[0].mlp.up.weight, model.blocks[0].mlp.up.weight)


def test_save_and_load_round_trip_stores_tied_weights_once(tmp_path):
    model = small_gpt()
    facts = save_checkpoint(model, tmp_path / "m.safetensors", metadata={"note": "test", "n": 3})
    tensors, metadata = load_state(tmp_path / "m.safetensors")
    assert "head.weight" not in tensors and "token_embedding.weight" in tensors
    assert metadata == {"note": "test", "n": "3"} and facts["tensors"] == len(tensors)
    torch.manual_seed(1)
    fresh = GPT(model.config).eval()
    load_into(fresh, tmp_path / "m.safetensors")
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(fresh(idx), model(idx), rtol=0, atol=0)
    assert fresh.head.weight is fresh.token_embedding.weight


def test_bf16_checkpoint_loads_as_the_rounded_weights(tmp_path):
    model = small_gpt()
    save_checkpoint(model, tmp_path / "m.safetensors", dtype=torch.bfloat16)
    assert load_state(tmp_path / "m.safetensors")[0]["blocks.0.attn.query.weight"].dtype == torch.bfloat16
    loaded = load_into(GPT(model.config).eval(), tmp_path / "m.safetensors")
    rounded = round_trip_dtype(small_gpt(), torch.bfloat16)
    assert loaded.blocks[1].mlp.down.weight.dtype == torch.float32
    assert torch.equal(loaded.blocks[1].mlp.down.weight, rounded.blocks[1].mlp.down.weight)
    assert not torch.equal(loaded.blocks[1].mlp.down.weight, model.blocks[1].mlp.down.weight)


def test_loading_into_the_wrong_architecture_says_what_differs(tmp_path):
    save_checkpoint(small_gpt(), tmp_path / "m.safetensors")
    wider = GPT(GPTConfig(context_length=32, n_layer=2, n_head=2, d_model=32))
    with pytest.raises(InputError, match="shape differs"):
        load_into(wider, tmp_path / "m.safetensors")
    deeper = GPT(GPTConfig(context_length=32, n_layer=3, n_head=2, d_model=16))
    with pytest.raises(InputError, match="missing: blocks.2"):
        load_into(deeper, tmp_path / "m.safetensors")
    with pytest.raises(InputError, match="bundled names: .*gpt-tiny"):
        checkpoint_path("no-such-model")


# ---------------------------------------------------------------------------------------------
# Recorded metrics reproduce


@pytest.mark.parametrize("name", ["gpt-tiny", "gpt-small"])
def test_gpt_quick_metric_reproduces(name):
    card = load_card(name)
    if not held_out_matches_card(card):
        pytest.skip(f"this interpreter's stdlib is not the {card['corpus']['python_version']} the card was measured on")
    result = evaluate_text(trained_model(name), text_eval_set(name, quick=True))
    assert result["bytes"] == card["metrics"]["quick_bytes"]
    assert result["bits_per_byte"] == pytest.approx(card["metrics"]["quick_bits_per_byte"], abs=2e-3)
    assert result["top1_accuracy"] == pytest.approx(card["metrics"]["quick_top1_accuracy"], abs=2e-3)


@pytest.mark.parametrize("name", ["vit", "mixer"])
def test_digits_accuracy_reproduces_and_clears_97_percent(name):
    card = load_card(name)
    measured = accuracy(trained_model(name), digits_eval_set())
    assert measured == pytest.approx(card["metrics"]["accuracy"], abs=1.5 / 360)
    assert measured >= 0.97


# ---------------------------------------------------------------------------------------------
# Corpus


def test_corpus_rules():
    assert _classify("os.py") == "core" and _classify("email/parser.py") == "core"
    assert _classify("test/test_os.py") == "tests" and _classify("idlelib/idle_test/test_x.py") == "tests"
    assert _classify("lib2to3/tests/data/bom.py") is None  # deliberately malformed test inputs
    assert _classify("site-packages/torch/__init__.py") is None
    assert _classify("_sysconfigdata__linux_x86_64-linux-gnu.py") is None
    assert _classify("config-3.11-x86_64-linux-gnu/python-config.py") is None
    assert split_of("os.py") == split_of("os.py")
    paths = [f"module_{i}.py" for i in range(2000)]
    held_out = sum(split_of(p) == "validation" for p in paths) / len(paths)
    assert 0.03 < held_out < 0.07


def test_corpus_streams_are_deterministic_and_agree_with_the_manifest():
    corpus = build_corpus(include_tests=False)
    assert corpus.validation == validation_stream()
    manifest = corpus.manifest
    assert hashlib.sha256(corpus.validation).hexdigest() == manifest["sha256_validation"]
    assert corpus.validation.count(FILE_SEPARATOR) == manifest["files_validation"]
    assert len(corpus.train) == manifest["bytes_core_train"] and manifest["bytes_tests"] == 0
    validation_files = [f for f in manifest["files"] if f[2] == "validation"]
    assert validation_files and all(f[1] == "core" and split_of(f[0]) == "validation" for f in validation_files)
    assert [f[0] for f in manifest["files"]] == sorted(f[0] for f in manifest["files"])
