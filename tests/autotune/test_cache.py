"""The autotune cache: round trip, validators retiring entries, corrupt files, locking, defaults."""

import json
import multiprocessing
import os
import warnings

import pytest

from slimline.autotune.cache import (CacheWarning, DeviceFingerprint, TuningCache, cache_dir,
                                     current_validators, entry_key, source_hash)

DEVICE = DeviceFingerprint("NVIDIA H200", "9.0", 132, 140)
VALID = {"slimline": "0.1.0", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "protocol": "1"}


def _cache(tmp_path, validators=VALID, defaults_dir=None):
    return TuningCache(DEVICE, tmp_path, validators=validators, defaults_dir=defaults_dir)


def test_fingerprint_slug_and_cache_dir(monkeypatch, tmp_path):
    assert DEVICE.slug == "nvidia-h200-sm90-132sm-140gib"
    monkeypatch.setenv("SLIMLINE_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SLIMLINE_CACHE_DIR")
    assert cache_dir().parts[-2:] == (".cache", "slimline")
    assert set(current_validators()) == {"slimline", "torch", "triton", "cuda", "protocol"}


def test_round_trip_between_instances(tmp_path):
    _cache(tmp_path).store("dense", "abc", "M1-N64-K64-bf16", {"config": {"block_m": 16}, "ms": 0.5})
    again = _cache(tmp_path)
    entry, where = again.lookup("dense", "abc", "M1-N64-K64-bf16")
    assert where == "cache" and entry["config"] == {"block_m": 16} and entry["ms"] == 0.5
    assert again.lookup("dense", "abd", "M1-N64-K64-bf16") == (None, None)   # other kernel source
    assert again.lookup("dense", "abc", "M2-N64-K64-bf16") == (None, None)   # other problem
    text = again.path.read_text()
    assert json.loads(text)["device"]["multiprocessors"] == 132 and "pickle" not in text


def test_non_json_record_is_refused_before_the_file(tmp_path):
    cache = _cache(tmp_path)
    with pytest.raises(TypeError):
        cache.store("dense", "abc", "p", {"config": {"fn": object()}})
    assert not cache.path.exists()


@pytest.mark.parametrize("changed", ["torch", "triton", "cuda", "protocol", "slimline"])
def test_validators_retire_stale_entries(tmp_path, changed):
    _cache(tmp_path).store("dense", "abc", "p", {"config": {"a": 1}})
    newer = _cache(tmp_path, validators=dict(VALID, **{changed: "other"}))
    assert newer.lookup("dense", "abc", "p") == (None, None)
    assert newer.retired == 1
    newer.store("dense", "abc", "q", {"config": {"a": 2}})          # a write drops the stale entry
    assert list(json.loads(newer.path.read_text())["entries"]) == [entry_key("dense", "abc", "q")]


@pytest.mark.parametrize("content", ['{"format": 1, "entries": {"dense/abc/p": {"con', "\x00\x01garbage",
                                     "[1, 2, 3]", '{"format": 99, "entries": {}}'])
def test_corrupt_or_truncated_file_is_ignored_and_rebuilt(tmp_path, content):
    cache = _cache(tmp_path)
    cache.path.parent.mkdir(parents=True)
    cache.path.write_text(content)
    with pytest.warns(CacheWarning):
        assert cache.lookup("dense", "abc", "p") == (None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        cache.store("dense", "abc", "p", {"config": {"a": 1}})
    assert _cache(tmp_path).lookup("dense", "abc", "p")[0]["config"] == {"a": 1}


def _writer(directory, start):
    cache = TuningCache(DEVICE, directory, validators=VALID, defaults_dir=None)
    for index in range(start, start + 15):
        cache.store("dense", "abc", f"p{index}", {"config": {"i": index}})


def test_concurrent_writers_lose_nothing_and_leave_no_temporaries(tmp_path):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_writer, args=(str(tmp_path), 100 * w)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    entries = _cache(tmp_path).entries()
    assert len(entries) == 45
    leftovers = [name for name in os.listdir(_cache(tmp_path).path.parent) if name.endswith(".tmp")]
    assert leftovers == []


def test_shipped_defaults_answer_a_user_miss_and_match_on_protocol_only(tmp_path):
    shipped = tmp_path / "shipped"
    source = _cache(tmp_path / "run", validators=dict(VALID, torch="2.9.0"))
    source.store("quant", "h", "p", {"config": {"block_n": 32}})
    source.store("quant", "h", "q", {"config": {"block_n": 64}})
    source.export_defaults(shipped / f"{DEVICE.slug}.json", keys=[entry_key("quant", "h", "p")])
    cache = _cache(tmp_path / "user", defaults_dir=shipped)
    entry, where = cache.lookup("quant", "h", "p")
    assert where == "defaults" and entry["config"] == {"block_n": 32}
    assert cache.lookup("quant", "h", "q") == (None, None)
    cache.store("quant", "h", "p", {"config": {"block_n": 16}})     # the user's own run wins
    assert cache.lookup("quant", "h", "p")[1] == "cache"
    other_protocol = _cache(tmp_path / "user2", validators=dict(VALID, protocol="0"), defaults_dir=shipped)
    assert other_protocol.lookup("quant", "h", "p") == (None, None)


def test_source_hash_follows_the_source():
    def one(x):
        return x + 1

    def two(x):
        return x + 2

    assert source_hash(one) != source_hash(two) and source_hash(one) == source_hash(one)
    assert len(source_hash(one, two)) == 16
