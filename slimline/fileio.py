"""Atomic file writes: a reader sees the old file or the whole new one, never a partial file.

Write to a temporary file in the destination directory, flush and fsync, then ``os.replace``.
An unwritable destination raises :class:`~slimline.errors.InputError` naming the path.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from slimline.errors import InputError

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_path", "check_writable_dir"]


def check_writable_dir(path: str | os.PathLike, stage: str = "write") -> Path:
    """Create the parent directory of ``path`` if needed and check that it is writable."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create directory {str(parent)!r}: {error.strerror}",
                         stage=stage, where=str(target), hint="choose a writable output path") from None
    if not os.access(parent, os.W_OK):
        raise InputError(f"directory {str(parent)!r} is not writable", stage=stage,
                         where=str(target), hint="choose a writable output path")
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, stage: str = "write") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    target = check_writable_dir(path, stage)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; a written file gets the usual mode
    try:
        yield Path(temporary)
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _write(path: str | os.PathLike, writer: Callable[[Path], None], stage: str) -> Path:
    with atomic_path(path, stage) as temporary:
        writer(temporary)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, stage: str = "write") -> Path:
    return _write(path, lambda p: p.write_bytes(data), stage)


def atomic_write_text(path: str | os.PathLike, text: str, stage: str = "write") -> Path:
    return _write(path, lambda p: p.write_text(text, encoding="utf-8"), stage)
