"""The zoo: tiny instances of real ``transformers`` architectures that nobody here wrote.

Each entry builds offline from a config with seeded random weights (nothing is downloaded),
in eval mode, small enough to build in milliseconds and to export in a few seconds on a CPU:
hidden width 64, 2 layers, 4 heads, a byte-sized vocabulary (256).

    name        transformers class               family                example inputs
    hf-gpt2     GPT2LMHeadModel                  causal-lm             input_ids, attention_mask (2, 16)
    hf-llama    LlamaForCausalLM, 4 kv heads     causal-lm             input_ids, attention_mask (2, 16)
    hf-qwen2    Qwen2ForCausalLM, 2 kv heads     causal-lm             input_ids, attention_mask (2, 16)
    hf-mistral  MistralForCausalLM, window 8     causal-lm             input_ids, attention_mask (2, 16)
    hf-mixtral  MixtralForCausalLM, 4 experts    causal-lm             input_ids, attention_mask (2, 16)
    hf-bert     BertModel (with pooler)          encoder               input_ids, attention_mask (2, 16)
    hf-vit      ViTForImageClassification        image-classification  pixel_values (2, 3, 32, 32)
    hf-t5       T5ForConditionalGeneration       seq2seq               input_ids, attention_mask (2, 16),
                                                                       decoder_input_ids (2, 6)
    hf-whisper  WhisperForConditionalGeneration  speech-seq2seq        input_features (2, 16, 32),
                                                                       decoder_input_ids (2, 6)

The names carry an ``hf-`` prefix because ``slimline.models.REFERENCE_MODELS`` already has a
``bert`` and a ``vit`` of its own; a model spec must name one model, not two.

What export needs (the findings behind each choice are in ``docs/zoo-findings.md``):

- ``use_cache=False`` on every config: otherwise the output holds a ``DynamicCache`` /
  ``EncoderDecoderCache``, which is not a pytree type, and ``torch.export`` refuses it.
- Mixtral: ``experts_implementation="batched_mm"``. The default ``grouped_mm`` captures but
  calls the custom op ``transformers::grouped_mm_fallback`` on CPU, which has no ONNX
  translation; ``eager`` loops over the experts that were hit, a data-dependent loop
  ``torch.export`` cannot capture.
- ``return_dict`` stays at its default (True): the ``ModelOutput`` classes are registered
  pytree nodes, so ``ep.module()`` returns the same class, and the ONNX outputs are its fields
  in order (``outputs`` below). No wrapper module is needed.
- The second example sequence is right-padded (``attention_mask`` ends in zeros), so the masked
  path is exercised while no query row is masked completely: fully masked rows are where
  implementations differ (eager: finite minimum, so the mean of the values; torch SDPA with a
  boolean or -inf mask: zeros; a hand-written softmax over -inf: NaN).
- T5 with ``attn_implementation="sdpa"`` captures but does not export to ONNX with torch 2.13
  (a stride disagreement inside the exporter; the findings give the exact rewrite that fixes it).
- Whisper's ``input_features`` must have exactly ``2 * max_source_positions`` frames (its
  convolution stem halves them and the model checks the length), so only the batch of that
  input is dynamic.

Shape legend (``dynamic_axes``): batch, sequence (encoder or decoder-only tokens),
decoder_sequence (the decoder's tokens in an encoder-decoder model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from slimline.errors import ConfigError

__all__ = [
    "ZOO",
    "ZooEntry",
    "ATTENTION_IMPLEMENTATIONS",
    "FAMILIES",
    "build_zoo_model",
    "zoo_dynamic_shapes",
    "example_inputs_for",
    "require_transformers",
]

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
FAMILIES = ("causal-lm", "encoder", "image-classification", "seq2seq", "speech-seq2seq")

BATCH = 2
SEQUENCE = 16
DECODER_SEQUENCE = 6
PADDED_TAIL = 4  # the second example sequence ends in this many padding positions
PAD_TOKEN_ID = 0
VOCAB = 256
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
MAX_POSITIONS = 128


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: how to build it, what it takes and what it returns.

    ``outputs`` are the fields of the returned ``ModelOutput`` in order: the leaves of
    ``ep.module()``'s output and the ONNX graph's outputs, one for one. ``primary_outputs`` are
    those that carry the model's answer (what a task metric reads); the rest are intermediates.
    ``dynamic_axes`` names the axes that may vary (input name -> {axis: dimension name});
    ``max_sizes`` bounds those that have a limit (learned positions, fixed buckets).
    """

    name: str
    architecture: str  # the transformers model class
    family: str  # one of FAMILIES: decides the example inputs
    config_class: str  # the transformers config class
    config: Mapping[str, Any]  # keyword arguments of config_class, besides use_cache
    outputs: tuple[str, ...]
    primary_outputs: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]
    max_sizes: Mapping[str, int] = field(default_factory=dict)
    build_options: Mapping[str, Any] = field(default_factory=dict)  # extra config kwargs for export
    notes: str = ""


_DECODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                max_position_embeddings=MAX_POSITIONS, pad_token_id=PAD_TOKEN_ID,
                bos_token_id=1, eos_token_id=2)
_TEXT_AXES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}


def _causal_lm(name: str, architecture: str, config_class: str, notes: str = "",
               build_options: Mapping[str, Any] | None = None, **config: Any) -> ZooEntry:
    return ZooEntry(name=name, architecture=architecture, family="causal-lm",
                    config_class=config_class, config={**_DECODER, **config},
                    outputs=("logits",), primary_outputs=("logits",), dynamic_axes=_TEXT_AXES,
                    max_sizes={"sequence": MAX_POSITIONS}, build_options=build_options or {},
                    notes=notes)


ZOO: dict[str, ZooEntry] = {
    "hf-gpt2": ZooEntry(
        name="hf-gpt2", architecture="GPT2LMHeadModel", family="causal-lm",
        config_class="GPT2Config",
        config=dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                    n_positions=MAX_POSITIONS, bos_token_id=1, eos_token_id=2),
        outputs=("logits",), primary_outputs=("logits",), dynamic_axes=_TEXT_AXES,
        max_sizes={"sequence": MAX_POSITIONS},
        notes="Conv1D projections (weight stored (in, out)); learned positions."),
    "hf-llama": _causal_lm("hf-llama", "LlamaForCausalLM", "LlamaConfig",
                           notes="multi-head (4 kv heads); RMSNorm and rotary written by hand",
                           num_key_value_heads=HEADS),
    "hf-qwen2": _causal_lm("hf-qwen2", "Qwen2ForCausalLM", "Qwen2Config",
                           notes="grouped-query attention, 2 kv heads for 4 query heads; qkv bias",
                           num_key_value_heads=2),
    "hf-mistral": _causal_lm("hf-mistral", "MistralForCausalLM", "MistralConfig",
                             notes="grouped-query attention; sliding window 8 < sequence 16, "
                                   "so the window mask matters",
                             num_key_value_heads=2, sliding_window=8),
    "hf-mixtral": _causal_lm("hf-mixtral", "MixtralForCausalLM", "MixtralConfig",
                             notes="mixture of experts: 4 experts, top 2; exported through "
                                   "experts_implementation='batched_mm'",
                             build_options={"experts_implementation": "batched_mm"},
                             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "hf-bert": ZooEntry(
        name="hf-bert", architecture="BertModel", family="encoder", config_class="BertConfig",
        config=dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                    num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    max_position_embeddings=MAX_POSITIONS, pad_token_id=PAD_TOKEN_ID),
        outputs=("last_hidden_state", "pooler_output"),
        primary_outputs=("last_hidden_state", "pooler_output"), dynamic_axes=_TEXT_AXES,
        max_sizes={"sequence": MAX_POSITIONS},
        notes="the architecture of the bundled MiniLM sentence encoder (AutoModel -> BertModel)"),
    "hf-vit": ZooEntry(
        name="hf-vit", architecture="ViTForImageClassification", family="image-classification",
        config_class="ViTConfig",
        config=dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, image_size=32, patch_size=8, num_channels=3,
                    num_labels=10),
        outputs=("logits",), primary_outputs=("logits",),
        dynamic_axes={"pixel_values": {0: "batch"}},
        notes="16 patches + CLS; image size fixed by the position embeddings"),
    "hf-t5": ZooEntry(
        name="hf-t5", architecture="T5ForConditionalGeneration", family="seq2seq",
        config_class="T5Config",
        config=dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=INTERMEDIATE,
                    num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=HEADS,
                    relative_attention_num_buckets=32, pad_token_id=PAD_TOKEN_ID,
                    eos_token_id=1, decoder_start_token_id=PAD_TOKEN_ID),
        outputs=("logits", "encoder_last_hidden_state"), primary_outputs=("logits",),
        dynamic_axes={**_TEXT_AXES, "decoder_input_ids": {0: "batch", 1: "decoder_sequence"}},
        notes="relative position bias added to unscaled scores; tied embeddings scale logits. "
              "sdpa: ONNX export fails (torch 2.13), see docs/zoo-findings.md"),
    "hf-whisper": ZooEntry(
        name="hf-whisper", architecture="WhisperForConditionalGeneration",
        family="speech-seq2seq", config_class="WhisperConfig",
        config=dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS,
                    decoder_layers=LAYERS, encoder_attention_heads=HEADS,
                    decoder_attention_heads=HEADS, encoder_ffn_dim=INTERMEDIATE,
                    decoder_ffn_dim=INTERMEDIATE, num_mel_bins=16, max_source_positions=16,
                    max_target_positions=32, pad_token_id=PAD_TOKEN_ID, bos_token_id=1,
                    eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None,
                    suppress_tokens=None),
        outputs=("logits", "encoder_last_hidden_state"), primary_outputs=("logits",),
        dynamic_axes={"input_features": {0: "batch"},
                      "decoder_input_ids": {0: "batch", 1: "decoder_sequence"}},
        max_sizes={"decoder_sequence": 32},
        notes="conv stem halves 32 frames to 16 positions; the frame count is checked, so fixed"),
}


def require_transformers():
    """Import ``transformers``, or say how to get it (it is a test extra, not a dependency)."""
    try:
        import transformers
    except ImportError as error:
        raise ConfigError("the transformers package is not installed", stage="models",
                          where="slimline.models.zoo",
                          hint="pip install 'slimline[test]' (or pip install transformers)"
                          ) from error
    return transformers


def _check_name(name: str) -> ZooEntry:
    if name not in ZOO:
        raise ConfigError(f"unknown zoo model {name!r}", stage="models",
                          where="slimline.models.zoo.ZOO",
                          hint=f"pick one of: {', '.join(ZOO)}")
    return ZOO[name]


def _check_attention(attn_implementation: str, where: str) -> None:
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"unknown attn_implementation {attn_implementation!r}", stage="models",
                          where=where,
                          hint=f"pick one of: {', '.join(ATTENTION_IMPLEMENTATIONS)}")


def build_zoo_model(name: str, attn_implementation: str = "eager",
                    seed: int = 0) -> tuple[nn.Module, tuple, dict]:
    """Build zoo model ``name``: ``(model in eval mode, example args, example kwargs)``.

    Weights come from ``seed``, inputs from ``seed + 1``; the global RNG is left untouched.
    ``attn_implementation`` is ``"eager"`` (the hand-written pattern that ``fuse_attention``
    matches) or ``"sdpa"``.
    """
    entry = _check_name(name)
    _check_attention(attn_implementation, where=f"zoo model {name!r}")
    transformers = require_transformers()
    config_class = getattr(transformers, entry.config_class)
    model_class = getattr(transformers, entry.architecture)
    config = config_class(**entry.config, **entry.build_options, use_cache=False,
                          attn_implementation=attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).eval()
    args, kwargs = example_inputs_for(entry.family, config,
                                      torch.Generator().manual_seed(seed + 1))
    return model, args, kwargs


def zoo_dynamic_shapes(name: str) -> dict[str, dict[int, torch.export.Dim]]:
    """``dynamic_shapes`` for ``torch.export.export`` of zoo model ``name``, keyed by input name.

    One ``Dim`` per dimension name, shared between the inputs that carry it (the batch of
    ``input_ids`` and ``attention_mask`` is one symbol).
    """
    entry = _check_name(name)
    dims: dict[str, torch.export.Dim] = {}
    for axes in entry.dynamic_axes.values():
        for dimension in axes.values():
            if dimension not in dims:
                maximum = entry.max_sizes.get(dimension)
                dims[dimension] = (torch.export.Dim(dimension, max=maximum) if maximum
                                   else torch.export.Dim(dimension))
    return {input_name: {axis: dims[dimension] for axis, dimension in axes.items()}
            for input_name, axes in entry.dynamic_axes.items()}


# ---------------------------------------------------------------------------------------------
# example inputs, by family (also used by slimline.models.spec for configs named on the CLI)


def _token_ids(generator: torch.Generator, vocab_size: int, batch: int, length: int) -> torch.Tensor:
    low = 1 if vocab_size > 1 else 0  # keep the padding id for padding
    return torch.randint(low, vocab_size, (batch, length), generator=generator)


def _right_padded(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the last row's tail: (input_ids, attention_mask), 1 = real token, 0 = padding."""
    attention_mask = torch.ones_like(input_ids)
    tail = min(PADDED_TAIL, input_ids.shape[1] - 1)
    if input_ids.shape[0] > 1 and tail > 0:
        attention_mask[-1, -tail:] = 0
        input_ids = input_ids.clone()
        input_ids[-1, -tail:] = PAD_TOKEN_ID
    return input_ids, attention_mask


def _sequence_length(config: Any) -> int:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(SEQUENCE, limit) if limit else SEQUENCE


def example_inputs_for(family: str, config: Any,
                       generator: torch.Generator) -> tuple[tuple, dict]:
    """Example ``(args, kwargs)`` for a transformers model of ``family`` built from ``config``."""
    vocab_size = getattr(config, "vocab_size", VOCAB)
    if family in ("causal-lm", "encoder"):
        input_ids = _token_ids(generator, vocab_size, BATCH, _sequence_length(config))
        input_ids, attention_mask = _right_padded(input_ids)
        return (input_ids,), {"attention_mask": attention_mask}
    if family == "image-classification":
        size = config.image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return (torch.randn(BATCH, config.num_channels, *size, generator=generator),), {}
    if family == "seq2seq":
        input_ids, attention_mask = _right_padded(_token_ids(generator, vocab_size, BATCH, SEQUENCE))
        decoder_input_ids = _token_ids(generator, vocab_size, BATCH, DECODER_SEQUENCE)
        return (input_ids,), {"attention_mask": attention_mask,
                              "decoder_input_ids": decoder_input_ids}
    if family == "speech-seq2seq":
        frames = 2 * config.max_source_positions  # the convolution stem halves the frames
        features = torch.randn(BATCH, config.num_mel_bins, frames, generator=generator)
        decoder_input_ids = _token_ids(generator, vocab_size, BATCH,
                                       min(DECODER_SEQUENCE, config.max_target_positions))
        return (features,), {"decoder_input_ids": decoder_input_ids}
    raise ConfigError(f"no example inputs for model family {family!r}", stage="models",
                      where="slimline.models.zoo.example_inputs_for",
                      hint=f"pick one of: {', '.join(FAMILIES)}")
