"""FREE-Merging's task-specific models: the FR-Merging backbone plus one sparse expert per task.

Zheng & Wang, ICCV 2025, https://arxiv.org/abs/2411.16815 (formulas and the ambiguities resolved in
:mod:`unimerge.methods.frequency`). Task ``t`` is rebuilt as ``W_t = W_base + tau_FR + e_t``, where
``tau_FR`` is ``fr_merging``'s merged task vector and ``e_t = mu_t * M(tau_t, d)`` keeps the top ``d``
fraction of task ``t``'s vector per tensor, rescaled. The paper picks the expert with a trained router;
here the task is named (``unimerge task --task NAME``), as for EMR's masks (:mod:`unimerge.taskmasks`).

File format (one safetensors file, metadata ``format = "unimerge.taskexperts"``)::

    vector::{tensor}        the FR-Merging task vector tau_FR, (*shape), float
    index::{i}::{tensor}    task i's expert: flat indices (k,), int32 (int64 past 2**31 entries)
    value::{i}::{tensor}    task i's expert values mu_i * tau_i[index], (k,), float32
    metadata                format, version, method ("free_merging"), tasks (JSON), params (JSON)

With ``d = 0.01`` each task adds about 8% of the model's float32 bytes (1% of entries, 8 bytes each).
:func:`load_expert_model` reads only the chosen task's experts. ``state_is="merged"`` takes the FR-merged
model ``W_base + tau_FR`` (the output of ``unimerge merge`` with ``fr_merging``) instead of the base.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from unimerge.errors import CheckpointError, ConfigError
from unimerge.methods.frequency import FrParams, fr_merging, free_experts
from unimerge.taskmasks import (
    StateKind,
    _check,
    _named,
    _stacked_deltas,
    _task_index,
    _vector_names,
    save_tensors_atomic,
)

__all__ = [
    "TaskExperts",
    "compute_task_experts",
    "is_task_experts_file",
    "load_expert_model",
    "load_task_experts",
    "save_task_experts",
    "task_experts_state_dict",
]

_FORMAT = "unimerge.taskexperts"
_VERSION = "1"


@dataclass(frozen=True)
class TaskExperts:
    """The FR-Merging vector and each task's sparse expert.

    Attributes:
        tasks: task names, in expert order.
        vector: tensor name -> ``tau_FR`` ``(*shape)``.
        experts: tensor name -> per task ``(flat indices (k,), values (k,))``.
        params: the parameters used (``cutoff``, ``lambda``, ``density``, ``weights``).
    """

    tasks: tuple[str, ...]
    vector: dict[str, Tensor]
    experts: dict[str, list[tuple[Tensor, Tensor]]]
    params: dict[str, Any]

    def index(self, task: str | int) -> int:
        """Position of ``task`` (a name or an index); unknown tasks raise :class:`ConfigError`."""
        return _task_index(self.tasks, task)

    def task_delta(self, task: str | int) -> dict[str, Tensor]:
        """Task ``t``'s rebuilt task vector ``tau_FR + e_t`` per tensor."""
        i = self.index(task)
        return {name: _add_expert(v.clone(), *self.experts[name][i]) for name, v in self.vector.items()}

    def num_expert_entries(self) -> int:
        """Stored expert entries over all tasks and tensors."""
        return sum(int(idx.numel()) for per_task in self.experts.values() for idx, _ in per_task)


def compute_task_experts(
    experts: Mapping[str, Mapping[str, Tensor]] | Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor],
    *,
    cutoff: float = 0.1,
    lambda_: float = 1.0,
    density: float = 0.01,
    weights: Sequence[float] | None = None,
) -> TaskExperts:
    """FREE-Merging from expert state dicts and their common base: FR-Merging vector plus experts.

    Args:
        experts: task name -> state dict (or a list, named ``model_0``, ``model_1``, ...).
        base: the pretrained state dict; its floating-point tensors are covered.
        cutoff: FR-Merging's high-pass cut-off (``fr_merging``'s ``cutoff``).
        lambda_: FR-Merging's scaling (``fr_merging``'s ``lambda``).
        density: the fraction ``d`` of each task vector's entries (per tensor) kept in its expert, in (0, 1).
        weights: per-model weights of the backbone (default 1 each), as ``fr_merging``'s ``weight``.

    Returns:
        The :class:`TaskExperts`, vector in float32 (float64 for a float64 base).
    """
    names, sds = _named(experts)
    if not sds:
        raise ConfigError("compute_task_experts needs at least one expert state dict.")
    if not 0.0 < density < 1.0:
        raise ConfigError(f"density must be in (0, 1) (the fraction of entries per expert), not {density}.")
    w = [1.0] * len(sds) if weights is None else [float(v) for v in weights]
    if len(w) != len(sds):
        raise ConfigError(f"weights has {len(w)} values for {len(sds)} experts; give one per expert.")
    try:
        params = FrParams.model_validate({"cutoff": cutoff, "lambda": lambda_})
    except ValueError as err:
        raise ConfigError(f"Invalid FR-Merging parameters: {err}") from None
    per_model = {"weight": torch.tensor(w)}
    vector: dict[str, Tensor] = {}
    sparse: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for key, x in _stacked_deltas(names, sds, base):
        sparse[key] = free_experts(x, density)  # before fr_merging, which may overwrite x
        vector[key] = fr_merging(x, params, per_model, base=None, generator=None)
    info = {"cutoff": cutoff, "lambda": lambda_, "density": density, "weights": w}
    return TaskExperts(tuple(names), vector, sparse, info)


def _add_expert(out: Tensor, idx: Tensor, val: Tensor) -> Tensor:
    """``out`` with ``val`` added at flat ``idx`` (in place, returned)."""
    if idx.numel():
        out.view(-1).index_add_(0, idx.to(out.device, torch.int64), val.to(out.device, out.dtype))
    return out


def save_task_experts(
    path: str | os.PathLike, te: TaskExperts, *, vector_dtype: torch.dtype | None = None
) -> int:
    """Write ``te`` to a safetensors file (atomically) and return its size in bytes.

    Args:
        path: output file.
        te: from :func:`compute_task_experts`.
        vector_dtype: store ``tau_FR`` in this dtype (default: as computed).
    """
    tensors: dict[str, Tensor] = {}
    for key, v in te.vector.items():
        tensors[f"vector::{key}"] = v.to(vector_dtype or v.dtype).contiguous()
        itype = torch.int32 if v.numel() < 2**31 else torch.int64
        for i, (idx, val) in enumerate(te.experts[key]):
            tensors[f"index::{i}::{key}"] = idx.to(itype).contiguous()
            tensors[f"value::{i}::{key}"] = val.float().contiguous()
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "method": "free_merging",
        "tasks": json.dumps(list(te.tasks)),
        "params": json.dumps(te.params),
    }
    return save_tensors_atomic(path, tensors, meta)


def _metadata(path: str | os.PathLike) -> dict[str, str] | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception:  # not a safetensors file at all
        return None


def is_task_experts_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file written by :func:`save_task_experts`."""
    meta = _metadata(path) if Path(path).is_file() else None
    return meta is not None and meta.get("format") == _FORMAT


def _open(path: str | os.PathLike):
    if not Path(path).is_file():
        raise CheckpointError(
            f"Task expert file {str(path)!r} does not exist; create it with `unimerge masks --kind free_merging`."
        )
    if not is_task_experts_file(path):
        raise CheckpointError(f"{str(path)!r} is not a unimerge task expert file (FREE-Merging).")
    handle = safe_open(str(path), framework="pt")
    return handle, handle.metadata()


def load_task_experts(path: str | os.PathLike) -> TaskExperts:
    """Read a whole task expert file (all tasks) back into a :class:`TaskExperts`."""
    handle, meta = _open(path)
    tasks = tuple(json.loads(meta["tasks"]))
    vector: dict[str, Tensor] = {}
    sparse: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for key in _vector_names(handle):
        vector[key] = handle.get_tensor(f"vector::{key}")
        sparse[key] = [
            (handle.get_tensor(f"index::{i}::{key}").long(), handle.get_tensor(f"value::{i}::{key}"))
            for i in range(len(tasks))
        ]
    return TaskExperts(tasks, vector, sparse, json.loads(meta.get("params", "{}")))


def _rebuild(w: Tensor, v: Tensor, idx: Tensor, val: Tensor, state_is: StateKind) -> Tensor:
    """``base + v + expert`` in float32 (float64 kept), where ``base = w`` or ``w - v``."""
    cdtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    out = w.to(cdtype) if state_is == "merged" else w.to(cdtype) + v.to(w.device, cdtype)
    return _add_expert(out.clone() if out is w else out, idx, val).to(w.dtype)


def _state_kind(state_is: str) -> None:
    if state_is not in ("base", "merged"):
        raise ConfigError(f"state_is must be 'base' or 'merged', not {state_is!r}.")


def load_expert_model(
    state: Mapping[str, Tensor],
    experts_file: str | os.PathLike,
    task: str | int,
    *,
    state_is: StateKind = "base",
) -> dict[str, Tensor]:
    """Rebuild task ``task``'s model from the base (or FR-merged) state dict and a task expert file.

    Only that task's experts are read (and ``tau_FR`` when ``state_is="base"``). Tensors the file does
    not cover are returned unchanged.

    Args:
        state: the base state dict, or the FR-merged one (``base + tau_FR``) with ``state_is="merged"``.
        experts_file: written by :func:`save_task_experts`.
        task: a task name or index.
        state_is: ``"base"`` or ``"merged"``.

    Returns:
        ``W_t = W_base + tau_FR + e_t`` per tensor, in ``state``'s dtypes.
    """
    _state_kind(state_is)
    handle, meta = _open(experts_file)
    i = _task_index(json.loads(meta["tasks"]), task)
    out = dict(state)
    for key in _vector_names(handle):
        shape = torch.Size(handle.get_slice(f"vector::{key}").get_shape())
        _check(state, key, shape, str(experts_file))
        v = handle.get_tensor(f"vector::{key}") if state_is == "base" else torch.zeros(())
        idx = handle.get_tensor(f"index::{i}::{key}").long()
        out[key] = _rebuild(state[key], v, idx, handle.get_tensor(f"value::{i}::{key}"), state_is)
    return out


def task_experts_state_dict(
    state: Mapping[str, Tensor], te: TaskExperts, task: str | int, *, state_is: StateKind = "base"
) -> dict[str, Tensor]:
    """In-memory counterpart of :func:`load_expert_model` for a :class:`TaskExperts`."""
    _state_kind(state_is)
    i = te.index(task)
    out = dict(state)
    for key, v in te.vector.items():
        _check(state, key, v.shape, "the task experts")
        out[key] = _rebuild(state[key], v, *te.experts[key][i], state_is)
    return out
