"""The user cache: where it is, and cached file hashes (right digest, reused while the file is
unchanged, recomputed when it changes)."""

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


def test_cache_root_precedence(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("UNIMERGE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "a"
    monkeypatch.delenv("UNIMERGE_CACHE")
    assert cache_root() == tmp_path / "x" / "unimerge"
