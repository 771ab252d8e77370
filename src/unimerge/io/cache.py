"""The user cache folder, and file hashes cached in it.

``cache_root()`` is ``$UNIMERGE_CACHE``, else ``$XDG_CACHE_HOME/unimerge``, else ``~/.cache/unimerge``.
:func:`sha256_file` remembers each file's digest under that folder, keyed by the file's path, size,
modification time and inode (as git's index does), so a model card's input hashes cost one sequential
read per file version, not one per merge.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from unimerge.io.atomic import atomic_write_text

__all__ = ["cache_root", "sha256_file"]

_BLOCK = 1 << 22


def cache_root() -> Path:
    """``$UNIMERGE_CACHE``, else ``$XDG_CACHE_HOME/unimerge``, else ``~/.cache/unimerge``."""
    if os.environ.get("UNIMERGE_CACHE"):
        return Path(os.environ["UNIMERGE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "unimerge"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)  # one reusable buffer: no allocation per block
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def sha256_file(path: str | os.PathLike[str], *, use_cache: bool = True) -> str:
    """Hex sha256 of a file; cached by (path, size, mtime, inode) unless ``use_cache`` is false."""
    p = Path(path).resolve()
    if not use_cache:
        return _digest(p)
    st = p.stat()
    key = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode()).hexdigest()
    entry = cache_root() / "sha256" / key[:2] / f"{key}.json"
    try:
        return str(json.loads(entry.read_text())["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    digest = _digest(p)
    with contextlib.suppress(OSError):  # a read-only cache only costs speed
        atomic_write_text(entry, json.dumps({"path": str(p), "sha256": digest}))
    return digest
