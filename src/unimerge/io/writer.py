"""Sharded, atomic safetensors output.

:class:`ShardedWriter` lays the planned tensors out into size-bounded shards, writes every shard's
safetensors header first (https://github.com/huggingface/safetensors#format), then lets any number of
threads put each tensor's bytes at its offset with ``os.pwrite``, so no shard is ever held in memory.
Everything goes to a temporary folder next to the output; :meth:`ShardedWriter.commit` checks that
every tensor arrived, fsyncs, and renames the folder into place, so a failed merge leaves nothing.
The shard and index names follow Hugging Face ``save_pretrained`` (``model-00001-of-00003.safetensors``
plus ``model.safetensors.index.json``), as mergekit's ``io/tensor_writer.py`` does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from unimerge.errors import MergeError
from unimerge.io.atomic import atomic_file, exists_error, fsync_path, swap_into_place, temp_dir_beside
from unimerge.io.checkpoint import SAFETENSORS_DTYPES
from unimerge.io.placed import Placement, pwrite_all, tensor_bytes

__all__ = [
    "MODEL_FILES",
    "TOKENIZER_FILES",
    "OutTensor",
    "ShardedWriter",
    "consecutive_groups",
    "copy_model_files",
    "format_size",
    "parse_size",
    "safetensors_header",
    "write_model_files",
    "write_safetensors",
]

T = TypeVar("T")
_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_FILES = tuple(
    n for n in MODEL_FILES if n.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens"))
)


@dataclass(frozen=True)
class OutTensor:
    """One planned output tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of data (shape product times item size)."""
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class _Slot:
    shard: int  # index into the shard list
    offset: int  # absolute byte offset of the data in the shard file
    spec: OutTensor


def consecutive_groups(items: Sequence[T], size: Callable[[T], int], limit: int) -> list[list[T]]:
    """Greedy, in order: a new group when the next item would take the group's ``size`` sum past
    ``limit`` (an item larger than ``limit`` is a group of its own); ``[]`` for no items."""
    groups: list[list[T]] = []
    total = 0
    for item in items:
        cost = size(item)
        if not groups or total + cost > limit:
            groups.append([])
            total = 0
        groups[-1].append(item)
        total += cost
    return groups


def _plan_shards(tensors: Sequence[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Output tensors in shards of at most ``max_bytes`` (one shard, perhaps empty, at least)."""
    return consecutive_groups(tensors, lambda t: t.nbytes, max_bytes) or [[]]


def safetensors_header(tensors: Sequence[OutTensor], metadata: Mapping[str, str]) -> tuple[bytes, list[int]]:
    """Encoded header (length prefix + JSON padded to 8 bytes) and each tensor's data offset within it,
    for ``tensors`` laid out in that order."""
    entries: dict[str, object] = {"__metadata__": dict(metadata)}
    starts, pos = [], 0
    for t in tensors:
        entries[t.name] = {
            "dtype": _DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [pos, pos + t.nbytes],
        }
        starts.append(pos)
        pos += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, starts


def _check_relpath(relpath: str) -> Path:
    p = Path(relpath)
    if not relpath or p.is_absolute() or ".." in p.parts:
        raise MergeError(
            f"Output file {relpath!r} must be a relative path inside the output folder (no '..')."
        )
    return p


class ShardedWriter:
    """Writes planned tensors into safetensors shards in a temp folder, renamed into place on commit.

    Use as a context manager: leaving the block normally commits (if not done already); leaving it
    with an exception aborts, removing the temp folder.

    Args:
        out_dir: Final output folder.
        tensors: Every tensor to write, in the order to lay them out.
        max_shard_bytes: Shard size limit; a single tensor larger than it gets a shard of its own.
        force: Replace an existing ``out_dir`` (only when the commit succeeds).
        metadata: Extra safetensors ``__metadata__`` (``{"format": "pt"}`` is always included).

    Raises:
        MergeError: ``out_dir`` exists without ``force``, duplicate names, or an unsupported dtype.
    """

    def __init__(
        self,
        out_dir: Path,
        tensors: Sequence[OutTensor],
        *,
        max_shard_bytes: int = 2_000_000_000,
        force: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self._force = force
        self._check_inputs(tensors, max_shard_bytes, metadata or {})
        meta = {**(metadata or {}), "format": "pt"}
        shards = _plan_shards(tensors, max_shard_bytes)
        n = len(shards)
        self._names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._cond = threading.Condition()
        self._inflight = 0
        self._state = "open"
        self._failure: MergeError | None = None
        self._written: set[str] = set()
        self._fds: list[int] = []
        self._tmp = temp_dir_beside(self.out_dir)
        self._slots: dict[str, _Slot] = {}
        try:
            for i, shard in enumerate(shards):
                self._open_shard(i, shard, meta)
        except OSError as err:
            self.abort()
            raise self._os_error(err, self._tmp) from None

    def _check_inputs(
        self, tensors: Sequence[OutTensor], max_shard_bytes: int, metadata: dict[str, str]
    ) -> None:
        if self.out_dir.exists() and not (self._force and self.out_dir.is_dir()):
            raise exists_error(self.out_dir)
        if max_shard_bytes <= 0:
            raise MergeError(f"max_shard_bytes must be positive (got {max_shard_bytes}).")
        seen: set[str] = set()
        for t in tensors:
            if t.name in seen or not t.name:
                raise MergeError(f"Output tensor name {t.name!r} is empty or planned twice.")
            seen.add(t.name)
            if t.dtype not in _DTYPE_CODES:
                raise MergeError(
                    f"Output tensor {t.name!r} has dtype {t.dtype}, which safetensors cannot store."
                )
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise MergeError("Safetensors metadata must map strings to strings.")

    def _open_shard(self, index: int, shard: list[OutTensor], metadata: dict[str, str]) -> None:
        header, starts = safetensors_header(shard, metadata)
        fd = os.open(self._tmp / self._names[index], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        self._fds.append(fd)
        pwrite_all(fd, memoryview(header), 0)
        os.ftruncate(fd, len(header) + sum(t.nbytes for t in shard))
        for t, start in zip(shard, starts, strict=True):
            self._slots[t.name] = _Slot(index, len(header) + start, t)

    def _os_error(self, err: OSError, file: Path) -> MergeError:
        if err.errno == errno.ENOSPC:
            return MergeError(
                f"Disk full while writing {file}; nothing was written to {self.out_dir}. Free space and retry."
            )
        return MergeError(
            f"Could not write {file}: {err.strerror or err}; nothing was written to {self.out_dir}."
        )

    def _closed(self, action: str) -> MergeError:
        """The error for using a writer that is no longer open: the failure that closed it, if any."""
        if self._failure is not None:
            return self._failure
        return MergeError(f"Cannot {action}: the writer for {self.out_dir} is already {self._state}.")

    def _begin(self, action: str) -> None:
        with self._cond:
            if self._state != "open":
                raise self._closed(action)
            self._inflight += 1

    def _end(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    def _check_tensor(self, name: str, shape: torch.Size, dtype: torch.dtype) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            raise MergeError(f"Tensor {name!r} is not in the output plan for {self.out_dir}.")
        spec = slot.spec
        if tuple(shape) != spec.shape or dtype != spec.dtype:
            raise MergeError(
                f"Tensor {name!r} is {list(shape)} {dtype}, but the plan says {list(spec.shape)} {spec.dtype}."
            )
        with self._cond:
            if self._state != "open":
                raise self._closed(f"write {name!r}")
            if name in self._written:
                raise MergeError(f"Tensor {name!r} was written twice to {self.out_dir}.")
            self._written.add(name)
        return slot

    @contextlib.contextmanager
    def _io(self, action: str, file: Path) -> Iterator[None]:
        """Count an in-flight I/O; on OSError abort everything and raise a MergeError."""
        self._begin(action)
        try:
            yield
        except OSError as err:
            error = self._os_error(err, file)
        else:
            return
        finally:
            self._end()
        with self._cond:
            self._failure = self._failure or error
        self.abort()
        raise error

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor's bytes at its offset (thread-safe; any order).

        Raises:
            MergeError: Unknown name, shape/dtype not as planned, written twice, or disk full (the temp
                folder is then removed).
        """
        slot = self._check_tensor(name, tensor.shape, tensor.dtype)
        with self._io(f"write {name!r}", self._tmp / self._names[slot.shard]):
            pwrite_all(self._fds[slot.shard], tensor_bytes(tensor), slot.offset)

    def placement(self, name: str) -> Placement:
        """Where another process puts planned tensor ``name`` (with a :class:`~unimerge.io.placed.PlacedWriter`), then
        :meth:`record` it here."""
        slot = self._slots.get(name)
        if slot is None:
            raise MergeError(f"Tensor {name!r} is not in the output plan for {self.out_dir}.")
        return Placement(str(self._tmp / self._names[slot.shard]), slot.offset, slot.spec.nbytes)

    def record(self, name: str) -> None:
        """Count ``name`` as written: another process put its bytes at :meth:`placement` (and synced
        them), so :meth:`commit` finds it."""
        slot = self._slots.get(name)
        if slot is None:
            raise MergeError(f"Tensor {name!r} is not in the output plan for {self.out_dir}.")
        self._check_tensor(name, torch.Size(slot.spec.shape), slot.spec.dtype)

    def _target(self, relpath: str) -> Path:
        rel = _check_relpath(relpath)
        if str(rel) in self._names or str(rel) == INDEX_NAME:
            raise MergeError(f"{relpath!r} would overwrite a weight file of the output; choose another name.")
        path = self._tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_text(self, relpath: str, text: str) -> None:
        """Write a UTF-8 text file (e.g. ``README.md``) into the output folder."""
        with self._io(f"write {relpath!r}", self._tmp / relpath):
            self._target(relpath).write_text(text, encoding="utf-8")

    def copy_file(self, src: Path, relpath: str | None = None) -> None:
        """Copy ``src`` into the output folder (as ``relpath``, default its file name)."""
        src = Path(src)
        if not src.is_file():
            raise MergeError(f"Cannot copy {src} into {self.out_dir}: no such file.")
        with self._io(f"copy {src}", src):
            shutil.copyfile(src, self._target(relpath or src.name))

    def _finish_files(self) -> None:
        """Write the index (several shards), fsync and close every file and the temp folder."""
        if len(self._names) > 1:
            total = sum(s.spec.nbytes for s in self._slots.values())
            weight_map = {name: self._names[s.shard] for name, s in self._slots.items()}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self._tmp / INDEX_NAME).write_text(json.dumps(index, indent=2), encoding="utf-8")
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        for path in self._tmp.rglob("*"):
            if path.is_file() and path.name not in self._names:
                fsync_path(path)
        fsync_path(self._tmp)

    def commit(self) -> None:
        """Check every tensor was written, fsync, and rename the temp folder to ``out_dir``.

        Raises:
            MergeError: Tensors are missing (listed), or the files could not be finished; the temp
                folder is removed and ``out_dir`` is left as it was.
        """
        with self._cond:
            if self._state != "open":
                raise MergeError(f"Cannot commit: the writer for {self.out_dir} is already {self._state}.")
            while self._inflight:
                self._cond.wait()
            missing = [n for n in self._slots if n not in self._written]
            self._state = "committing"
        if missing:
            self.abort()
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise MergeError(
                f"{len(missing)} planned tensors were never written ({shown}); nothing was written to {self.out_dir}."
            )
        try:
            self._finish_files()
            swap_into_place(self._tmp, self.out_dir)
        except OSError as err:
            self.abort()
            raise self._os_error(err, self._tmp) from None
        with self._cond:
            self._state = "committed"

    def abort(self) -> None:
        """Discard everything: close files and remove the temp folder (idempotent)."""
        with self._cond:
            if self._state == "committed":
                return
            self._state = "aborted"
            while self._inflight:
                self._cond.wait()
            fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)
        shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def shard_names(self) -> list[str]:
        """The planned shard file names, in order."""
        return list(self._names)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.commit()


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> int:
    """Write ``tensors`` as one safetensors file, all at once; returns its size in bytes.

    Tensors are laid out sorted by name and the metadata keys sorted, so the bytes depend only on the
    content (safetensors' own ``save_file`` orders its header differently from run to run).

    Raises:
        MergeError: a dtype safetensors cannot store.
    """
    names = sorted(tensors)
    specs = []
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPE_CODES:
            raise MergeError(f"Tensor {name!r} has dtype {t.dtype}, which safetensors cannot store.")
        specs.append(OutTensor(name, tuple(t.shape), t.dtype))
    header, _ = safetensors_header(specs, dict(sorted(metadata.items())))
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        for name in names:
            f.write(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


def copy_model_files(src_root: Path, writer: ShardedWriter, names: Sequence[str] = MODEL_FILES) -> list[str]:
    """Copy those of ``names`` (default: config, generation config, tokenizer and chat template files)
    present in ``src_root``; returns the names copied."""
    copied = []
    for name in names:
        src = Path(src_root) / name
        if src.is_file():
            writer.copy_file(src, name)
            copied.append(name)
    return copied


def write_model_files(
    writer: ShardedWriter, meta_root: Path, tokenizer_root: Path | None, config_updates: Mapping[str, Any]
) -> None:
    """Copy the config, generation config and tokenizer files of ``meta_root`` (the tokenizer files of
    ``tokenizer_root`` over them when it differs; none with ``tokenizer_root=None``, when the caller
    writes its own), with ``config_updates`` applied to ``config.json``."""
    names = (
        MODEL_FILES
        if tokenizer_root is not None
        else tuple(n for n in MODEL_FILES if n not in TOKENIZER_FILES)
    )
    copied = copy_model_files(meta_root, writer, names)
    if tokenizer_root is not None and tokenizer_root != meta_root:
        copy_model_files(tokenizer_root, writer, TOKENIZER_FILES)
    if config_updates and "config.json" in copied:
        cfg = json.loads((Path(meta_root) / "config.json").read_text(encoding="utf-8"))
        writer.write_text("config.json", json.dumps({**cfg, **config_updates}, indent=2) + "\n")


_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes from ``"2GB"``, ``"500MB"``, ``"1.5G"``, ``"1e9"``, ``"4GiB"`` or an int (GB = 1e9, GiB = 2**30).

    Raises:
        ValueError: Unparseable, unknown unit, or not at least one byte.
    """
    fix = "write a number of bytes or a size such as 2GB, 500MB, 1.5G or 4GiB"
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"Size {text!r} is not a number or string; {fix}.")
    if isinstance(text, int):
        value = float(text)
    else:
        m = _SIZE.match(text)
        if not m or m[2].lower() not in _UNITS:
            raise ValueError(f"Cannot read size {text!r}; {fix}.")
        value = float(m[1]) * _UNITS[m[2].lower()]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"Size {text!r} must be at least one byte; {fix}.")
    return int(round(value))


def format_size(n: float) -> str:
    """``n`` bytes as ``"1.5 GB"`` (decimal units, as :func:`parse_size` reads them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
