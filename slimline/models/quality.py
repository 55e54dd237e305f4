"""The quality harness: task metrics on real held-out data, for judging lossy rewrites.

Each metric is a function ``metric(model, inputs) -> float`` registered with
:func:`slimline.budget.register_metric`, so ``slimline.Budget(metric="bits_per_byte",
max_loss=0.01, inputs=text_eval_set("gpt-tiny"))`` spends its budget in it. ``model`` may be an
``nn.Module`` or anything callable like one (slimline's ``OptimizedModel``); outputs may be a
tensor, a tuple whose first item is the main output, or carry ``.logits`` /
``.last_hidden_state``.

    metric               inputs                                       better   meaning
    bits_per_byte        TextEvalSet (held-out stdlib bytes)          lower    mean -log2 p(next byte)
    next_byte_accuracy   TextEvalSet                                  higher   argmax == the true next byte
    top1_agreement       TextEvalSet with reference (.with_reference) higher   argmax == the reference's argmax
    accuracy             ImageEvalSet (digits test split)             higher   argmax == label
    embedding_cosine     SentenceEvalSet with reference embeddings    higher   mean cos(embedding, reference)
    similarity_spearman  SentenceEvalSet with reference embeddings    higher   Spearman rank correlation of
                                                                               all pairwise cosine similarities

Text is scored in non-overlapping windows of ``window`` bytes (by default the model's context
length): window i predicts bytes ``i*W+1 .. i*W+W`` from the bytes before them in that window; the
few bytes after the last full window are not scored. The held-out text is the validation stream
of :mod:`slimline.models.corpus`, read from the *running* interpreter's standard library; the
model cards say which Python their metrics came from (:func:`held_out_matches_card` checks).

Every evaluation runs in batches of ``batch_size`` (the last batch may be smaller): a model
captured with a static batch size needs an eval set built with that batch size.

``quality_table(names)`` measures the trained reference models (and optional candidates beside
them) and returns one row per metric, for ``slimline quality MODEL`` to print.

Shape legend:  N items in the eval set,  B batch,  W window (bytes),  V 256,  L tokens,  C width.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from slimline.budget import register_metric
from slimline.errors import ConfigError, InputError
from slimline.models.minilm import SentenceEvalSet, sentence_embeddings

__all__ = [
    "QUICK_BYTES",
    "QUALITY_MODELS",
    "TextEvalSet",
    "ImageEvalSet",
    "SentenceEvalSet",
    "held_out_text",
    "held_out_matches_card",
    "text_eval_set",
    "digits_split",
    "digits_eval_set",
    "sentence_eval_set",
    "eval_inputs",
    "trained_model",
    "evaluate_text",
    "bits_per_byte",
    "next_byte_accuracy",
    "top1_agreement",
    "accuracy",
    "embedding_cosine",
    "similarity_spearman",
    "quality_table",
    "round_weights",
]

# validation bytes scored by quick evaluations (tests, progress during training)
QUICK_BYTES = {"gpt-tiny": 65536, "gpt-small": 16384}
DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2

QUALITY_MODELS = ("gpt-tiny", "gpt-small", "vit", "mixer", "minilm")


# ---------------------------------------------------------------------------------------------
# Evaluation sets


@dataclass(frozen=True)
class TextEvalSet:
    """Byte windows ``(N, W+1)``: inputs are ``[:, :-1]``, targets ``[:, 1:]``."""

    windows: torch.Tensor  # (N, W+1) int64
    batch_size: int = 8
    reference_top1: torch.Tensor | None = None  # (N, W) int64: a reference model's argmax
    description: str = ""

    @property
    def window(self) -> int:
        return self.windows.shape[1] - 1

    @property
    def num_bytes(self) -> int:
        """Bytes scored."""
        return self.windows.shape[0] * self.window

    @classmethod
    def from_bytes(cls, stream: bytes, window: int, batch_size: int = 8, max_bytes: int | None = None,
                   description: str = "") -> "TextEvalSet":
        """Non-overlapping windows over ``stream`` (its first ``max_bytes`` predictions, if given)."""
        if max_bytes is not None:
            stream = stream[: max_bytes + 1]
        count = (len(stream) - 1) // window
        if count < 1:
            raise InputError(f"{len(stream)} bytes of text are too few for one window of {window}",
                             stage="quality", where="TextEvalSet", hint="use a smaller window")
        data = torch.frombuffer(bytearray(stream[: count * window + 1]), dtype=torch.uint8).long()
        windows = data.unfold(0, window + 1, window).contiguous()  # (N, W+1)
        return cls(windows, batch_size, None, description)

    def halves(self) -> tuple["TextEvalSet", "TextEvalSet"] | None:
        """The first and the second half of the windows (None for fewer than two)."""
        count = self.windows.shape[0]
        if count < 2:
            return None
        middle = count // 2
        parts = []
        for rows, label in ((slice(0, middle), "first"), (slice(middle, count), "second")):
            top1 = self.reference_top1[rows] if self.reference_top1 is not None else None
            parts.append(replace(self, windows=self.windows[rows], reference_top1=top1,
                                 description=f"{self.description} ({label} half)"))
        return parts[0], parts[1]

    def with_reference(self, reference: Any) -> "TextEvalSet":
        """A copy holding ``reference``'s top-1 next-byte predictions, for :func:`top1_agreement`."""
        predictions = [logits.argmax(-1).cpu() for logits, _ in _text_batches(reference, self)]
        return replace(self, reference_top1=torch.cat(predictions))


@dataclass(frozen=True)
class ImageEvalSet:
    images: torch.Tensor  # (N, 1, 8, 8) float32, values 0..16
    labels: torch.Tensor  # (N,) int64
    batch_size: int = 8
    description: str = ""


# ---------------------------------------------------------------------------------------------
# Data


@functools.lru_cache(maxsize=1)
def held_out_text() -> bytes:
    """The validation stream of this interpreter's standard-library corpus."""
    from slimline.models.corpus import validation_stream

    return validation_stream()


def held_out_matches_card(card: dict) -> bool:
    """Whether this interpreter's held-out text is the one the card's metrics were measured on."""
    return hashlib.sha256(held_out_text()).hexdigest() == card["corpus"]["sha256_validation"]


def text_eval_set(model_name: str = "gpt-tiny", *, quick: bool = False, max_bytes: int | None = None,
                  window: int | None = None, batch_size: int = 8, reference: Any = None) -> TextEvalSet:
    """Held-out stdlib text for a GPT config; ``quick`` scores only ``QUICK_BYTES[model_name]`` bytes.

    ``reference`` (a model) adds its top-1 predictions, needed by ``top1_agreement``.
    """
    from slimline.models.corpus import python_version
    from slimline.models.gpt import GPT_CONFIGS

    if model_name not in GPT_CONFIGS:
        raise ConfigError(f"no GPT config {model_name!r}", stage="quality", where="text_eval_set",
                          hint=f"use one of: {', '.join(GPT_CONFIGS)}")
    window = window or GPT_CONFIGS[model_name].context_length
    if quick and max_bytes is None:
        max_bytes = QUICK_BYTES.get(model_name)
    text = held_out_text()
    description = (f"{python_version()} stdlib validation, "
                   f"{'first ' + format(max_bytes, ',') if max_bytes else 'all ' + format(len(text) - 1, ',')} "
                   f"bytes, windows of {window}")
    eval_set = TextEvalSet.from_bytes(text, window, batch_size, max_bytes, description)
    return eval_set.with_reference(reference) if reference is not None else eval_set


@functools.lru_cache(maxsize=2)
def digits_split(seed: int = DIGITS_SEED, test_fraction: float = DIGITS_TEST_FRACTION) -> dict[str, torch.Tensor]:
    """scikit-learn's bundled digits, split stratified and seeded: images (N, 1, 8, 8), values 0..16.

    Cached: the returned tensors are shared, so treat them as read-only.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise InputError("the digits data needs scikit-learn", stage="quality", where="digits_split",
                         hint="pip install scikit-learn") from None
    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.images, digits.target, test_size=test_fraction, stratify=digits.target, random_state=seed)

    def images(array) -> torch.Tensor:
        return torch.tensor(array, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)

    return {"train_images": images(train_x), "train_labels": torch.tensor(train_y, dtype=torch.int64),
            "test_images": images(test_x), "test_labels": torch.tensor(test_y, dtype=torch.int64)}


def digits_eval_set(split: str = "test", batch_size: int = 8) -> ImageEvalSet:
    data = digits_split()
    return ImageEvalSet(data[f"{split}_images"], data[f"{split}_labels"], batch_size,
                        f"sklearn digits, {split} split ({1 - DIGITS_TEST_FRACTION:.0%}/"
                        f"{DIGITS_TEST_FRACTION:.0%} stratified, seed {DIGITS_SEED})")


def sentence_eval_set(count: int | None = None, *, batch_size: int = 32, reference: Any = None) -> SentenceEvalSet:
    """Stdlib docstring sentences tokenized for MiniLM, with ``reference``'s embeddings (default: MiniLM's own)."""
    from slimline.models import minilm

    eval_set = minilm.sentence_eval_set(count or minilm.SENTENCE_COUNT, batch_size=batch_size)
    return eval_set.with_reference(reference if reference is not None else trained_model("minilm"))


def eval_inputs(name: str, *, quick: bool = False, reference: Any = None) -> Any:
    """The eval set a named reference model is judged on (see the table in the module docstring)."""
    if name in ("gpt-tiny", "gpt-small"):
        return text_eval_set(name, quick=quick, reference=reference)
    if name in ("vit", "mixer"):
        return digits_eval_set()
    if name == "minilm":
        return sentence_eval_set(128 if quick else None, reference=reference)
    raise ConfigError(f"no evaluation data for {name!r}", stage="quality", where="eval_inputs",
                      hint=f"use one of: {', '.join(QUALITY_MODELS)}")


def trained_model(name: str) -> nn.Module:
    """A reference model with its trained (or, for MiniLM, pretrained) weights, in eval mode."""
    from slimline.models.checkpoint import load_into

    if name in ("gpt-tiny", "gpt-small"):
        from slimline.models.gpt import GPT, GPT_CONFIGS

        model = GPT(GPT_CONFIGS[name])
    elif name == "vit":
        from slimline.models.vit import ViT, ViTConfig

        model = ViT(ViTConfig())
    elif name == "mixer":
        from slimline.models.mixer import Mixer, MixerConfig

        model = Mixer(MixerConfig())
    elif name == "minilm":
        from slimline.models.minilm import load_minilm

        return load_minilm()
    else:
        raise ConfigError(f"no trained model {name!r}", stage="quality", where="trained_model",
                          hint=f"use one of: {', '.join(QUALITY_MODELS)}")
    return load_into(model, name).eval()


# ---------------------------------------------------------------------------------------------
# Running a model or an OptimizedModel


def _device(model: Any) -> torch.device:
    if isinstance(model, nn.Module):
        # a captured graph holds its weights as buffers, not parameters: look at both
        tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")
    return torch.device("cuda" if getattr(model, "target", "cpu") == "cuda" else "cpu")


def _main_output(output: Any) -> torch.Tensor:
    for attribute in ("logits", "last_hidden_state"):
        if hasattr(output, attribute):
            return getattr(output, attribute)
    if isinstance(output, dict):
        return next(iter(output.values()))
    if isinstance(output, (tuple, list)):
        return _main_output(output[0])
    return output


def _is_module_in_training(model: Any) -> bool:
    return isinstance(model, nn.Module) and model.training


def _batches(count: int, batch_size: int) -> Iterable[slice]:
    for start in range(0, count, batch_size):
        yield slice(start, min(count, start + batch_size))


def _text_batches(model: Any, eval_set: TextEvalSet) -> Iterable[tuple[torch.Tensor, slice]]:
    """``(logits (B, W, V) float, rows)`` per batch."""
    device = _device(model)
    with torch.no_grad():
        for rows in _batches(len(eval_set.windows), eval_set.batch_size):
            idx = eval_set.windows[rows, :-1].to(device)  # (B, W)
            yield _main_output(model(idx)).float(), rows


def _require_eval_set(inputs: Any, kind: type, metric: str, example: str) -> None:
    if not isinstance(inputs, kind):
        raise ConfigError(f"metric {metric!r} needs a {kind.__name__}, got {type(inputs).__name__}",
                          stage="quality", where=f"metric {metric!r}",
                          hint=f"pass Budget(..., inputs={example}) from slimline.models.quality")


def evaluate_text(model: Any, eval_set: TextEvalSet) -> dict[str, float]:
    """bits/byte, next-byte top-1 accuracy and (with a reference) top-1 agreement, in one pass."""
    if _is_module_in_training(model):
        raise ConfigError("the model is in training mode", stage="quality", where="evaluate_text",
                          hint="call model.eval() first")
    nats, correct, agree, count = 0.0, 0, 0, 0
    for logits, rows in _text_batches(model, eval_set):
        targets = eval_set.windows[rows, 1:].to(logits.device)  # (B, W)
        nats += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").double().item()
        top1 = logits.argmax(-1)  # (B, W)
        correct += int((top1 == targets).sum())
        if eval_set.reference_top1 is not None:
            agree += int((top1 == eval_set.reference_top1[rows].to(top1.device)).sum())
        count += targets.numel()
    result = {"bits_per_byte": nats / count / math.log(2), "top1_accuracy": correct / count, "bytes": count}
    if eval_set.reference_top1 is not None:
        result["top1_agreement"] = agree / count
    return result


def bits_per_byte(model: Any, inputs: TextEvalSet) -> float:
    _require_eval_set(inputs, TextEvalSet, "bits_per_byte", "text_eval_set('gpt-tiny')")
    return evaluate_text(model, inputs)["bits_per_byte"]


def next_byte_accuracy(model: Any, inputs: TextEvalSet) -> float:
    _require_eval_set(inputs, TextEvalSet, "next_byte_accuracy", "text_eval_set('gpt-tiny')")
    return evaluate_text(model, inputs)["top1_accuracy"]


def top1_agreement(model: Any, inputs: TextEvalSet) -> float:
    _require_eval_set(inputs, TextEvalSet, "top1_agreement", "text_eval_set('gpt-tiny', reference=model)")
    if inputs.reference_top1 is None:
        raise ConfigError("top1_agreement needs a reference model's predictions", stage="quality",
                          where="metric 'top1_agreement'",
                          hint="build the inputs with text_eval_set(name, reference=original_model)")
    return evaluate_text(model, inputs)["top1_agreement"]


def accuracy(model: Any, inputs: ImageEvalSet) -> float:
    _require_eval_set(inputs, ImageEvalSet, "accuracy", "digits_eval_set()")
    if _is_module_in_training(model):
        raise ConfigError("the model is in training mode", stage="quality", where="accuracy",
                          hint="call model.eval() first")
    device = _device(model)
    correct = 0
    with torch.no_grad():
        for rows in _batches(len(inputs.labels), inputs.batch_size):
            logits = _main_output(model(inputs.images[rows].to(device)))  # (B, K)
            correct += int((logits.argmax(-1).cpu() == inputs.labels[rows]).sum())
    return correct / len(inputs.labels)


def _embeddings_against_reference(model: Any, inputs: SentenceEvalSet, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    _require_eval_set(inputs, SentenceEvalSet, metric, "sentence_eval_set()")
    if inputs.reference is None:
        raise ConfigError(f"{metric} needs reference embeddings", stage="quality", where=f"metric {metric!r}",
                          hint="build the inputs with sentence_eval_set(reference=original_model)")
    return sentence_embeddings(model, inputs), inputs.reference


def embedding_cosine(model: Any, inputs: SentenceEvalSet) -> float:
    embeddings, reference = _embeddings_against_reference(model, inputs, "embedding_cosine")
    return float(F.cosine_similarity(embeddings.double(), reference.double(), dim=-1).mean())


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of a 1-D tensor (ties broken by position; they are measure-zero for floats)."""
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[values.argsort(stable=True)] = torch.arange(len(values), dtype=torch.float64)
    return ranks


def similarity_spearman(model: Any, inputs: SentenceEvalSet) -> float:
    embeddings, reference = _embeddings_against_reference(model, inputs, "similarity_spearman")
    upper = torch.triu_indices(len(reference), len(reference), offset=1)

    def pairwise(x: torch.Tensor) -> torch.Tensor:  # (N, C) -> (N(N-1)/2,) cosines
        x = F.normalize(x.double(), dim=-1)
        return (x @ x.T)[upper[0], upper[1]]

    a, b = _ranks(pairwise(embeddings)), _ranks(pairwise(reference))
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


_METRICS: dict[str, tuple[Callable[..., float], bool]] = {
    "bits_per_byte": (bits_per_byte, False),
    "next_byte_accuracy": (next_byte_accuracy, True),
    "top1_agreement": (top1_agreement, True),
    "accuracy": (accuracy, True),
    "embedding_cosine": (embedding_cosine, True),
    "similarity_spearman": (similarity_spearman, True),
}
for _name, (_function, _higher) in _METRICS.items():
    register_metric(_name, _function, higher_is_better=_higher)


def round_weights(model: nn.Module, bits: int) -> nn.Module:
    """A deliberately damaged copy: every weight matrix (dim >= 2) rounded to ``bits`` bits.

    Symmetric per-tensor rounding to the 2^(bits-1) - 1 positive levels of ``max|w|``; vectors
    (norms, biases) are kept. The original is not modified. For checking that metrics notice.
    """
    damaged = copy.deepcopy(model)
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for parameter in damaged.parameters():
            if parameter.dim() >= 2:
                scale = parameter.abs().max().clamp(min=1e-12) / levels
                parameter.copy_((parameter / scale).round().clamp(-levels, levels) * scale)
    return damaged


# ---------------------------------------------------------------------------------------------
# The table


_UNITS = {"bits_per_byte": "bits/byte", "next_byte_accuracy": "fraction", "top1_agreement": "fraction",
          "accuracy": "fraction", "embedding_cosine": "cosine", "similarity_spearman": "Spearman rho"}
_RECORDED = {"bits_per_byte": "bits_per_byte", "next_byte_accuracy": "top1_accuracy"}


def _recorded(name: str, metric: str, quick: bool) -> float | None:
    """The value the model card recorded for this metric on this data, when the data is the same."""
    from slimline.models.checkpoint import CHECKPOINT_DIR, load_card

    if not (CHECKPOINT_DIR / f"{name}.json").exists():
        return None
    card = load_card(name)
    metrics = card.get("metrics", {})
    if name.startswith("gpt"):
        if not held_out_matches_card(card):
            return None
        key = f"{'quick' if quick else 'val'}_{_RECORDED[metric]}"
        return metrics.get(key)
    return metrics.get(metric)


def _parameters(model: Any) -> int | None:
    return sum(p.numel() for p in model.parameters()) if isinstance(model, nn.Module) else None


def quality_table(names: Iterable[str] = QUALITY_MODELS, *, candidates: dict[str, Any] | None = None,
                  quick: bool = False) -> list[dict[str, Any]]:
    """One row per (model, metric): the trained model's value, and a candidate's beside it.

    ``candidates`` maps a name to a model or OptimizedModel to judge against the trained original
    (e.g. ``{"gpt-tiny": slimline.optimize(...)}``); then rows carry ``candidate`` and ``delta``.
    ``quick`` evaluates the GPTs on ``QUICK_BYTES`` held-out bytes and MiniLM on 128 sentences.
    Rows: model, metric, unit, higher_is_better, value, recorded (the model card's value on the
    same data, or None), candidate, delta, parameters, data.
    """
    candidates = candidates or {}
    rows = []
    for name in names:
        name = {"gpt": "gpt-small"}.get(name, name)
        original = trained_model(name)
        inputs = eval_inputs(name, quick=quick, reference=original if name != "vit" and name != "mixer" else None)
        candidate = candidates.get(name)
        if name.startswith("gpt"):
            metrics = ["bits_per_byte", "next_byte_accuracy"] + (["top1_agreement"] if candidate is not None else [])
            before = evaluate_text(original, inputs)
            after = evaluate_text(candidate, inputs) if candidate is not None else None
            values = {"bits_per_byte": "bits_per_byte", "next_byte_accuracy": "top1_accuracy",
                      "top1_agreement": "top1_agreement"}
            measured = {m: (before[values[m]], after[values[m]] if after else None) for m in metrics}
        else:
            metrics = ["accuracy"] if name in ("vit", "mixer") else ["embedding_cosine", "similarity_spearman"]
            measured = {m: (_METRICS[m][0](original, inputs),
                            _METRICS[m][0](candidate, inputs) if candidate is not None else None) for m in metrics}
        description = getattr(inputs, "description", "")
        for metric in metrics:
            value, other = measured[metric]
            rows.append({
                "model": name, "metric": metric, "unit": _UNITS[metric],
                "higher_is_better": _METRICS[metric][1], "value": value,
                "recorded": _recorded(name, metric, quick) if metric in _RECORDED or name in ("vit", "mixer") else None,
                "candidate": other, "delta": None if other is None else other - value,
                "parameters": _parameters(original), "data": description,
            })
    return rows
