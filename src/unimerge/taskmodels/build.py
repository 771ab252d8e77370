"""Task models from a merge config, and one task's model rebuilt as a Hugging Face folder.

:func:`build_task_models` reads the base and expert models of a merge config (tensor by tensor) and
writes a task mask file (EMR, TALL) or a task expert file (FREE-Merging, whose backbone parameters come
from the config's ``fr_merging`` settings). :func:`rebuild_task` streams the base model tensor by
tensor, applies one task's entries and writes the task's model; peak memory is about one tensor.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast, get_args

from torch import Tensor

from unimerge.config import MergeConfig, load_config
from unimerge.errors import ConfigError
from unimerge.io import Checkpoint, OutTensor, ShardedWriter, copy_model_files, open_checkpoint, resolve_ref
from unimerge.methods.frequency import FrParams
from unimerge.taskmodels.common import TaskView, check_covers
from unimerge.taskmodels.experts import compute_task_experts, expert_task, save_task_experts
from unimerge.taskmodels.fileformat import open_task_file
from unimerge.taskmodels.masks import compute_task_masks, masked_task, save_task_masks

__all__ = [
    "TASK_MODEL_KINDS",
    "BuiltTaskModels",
    "CheckpointState",
    "TaskModelKind",
    "build_task_models",
    "check_kind",
    "fr_settings",
    "open_task",
    "rebuild_task",
    "task_names",
]

TaskModelKind = Literal["emr", "tall", "free_merging"]
TASK_MODEL_KINDS: tuple[TaskModelKind, ...] = get_args(TaskModelKind)


@dataclass(frozen=True)
class BuiltTaskModels:
    """What :func:`build_task_models` wrote.

    Attributes:
        path: the task-model file.
        kind: ``"emr"``, ``"tall"`` or ``"free_merging"``.
        tasks: task names, in file order.
        size: the file's size in bytes.
    """

    path: Path
    kind: TaskModelKind
    tasks: tuple[str, ...]
    size: int


class CheckpointState(Mapping[str, Tensor]):
    """A checkpoint as a read-on-access state dict: each lookup reads one tensor (headers otherwise)."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self._ck = checkpoint

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._ck.tensors():
            raise KeyError(name)
        return self._ck.read(name)

    def __contains__(self, name: object) -> bool:
        return name in self._ck.tensors()

    def __iter__(self) -> Iterator[str]:
        return iter(self._ck.tensors())

    def __len__(self) -> int:
        return len(self._ck.tensors())


def check_kind(kind: str) -> TaskModelKind:
    """``kind`` as a :data:`TaskModelKind`; anything else raises :class:`ConfigError`."""
    if kind not in TASK_MODEL_KINDS:
        raise ConfigError(f"Unknown task-model kind {kind!r}; use one of {list(TASK_MODEL_KINDS)}.")
    return kind


def task_names(refs: list[str]) -> list[str]:
    """Each model's task name: its folder's name, else (when those repeat, as in ``a/encoder`` and
    ``b/encoder``) its parent's, else the folder's name numbered. An adapter is named by the adapter."""
    paths = [Path(r.split("+")[-1]) for r in refs]
    for names in ([p.name for p in paths], [p.parent.name for p in paths]):
        if all(names) and len(set(names)) == len(names):
            return names
    names = [p.name or f"model_{i}" for i, p in enumerate(paths)]
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def _plain(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fr_settings(
    cfg: MergeConfig, refs: list[str], path: str | os.PathLike[str]
) -> tuple[float, float, list[float]]:
    """FR-Merging's ``cutoff``, ``lambda`` and per-model weights (in ``refs`` order) from a config."""
    if cfg.merge_method != "fr_merging":
        raise ConfigError(
            f"{path}: --kind free_merging builds its backbone with FR-Merging; set `merge_method: fr_merging` "
            f"(not {cfg.merge_method!r}) and its `parameters:` (cutoff, lambda)."
        )
    if not all(_plain(v) for v in cfg.parameters.values()):
        raise ConfigError(f"{path}: --kind free_merging takes plain cutoff/lambda values (no gradients).")
    params = FrParams.model_validate(cfg.parameters)
    weights: dict[str, float] = {}
    for spec in cfg.merged_specs():
        w = spec.parameters.get("weight", 1.0)
        if not _plain(w):
            raise ConfigError(
                f"{path}: model {spec.model!r}: --kind free_merging takes a plain `weight` value."
            )
        weights[spec.model] = float(w)
    return params.cutoff, params.lambda_, [weights.get(r, 1.0) for r in refs]


def build_task_models(
    config_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    kind: str = "emr",
    *,
    tall_lambda: float = 0.4,
    density: float = 0.01,
    allow_pickle: bool = False,
) -> BuiltTaskModels:
    """Compute per-task masks (EMR, TALL) or experts (FREE-Merging) for a merge config's experts.

    Args:
        config_path: merge config naming ``base_model`` and the experts (``fr_merging`` for FREE-Merging).
        output: the task-model file to write (``.safetensors``), all at once.
        kind: ``"emr"``, ``"tall"`` or ``"free_merging"``.
        tall_lambda: TALL's ``lambda``.
        density: FREE-Merging: the fraction of entries per expert, in (0, 1).
        allow_pickle: read ``.bin`` checkpoints too.

    Returns:
        The file written, its kind, task names (from the folders that tell the models apart) and size.
    """
    checked = check_kind(kind)
    cfg = load_config(Path(config_path))
    if cfg.base_model is None:
        raise ConfigError(f"{config_path}: per-task masks need `base_model:`.")
    refs = [r for r in cfg.expert_refs() if r != cfg.base_model]
    fr = fr_settings(cfg, refs, config_path) if checked == "free_merging" else None
    cdir = Path(config_path).resolve().parent
    names = task_names(refs)
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(
            open_checkpoint(resolve_ref(cfg.base_model, cdir), allow_pickle=allow_pickle)
        )
        experts = [
            stack.enter_context(open_checkpoint(resolve_ref(r, cdir), allow_pickle=allow_pickle))
            for r in refs
        ]
        states = {n: CheckpointState(e) for n, e in zip(names, experts, strict=True)}
        if fr is not None:
            cutoff, lam, weights = fr
            te = compute_task_experts(
                states, CheckpointState(base), cutoff=cutoff, lambda_=lam, density=density, weights=weights
            )
            size = save_task_experts(output, te)
        else:
            method = cast(Literal["emr", "tall"], checked)
            tm = compute_task_masks(states, CheckpointState(base), method=method, tall_lambda=tall_lambda)
            size = save_task_masks(output, tm)
    return BuiltTaskModels(Path(output), checked, tuple(names), size)


def open_task(path: str | os.PathLike[str], task: str | int) -> TaskView:
    """Task ``task`` (a name, an index, or an index written as digits) of a mask or expert file."""
    tf = open_task_file(path)
    if isinstance(task, str) and task not in tf.tasks and task.isdigit():
        task = int(task)
    i = tf.index(task)
    return masked_task(tf, i) if tf.kind == "masks" else expert_task(tf, i)


def rebuild_task(
    file: str | os.PathLike[str],
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    task: str | int,
    *,
    force: bool = False,
) -> int:
    """Write task ``task``'s model (base plus its masks or expert) as a Hugging Face folder.

    The base is streamed: shapes are checked from the headers, then each tensor is read, rebuilt from
    that tensor's entries in ``file`` and written before the next is read. The folder appears all at
    once (with the base's config and tokenizer files); its safetensors metadata records the task.

    Args:
        file: a mask or expert file from :func:`build_task_models`.
        base_dir: the base model the file was computed against.
        out_dir: the folder to write.
        task: a task name or index.
        force: replace an existing ``out_dir``.

    Returns:
        The number of tensors written.
    """
    view = open_task(file, task)
    with open_checkpoint(Path(base_dir)) as base:
        metas = base.tensors()
        check_covers(metas, view.shapes, str(file))
        plan = [OutTensor(name, meta.shape, meta.dtype) for name, meta in metas.items()]
        recorded = {"unimerge_task": str(task)}
        with ShardedWriter(Path(out_dir), plan, force=force, metadata=recorded) as writer:
            for name in metas:
                w = base.read(name)
                writer.write(name, view.apply(name, w) if name in view.shapes else w)
            copy_model_files(base.root, writer)
            writer.commit()
    return len(plan)
