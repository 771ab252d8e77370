"""Task-specific models rebuilt from one shared vector and compact per-task masks.

Two methods keep a single model-sized vector plus one bit per parameter and task:

- **EMR-Merging** (Huang et al., NeurIPS 2024, https://arxiv.org/abs/2405.17461): the unified vector
  ``tau_uni``, masks ``M_t = 1[tau_t * tau_uni > 0]`` and rescalers ``lambda_t``;
  ``W_t = W_base + lambda_t * M_t * tau_uni``.
- **TALL masks** (Wang et al., ICML 2024, https://arxiv.org/abs/2405.07813): the task-arithmetic vector
  ``tau_MTL = sum_t tau_t``, masks ``m_t = 1[|tau_t| > |tau_MTL - tau_t| * lambda_t]``;
  ``W_t = W_base + m_t * tau_MTL`` (rescalers are 1).

File format (one safetensors file, metadata ``format = "unimerge.taskmasks"``)::

    vector::{tensor}       the shared vector, (*shape), float
    mask::{i}::{tensor}    task i's mask, flattened and bit-packed with numpy.packbits, uint8 (ceil(numel/8),)
    rescalers              (n_tasks,) float32
    metadata               format, version, method, tasks (JSON list of task names)

:func:`load_task_model` reads only the chosen task's masks. ``state_is="merged"`` accepts the merged
model ``W_base + tau`` (``emr`` at ``lambda=1``; task arithmetic with ``lambda=1`` for TALL) instead of
the base.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from unimerge.errors import CheckpointError, ConfigError, PlanError
from unimerge.methods.emr import emr_elect, emr_rescalers
from unimerge.methods.masks import tall_masks

__all__ = [
    "TaskMasks",
    "compute_task_masks",
    "load_task_masks",
    "load_task_model",
    "save_task_masks",
    "save_tensors_atomic",
    "task_state_dict",
]

MaskMethod = Literal["emr", "tall"]
StateKind = Literal["base", "merged"]
_FORMAT = "unimerge.taskmasks"
_VERSION = "1"


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
        return _task_index(self.tasks, task)

    def task_delta(self, task: str | int) -> dict[str, Tensor]:
        """Task ``t``'s rebuilt task vector ``lambda_t * M_t * vector`` per tensor."""
        i = self.index(task)
        r = float(self.rescalers[i])
        return {name: r * self.masks[name][i] * v for name, v in self.vector.items()}


def _task_index(tasks: Sequence[str], task: str | int) -> int:
    if isinstance(task, int) and not isinstance(task, bool) and 0 <= task < len(tasks):
        return task
    if isinstance(task, str) and task in tasks:
        return list(tasks).index(task)
    raise ConfigError(f"Unknown task {task!r}; the mask file holds tasks {list(tasks)} (name or index).")


def _named(experts: Mapping[str, Mapping[str, Tensor]] | Sequence[Mapping[str, Tensor]]):
    if isinstance(experts, Mapping):
        return [str(k) for k in experts], list(experts.values())
    return [f"model_{i}" for i in range(len(experts))], list(experts)


def _stacked_deltas(
    names: Sequence[str], experts: Sequence[Mapping[str, Tensor]], base: Mapping[str, Tensor]
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(tensor name, task vectors (n, *shape))`` for every floating-point base tensor."""
    for key, b in base.items():
        if not b.is_floating_point():
            continue
        rows = []
        for task, sd in zip(names, experts, strict=True):
            if key not in sd:
                raise PlanError(
                    f"Expert {task!r} has no tensor {key!r} that the base has; merge experts "
                    "fine-tuned from the same base model."
                )
            if sd[key].shape != b.shape:
                raise PlanError(
                    f"Tensor {key!r}: expert {task!r} has shape {tuple(sd[key].shape)}, the base "
                    f"{tuple(b.shape)}."
                )
            rows.append(sd[key])
        cdtype = torch.float64 if b.dtype == torch.float64 else torch.float32
        yield key, torch.stack([t.to(cdtype) for t in rows]) - b.to(cdtype)


def compute_task_masks(
    experts: Mapping[str, Mapping[str, Tensor]] | Sequence[Mapping[str, Tensor]],
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
    names, sds = _named(experts)
    if not sds:
        raise ConfigError("compute_task_masks needs at least one expert state dict.")
    if method not in ("emr", "tall"):
        raise ConfigError(f"Unknown mask method {method!r}; use 'emr' or 'tall'.")
    lam = [float(tall_lambda)] * len(sds) if isinstance(tall_lambda, (int, float)) else list(tall_lambda)
    if len(lam) != len(sds):
        raise ConfigError(
            f"tall_lambda has {len(lam)} values for {len(sds)} experts; give one or one per expert."
        )
    vector: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    stats: list[tuple[Tensor, Tensor, Tensor]] = []
    for key, x in _stacked_deltas(names, sds, base):
        if method == "emr":
            vector[key], masks[key] = emr_elect(x)
            stats.append((x, vector[key], masks[key]))
        else:
            vector[key] = x.sum(dim=0)
            masks[key] = tall_masks(x, vector[key], torch.tensor(lam, dtype=x.dtype))
    n = len(sds)
    rescalers = emr_rescalers(stats, n) if method == "emr" else torch.ones(n)
    return TaskMasks(method, tuple(names), vector, masks, rescalers)


def _pack(mask: Tensor) -> Tensor:
    """Boolean ``(*shape)`` -> bit-packed uint8 ``(ceil(numel / 8),)``."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy()))


def _unpack(packed: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`_pack`."""
    n = int(np.prod(shape, dtype=np.int64))
    bits = np.unpackbits(packed.numpy(), count=n).astype(bool)
    return torch.from_numpy(bits).reshape(shape)


def save_task_masks(
    path: str | os.PathLike, masks: TaskMasks, *, vector_dtype: torch.dtype | None = None
) -> int:
    """Write ``masks`` to a safetensors file (atomically) and return its size in bytes.

    Args:
        path: output file.
        masks: from :func:`compute_task_masks`.
        vector_dtype: store the shared vector in this dtype (default: as computed, float32).
    """
    tensors: dict[str, Tensor] = {"rescalers": masks.rescalers.float().contiguous()}
    for key, v in masks.vector.items():
        tensors[f"vector::{key}"] = v.to(vector_dtype or v.dtype).contiguous()
        for i in range(len(masks.tasks)):
            tensors[f"mask::{i}::{key}"] = _pack(masks.masks[key][i])
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "method": masks.method,
        "tasks": json.dumps(list(masks.tasks)),
    }
    return save_tensors_atomic(path, tensors, meta)


def save_tensors_atomic(path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> int:
    """Write a safetensors file through a temporary sibling renamed into place; returns its size."""
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    save_file(dict(tensors), str(tmp), metadata=dict(metadata))
    os.replace(tmp, out)
    return out.stat().st_size


def _open(path: str | os.PathLike):
    if not Path(path).is_file():
        raise CheckpointError(f"Task mask file {str(path)!r} does not exist; create it with save_task_masks.")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises several types for corrupt headers
        raise CheckpointError(
            f"Task mask file {str(path)!r} is not a readable safetensors file: {err}"
        ) from None
    meta = handle.metadata() or {}
    if meta.get("format") != _FORMAT or meta.get("method") not in ("emr", "tall"):
        raise CheckpointError(
            f"{str(path)!r} is not a unimerge task mask file (metadata format={meta.get('format')!r})."
        )
    return handle, meta


def _vector_names(handle) -> list[str]:
    keys: list[str] = handle.keys()
    return [k[len("vector::") :] for k in keys if k.startswith("vector::")]


def load_task_masks(path: str | os.PathLike) -> TaskMasks:
    """Read a whole task mask file (all tasks) back into a :class:`TaskMasks`."""
    handle, meta = _open(path)
    tasks = tuple(json.loads(meta["tasks"]))
    vector, masks = {}, {}
    for key in _vector_names(handle):
        vector[key] = handle.get_tensor(f"vector::{key}")
        masks[key] = torch.stack(
            [_unpack(handle.get_tensor(f"mask::{i}::{key}"), vector[key].shape) for i in range(len(tasks))]
        )
    return TaskMasks(meta["method"], tasks, vector, masks, handle.get_tensor("rescalers"))


def _rebuild(w: Tensor, v: Tensor, mask: Tensor, r: float, state_is: StateKind) -> Tensor:
    """``base + r * mask * v`` in float32 (float64 kept), where ``base = w`` or ``w - v``."""
    cdtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    wc, vc = w.to(cdtype), v.to(device=w.device, dtype=cdtype)
    b = wc - vc if state_is == "merged" else wc
    return (b + r * mask.to(w.device) * vc).to(w.dtype)


def _check(state: Mapping[str, Tensor], key: str, shape: torch.Size, source: str) -> None:
    if key not in state:
        raise PlanError(
            f"The model has no tensor {key!r} that {source} covers; use the base model the masks "
            "were computed from."
        )
    if state[key].shape != shape:
        raise PlanError(
            f"Tensor {key!r}: the model has shape {tuple(state[key].shape)}, {source} has {tuple(shape)}."
        )


def load_task_model(
    state: Mapping[str, Tensor],
    masks_file: str | os.PathLike,
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
    if state_is not in ("base", "merged"):
        raise ConfigError(f"state_is must be 'base' or 'merged', not {state_is!r}.")
    handle, meta = _open(masks_file)
    i = _task_index(json.loads(meta["tasks"]), task)
    r = float(handle.get_tensor("rescalers")[i])
    out = dict(state)
    for key in _vector_names(handle):
        v = handle.get_tensor(f"vector::{key}")
        _check(state, key, v.shape, str(masks_file))
        mask = _unpack(handle.get_tensor(f"mask::{i}::{key}"), v.shape)
        out[key] = _rebuild(state[key], v, mask, r, state_is)
    return out


def task_state_dict(
    state: Mapping[str, Tensor], masks: TaskMasks, task: str | int, *, state_is: StateKind = "base"
) -> dict[str, Tensor]:
    """In-memory counterpart of :func:`load_task_model` for a :class:`TaskMasks`."""
    i = masks.index(task)
    r = float(masks.rescalers[i])
    out = dict(state)
    for key, v in masks.vector.items():
        _check(state, key, v.shape, "the task masks")
        out[key] = _rebuild(state[key], v, masks.masks[key][i], r, state_is)
    return out
