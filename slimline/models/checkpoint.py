"""Checkpoints: safetensors weights plus a model card (JSON for programs, Markdown for people).

A checkpoint named ``NAME`` lives in ``slimline/models/checkpoints/`` as ``NAME.safetensors``,
``NAME.json`` and ``NAME.md``. Files are written atomically. Tied weights (gpt's head shares the
token embedding) are stored once: aliases of a stored tensor are left out and re-tied by the
model when it is loaded, since ``load_state_dict`` copies into the shared parameter.

``load_into(model, weights)`` takes a path or a bundled checkpoint name (``"gpt-tiny"``) and
casts stored tensors (bf16 for gpt-small) to the model's own dtype.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimline.errors import InputError
from slimline.fileio import atomic_path, atomic_write_text

__all__ = [
    "CHECKPOINT_DIR",
    "checkpoint_path",
    "save_checkpoint",
    "load_state",
    "load_into",
    "load_card",
    "write_card",
    "round_trip_dtype",
]

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


def checkpoint_path(weights: str | Path) -> Path:
    """A path as given, or ``CHECKPOINT_DIR / f"{name}.safetensors"`` for a bundled name."""
    path = Path(weights)
    if path.suffix == ".safetensors":
        return path
    bundled = CHECKPOINT_DIR / f"{weights}.safetensors"
    if bundled.exists():
        return bundled
    names = sorted(p.stem for p in CHECKPOINT_DIR.glob("*.safetensors"))
    raise InputError(f"no checkpoint {str(weights)!r}", stage="load weights", where=str(weights),
                     hint=f"pass a .safetensors path or one of the bundled names: {', '.join(names) or 'none'}")


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each storage once (the first name wins; later aliases are dropped)."""
    seen: set[tuple] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor
    return state


def round_trip_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Round every floating weight of ``model`` to ``dtype`` and back, in place: what saving does."""
    with torch.no_grad():
        for tensor in _unique_state(model).values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype))
    return model


def save_checkpoint(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Write ``model``'s weights (floating tensors cast to ``dtype`` if given); return file facts."""
    from safetensors.torch import save_file

    tensors = {}
    for name, tensor in _unique_state(model).items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous().clone()
    text_metadata = {key: value if isinstance(value, str) else json.dumps(value)
                     for key, value in (metadata or {}).items()}
    with atomic_path(path, stage="save checkpoint") as temporary:
        save_file(tensors, str(temporary), metadata=text_metadata)
    data = Path(path).read_bytes()
    return {"file": Path(path).name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "dtype": str(dtype or next(iter(tensors.values())).dtype).replace("torch.", ""),
            "tensors": len(tensors)}


def load_state(weights: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a checkpoint file or bundled name."""
    from safetensors import safe_open

    path = checkpoint_path(weights)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except FileNotFoundError:
        raise InputError(f"checkpoint file {str(path)!r} not found", stage="load weights",
                         where=str(path), hint="check the path") from None
    return tensors, metadata


def load_into(model: nn.Module, weights: str | Path) -> nn.Module:
    """Copy a checkpoint's tensors into ``model`` (cast to each parameter's dtype); returns it."""
    tensors, _ = load_state(weights)
    expected = _unique_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(model.state_dict()))
    mismatched = [name for name in expected if name in tensors and tensors[name].shape != expected[name].shape]
    if missing or unexpected or mismatched:
        problems = [f"{label}: {', '.join(names[:4])}" for label, names in
                    (("missing", missing), ("unexpected", unexpected), ("shape differs", mismatched)) if names]
        raise InputError(f"checkpoint {str(weights)!r} does not fit {type(model).__name__}: " + "; ".join(problems),
                         stage="load weights", where=str(weights),
                         hint="build the model with the configuration the checkpoint was trained with")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name].to(target.dtype))
    return model


def _card_path(name: str, suffix: str, directory: str | Path | None) -> Path:
    return Path(directory or CHECKPOINT_DIR) / f"{name}{suffix}"


def load_card(name: str, directory: str | Path | None = None) -> dict[str, Any]:
    path = _card_path(name, ".json", directory)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"no model card {str(path)!r}", stage="load card", where=name,
                         hint="train the model first (see slimline/models/train_*.py)") from None


def write_card(name: str, card: dict[str, Any], markdown: str, directory: str | Path | None = None) -> None:
    atomic_write_text(_card_path(name, ".json", directory), json.dumps(card, indent=2) + "\n", stage="write card")
    atomic_write_text(_card_path(name, ".md", directory), markdown, stage="write card")
