"""The task-model file: one safetensors file holding a shared vector and per-task compressed entries.

Two kinds share the layout and the metadata (``format``, ``version``, ``method``, ``tasks``)::

    masks   (format "unimerge.taskmasks", method "emr" or "tall")
        vector::{tensor}        the shared vector, (*shape), float
        mask::{i}::{tensor}     task i's mask, flattened and bit-packed (numpy.packbits), uint8 (ceil(numel/8),)
        rescalers               (n_tasks,) float32

    experts (format "unimerge.taskexperts", method "free_merging", plus metadata ``params`` as JSON)
        vector::{tensor}        the FR-Merging task vector tau_FR, (*shape), float
        index::{i}::{tensor}    task i's expert: flat indices (k,), int32 (int64 past 2**31 entries)
        value::{i}::{tensor}    task i's expert values, (k,), float32

``tasks`` is a JSON list of task names, in the order of ``i``. :func:`write_task_file` writes the file
all at once (through :func:`unimerge.io.writer.write_safetensors`) and deterministically: the same tensors and
metadata give the same bytes (tensors sorted by name; safetensors' own ``save_file`` orders its header
differently from run to run). :func:`open_task_file` checks the metadata and that every task's entries
are present from the header, before any data is read; :class:`TaskFile` then reads one tensor's vector
or one task's entries at a time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from unimerge.errors import CheckpointError, ConfigError
from unimerge.io.writer import write_safetensors

__all__ = [
    "EXPERTS_FORMAT",
    "MASKS_FORMAT",
    "RESCALERS",
    "VERSION",
    "TaskFile",
    "TaskKind",
    "file_kind",
    "index_key",
    "is_task_experts_file",
    "mask_key",
    "open_task_file",
    "pack_bits",
    "task_index",
    "task_metadata",
    "unpack_bits",
    "value_key",
    "vector_key",
    "write_task_file",
]

TaskKind = Literal["masks", "experts"]
MASKS_FORMAT = "unimerge.taskmasks"
EXPERTS_FORMAT = "unimerge.taskexperts"
VERSION = "1"
RESCALERS = "rescalers"
_VECTOR = "vector::"
_FORMATS: dict[TaskKind, str] = {"masks": MASKS_FORMAT, "experts": EXPERTS_FORMAT}
_METHODS: dict[TaskKind, tuple[str, ...]] = {"masks": ("emr", "tall"), "experts": ("free_merging",)}
_WHAT: dict[TaskKind | None, str] = {
    "masks": "task mask file",
    "experts": "task expert file (FREE-Merging)",
    None: "task-model file (masks or experts)",
}
_MAKE: dict[TaskKind | None, str] = {
    "masks": "`unimerge masks` (or save_task_masks)",
    "experts": "`unimerge masks --kind free_merging` (or save_task_experts)",
    None: "`unimerge masks`",
}


def vector_key(name: str) -> str:
    """The file's name for the shared vector of tensor ``name``."""
    return f"{_VECTOR}{name}"


def mask_key(i: int, name: str) -> str:
    """The file's name for task ``i``'s packed mask of tensor ``name``."""
    return f"mask::{i}::{name}"


def index_key(i: int, name: str) -> str:
    """The file's name for task ``i``'s expert indices of tensor ``name``."""
    return f"index::{i}::{name}"


def value_key(i: int, name: str) -> str:
    """The file's name for task ``i``'s expert values of tensor ``name``."""
    return f"value::{i}::{name}"


def pack_bits(mask: Tensor) -> Tensor:
    """Boolean ``(*shape)`` -> bit-packed uint8 ``(ceil(numel / 8),)``."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy()))


def unpack_bits(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``(ceil(numel / 8),)`` -> boolean ``(*shape)``."""
    n = math.prod(shape)
    bits = np.unpackbits(packed.numpy(), count=n).astype(bool)
    return torch.from_numpy(bits).reshape(tuple(shape))


def task_index(tasks: Sequence[str], task: str | int) -> int:
    """Position of ``task`` (a name or an index) in ``tasks``; unknown tasks raise :class:`ConfigError`."""
    if isinstance(task, int) and not isinstance(task, bool) and 0 <= task < len(tasks):
        return task
    if isinstance(task, str) and task in tasks:
        return list(tasks).index(task)
    raise ConfigError(f"Unknown task {task!r}; the mask file holds tasks {list(tasks)} (name or index).")


def task_metadata(kind: TaskKind, method: str, tasks: Sequence[str], **extra: str) -> dict[str, str]:
    """The metadata of a ``kind`` file: ``format``, ``version``, ``method``, ``tasks`` (JSON) and ``extra``."""
    meta = {"format": _FORMATS[kind], "version": VERSION, "method": method, "tasks": json.dumps(list(tasks))}
    return {**meta, **extra}


def write_task_file(
    path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str]
) -> int:
    """Write ``tensors`` (sorted by name) and ``metadata`` as one safetensors file, all at once.

    The bytes depend only on the tensors and the metadata. Returns the file's size in bytes.
    """
    out = Path(path)
    if out.is_dir():
        raise ConfigError(
            f"{out} is a folder; give a file name for the task-model file (e.g. masks.safetensors)."
        )
    return write_safetensors(out, tensors, metadata)


def _kind_of(meta: Mapping[str, str]) -> TaskKind | None:
    return next((k for k, fmt in _FORMATS.items() if meta.get("format") == fmt), None)


def _metadata(path: Path) -> dict[str, str] | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception:  # safetensors raises several types for files that are not safetensors
        return None


def file_kind(path: str | os.PathLike[str]) -> TaskKind | None:
    """Which kind of task-model file ``path`` is (``"masks"``, ``"experts"``), or None for anything else."""
    meta = _metadata(Path(path)) if Path(path).is_file() else None
    return None if meta is None else _kind_of(meta)


def is_task_experts_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a task expert file (FREE-Merging, written by ``save_task_experts``)."""
    return file_kind(path) == "experts"


class _Slice(Protocol):
    def get_shape(self) -> list[int]: ...


class _SafeHandle(Protocol):
    """The part of a ``safetensors.safe_open(..., framework="pt")`` handle used here, typed."""

    def metadata(self) -> dict[str, str] | None: ...
    def keys(self) -> list[str]: ...
    def get_slice(self, name: str) -> _Slice: ...
    def get_tensor(self, name: str) -> Tensor: ...


@dataclass(frozen=True)
class TaskFile:
    """An opened, checked task-model file; tensors are read on demand.

    Attributes:
        path: the file.
        kind: ``"masks"`` or ``"experts"``.
        method: ``"emr"``, ``"tall"`` or ``"free_merging"``.
        tasks: task names, in entry order.
        metadata: the file's metadata.
        shapes: covered tensor name -> shape (from the header).
    """

    path: Path
    kind: TaskKind
    method: str
    tasks: tuple[str, ...]
    metadata: dict[str, str]
    shapes: dict[str, torch.Size]
    handle: _SafeHandle = field(repr=False, compare=False)

    def index(self, task: str | int) -> int:
        """Position of ``task`` (a name or an index); unknown tasks raise :class:`ConfigError`."""
        return task_index(self.tasks, task)

    def vector(self, name: str) -> Tensor:
        """The shared vector of tensor ``name``, ``(*shape)``."""
        return self.handle.get_tensor(vector_key(name))

    def rescalers(self) -> Tensor:
        """The per-task rescalers of a masks file, ``(n_tasks,)``."""
        return self.handle.get_tensor(RESCALERS)

    def mask(self, i: int, name: str) -> Tensor:
        """Task ``i``'s boolean mask of tensor ``name``, ``(*shape)``."""
        packed = self.handle.get_tensor(mask_key(i, name))
        shape = self.shapes[name]
        if packed.dtype != torch.uint8 or tuple(packed.shape) != ((math.prod(shape) + 7) // 8,):
            raise self._corrupt(
                f"tensor {mask_key(i, name)!r} is {packed.dtype} {tuple(packed.shape)}, "
                f"not the uint8 ({(math.prod(shape) + 7) // 8},) a packed {tuple(shape)} mask takes"
            )
        return unpack_bits(packed, shape)

    def expert(self, i: int, name: str) -> tuple[Tensor, Tensor]:
        """Task ``i``'s sparse expert of tensor ``name``: flat indices (k,) int64 and values (k,)."""
        idx = self.handle.get_tensor(index_key(i, name)).long()
        val = self.handle.get_tensor(value_key(i, name))
        if idx.dim() != 1 or idx.shape != val.shape:
            raise self._corrupt(
                f"the expert of task {i} on {name!r} has indices {tuple(idx.shape)} "
                f"and values {tuple(val.shape)}; both must be (k,)"
            )
        if idx.numel() and not (int(idx.min()) >= 0 and int(idx.max()) < math.prod(self.shapes[name])):
            raise self._corrupt(f"the expert of task {i} on {name!r} has indices outside the tensor")
        return idx, val

    def _corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(
            f"Task-model file {str(self.path)!r} is corrupt: {why}. Recreate it with {_MAKE[self.kind]}."
        )


def _not_a(path: Path, kind: TaskKind | None, why: str) -> CheckpointError:
    return CheckpointError(
        f"{str(path)!r} is not a unimerge {_WHAT[kind]}: {why}. Create one with {_MAKE[kind]}."
    )


def _checked_meta(
    path: Path, kind: TaskKind | None, meta: Mapping[str, str]
) -> tuple[TaskKind, tuple[str, ...]]:
    """The file's kind and tasks, after checking format, method, version and tasks."""
    found = _kind_of(meta)
    if found is None or (kind is not None and found != kind):
        want = " or ".join(repr(_FORMATS[k]) for k in ((kind,) if kind else _FORMATS))
        raise _not_a(path, kind, f"its metadata format is {meta.get('format')!r}, not {want}")
    if meta.get("method") not in _METHODS[found]:
        raise _not_a(path, kind, f"its method is {meta.get('method')!r}, not one of {list(_METHODS[found])}")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{str(path)!r} is a version {meta.get('version')!r} task-model file; this "
            f"unimerge reads version {VERSION}. Upgrade unimerge or recreate the file."
        )
    try:
        tasks = json.loads(meta.get("tasks", ""))
    except json.JSONDecodeError:
        tasks = None
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise _not_a(path, kind, f"its metadata tasks {meta.get('tasks')!r} is not a JSON list of task names")
    return found, tuple(tasks)


def _entry_names(kind: TaskKind, i: int, name: str) -> tuple[str, ...]:
    return (mask_key(i, name),) if kind == "masks" else (index_key(i, name), value_key(i, name))


def _check_entries(
    path: Path, kind: TaskKind, keys: Iterable[str], names: Sequence[str], n_tasks: int
) -> None:
    """Every task's entries (and a masks file's rescalers) are in the header."""
    have = set(keys)
    need = [RESCALERS] if kind == "masks" else []
    need += [e for name in names for i in range(n_tasks) for e in _entry_names(kind, i, name)]
    missing = [e for e in need if e not in have]
    if missing:
        raise CheckpointError(
            f"Task-model file {str(path)!r} is incomplete: it lacks {missing[:5]}"
            f"{' and more' if len(missing) > 5 else ''}. Recreate it with {_MAKE[kind]}."
        )


def open_task_file(path: str | os.PathLike[str], kind: TaskKind | None = None) -> TaskFile:
    """Open a task-model file and check it from its header (no tensor data read).

    Args:
        path: the file.
        kind: the kind it must be (``"masks"`` or ``"experts"``); None accepts either.

    Raises:
        CheckpointError: missing, not safetensors, another kind or format, or incomplete.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(
            f"{_WHAT[kind].capitalize()} {str(p)!r} does not exist; create it with {_MAKE[kind]}."
        )
    try:
        handle: _SafeHandle = safe_open(str(p), framework="pt")
    except Exception as err:  # safetensors raises several types for corrupt headers
        raise _not_a(p, kind, f"it is not a readable safetensors file ({err})") from None
    meta = dict(handle.metadata() or {})
    found, tasks = _checked_meta(p, kind, meta)
    keys: list[str] = list(handle.keys())
    names = [k[len(_VECTOR) :] for k in keys if k.startswith(_VECTOR)]
    _check_entries(p, found, keys, names, len(tasks))
    shapes = {n: torch.Size(handle.get_slice(vector_key(n)).get_shape()) for n in names}
    return TaskFile(p, found, meta["method"], tasks, meta, shapes, handle)
