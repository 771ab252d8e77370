"""Cached file hashes: right digest, reused while the file is unchanged, recomputed when it changes."""

from __future__ import annotations

import hashlib
import os

from unimerge.io.cache import cache_root, sha256_file


def test_hash_is_cached_by_file_identity(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("UNIMERGE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert sha256_file(f) == want
    entries = list((cache_root() / "sha256").rglob("*.json"))
    assert len(entries) == 1
    entries[0].write_text('{"sha256": "cached"}')  # proves the second call reads the cache
    assert sha256_file(f) == "cached"
    assert sha256_file(f, use_cache=False) == want
    f.write_bytes(b"abcd" * 1000)  # new size and mtime: a new key
    os.utime(f, ns=(1, 1))
    assert sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()
