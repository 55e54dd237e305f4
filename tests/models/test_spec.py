"""Model specs: reference names, zoo names, factories, transformers configs, and bad specs."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from slimline.errors import ConfigError, InputError, SlimlineError
from slimline.models import REFERENCE_MODELS
from slimline.models.spec import load_model_spec, parse_overrides
from slimline.models.zoo import ZOO

transformers = pytest.importorskip("transformers")

TINY_LLAMA = ("LlamaConfig:hidden_size=32,intermediate_size=64,num_hidden_layers=1,"
              "num_attention_heads=4,num_key_value_heads=2,vocab_size=64")


def runs(model: nn.Module, args: tuple, kwargs: dict):
    with torch.no_grad():
        return model(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# names


def test_reference_name_builds_the_registry_model():
    model, args, kwargs = load_model_spec("gpt-tiny")
    expected_model, expected_args = REFERENCE_MODELS["gpt-tiny"]()
    assert type(model) is type(expected_model) and kwargs == {}
    assert all(torch.equal(a, b) for a, b in zip(args, expected_args, strict=True))


def test_reference_names_win_over_nothing_and_zoo_names_build_zoo_models():
    model, args, kwargs = load_model_spec(" hf-qwen2 ")  # surrounding blanks are ignored
    assert type(model).__name__ == ZOO["hf-qwen2"].architecture
    assert model.config._attn_implementation == "eager" and "attention_mask" in kwargs
    runs(model, args, kwargs)


def test_unknown_name_lists_valid_names_and_suggests():
    with pytest.raises(ConfigError, match="unknown model 'gpt-smal'") as error:
        load_model_spec("gpt-smal")
    text = str(error.value)
    assert "did you mean gpt-small" in text
    assert "hf-llama" in text and "hyena" in text  # both registries are listed
    assert error.value.stage == "models"


@pytest.mark.parametrize("spec", ["", "   "])
def test_empty_spec(spec):
    with pytest.raises(ConfigError, match="empty model spec"):
        load_model_spec(spec)


# ---------------------------------------------------------------------------------------------
# package.module:factory and path/to/file.py:factory


FACTORIES = textwrap.dedent('''
    import torch
    from torch import nn

    class Constant(nn.Module):
        def forward(self, scale=2.0):  # nothing required: no example inputs needed
            return torch.ones(2) * scale

    def module_only():
        return Constant()

    def with_args():
        return nn.Linear(4, 3), (torch.ones(2, 4),)

    def with_kwargs():
        return nn.Linear(4, 3), [], {"input": torch.ones(2, 4)}

    def needs_inputs():
        return nn.Linear(4, 3)

    def not_a_model():
        return 42

    def args_not_a_tuple():
        return nn.Linear(4, 3), torch.ones(2, 4)

    def needs_argument(width):
        return nn.Linear(width, 3)

    NOT_CALLABLE = 3
''')


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "zoo_spec_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "zoo_spec_factories.py"


def test_factory_forms(factories):
    model, args, kwargs = load_model_spec("zoo_spec_factories:with_args")
    assert isinstance(model, nn.Linear) and args[0].shape == (2, 4) and kwargs == {}
    model, args, kwargs = load_model_spec("zoo_spec_factories:with_kwargs")
    assert args == () and set(kwargs) == {"input"}
    assert runs(model, args, kwargs).shape == (2, 3)
    model, args, kwargs = load_model_spec("zoo_spec_factories:module_only")
    assert type(model).__name__ == "Constant" and (args, kwargs) == ((), {})


def test_factory_from_a_file_path(factories):
    model, args, _ = load_model_spec(f"{factories}:with_args")
    assert isinstance(model, nn.Linear) and isinstance(args, tuple)


@pytest.mark.parametrize("factory, error_type, message", [
    ("needs_inputs", InputError, "without example inputs, and its forward needs input"),
    ("not_a_model", InputError, "returned int, not a model"),
    ("args_not_a_tuple", InputError, "example args are a Tensor, not a tuple"),
    ("needs_argument", ConfigError, "needs arguments"),
    ("NOT_CALLABLE", ConfigError, "is not callable"),
    ("missing", ConfigError, "does not exist"),
])
def test_bad_factories(factories, factory, error_type, message):
    with pytest.raises(error_type, match=message) as error:
        load_model_spec(f"zoo_spec_factories:{factory}")
    assert "zoo_spec_factories" in str(error.value)  # where


def test_missing_attribute_lists_the_module_callables(factories):
    with pytest.raises(ConfigError) as error:
        load_model_spec("zoo_spec_factories:with_arg")
    assert "with_args" in str(error.value) and "needs_inputs" in str(error.value)


@pytest.mark.parametrize("spec, message", [
    ("no_such_package_xyz.models:build", "cannot import module 'no_such_package_xyz.models'"),
    ("/no/such/file.py:build", "no such file"),
    ("not a module:build", "is not a module name"),
    (":build", "malformed model spec"),
    ("package.module:", "malformed model spec"),
    ("package.module:not-a-name", "malformed model spec"),
])
def test_malformed_or_missing_factory_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_model_spec(spec)


# ---------------------------------------------------------------------------------------------
# NameConfig:key=value,...


def test_parse_overrides_literals_and_bare_words():
    assert parse_overrides("a=64,b=1e-5,c=True,d=none,e=gelu,f=[1, 2],g='x,y',h=false") == {
        "a": 64, "b": 1e-5, "c": True, "d": None, "e": "gelu", "f": [1, 2], "g": "x,y", "h": False}
    assert parse_overrides("") == {}


@pytest.mark.parametrize("text, message", [
    ("hidden_size", "cannot read override 'hidden_size'"),
    ("hidden_size=", "cannot read override"),
    ("=3", "cannot read override"),
    ("a=1,a=2", "given twice"),
])
def test_parse_overrides_rejects(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides(text)


def test_config_spec_builds_causal_lm_with_export_defaults():
    model, args, kwargs = load_model_spec(TINY_LLAMA)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (32, 1, 2)
    assert config.use_cache is False and config._attn_implementation == "eager"
    assert args[0].shape == (2, 16) and int(args[0].max()) < 64
    assert kwargs["attention_mask"][-1, -1] == 0  # the last row is padded
    assert runs(model, args, kwargs).logits.shape == (2, 16, 64)
    again, _, _ = load_model_spec(TINY_LLAMA)  # seeded
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_config_spec_overrides_attention_and_strings():
    model, _, _ = load_model_spec(TINY_LLAMA + ",attn_implementation=sdpa,hidden_act=gelu")
    assert model.config._attn_implementation == "sdpa" and model.config.hidden_act == "gelu"


@pytest.mark.parametrize("spec, architecture, input_names", [
    ("BertConfig:hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=4,"
     "vocab_size=64", "BertModel", ("input_ids", "attention_mask")),
    ("ViTConfig:hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=4,"
     "image_size=16,patch_size=8", "ViTForImageClassification", ("pixel_values",)),
    ("T5Config:d_model=32,d_kv=8,d_ff=64,num_layers=1,num_heads=4,vocab_size=64,"
     "decoder_start_token_id=0", "T5ForConditionalGeneration",
     ("input_ids", "attention_mask", "decoder_input_ids")),
    ("WhisperConfig:d_model=32,encoder_layers=1,decoder_layers=1,encoder_attention_heads=4,"
     "decoder_attention_heads=4,vocab_size=64,num_mel_bins=8,max_source_positions=8,"
     "max_target_positions=16,pad_token_id=0,bos_token_id=1,eos_token_id=2,"
     "decoder_start_token_id=1", "WhisperForConditionalGeneration",
     ("input_features", "decoder_input_ids")),
    ("MixtralConfig:hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=4,"
     "num_key_value_heads=2,vocab_size=64,num_local_experts=4", "MixtralForCausalLM",
     ("input_ids", "attention_mask")),
])
def test_config_spec_picks_model_class_and_inputs_by_family(spec, architecture, input_names):
    model, args, kwargs = load_model_spec(spec)
    assert type(model).__name__ == architecture
    forward_names = list(__import__("inspect").signature(model.forward).parameters)
    assert (*forward_names[:len(args)], *kwargs) == input_names
    runs(model, args, kwargs)
    if architecture == "MixtralForCausalLM":
        assert model.config._experts_implementation == "batched_mm"  # the form that exports


@pytest.mark.parametrize("spec, message", [
    ("LlamaConfig:hiden_size=32", "has no setting 'hiden_size'.*did you mean hiden_size -> hidden_size"),
    ("LlamaConfig:hidden_size=48", "LlamaConfig rejects these settings.*multiple of"),
    ("LamaConfig:hidden_size=32", "no config class 'LamaConfig'.*LlamaConfig"),
    ("CLIPConfig", "cannot generate example inputs for CLIPConfig"),  # sizes in sub-configs
    ("CLIPTextConfig", "cannot generate example inputs for model type 'clip_text_model'"),
])
def test_bad_config_specs(spec, message):
    with pytest.raises(ConfigError, match="(?s)" + message):  # (?s): the hint is on its own line
        load_model_spec(spec)


def test_every_error_is_a_slimline_error_with_a_hint():
    for spec in ["nope", "LlamaConfig:x=1", "no_such_package_xyz:f", "hidden_size=3"]:
        with pytest.raises(SlimlineError) as error:
            load_model_spec(spec)
        assert error.value.hint, spec
