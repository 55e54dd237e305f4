"""Write an ONNX model atomically, weights inline or as external data.

Like :mod:`slimline.backends.onnx_export`: the model (and ``<name>.data`` when weights go to
external data) is saved into a temporary directory beside the destination, the caller may check
the staged file, and only then are the data and the model moved into place with ``os.replace``.
On any failure the temporary directory goes and an existing file at the destination stays.
Weights go to external data above :data:`LARGE_MODEL_BYTES` (protobuf caps a file at 2 GiB) or
when asked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import onnx_ir as ir

from slimline.errors import ExportError

__all__ = ["LARGE_MODEL_BYTES", "StagedModel", "staged_model", "initializer_bytes"]

LARGE_MODEL_BYTES = 1_800_000_000


def initializer_bytes(model: ir.Model) -> int:
    return sum(value.const_value.nbytes for value in model.graph.initializers.values()
               if value.const_value is not None)


@dataclass
class StagedModel:
    """A saved model waiting in a temporary directory; :meth:`publish` moves it into place."""

    model: Path
    data: Path | None
    destination: Path
    published: bool = False

    @property
    def final_data(self) -> Path | None:
        return self.destination.parent / self.data.name if self.data is not None else None

    @property
    def size(self) -> int:
        path = self.destination if self.published else self.model
        data = self.final_data if self.published else self.data
        return path.stat().st_size + (data.stat().st_size if data is not None and data.exists()
                                      else 0)

    def publish(self) -> None:
        try:
            if self.data is not None and self.data.exists():
                _fsync(self.data)
                os.replace(self.data, self.final_data)  # the data first: the model refers to it
            _fsync(self.model)
            os.replace(self.model, self.destination)
            self.published = True
        except OSError as error:
            raise ExportError(f"cannot write {str(self.destination)!r}: {error.strerror or error}",
                              stage="write", where=str(self.destination),
                              hint="check free disk space and the directory's permissions") from error


@contextlib.contextmanager
def staged_model(model: ir.Model, destination: str | os.PathLike,
                 external_data: bool | None = None) -> Iterator[StagedModel]:
    """Save ``model`` beside ``destination``; yield it staged; always remove the staging dir."""
    destination = Path(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp", dir=destination.parent))
    except OSError as error:
        raise ExportError(f"cannot write next to {str(destination)!r}: {error.strerror or error}",
                          stage="write", where=str(destination),
                          hint="choose a writable output directory") from error
    try:
        use_external = initializer_bytes(model) > LARGE_MODEL_BYTES if external_data is None \
            else external_data
        data_name = f"{destination.name}.data" if use_external else None
        staged = StagedModel(directory / destination.name,
                             directory / data_name if data_name else None, destination)
        try:
            ir.save(model, staged.model, external_data=data_name)
        except Exception as error:
            raise ExportError(f"cannot save the ONNX model: {type(error).__name__}: "
                              f"{str(error).splitlines()[0][:300] if str(error) else ''}",
                              stage="write", where=str(destination),
                              hint="models over 2 GB need external data; check free disk "
                                   "space") from error
        yield staged
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as stream:
        os.fsync(stream.fileno())
