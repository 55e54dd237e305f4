"""Model specs: the one string the CLI takes to name a model, and how it becomes one.

    spec                                         what it builds
    gpt-small                                    a bundled reference model (slimline.models.REFERENCE_MODELS)
    hf-llama                                     a zoo model (slimline.models.zoo.ZOO), eager attention
    my_package.models:build                      calls build(); a module, (module, args) or
    path/to/file.py:build                        (module, args, kwargs)
    LlamaConfig:hidden_size=64,num_hidden_layers=2
                                                 a transformers config with overrides, its model
                                                 with random weights and generated inputs
    LlamaConfig                                  the same with the config's defaults (full size!)

:func:`load_model_spec` returns ``(model, args, kwargs)``. Names are tried in this order:
reference models, then the zoo, then ``*Config``. A spec with a colon is a config spec when the
part before the colon is a bare name ending in ``Config``, a factory otherwise.

Config specs: values are Python literals (``64``, ``1e-5``, ``True``, ``None``, ``[1, 2]``,
``'gelu'``); anything else is taken as a string (``hidden_act=gelu``). Keys must be parameters
or attributes of the config class, so a typo fails instead of being ignored. Unless overridden:
``use_cache=False`` (a cache output defeats ``torch.export``), ``attn_implementation="eager"``
and ``experts_implementation="batched_mm"`` (read by mixture-of-experts models only: the form
that exports; see ``docs/zoo-findings.md``). The model class follows the config's model type:
speech seq2seq (Whisper) → ``AutoModelForSpeechSeq2Seq``; seq2seq LM (T5) →
``AutoModelForSeq2SeqLM``; image classification (ViT) → ``AutoModelForImageClassification``;
masked LM (BERT) → ``AutoModel``, the bare encoder; causal LM (Llama, GPT-2) →
``AutoModelForCausalLM``. Example inputs come from :func:`slimline.models.zoo.example_inputs_for`.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimline.errors import ConfigError, InputError
from slimline.models.zoo import ZOO, build_zoo_model, example_inputs_for, require_transformers

__all__ = ["load_model_spec", "parse_overrides", "SPEC_FORMS"]

STAGE = "models"
SPEC_FORMS = ("a reference model name (gpt-small)", "a zoo name (hf-llama)",
              "package.module:factory or path/to/file.py:factory",
              "a transformers config with overrides (LlamaConfig:hidden_size=64,num_hidden_layers=2)")
_CONFIG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*Config")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SEED = 0


def load_model_spec(spec: str) -> tuple[nn.Module, tuple, dict]:
    """Build the model a spec names: ``(model, example args, example kwargs)``.

    Raises a :class:`~slimline.errors.ConfigError` for a spec that names nothing buildable and
    an :class:`~slimline.errors.InputError` for a factory that returns something unusable.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty model spec {spec!r}", stage=STAGE, where="model spec",
                          hint="give one of: " + "; ".join(SPEC_FORMS))
    spec = spec.strip()
    if ":" not in spec:
        return _load_name(spec)
    head, _, tail = spec.partition(":")
    if _CONFIG_NAME.fullmatch(head.strip()):
        return _load_config(head.strip(), parse_overrides(tail, where=spec))
    return _load_factory(head.strip(), tail.strip(), spec)


# ---------------------------------------------------------------------------------------------
# names: reference models, zoo, bare config classes


def _reference_models() -> dict:
    from slimline.models import REFERENCE_MODELS  # imported when needed: slimline.models may import this module
    return REFERENCE_MODELS


def _load_name(name: str) -> tuple[nn.Module, tuple, dict]:
    references = _reference_models()
    if name in references:
        model, args = references[name]()
        return model, tuple(args), {}
    if name in ZOO:
        return build_zoo_model(name)
    if _CONFIG_NAME.fullmatch(name):
        return _load_config(name, {})
    known = [*references, *ZOO]
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ConfigError(
        f"unknown model {name!r}", stage=STAGE, where="model spec",
        hint=f"{hint}reference models: {', '.join(references)}; zoo: {', '.join(ZOO)}; "
             "or package.module:factory, or a transformers config such as "
             "LlamaConfig:hidden_size=64,num_hidden_layers=2")


# ---------------------------------------------------------------------------------------------
# package.module:factory


def _import_module(module_name: str, spec: str):
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise ConfigError(f"no such file {str(path)!r}", stage=STAGE, where=f"model spec {spec!r}",
                              hint="give an existing .py file, or a dotted module name on sys.path")
        import_spec = importlib.util.spec_from_file_location(f"_slimline_spec_{path.stem}", path)
        module = importlib.util.module_from_spec(import_spec)
        sys.modules[import_spec.name] = module
        try:
            import_spec.loader.exec_module(module)
        except Exception:
            del sys.modules[import_spec.name]
            raise
        return module
    if not all(_IDENTIFIER.fullmatch(part) for part in module_name.split(".")):
        raise ConfigError(f"{module_name!r} is not a module name", stage=STAGE,
                          where=f"model spec {spec!r}",
                          hint="write package.module:factory, path/to/file.py:factory, "
                               "or NameConfig:key=value,...")
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ConfigError(f"cannot import module {module_name!r}: {error}", stage=STAGE,
                          where=f"model spec {spec!r}",
                          hint="check the spelling, and that its package is installed or its "
                               "directory is on PYTHONPATH") from error


def _load_factory(module_name: str, factory_name: str, spec: str) -> tuple[nn.Module, tuple, dict]:
    where = f"model spec {spec!r}"
    if not module_name or not _IDENTIFIER.fullmatch(factory_name or ""):
        raise ConfigError(f"malformed model spec {spec!r}", stage=STAGE, where=where,
                          hint="write package.module:factory (the factory a plain name)")
    module = _import_module(module_name, spec)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        callables = sorted(name for name, value in vars(module).items()
                           if callable(value) and not name.startswith("_")
                           and getattr(value, "__module__", None) == module.__name__)
        problem = "is not callable" if factory is not None else "does not exist"
        raise ConfigError(f"{module_name}:{factory_name} {problem}", stage=STAGE, where=where,
                          hint=f"callables defined in {module_name}: {', '.join(callables) or 'none'}")
    try:
        inspect.signature(factory).bind()
    except TypeError as error:
        raise ConfigError(f"factory {module_name}:{factory_name} needs arguments ({error})",
                          stage=STAGE, where=where,
                          hint="give every factory parameter a default") from error
    except ValueError:  # builtins without a signature: just call them
        pass
    return _unpack_factory_result(factory(), f"{module_name}:{factory_name}")


def _unpack_factory_result(result: Any, where: str) -> tuple[nn.Module, tuple, dict]:
    hint = "return a module, (module, args) or (module, args, kwargs)"
    if isinstance(result, nn.Module):
        result = (result,)
    if not isinstance(result, (tuple, list)) or not 1 <= len(result) <= 3:
        raise InputError(f"the factory returned {type(result).__name__}, not a model",
                         stage=STAGE, where=where, hint=hint)
    model, args, kwargs = (*result, (), {})[:3] if len(result) == 1 else (*result, {})[:3]
    if not isinstance(model, nn.Module):
        raise InputError(f"the factory's model is a {type(model).__name__}, not a torch.nn.Module",
                         stage=STAGE, where=where, hint=hint)
    if not isinstance(args, (tuple, list)):
        raise InputError(f"the factory's example args are a {type(args).__name__}, not a tuple",
                         stage=STAGE, where=where,
                         hint="return (model, (x,)): args is a tuple, even for one input")
    if not isinstance(kwargs, dict):
        raise InputError(f"the factory's example kwargs are a {type(kwargs).__name__}, not a dict",
                         stage=STAGE, where=where, hint=hint)
    missing = _required_parameters(model)
    if not args and not kwargs and missing:
        raise InputError(
            f"the factory returned a model without example inputs, and its forward needs "
            f"{', '.join(missing)}", stage=STAGE, where=where,
            hint="return (model, args) or (model, args, kwargs) with example inputs")
    return model, tuple(args), dict(kwargs)


def _required_parameters(model: nn.Module) -> list[str]:
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


# ---------------------------------------------------------------------------------------------
# NameConfig:key=value,...


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: ``a=1,b=[1, 2]`` -> ``['a=1', 'b=[1, 2]']``."""
    parts, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    return text  # a bare word: a string such as hidden_act=gelu


def parse_overrides(text: str, where: str = "model spec") -> dict[str, Any]:
    """``"hidden_size=64,hidden_act=gelu"`` -> ``{"hidden_size": 64, "hidden_act": "gelu"}``."""
    overrides: dict[str, Any] = {}
    for item in _split_top_level(text):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not _IDENTIFIER.fullmatch(key) or not value.strip():
            raise ConfigError(f"cannot read override {item!r}", stage=STAGE, where=where,
                              hint="write key=value pairs separated by commas, "
                                   "e.g. LlamaConfig:hidden_size=64,num_hidden_layers=2")
        if key in overrides:
            raise ConfigError(f"override {key!r} given twice", stage=STAGE, where=where,
                              hint="give each key once")
        overrides[key] = _parse_value(value.strip())
    return overrides


def _config_class(transformers, name: str):
    config_class = getattr(transformers, name, None)
    base = transformers.PretrainedConfig
    if not (isinstance(config_class, type) and issubclass(config_class, base)):
        names = [n for n in dir(transformers) if n.endswith("Config") and n[0].isupper()]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        raise ConfigError(f"transformers has no config class {name!r}", stage=STAGE,
                          where="model spec",
                          hint=(f"did you mean {' or '.join(close)}?" if close else
                                "name a transformers config class, such as LlamaConfig, "
                                "GPT2Config, BertConfig, T5Config, WhisperConfig, ViTConfig"))
    return config_class


def _known_keys(transformers, config_class) -> set[str]:
    """Settings a config takes: its parameters, its attributes, and generation settings
    (``decoder_start_token_id``), which configs still accept as keywords."""
    keys = {name for name in inspect.signature(config_class.__init__).parameters
            if name not in ("self", "kwargs")}
    keys |= {name for name in vars(transformers.GenerationConfig()) if not name.startswith("_")}
    try:
        keys |= {name for name in vars(config_class()) if not name.startswith("_")}
    except Exception:  # a config without usable defaults: its signature is all we know
        pass
    return keys | {"attn_implementation", "experts_implementation"}


_FAMILY_MAPPINGS = (  # first match wins: Whisper is also a causal LM, BERT also a masked LM
    ("speech-seq2seq", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "AutoModelForSpeechSeq2Seq"),
    ("seq2seq", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    ("image-classification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
     "AutoModelForImageClassification"),
    ("encoder", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModel"),
    ("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
)


def _family(transformers, config) -> tuple[str, Any]:
    """(family, auto class) for a config, by its model type."""
    from transformers.models.auto import modeling_auto
    for family, mapping_name, auto_name in _FAMILY_MAPPINGS:
        if config.model_type in getattr(modeling_auto, mapping_name, {}):
            return family, getattr(transformers, auto_name)
    raise ConfigError(
        f"cannot generate example inputs for model type {config.model_type!r}", stage=STAGE,
        where=f"model spec {type(config).__name__}",
        hint="config specs cover causal LMs, masked-LM encoders, seq2seq and speech seq2seq "
             "models and image classifiers; for another model write a factory "
             "(package.module:factory) that returns (model, args, kwargs)")


def _load_config(name: str, overrides: dict[str, Any]) -> tuple[nn.Module, tuple, dict]:
    transformers = require_transformers()
    config_class = _config_class(transformers, name)
    where = f"model spec {name}"
    known = _known_keys(transformers, config_class)
    unknown = sorted(set(overrides) - known)
    if unknown:
        close = {key: difflib.get_close_matches(key, known, n=1) for key in unknown}
        suggestions = [f"{key} -> {match[0]}" for key, match in close.items() if match]
        raise ConfigError(f"{name} has no setting {', '.join(map(repr, unknown))}", stage=STAGE,
                          where=where,
                          hint=(f"did you mean {'; '.join(suggestions)}?" if suggestions else
                                f"see the parameters of transformers.{name}"))
    settings = {"use_cache": False, "attn_implementation": "eager",
                "experts_implementation": "batched_mm", **overrides}
    try:
        config = config_class(**settings)
    except Exception as error:  # transformers validates sizes (hidden % heads) in __init__
        raise ConfigError(f"{name} rejects these settings: {error}", stage=STAGE, where=where,
                          hint="fix the overrides (e.g. hidden_size divisible by "
                               "num_attention_heads)") from error
    family, auto_class = _family(transformers, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        try:
            model = auto_class.from_config(config)
        except Exception as error:
            raise ConfigError(f"cannot build a model from {name}: {error}", stage=STAGE,
                              where=where, hint="check the overrides") from error
    try:
        args, kwargs = example_inputs_for(family, config, torch.Generator().manual_seed(_SEED + 1))
    except AttributeError as error:  # a composite config (CLIP) keeps sizes in sub-configs
        raise ConfigError(f"cannot generate example inputs for {name}: {error}", stage=STAGE,
                          where=where,
                          hint="write a factory (package.module:factory) that returns "
                               "(model, args, kwargs)") from error
    return model.eval(), args, kwargs

