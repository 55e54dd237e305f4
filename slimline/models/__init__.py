"""Reference models: small architectures slimline is built and tested against.

``REFERENCE_MODELS[name]()`` returns ``(model, example_inputs)``: the model in eval mode with
seeded random weights (the same every call, the global RNG left untouched), and a tuple of
example inputs to capture it with. ``DEFAULT_MODEL`` is what the CLI works on when given no model.

    name               model                                   example inputs
    gpt-tiny           GPT, ~1.0M params, context 256          idx (2, 64) int64
    gpt-small, gpt     GPT, ~17.8M params, context 1024        idx (2, 128) int64
    gpt-small-decode   GPTDecode step of gpt-small             idx (1, 1), input_pos (1,), k_cache, v_cache
    bert               BertEncoder, ~3.36M params              input_ids (2, 64), attention_mask (2, 64)
    vit                ViT for 8x8 digits, ~0.2M params        images (8, 1, 8, 8)
    mixer              Mixer for 8x8 digits, ~0.14M params     images (8, 1, 8, 8)
    hyena              Hyena, ~1.35M params, filters of 1024   idx (1, 1024) int64

Every factory takes ``weights: str | None = None``. ``None`` means seeded random weights;
a ``.safetensors`` path or the name of a bundled checkpoint (``"gpt-tiny"``, ``"gpt-small"``,
``"vit"``, ``"mixer"``) loads trained weights through ``load_weights`` below
(see ``slimline.models.checkpoint``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from slimline.models.bert import BertConfig, BertEncoder
from slimline.models.gpt import GPT, GPT_CONFIGS, GPTConfig, GPTDecode, GPTPrefill, generate
from slimline.models.hyena import Hyena, HyenaConfig
from slimline.models.mixer import Mixer, MixerConfig
from slimline.models.vit import ViT, ViTConfig

__all__ = [
    "REFERENCE_MODELS",
    "DEFAULT_MODEL",
    "reference_dynamic_shapes",
    "load_weights",
    "GPT",
    "GPTConfig",
    "GPT_CONFIGS",
    "GPTPrefill",
    "GPTDecode",
    "generate",
    "BertConfig",
    "BertEncoder",
    "ViTConfig",
    "ViT",
    "MixerConfig",
    "Mixer",
    "HyenaConfig",
    "Hyena",
]

SEED = 0
DECODE_PROMPT_LENGTH = 16  # gpt-small-decode's example decodes after a 16-byte prompt


def load_weights(model: nn.Module, weights: str | None) -> nn.Module:
    """Load a checkpoint (path or bundled name) into model; ``None`` keeps its seeded random weights."""
    if weights is None:
        return model
    from slimline.models.checkpoint import load_into

    return load_into(model, weights)


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module with seed SEED without disturbing the caller's global RNG; eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build().eval()


def _example_generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED + 1)


def _gpt(name: str, weights: str | None, sequence_length: int) -> tuple[nn.Module, tuple]:
    model = load_weights(_seeded(lambda: GPT(GPT_CONFIGS[name])), weights)
    # batch 2: a batch of 1 would be specialised to a constant by torch.export
    idx = torch.randint(0, 256, (2, sequence_length), generator=_example_generator())
    return model, (idx,)


def gpt_tiny(weights: str | None = None) -> tuple[nn.Module, tuple]:
    return _gpt("gpt-tiny", weights, sequence_length=64)


def gpt_small(weights: str | None = None) -> tuple[nn.Module, tuple]:
    return _gpt("gpt-small", weights, sequence_length=128)


@torch.no_grad()
def gpt_small_decode(weights: str | None = None) -> tuple[nn.Module, tuple]:
    """The decode step of gpt-small, its example caches filled by prefilling a 16-byte prompt."""
    gpt, _ = gpt_small(weights)
    generator = _example_generator()
    prompt = torch.randint(0, 256, (1, DECODE_PROMPT_LENGTH), generator=generator)
    _, k_cache, v_cache = GPTPrefill(gpt)(prompt, *gpt.new_kv_cache(batch_size=1))
    next_token = torch.randint(0, 256, (1, 1), generator=generator)
    input_pos = torch.tensor([DECODE_PROMPT_LENGTH])
    return GPTDecode(gpt).eval(), (next_token, input_pos, k_cache, v_cache)


def bert(weights: str | None = None) -> tuple[nn.Module, tuple]:
    model = load_weights(_seeded(lambda: BertEncoder(BertConfig())), weights)
    generator = _example_generator()
    input_ids = torch.randint(1, 256, (2, 64), generator=generator)
    attention_mask = torch.ones(2, 64, dtype=torch.int64)
    attention_mask[1, 40:] = 0  # the second sequence is padded after 40 tokens
    input_ids[1, 40:] = 0
    return model, (input_ids, attention_mask)


def _digits_like(generator: torch.Generator) -> torch.Tensor:
    """(8, 1, 8, 8) images with the digits' value range 0..16."""
    return torch.randint(0, 17, (8, 1, 8, 8), generator=generator).float()


def vit(weights: str | None = None) -> tuple[nn.Module, tuple]:
    model = load_weights(_seeded(lambda: ViT(ViTConfig())), weights)
    return model, (_digits_like(_example_generator()),)


def mixer(weights: str | None = None) -> tuple[nn.Module, tuple]:
    model = load_weights(_seeded(lambda: Mixer(MixerConfig())), weights)
    return model, (_digits_like(_example_generator()),)


def hyena(weights: str | None = None) -> tuple[nn.Module, tuple]:
    config = HyenaConfig()
    model = load_weights(_seeded(lambda: Hyena(config)), weights)
    idx = torch.randint(0, 256, (1, config.filter_length), generator=_example_generator())
    return model, (idx,)


REFERENCE_MODELS: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "gpt-tiny": gpt_tiny,
    "gpt-small": gpt_small,
    "gpt": gpt_small,
    "gpt-small-decode": gpt_small_decode,
    "bert": bert,
    "vit": vit,
    "mixer": mixer,
    "hyena": hyena,
}

DEFAULT_MODEL = "gpt-small"


def reference_dynamic_shapes(name: str) -> dict | None:
    """``dynamic_shapes`` (torch.export's form) for a reference model's example inputs, or None.

    The dimension names become the sympy symbols of the report's FLOPs and the ONNX axes.
    """
    batch = torch.export.Dim("batch")
    if name in ("gpt-tiny", "gpt-small", "gpt"):
        context = GPT_CONFIGS["gpt-small" if name == "gpt" else name].context_length
        return {"idx": {0: batch, 1: torch.export.Dim("seq", max=context)}}
    if name == "bert":
        seq = torch.export.Dim("seq", max=BertConfig().max_positions)
        return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    if name in ("vit", "mixer"):
        return {"images": {0: batch}}
    return None
