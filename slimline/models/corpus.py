"""A deterministic byte-level text corpus: the CPython standard library's own ``.py`` source.

Every Python install carries it, so the project's GPTs train and are judged on text that needs
no download. The corpus is built from the *running* interpreter's ``Lib/``
(``sysconfig.get_paths()["stdlib"]``):

* files: every ``*.py`` under ``Lib/``, as relative POSIX paths, sorted. Left out: anything in
  ``site-packages`` or ``__pycache__``, the build-specific ``_sysconfigdata*.py`` and
  ``config-*/`` (they differ between builds of one version), and ``data/`` folders inside test
  suites (deliberately malformed inputs).
* parts: ``core`` is the library itself; ``tests`` is every file in a test suite (a path with a
  ``test``, ``tests`` or ``idle_test`` folder). Some distributions strip the test suite, so it
  only ever adds training text and never decides a metric.
* split: a ``core`` file is in ``validation`` when the SHA-256 of its relative path, read as an
  integer from its first 8 hex digits, is divisible by 20 (about 5% of the files); otherwise in
  ``train``. The split is by path, so a file lands on the same side in every Python version.
* streams: each split is the concatenation, in sorted path order, of each file's bytes followed
  by one ``FILE_SEPARATOR`` byte (NUL, which no standard-library source contains). The training
  stream is ``core`` train files, then ``tests`` files.

The corpus therefore differs between Python versions. A corpus built on one machine can be saved
(``python -m slimline.models.corpus --out DIR``) and loaded elsewhere, which is how gpt-small was
trained on a machine with another Python on exactly the corpus of this one. The manifest names
the Python version, byte counts and SHA-256 of each stream, and every file with its own SHA-256,
so a metric measured on the validation stream names the data it came from.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import platform
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from slimline.errors import InputError
from slimline.fileio import atomic_write_bytes, atomic_write_text

__all__ = [
    "FILE_SEPARATOR",
    "SourceFile",
    "Corpus",
    "stdlib_root",
    "python_version",
    "split_of",
    "list_sources",
    "build_corpus",
    "validation_stream",
    "save_corpus",
    "load_corpus",
]

FILE_SEPARATOR = b"\x00"
VALIDATION_MODULUS = 20  # 1 file in 20 (by path hash) is held out
_EXCLUDED_FOLDERS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_FOLDERS = {"test", "tests", "idle_test"}


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative POSIX path under Lib/
    part: str  # "core" or "tests"
    split: str  # "train" or "validation"
    size: int
    sha256: str


@dataclass
class Corpus:
    """The two byte streams and the manifest that describes them."""

    train: bytes
    validation: bytes
    manifest: dict

    @property
    def python_version(self) -> str:
        return self.manifest["python_version"]

    def card(self) -> dict:
        """The manifest without its per-file list: what a model card records."""
        return {key: value for key, value in self.manifest.items() if key != "files"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    return f"{platform.python_implementation()} {platform.python_version()}"


def split_of(relative_path: str) -> str:
    digest = hashlib.sha256(relative_path.encode("utf-8")).hexdigest()
    return "validation" if int(digest[:8], 16) % VALIDATION_MODULUS == 0 else "train"


def _classify(relative_path: str) -> str | None:
    """The part a file belongs to, or None when it is left out."""
    folders = relative_path.split("/")[:-1]
    name = relative_path.rsplit("/", 1)[-1]
    if _EXCLUDED_FOLDERS.intersection(folders) or name.startswith("_sysconfigdata"):
        return None
    if folders and folders[0].startswith("config-"):
        return None
    if _TEST_FOLDERS.intersection(folders):
        return None if "data" in folders else "tests"
    return "core"


def list_sources(root: str | Path | None = None, include_tests: bool = True) -> list[SourceFile]:
    """Every corpus file under ``root`` (default: this interpreter's Lib/), sorted by path."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise InputError(f"standard library folder {str(root)!r} not found", stage="corpus",
                         where="slimline.models.corpus", hint="pass the folder that holds os.py")
    files = []
    for path in root.rglob("*.py"):
        if not path.is_file():
            continue
        relative = path.relative_to(root).as_posix()
        part = _classify(relative)
        if part is None or (part == "tests" and not include_tests):
            continue
        data = path.read_bytes()
        split = split_of(relative) if part == "core" else "train"
        files.append(SourceFile(relative, part, split, len(data), hashlib.sha256(data).hexdigest()))
    return sorted(files, key=lambda f: f.path)


def _stream(root: Path, files: list[SourceFile]) -> bytes:
    return b"".join((root / f.path).read_bytes() + FILE_SEPARATOR for f in files)


def build_corpus(root: str | Path | None = None, include_tests: bool = True) -> Corpus:
    """Read the corpus from ``root`` (default: this interpreter's standard library)."""
    root = Path(root) if root is not None else stdlib_root()
    files = list_sources(root, include_tests)
    core_train = [f for f in files if f.part == "core" and f.split == "train"]
    tests = [f for f in files if f.part == "tests"]
    validation_files = [f for f in files if f.split == "validation"]
    core_train_bytes = _stream(root, core_train)
    train = core_train_bytes + _stream(root, tests)
    validation = _stream(root, validation_files)
    manifest = {
        "source": "CPython standard library .py files (sysconfig stdlib path)",
        "python_version": python_version() if root == stdlib_root() else f"unknown ({root})",
        "platform": sys.platform,
        "file_separator": "NUL byte after each file",
        "split_rule": f"core file in validation iff int(sha256(path)[:8], 16) % {VALIDATION_MODULUS} == 0",
        "include_tests": include_tests,
        "files_core_train": len(core_train),
        "files_tests": len(tests),
        "files_validation": len(validation_files),
        "bytes_core_train": len(core_train_bytes),
        "bytes_tests": len(train) - len(core_train_bytes),
        "bytes_train": len(train),
        "bytes_validation": len(validation),
        "sha256_train": hashlib.sha256(train).hexdigest(),
        "sha256_validation": hashlib.sha256(validation).hexdigest(),
        "sha256_corpus": hashlib.sha256(train + validation).hexdigest(),
        "files": [[f.path, f.part, f.split, f.size, f.sha256] for f in files],
    }
    return Corpus(train, validation, manifest)


def validation_stream(root: str | Path | None = None) -> bytes:
    """The validation stream alone (cheaper than :func:`build_corpus`); same bytes as its ``validation``."""
    root = Path(root) if root is not None else stdlib_root()
    return _stream(root, [f for f in list_sources(root, include_tests=False) if f.split == "validation"])


def save_corpus(corpus: Corpus, directory: str | Path) -> Path:
    """Write ``train.bin.gz``, ``validation.bin`` and ``manifest.json`` into ``directory``."""
    directory = Path(directory)
    atomic_write_bytes(directory / "train.bin.gz", gzip.compress(corpus.train, compresslevel=6, mtime=0))
    atomic_write_bytes(directory / "validation.bin", corpus.validation)
    atomic_write_text(directory / "manifest.json", json.dumps(corpus.manifest, indent=1) + "\n")
    return directory


def load_corpus(directory: str | Path) -> Corpus:
    """Read a corpus written by :func:`save_corpus`, checking its hashes."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        train = gzip.decompress((directory / "train.bin.gz").read_bytes())
        validation = (directory / "validation.bin").read_bytes()
    except FileNotFoundError as error:
        raise InputError(f"corpus file missing: {error.filename}", stage="corpus", where=str(directory),
                         hint="write it with: python -m slimline.models.corpus --out DIR") from None
    for name, data in (("train", train), ("validation", validation)):
        if hashlib.sha256(data).hexdigest() != manifest[f"sha256_{name}"]:
            raise InputError(f"corpus {name} stream does not match its manifest's SHA-256",
                             stage="corpus", where=str(directory), hint="rebuild the corpus")
    return Corpus(train, validation, manifest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder to save the corpus in (train.bin.gz, validation.bin, manifest.json)")
    parser.add_argument("--no-tests", action="store_true", help="leave the test suites out")
    args = parser.parse_args(argv)
    corpus = build_corpus(include_tests=not args.no_tests)
    if args.out:
        save_corpus(corpus, args.out)
    print(json.dumps(corpus.card(), indent=1))


if __name__ == "__main__":
    main()
