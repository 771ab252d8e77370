"""Lazy, checked readers for model checkpoints.

:func:`open_checkpoint` turns what a user wrote (a Hugging Face folder, one ``.safetensors`` file, a
sharded folder with ``model.safetensors.index.json``, mergekit's ``BASE+ADAPTER`` syntax, or - only
when asked - a pickled ``pytorch_model.bin``) into a :class:`Checkpoint`: names, shapes and dtypes
come from the file headers alone; tensor data is read one tensor at a time by :meth:`Checkpoint.read`.

Safetensors headers are parsed and checked here (format:
https://github.com/huggingface/safetensors#format), so a corrupt or truncated download fails with a
message naming the file, the tensor and the fix rather than a panic deep inside a merge; tensor
bytes are then read with ``os.preadv`` at the checked offsets, straight into the caller's buffer.
"""

from __future__ import annotations

import abc
import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unimerge.errors import CheckpointError

__all__ = [
    "SAFETENSORS_DTYPES",
    "Checkpoint",
    "PickleCheckpoint",
    "SafetensorsCheckpoint",
    "TensorMeta",
    "open_path",
    "read_safetensors_header",
    "resolve_inside",
]

# safetensors dtype code -> torch dtype (those this torch build has).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, attr)
    for code, attr in [
        ("BOOL", "bool"),
        ("U8", "uint8"),
        ("I8", "int8"),
        ("I16", "int16"),
        ("U16", "uint16"),
        ("I32", "int32"),
        ("U32", "uint32"),
        ("I64", "int64"),
        ("U64", "uint64"),
        ("F16", "float16"),
        ("BF16", "bfloat16"),
        ("F32", "float32"),
        ("F64", "float64"),
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"),
        ("C64", "complex64"),
    ]
    if hasattr(torch, attr)
}
_READ_CHUNK = 1 << 30  # bytes per pread call (Linux caps one read near 2 GiB)
_MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
_FIX = "re-download or re-save the file"
EXPECTED_FILES = (
    "model.safetensors, sharded model-*.safetensors with model.safetensors.index.json, "
    "or (with --allow-pickle) pytorch_model.bin"
)


@dataclass(frozen=True)
class TensorMeta:
    """What the headers say about one tensor; no data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path  # file holding the data (for LoRA-materialised tensors: the base's file)
    nbytes: int
    offset: int = -1  # absolute byte offset of the data in ``file`` (safetensors), else -1


def _bad(path: Path, what: str, tensor: str | None = None) -> CheckpointError:
    where = f"{path}" + (f", tensor {tensor!r}" if tensor else "")
    return CheckpointError(f"Corrupt safetensors file {where}: {what}. The file is damaged; {_FIX}.")


def _check_entry(path: Path, name: str, entry: Any) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """Validate one header entry; returns (dtype, shape, begin, end)."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise _bad(path, "header entry lacks dtype/shape/data_offsets", name)
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in SAFETENSORS_DTYPES:
        known = ", ".join(SAFETENSORS_DTYPES)
        raise _bad(path, f"unknown dtype {code!r} (known: {known})", name)
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad(path, f"shape {shape!r} is not a list of non-negative integers", name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise _bad(path, f"data_offsets {offsets!r} is not a pair of integers", name)
    begin, end = offsets
    dtype = SAFETENSORS_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    if begin < 0 or end - begin != expected:
        raise _bad(
            path,
            f"data_offsets {offsets} hold {end - begin} bytes but shape {shape} {code} needs {expected}",
            name,
        )
    return dtype, tuple(shape), begin, end


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorMeta], dict[str, str]]:
    """Parse and check a safetensors header without trusting it.

    Checks the 8-byte little-endian length, the JSON, every dtype, that each tensor's byte range
    matches ``shape * itemsize``, that ranges are contiguous, and that the file holds exactly the
    bytes the header claims.

    Args:
        path: A ``.safetensors`` file.

    Returns:
        ``(name -> TensorMeta in header order, __metadata__ dict)``.

    Raises:
        CheckpointError: naming the file (and tensor) and the fix.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _bad(path, f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise _bad(path, f"header length {n} runs past the end of the {size}-byte file")
            raw = fh.read(n)
    except OSError as err:
        raise CheckpointError(f"Cannot read {path}: {err.strerror or err}.") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(path, f"header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ is not a mapping of strings")
    entries = {name: _check_entry(path, name, e) for name, e in header.items()}
    metas, pos = {}, 0
    for name, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != pos:
            raise _bad(path, f"data_offsets start at {begin}, expected {pos} (gap or overlap)", name)
        pos = end
        metas[name] = TensorMeta(name, shape, dtype, path, end - begin, offset=8 + n + begin)
    data = size - 8 - n
    if pos > data:
        raise _bad(
            path, f"header claims {pos} bytes of tensor data but the file holds {data}: it is truncated"
        )
    if pos < data:
        raise _bad(path, f"file has {data - pos} bytes after the last tensor")
    return {name: metas[name] for name in header}, metadata


def resolve_inside(folder: Path, rel: str, what: str) -> Path:
    """``folder / rel`` if that stays inside ``folder``, else :class:`CheckpointError`."""
    p = Path(rel)
    if not rel or p.is_absolute() or ".." in p.parts:
        raise CheckpointError(
            f"{what} names {rel!r}, a path outside {folder}. Only files inside the checkpoint folder are "
            "read; fix the file or re-download the checkpoint."
        )
    return folder / p


class Checkpoint(abc.ABC):
    """A lazy view of one model's tensors; reads are thread-safe; only headers until :meth:`read`."""

    def __init__(self, ref: str, root: Path, metas: dict[str, TensorMeta]) -> None:
        self.ref = ref  # what the user wrote
        self.root = root  # folder with config.json / tokenizer (single file: its parent)
        self._metas = metas

    def tensors(self) -> dict[str, TensorMeta]:
        """Name -> :class:`TensorMeta`, from headers only (the cached mapping itself: do not mutate it)."""
        return self._metas

    def files(self) -> list[Path]:
        """The data files, sorted (for sha256 sums in the model card)."""
        return sorted({m.file for m in self._metas.values()})

    def _meta(self, name: str) -> TensorMeta:
        try:
            return self._metas[name]
        except KeyError:
            raise CheckpointError(
                f"{self.ref} has no tensor {name!r} ({len(self._metas)} tensors)."
            ) from None

    @abc.abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """One tensor on CPU, in its stored dtype."""

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read one tensor into ``out`` (same shape, any dtype/device), converting as needed."""
        out.copy_(self.read(name))

    @abc.abstractmethod
    def close(self) -> None:
        """Release open files; :meth:`read` may not be called afterwards."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ref!r}, {len(self._metas)} tensors)"


class SafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files, read with ``os.pread`` at the offsets the checked header gives.

    One descriptor per file, shared by all threads (``pread`` does not move a file position), so a
    tensor goes from the page cache straight into the caller's buffer: no mmap faults, no copy.
    """

    def __init__(self, ref: str, root: Path, metas: dict[str, TensorMeta]) -> None:
        super().__init__(ref, root, metas)
        self._lock = threading.Lock()
        self._fds: dict[Path, int] = {}
        self._closed = False

    def _fd(self, file: Path) -> int:
        with self._lock:
            if self._closed:
                raise CheckpointError(f"{self.ref} was closed; reopen it to read from {file}.")
            if file not in self._fds:
                try:
                    self._fds[file] = os.open(file, os.O_RDONLY)
                except OSError as err:
                    raise CheckpointError(f"Cannot open {file}: {err.strerror or err}.") from None
            return self._fds[file]

    def read(self, name: str) -> torch.Tensor:
        """One tensor on CPU, in its stored dtype."""
        meta = self._meta(name)
        out = torch.empty(meta.shape, dtype=meta.dtype)
        self._pread(meta, out)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read straight into ``out`` when it is a contiguous CPU tensor of the stored dtype."""
        meta = self._meta(name)
        if out.device.type == "cpu" and out.dtype == meta.dtype and out.is_contiguous():
            self._pread(meta, out)
        else:
            out.copy_(self.read(name))

    def _pread(self, meta: TensorMeta, out: torch.Tensor) -> None:
        view = out.reshape(-1).view(torch.uint8).numpy().data if meta.nbytes else memoryview(b"")
        fd, pos, done = self._fd(meta.file), meta.offset, 0
        try:
            while done < meta.nbytes:
                got = os.preadv(fd, [view[done : done + _READ_CHUNK]], pos + done)
                if got == 0:
                    raise OSError(f"file ended {meta.nbytes - done} bytes early")
                done += got
        except OSError as err:
            raise CheckpointError(
                f"Cannot read tensor {meta.name!r} from {meta.file}: {getattr(err, 'strerror', None) or err}. "
                f"{_FIX.capitalize()}."
            ) from None

    def close(self) -> None:
        """Close the file descriptors."""
        with self._lock:
            self._closed = True
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class PickleCheckpoint(Checkpoint):
    """``pytorch_model*.bin`` files, loaded with ``torch.load(weights_only=True, mmap=True)``."""

    def __init__(
        self, ref: str, root: Path, state: dict[str, torch.Tensor], metas: dict[str, TensorMeta]
    ) -> None:
        super().__init__(ref, root, metas)
        self._state = state

    @classmethod
    def load(cls, ref: str, root: Path, files: list[Path]) -> PickleCheckpoint:
        """Load (memory-mapped) every file; tensors are paged in only when read."""
        state: dict[str, torch.Tensor] = {}
        metas: dict[str, TensorMeta] = {}
        for file in files:
            for name, t in _torch_load(file).items():
                if name in state:
                    raise CheckpointError(f"Tensor {name!r} appears in two files of {ref} (second: {file}).")
                state[name] = t
                metas[name] = TensorMeta(name, tuple(t.shape), t.dtype, file, t.numel() * t.element_size())
        return cls(ref, root, state, metas)

    def read(self, name: str) -> torch.Tensor:
        """One tensor on CPU, in its stored dtype (a copy, detached from the memory map)."""
        self._meta(name)
        if not self._state:
            raise CheckpointError(f"{self.ref} was closed; reopen it to read {name!r}.")
        return self._state[name].clone()

    def close(self) -> None:
        """Drop the memory-mapped state dicts."""
        self._state = {}


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(
            f"Cannot load {file} with torch.load(weights_only=True): {err}. Only plain tensor state dicts "
            "saved by torch >= 1.6 are read; convert it to safetensors."
        ) from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{file} does not hold a flat name -> tensor state dict; convert it to safetensors."
        )
    return obj


def _read_index(index_path: Path) -> dict[str, Path]:
    """Tensor name -> shard path from a ``*.index.json``, every shard inside the folder and present."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Cannot parse {index_path}: {err}. Re-download the checkpoint.") from None
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise CheckpointError(
            f"{index_path} has no 'weight_map' of tensor name -> shard file; re-download it."
        )
    folder = index_path.parent
    out = {name: resolve_inside(folder, rel, f"{index_path} (tensor {name!r})") for name, rel in wmap.items()}
    for name, shard in out.items():
        if not shard.is_file():
            raise CheckpointError(
                f"{index_path} maps tensor {name!r} to {shard.name}, which is missing from {folder}. "
                "The download is incomplete; re-download the checkpoint."
            )
    return out


def _safetensors_metas(files: list[Path], index: dict[str, Path] | None) -> dict[str, TensorMeta]:
    metas: dict[str, TensorMeta] = {}
    for file in files:
        for name, meta in read_safetensors_header(file)[0].items():
            if index is not None and index.get(name) != file:
                continue
            if name in metas:
                raise CheckpointError(f"Tensor {name!r} appears in both {metas[name].file} and {file}.")
            metas[name] = meta
    for name, shard in (index or {}).items():
        if name not in metas:
            raise CheckpointError(
                f"The index maps {name!r} to {shard}, but that file has no such tensor; re-download it."
            )
    return metas


def _open_folder(ref: str, folder: Path, allow_pickle: bool) -> Checkpoint:
    st_index = folder / "model.safetensors.index.json"
    if st_index.is_file():
        index = _read_index(st_index)
        files = sorted(set(index.values()))
        return SafetensorsCheckpoint(ref, folder, _safetensors_metas(files, index))
    single = folder / "model.safetensors"
    files = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name != "adapter_model.safetensors"]
    if files:
        return SafetensorsCheckpoint(ref, folder, _safetensors_metas(files, None))
    bin_index = folder / "pytorch_model.bin.index.json"
    if bin_index.is_file() or (folder / "pytorch_model.bin").is_file():
        files = (
            sorted(set(_read_index(bin_index).values()))
            if bin_index.is_file()
            else [folder / "pytorch_model.bin"]
        )
        return _open_pickle(ref, folder, files, allow_pickle)
    if (folder / "adapter_config.json").is_file():
        raise CheckpointError(
            f"{folder} is a PEFT adapter, not a full model. Merge it onto its base with the BASE+ADAPTER "
            f"syntax, e.g. `path/to/base+{ref}`."
        )
    present = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
    raise CheckpointError(f"No model weights in {folder} (it holds: {present}). Expected {EXPECTED_FILES}.")


def _open_pickle(ref: str, root: Path, files: list[Path], allow_pickle: bool) -> Checkpoint:
    if not allow_pickle:
        names = ", ".join(f.name for f in files[:3])
        raise CheckpointError(
            f"{ref} stores its weights as pickle ({names}). Unpickling can run arbitrary code, so it is off by "
            "default: pass --allow-pickle (allow_pickle=True) if you trust this file, or convert it to "
            "safetensors. It is then loaded with torch.load(weights_only=True)."
        )
    return PickleCheckpoint.load(ref, root, files)


def open_path(ref: str, path: Path, allow_pickle: bool) -> Checkpoint:
    """Open an existing folder or file (``ref`` is what the user wrote, for messages)."""
    if path.is_dir():
        return _open_folder(ref, path, allow_pickle)
    if path.name.endswith(".index.json"):
        return _open_folder(ref, path.parent, allow_pickle)
    if path.suffix == ".safetensors":
        return SafetensorsCheckpoint(ref, path.parent, _safetensors_metas([path], None))
    if path.suffix in {".bin", ".pt", ".pth"}:
        return _open_pickle(ref, path.parent, [path], allow_pickle)
    raise CheckpointError(
        f"{path} is not a checkpoint. Expected a folder with {EXPECTED_FILES}, or a .safetensors file."
    )
