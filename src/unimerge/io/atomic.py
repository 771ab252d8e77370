"""The one way unimerge writes anything a user or a later run reads: all or nothing.

Every output (a merged model folder, a mask file, a statistics sidecar, a cached dataset or expert,
a benchmark report) is written under a temporary name beside its final place and renamed into place
only when complete, so an interrupted or failed run never leaves a half-written file behind.
Temporary names start with a dot. What is renamed into place has the user's normal permissions
(``0o666``/``0o777`` minus the umask, as for any file the user creates): folders are created that
way (``tempfile.mkdtemp`` would give 0700), and files written by libraries that create them 0600
(safetensors' ``save_file``, also inside ``save_pretrained``) are given the normal mode before the
rename, so the result can be shared like any other file.

- :func:`atomic_dir`: a folder, with a policy for an existing one (``error``, ``replace``, ``keep``).
- :func:`atomic_file` / :func:`atomic_write_text`: one file.
- :func:`temp_dir_beside` + :func:`swap_into_place`: the two halves of :func:`atomic_dir`, for a
  writer that holds its folder open across calls (:class:`~unimerge.io.writer.ShardedWriter`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from unimerge.errors import MergeError

__all__ = [
    "ExistsPolicy",
    "atomic_dir",
    "atomic_file",
    "atomic_write_text",
    "exists_error",
    "fsync_path",
    "share",
    "swap_into_place",
    "temp_dir_beside",
]

ExistsPolicy = Literal["error", "replace", "keep"]


def _umask() -> int:
    """The process umask (Linux reports it in /proc; elsewhere it is read by setting and restoring it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share(path: Path) -> None:
    """Give the file ``path``, or every file under the folder ``path``, a new file's normal mode."""
    mode = 0o666 & ~_umask()
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]:
        f.chmod(mode)


def _temp_name(final: Path, tag: str) -> Path:
    return final.with_name(f".{final.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def temp_dir_beside(final: Path) -> Path:
    """A new empty folder next to ``final`` (same file system, so a rename can finish it), created
    with the user's normal permissions."""
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temp_name(final, "tmp")
        try:
            tmp.mkdir()  # mode 0o777 minus the umask, like any folder the user makes
        except FileExistsError:
            continue
        return tmp


def exists_error(out: Path) -> MergeError:
    """The error for an output folder that exists when it may not be replaced."""
    return MergeError(
        f"Output folder {out} already exists. Pass --force (force=True) to replace it, or choose another folder."
    )


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``; an existing ``out`` is moved aside first and
    restored if the rename fails, then removed."""
    old = None
    if out.exists():
        old = temp_dir_beside(out)
        os.replace(out, old / "dir")
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old / "dir", out)
            shutil.rmtree(old, ignore_errors=True)
        raise
    fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_path(path: Path) -> None:
    """fsync a file or folder (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: Path, *, exists: ExistsPolicy = "error") -> Iterator[Path]:
    """Yield a temporary folder that becomes ``final`` when the block succeeds (removed if not).

    ``exists`` says what happens when ``final`` exists at the end: ``error`` raises a
    :class:`~unimerge.errors.MergeError` (and checks first too, before any work), ``replace`` swaps
    it out (restored if the rename fails), ``keep`` keeps it and discards the new folder (a cache
    entry another process finished first).
    """
    if exists == "error" and final.exists():
        raise exists_error(final)
    tmp = temp_dir_beside(final)
    try:
        yield tmp
        if final.exists() and exists != "replace":
            if exists == "error":
                raise exists_error(final)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        share(tmp)
        swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; what the block writes there replaces ``path`` when
    the block succeeds (the temporary file is removed if it fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, "tmp")
    try:
        yield tmp
        share(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` all at once."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
