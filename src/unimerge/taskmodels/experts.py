"""FREE-Merging's task-specific models: the FR-Merging backbone plus one sparse expert per task.

Zheng & Wang, ICCV 2025, https://arxiv.org/abs/2411.16815 (formulas and the ambiguities resolved in
:mod:`unimerge.methods.frequency`). Task ``t`` is rebuilt as ``W_t = W_base + tau_FR + e_t``, where
``tau_FR`` is ``fr_merging``'s merged task vector and ``e_t = mu_t * M(tau_t, d)`` keeps the top ``d``
fraction of task ``t``'s vector per tensor, rescaled. The paper picks the expert with a trained router;
here the task is named (``unimerge task --task NAME``), as for EMR's masks (:mod:`unimerge.taskmodels.masks`).

They are stored in a task expert file (format ``unimerge.taskexperts``, see
:mod:`unimerge.taskmodels.fileformat`). With ``d = 0.01`` each task adds about 8% of the model's float32
bytes (1% of entries, 8 bytes each). :func:`load_expert_model` reads only the chosen task's experts.
``state_is="merged"`` takes the FR-merged model ``W_base + tau_FR`` (the output of ``unimerge merge``
with ``fr_merging``) instead of the base.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from unimerge.errors import ConfigError
from unimerge.methods.frequency import FrParams, fr_merging, free_experts
from unimerge.taskmodels.common import (
    ExpertStates,
    StateKind,
    check_state_kind,
    compute_dtype,
    named_experts,
    rebuild_state,
    stacked_deltas,
)
from unimerge.taskmodels.fileformat import (
    TaskFile,
    index_key,
    open_task_file,
    task_index,
    task_metadata,
    value_key,
    vector_key,
    write_task_file,
)

__all__ = [
    "ExpertTask",
    "TaskExperts",
    "add_expert",
    "compute_task_experts",
    "expert_task",
    "load_expert_model",
    "load_task_experts",
    "rebuild_expert",
    "save_task_experts",
    "task_experts_state_dict",
]


def add_expert(out: Tensor, idx: Tensor, val: Tensor) -> Tensor:
    """``out`` with ``val`` (k,) added at flat ``idx`` (k,) (in place, returned)."""
    if idx.numel():
        out.view(-1).index_add_(0, idx.to(out.device, torch.int64), val.to(out.device, out.dtype))
    return out


def rebuild_expert(w: Tensor, v: Tensor, idx: Tensor, val: Tensor, state_is: StateKind = "base") -> Tensor:
    """``base + v + expert`` in float32 (float64 kept), where ``base = w`` or ``w - v``; ``w``'s dtype."""
    cdtype = compute_dtype(w.dtype)
    out = w.to(cdtype) if state_is == "merged" else w.to(cdtype) + v.to(w.device, cdtype)
    return add_expert(out.clone() if out is w else out, idx, val).to(w.dtype)


@dataclass(frozen=True)
class ExpertTask:
    """One task of an expert file (or of a :class:`TaskExperts`), rebuilt one tensor at a time.

    Attributes:
        shapes: covered tensor name -> shape.
        vector: tensor name -> ``tau_FR`` ``(*shape)`` (not read for a merged state).
        expert: tensor name -> the task's expert ``(flat indices (k,), values (k,))``.
    """

    shapes: Mapping[str, torch.Size]
    vector: Callable[[str], Tensor]
    expert: Callable[[str], tuple[Tensor, Tensor]]

    def apply(self, key: str, w: Tensor, state_is: StateKind = "base") -> Tensor:
        """``W_t = W_base + tau_FR + e_t`` for tensor ``key`` from ``w`` (base or FR-merged)."""
        v = self.vector(key) if state_is == "base" else torch.zeros(())
        return rebuild_expert(w, v, *self.expert(key), state_is)


def expert_task(tf: TaskFile, i: int) -> ExpertTask:
    """Task ``i`` of an opened expert file; each tensor's vector and expert are read when applied."""
    return ExpertTask(tf.shapes, tf.vector, functools.partial(tf.expert, i))


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
        return task_index(self.tasks, task)

    def task_delta(self, task: str | int) -> dict[str, Tensor]:
        """Task ``t``'s rebuilt task vector ``tau_FR + e_t`` per tensor."""
        i = self.index(task)
        return {name: add_expert(v.clone(), *self.experts[name][i]) for name, v in self.vector.items()}

    def num_expert_entries(self) -> int:
        """Stored expert entries over all tasks and tensors."""
        return sum(int(idx.numel()) for per_task in self.experts.values() for idx, _ in per_task)

    def view(self, task: str | int) -> ExpertTask:
        """Task ``task`` as an :class:`ExpertTask`."""
        i = self.index(task)
        shapes = {k: v.shape for k, v in self.vector.items()}
        return ExpertTask(shapes, self.vector.__getitem__, lambda k: self.experts[k][i])


def _fr_params(cutoff: float, lambda_: float) -> FrParams:
    try:
        return FrParams.model_validate({"cutoff": cutoff, "lambda": lambda_})
    except ValueError as err:
        raise ConfigError(f"Invalid FR-Merging parameters: {err}") from None


def compute_task_experts(
    experts: ExpertStates,
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
    names, sds = named_experts(experts)
    if not sds:
        raise ConfigError("compute_task_experts needs at least one expert state dict.")
    if not 0.0 < density < 1.0:
        raise ConfigError(f"density must be in (0, 1) (the fraction of entries per expert), not {density}.")
    w = [1.0] * len(sds) if weights is None else [float(v) for v in weights]
    if len(w) != len(sds):
        raise ConfigError(f"weights has {len(w)} values for {len(sds)} experts; give one per expert.")
    params = _fr_params(cutoff, lambda_)
    per_model = {"weight": torch.tensor(w)}
    vector: dict[str, Tensor] = {}
    sparse: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for key, x in stacked_deltas(names, sds, base):  # x: (n, *shape)
        sparse[key] = free_experts(x, density)  # before fr_merging, which may overwrite x
        vector[key] = fr_merging(x, params, per_model, base=None, generator=None)
    info = {"cutoff": cutoff, "lambda": lambda_, "density": density, "weights": w}
    return TaskExperts(tuple(names), vector, sparse, info)


def save_task_experts(
    path: str | os.PathLike[str], te: TaskExperts, *, vector_dtype: torch.dtype | None = None
) -> int:
    """Write ``te`` to a task expert file (all at once, deterministic bytes); returns its size in bytes.

    Args:
        path: output file.
        te: from :func:`compute_task_experts`.
        vector_dtype: store ``tau_FR`` in this dtype (default: as computed).
    """
    tensors: dict[str, Tensor] = {}
    for key, v in te.vector.items():
        tensors[vector_key(key)] = v.to(vector_dtype or v.dtype).contiguous()
        itype = torch.int32 if v.numel() < 2**31 else torch.int64
        for i, (idx, val) in enumerate(te.experts[key]):
            tensors[index_key(i, key)] = idx.to(itype).contiguous()
            tensors[value_key(i, key)] = val.float().contiguous()
    meta = task_metadata("experts", "free_merging", te.tasks, params=json.dumps(te.params))
    return write_task_file(path, tensors, meta)


def load_task_experts(path: str | os.PathLike[str]) -> TaskExperts:
    """Read a whole task expert file (all tasks) back into a :class:`TaskExperts`."""
    tf = open_task_file(path, "experts")
    vector = {key: tf.vector(key) for key in tf.shapes}
    sparse = {key: [tf.expert(i, key) for i in range(len(tf.tasks))] for key in tf.shapes}
    return TaskExperts(tf.tasks, vector, sparse, json.loads(tf.metadata.get("params", "{}")))


def load_expert_model(
    state: Mapping[str, Tensor],
    experts_file: str | os.PathLike[str],
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
    check_state_kind(state_is)
    tf = open_task_file(experts_file, "experts")
    return rebuild_state(state, expert_task(tf, tf.index(task)), str(experts_file), state_is)


def task_experts_state_dict(
    state: Mapping[str, Tensor], te: TaskExperts, task: str | int, *, state_is: StateKind = "base"
) -> dict[str, Tensor]:
    """In-memory counterpart of :func:`load_expert_model` for a :class:`TaskExperts`."""
    return rebuild_state(state, te.view(task), "the task experts", state_is)
