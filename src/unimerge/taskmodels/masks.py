"""Task-specific models rebuilt from one shared vector and compact per-task masks.

Two methods keep a single model-sized vector plus one bit per parameter and task:

- **EMR-Merging** (Huang et al., NeurIPS 2024, https://arxiv.org/abs/2405.17461): the unified vector
  ``tau_uni``, masks ``M_t = 1[tau_t * tau_uni > 0]`` and rescalers ``lambda_t``;
  ``W_t = W_base + lambda_t * M_t * tau_uni``.
- **TALL masks** (Wang et al., ICML 2024, https://arxiv.org/abs/2405.07813): the task-arithmetic vector
  ``tau_MTL = sum_t tau_t``, masks ``m_t = 1[|tau_t| > |tau_MTL - tau_t| * lambda_t]``;
  ``W_t = W_base + m_t * tau_MTL`` (rescalers are 1).

They are stored in a task mask file (format ``unimerge.taskmasks``, see
:mod:`unimerge.taskmodels.fileformat`). :func:`load_task_model` reads only the chosen task's masks.
``state_is="merged"`` accepts the merged model ``W_base + tau`` (``emr`` at ``lambda=1``; task
arithmetic with ``lambda=1`` for TALL) instead of the base.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor

from unimerge.errors import ConfigError
from unimerge.methods.emr import emr_elect, emr_rescalers
from unimerge.methods.masks import tall_masks
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
    RESCALERS,
    TaskFile,
    mask_key,
    open_task_file,
    pack_bits,
    task_index,
    task_metadata,
    vector_key,
    write_task_file,
)

__all__ = [
    "MaskMethod",
    "MaskedTask",
    "TaskMasks",
    "compute_task_masks",
    "load_task_masks",
    "load_task_model",
    "masked_task",
    "rebuild_masked",
    "save_task_masks",
    "task_state_dict",
]

MaskMethod = Literal["emr", "tall"]


def rebuild_masked(w: Tensor, v: Tensor, mask: Tensor, r: float, state_is: StateKind = "base") -> Tensor:
    """``base + r * mask * v`` in float32 (float64 kept), where ``base = w`` or ``w - v``; ``w``'s dtype."""
    cdtype = compute_dtype(w.dtype)
    wc, vc = w.to(cdtype), v.to(device=w.device, dtype=cdtype)
    b = wc - vc if state_is == "merged" else wc
    return (b + r * mask.to(w.device) * vc).to(w.dtype)


@dataclass(frozen=True)
class MaskedTask:
    """One task of a mask file (or of a :class:`TaskMasks`), rebuilt one tensor at a time.

    Attributes:
        shapes: covered tensor name -> shape.
        rescaler: the task's ``lambda_t``.
        vector: tensor name -> the shared vector ``(*shape)``.
        mask: tensor name -> the task's boolean mask ``(*shape)``.
    """

    shapes: Mapping[str, torch.Size]
    rescaler: float
    vector: Callable[[str], Tensor]
    mask: Callable[[str], Tensor]

    def apply(self, key: str, w: Tensor, state_is: StateKind = "base") -> Tensor:
        """``W_t = W_base + lambda_t * M_t * vector`` for tensor ``key`` from ``w`` (base or merged)."""
        return rebuild_masked(w, self.vector(key), self.mask(key), self.rescaler, state_is)


def masked_task(tf: TaskFile, i: int) -> MaskedTask:
    """Task ``i`` of an opened mask file; each tensor's vector and mask are read when applied."""
    return MaskedTask(tf.shapes, float(tf.rescalers()[i]), tf.vector, functools.partial(tf.mask, i))


@dataclass(frozen=True)
class TaskMasks:
    """A shared vector, per-task boolean masks and per-task rescalers.

    Attributes:
        method: ``"emr"`` or ``"tall"``.
        tasks: task names, in mask order.
        vector: tensor name -> shared vector ``(*shape)``.
        masks: tensor name -> boolean masks ``(n_tasks, *shape)``.
        rescalers: ``(n_tasks,)`` float32.
    """

    method: MaskMethod
    tasks: tuple[str, ...]
    vector: dict[str, Tensor]
    masks: dict[str, Tensor]
    rescalers: Tensor

    def index(self, task: str | int) -> int:
        """Position of ``task`` (a name or an index); unknown tasks raise :class:`ConfigError`."""
        return task_index(self.tasks, task)

    def task_delta(self, task: str | int) -> dict[str, Tensor]:
        """Task ``t``'s rebuilt task vector ``lambda_t * M_t * vector`` per tensor."""
        i = self.index(task)
        r = float(self.rescalers[i])
        return {name: r * self.masks[name][i] * v for name, v in self.vector.items()}

    def view(self, task: str | int) -> MaskedTask:
        """Task ``task`` as a :class:`MaskedTask`."""
        i = self.index(task)
        shapes = {k: v.shape for k, v in self.vector.items()}
        return MaskedTask(
            shapes, float(self.rescalers[i]), self.vector.__getitem__, lambda k: self.masks[k][i]
        )


def _lambdas(tall_lambda: float | Sequence[float], n: int) -> list[float]:
    lam = [float(tall_lambda)] * n if isinstance(tall_lambda, (int, float)) else list(tall_lambda)
    if len(lam) != n:
        raise ConfigError(f"tall_lambda has {len(lam)} values for {n} experts; give one or one per expert.")
    return lam


def compute_task_masks(
    experts: ExpertStates,
    base: Mapping[str, Tensor],
    *,
    method: MaskMethod = "emr",
    tall_lambda: float | Sequence[float] = 0.4,
) -> TaskMasks:
    """Compute EMR or TALL task masks from expert state dicts and their common base.

    Args:
        experts: task name -> state dict (or a list, named ``model_0``, ``model_1``, ...).
        base: the pretrained state dict; its floating-point tensors are covered.
        method: ``"emr"`` (unified vector, masks, rescalers) or ``"tall"`` (task-arithmetic sum, masks).
        tall_lambda: TALL's ``lambda`` (one value, or one per task; the paper picks it per task from
            0.2-0.6 on validation data). Ignored for EMR.

    Returns:
        The :class:`TaskMasks`, vectors in float32 (float64 for a float64 base).
    """
    names, sds = named_experts(experts)
    if not sds:
        raise ConfigError("compute_task_masks needs at least one expert state dict.")
    if method not in ("emr", "tall"):
        raise ConfigError(f"Unknown mask method {method!r}; use 'emr' or 'tall'.")
    lam = _lambdas(tall_lambda, len(sds))
    vector: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    stats: list[tuple[Tensor, Tensor, Tensor]] = []
    for key, x in stacked_deltas(names, sds, base):  # x: (n, *shape)
        if method == "emr":
            vector[key], masks[key] = emr_elect(x)
            stats.append((x, vector[key], masks[key]))
        else:
            vector[key] = x.sum(dim=0)
            masks[key] = tall_masks(x, vector[key], torch.tensor(lam, dtype=x.dtype))
    n = len(sds)
    rescalers = emr_rescalers(stats, n) if method == "emr" else torch.ones(n)
    return TaskMasks(method, tuple(names), vector, masks, rescalers)


def save_task_masks(
    path: str | os.PathLike[str], masks: TaskMasks, *, vector_dtype: torch.dtype | None = None
) -> int:
    """Write ``masks`` to a task mask file (all at once, deterministic bytes); returns its size in bytes.

    Args:
        path: output file.
        masks: from :func:`compute_task_masks`.
        vector_dtype: store the shared vector in this dtype (default: as computed, float32).
    """
    tensors: dict[str, Tensor] = {RESCALERS: masks.rescalers.float().contiguous()}
    for key, v in masks.vector.items():
        tensors[vector_key(key)] = v.to(vector_dtype or v.dtype).contiguous()
        for i in range(len(masks.tasks)):
            tensors[mask_key(i, key)] = pack_bits(masks.masks[key][i])
    return write_task_file(path, tensors, task_metadata("masks", masks.method, masks.tasks))


def load_task_masks(path: str | os.PathLike[str]) -> TaskMasks:
    """Read a whole task mask file (all tasks) back into a :class:`TaskMasks`."""
    tf = open_task_file(path, "masks")
    vector = {key: tf.vector(key) for key in tf.shapes}
    masks = {key: torch.stack([tf.mask(i, key) for i in range(len(tf.tasks))]) for key in tf.shapes}
    return TaskMasks(cast(MaskMethod, tf.method), tf.tasks, vector, masks, tf.rescalers())


def load_task_model(
    state: Mapping[str, Tensor],
    masks_file: str | os.PathLike[str],
    task: str | int,
    *,
    state_is: StateKind = "base",
) -> dict[str, Tensor]:
    """Rebuild task ``task``'s model from the base (or merged) state dict and a task mask file.

    Only that task's masks are read. Tensors the file does not cover are returned unchanged.

    Args:
        state: the base state dict, or the merged one (``base + vector``) with ``state_is="merged"``.
        masks_file: written by :func:`save_task_masks`.
        task: a task name or index.
        state_is: ``"base"`` or ``"merged"``.

    Returns:
        ``W_t = W_base + lambda_t * M_t * vector`` per tensor, in ``state``'s dtypes.
    """
    check_state_kind(state_is)
    tf = open_task_file(masks_file, "masks")
    return rebuild_state(state, masked_task(tf, tf.index(task)), str(masks_file), state_is)


def task_state_dict(
    state: Mapping[str, Tensor], masks: TaskMasks, task: str | int, *, state_is: StateKind = "base"
) -> dict[str, Tensor]:
    """In-memory counterpart of :func:`load_task_model` for a :class:`TaskMasks`."""
    return rebuild_state(state, masks.view(task), "the task masks", state_is)
