"""The autotuner's persistent cache: one JSON file per device, data only.

Where: ``$SLIMLINE_CACHE_DIR`` (default ``~/.cache/slimline``) / ``autotune`` /
``<device fingerprint>.json``. The fingerprint names the device by what changes a kernel's best
configuration: its name, compute capability, SM count and memory (GiB), e.g.
``nvidia-h200-sm90-132sm-140gib``.

An entry is keyed by ``family/source hash/problem key``: the kernel family, a hash of the
kernel's source (edit the kernel and its entries no longer match) and the problem (shape
buckets, dtypes, layout). Each entry carries the validators it was measured under (slimline,
torch, triton and CUDA versions, the measurement protocol's version); an entry whose validators
differ from the running ones is *retired*: never returned, and dropped at the next write.

Writes take an exclusive ``fcntl`` lock on ``<file>.lock``, re-read the file, merge and replace
it atomically (:mod:`slimline.fileio`), so two processes tuning at once lose no entries and a
reader never sees half a file. A file that does not parse (truncated, corrupt, a foreign format)
is ignored with a warning and rebuilt at the next write: the cache never makes slimline fail.

Shipped defaults: ``slimline/autotune/defaults/<fingerprint>.json`` holds, in the same format,
the winners of the project's own runs on that device; :meth:`TuningCache.lookup` consults it when
the user's file misses. Defaults are matched on family, kernel source hash, problem and protocol
version only (a winner measured under another torch is still the best first guess).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from slimline.fileio import atomic_write_text, check_writable_dir

__all__ = ["DeviceFingerprint", "TuningCache", "CacheWarning", "PROTOCOL_VERSION", "FORMAT_VERSION",
           "cache_dir", "current_validators", "source_hash", "entry_key", "DEFAULTS_DIR"]

PROTOCOL_VERSION = 1      # bump when the measurement protocol changes what a winner means
FORMAT_VERSION = 1        # the JSON layout of a cache file
DEFAULTS_DIR = Path(__file__).resolve().parent / "defaults"


class CacheWarning(UserWarning):
    """A cache file could not be read and is being ignored (it will be rebuilt)."""


@dataclass(frozen=True)
class DeviceFingerprint:
    """What names a device for the cache: name, compute capability, SM count, memory."""

    name: str
    capability: str      # "9.0"; "cpu" for the host
    multiprocessors: int
    memory_gib: int

    @property
    def slug(self) -> str:
        name = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "device"
        arch = "sm" + self.capability.replace(".", "") if self.capability != "cpu" else "cpu"
        return f"{name}-{arch}-{self.multiprocessors}sm-{self.memory_gib}gib"

    def to_json(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    """``$SLIMLINE_CACHE_DIR`` or ``~/.cache/slimline``."""
    configured = os.environ.get("SLIMLINE_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "slimline"


def current_validators() -> dict[str, str]:
    """The versions an entry is valid for: slimline, torch, triton, CUDA, the protocol."""
    import torch

    import slimline

    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton is optional on CPU
        triton_version = "none"
    return {"slimline": str(getattr(slimline, "__version__", "unknown")), "torch": torch.__version__,
            "triton": triton_version, "cuda": str(torch.version.cuda or "none"),
            "protocol": str(PROTOCOL_VERSION)}


def source_hash(*objects: Any) -> str:
    """A short hash of the source text of functions or Triton kernels.

    A Triton kernel hashes as its Python function's source from ``def`` on (what Triton keeps as
    ``src``), the same under ``TRITON_INTERPRET`` as compiled.
    """
    digest = hashlib.sha256()
    for obj in objects:
        wrapped = getattr(obj, "fn", None)
        try:
            if callable(wrapped):  # a Triton kernel (compiled or interpreted): the source from "def"
                text = textwrap.dedent(inspect.getsource(wrapped))
                found = re.search(r"^def\s+\w+\s*\(", text, re.MULTILINE)
                text = text[found.start():] if found else text
            else:
                text = inspect.getsource(obj)
        except (OSError, TypeError):
            text = repr(obj)
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def entry_key(family: str, kernel_hash: str, problem_key: str) -> str:
    return f"{family}/{kernel_hash}/{problem_key}"


def _empty(fingerprint: DeviceFingerprint) -> dict:
    return {"format": FORMAT_VERSION, "device": fingerprint.to_json(), "entries": {}}


def _read(path: Path) -> dict | None:
    """The parsed file, or None if it is missing; a file that is not a cache warns and reads empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        warnings.warn(f"autotune cache {path} cannot be read ({error}); ignoring it, it will be rebuilt",
                      CacheWarning, stacklevel=3)
        return {}
    try:
        data = json.loads(text)
    except ValueError as error:
        warnings.warn(f"autotune cache {path} is corrupt or truncated ({error}); ignoring it, "
                      "it will be rebuilt", CacheWarning, stacklevel=3)
        return {}
    if (not isinstance(data, dict) or data.get("format") != FORMAT_VERSION
            or not isinstance(data.get("entries"), dict)):
        warnings.warn(f"autotune cache {path} is not a format-{FORMAT_VERSION} cache file; ignoring it, "
                      "it will be rebuilt", CacheWarning, stacklevel=3)
        return {}
    return data


class TuningCache:
    """The user's cache file for one device, plus the shipped defaults for that device.

    ``validators`` defaults to :func:`current_validators`; tests pass their own.
    """

    def __init__(self, fingerprint: DeviceFingerprint, directory: str | os.PathLike | None = None,
                 validators: dict[str, str] | None = None, defaults_dir: str | os.PathLike | None = DEFAULTS_DIR):
        self.fingerprint = fingerprint
        self.directory = Path(directory) if directory is not None else cache_dir()
        self.path = self.directory / "autotune" / f"{fingerprint.slug}.json"
        self.validators = dict(validators) if validators is not None else current_validators()
        self.defaults_path = Path(defaults_dir) / f"{fingerprint.slug}.json" if defaults_dir else None
        self._entries: dict[str, dict] | None = None
        self._defaults: dict[str, dict] | None = None
        self.retired = 0          # stale entries seen at the last load

    # -- reading ------------------------------------------------------------------------------
    def _valid(self, entry: Any, protocol_only: bool = False) -> bool:
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
            return False
        stamped = entry.get("validators")
        if not isinstance(stamped, dict):
            return False
        if protocol_only:
            return stamped.get("protocol") == self.validators.get("protocol")
        return stamped == self.validators

    def entries(self) -> dict[str, dict]:
        """The valid entries of the user's file (loaded once; stale ones counted in ``retired``)."""
        if self._entries is None:
            data = _read(self.path) or {}
            raw = data.get("entries", {}) if isinstance(data, dict) else {}
            self._entries = {key: entry for key, entry in raw.items() if self._valid(entry)}
            self.retired = len(raw) - len(self._entries)
        return self._entries

    def defaults(self) -> dict[str, dict]:
        if self._defaults is None:
            data = _read(self.defaults_path) if self.defaults_path is not None else None
            raw = (data or {}).get("entries", {})
            self._defaults = {key: entry for key, entry in raw.items() if self._valid(entry, protocol_only=True)}
        return self._defaults

    def lookup(self, family: str, kernel_hash: str, problem_key: str) -> tuple[dict | None, str | None]:
        """``(entry, where)``: where is ``"cache"`` (the user's file), ``"defaults"`` or None."""
        key = entry_key(family, kernel_hash, problem_key)
        found = self.entries().get(key)
        if found is not None:
            return found, "cache"
        found = self.defaults().get(key)
        if found is not None:
            return found, "defaults"
        return None, None

    # -- writing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        check_writable_dir(self.path, stage="tune")
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def store(self, family: str, kernel_hash: str, problem_key: str, record: dict) -> None:
        """Add or replace one entry (``record`` must hold a JSON ``config`` dict)."""
        self.store_many({entry_key(family, kernel_hash, problem_key): record})

    def store_many(self, records: dict[str, dict]) -> None:
        """Merge ``{entry key: record}`` into the file under the lock; stale entries are dropped."""
        if not records:
            return
        stamped = {}
        for key, record in records.items():
            if not isinstance(record.get("config"), dict):
                raise TypeError(f"cache record for {key} needs a 'config' dict")
            entry = dict(record, validators=dict(self.validators), stored=time.strftime("%Y-%m-%dT%H:%M:%S"))
            json.dumps(entry)  # data only: fail here, before the file, on anything not JSON
            stamped[key] = entry
        with self._locked():
            data = _read(self.path) or {}
            raw = data.get("entries", {}) if isinstance(data, dict) else {}
            merged = {key: entry for key, entry in raw.items() if self._valid(entry)}
            merged.update(stamped)
            document = _empty(self.fingerprint)
            document["entries"] = dict(sorted(merged.items()))
            atomic_write_text(self.path, json.dumps(document, indent=1, sort_keys=False) + "\n", stage="tune")
            self._entries = merged
            self.retired = 0

    def export_defaults(self, path: str | os.PathLike, keys: list[str] | None = None) -> Path:
        """Write (atomically) a defaults file from this cache's valid entries (all, or ``keys``)."""
        chosen = {k: v for k, v in self.entries().items() if keys is None or k in keys}
        document = _empty(self.fingerprint)
        document["entries"] = dict(sorted(chosen.items()))
        return atomic_write_text(path, json.dumps(document, indent=1) + "\n", stage="tune")
