"""``unimerge masks`` and ``unimerge task``: per-task masks (EMR, TALL) or experts (FREE-Merging).

``unimerge masks CONFIG MASKS.safetensors`` computes EMR's (or TALL's) shared vector, bit-packed
per-task masks and rescalers from the base and expert models of a merge config; with
``--kind free_merging`` (the config's ``merge_method`` must be ``fr_merging``, whose parameters build the
backbone) it computes the FR-Merging vector and one sparse expert per task (``--density``, see
:mod:`unimerge.taskexperts`). ``unimerge task MASKS.safetensors BASE_DIR OUT_DIR --task NAME`` rebuilds
task NAME's model (``W_base + lambda_t * M_t * vector``, or ``W_base + tau_FR + e_t``) as a Hugging Face
folder (written atomically).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["masks", "task"]


class _LazyState(Mapping[str, "Tensor"]):  # torch is imported when a command runs
    """A checkpoint as a read-on-access state dict (tensors are read one at a time)."""

    def __init__(self, ck) -> None:  # noqa: ANN001 - a unimerge.io.checkpoint.Checkpoint
        self._ck = ck

    def __getitem__(self, name: str) -> Tensor:
        return self._ck.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ck.tensors())

    def __len__(self) -> int:
        return len(self._ck.tensors())


def _task_names(refs: list[str]) -> list[str]:
    """Each model's task name: its folder's name, else (when those repeat, as in ``a/encoder`` and
    ``b/encoder``) its parent's, else the folder's name numbered. An adapter is named by the adapter."""
    paths = [Path(r.split("+")[-1]) for r in refs]
    for names in ([p.name for p in paths], [p.parent.name for p in paths]):
        if all(names) and len(set(names)) == len(names):
            return names
    names = [p.name or f"model_{i}" for i, p in enumerate(paths)]
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def _fr_settings(cfg, refs: list[str], path: Path) -> tuple[float, float, list[float]]:  # noqa: ANN001
    """FR-Merging's ``cutoff``, ``lambda`` and per-model weights (in ``refs`` order) from a config."""
    from unimerge.errors import ConfigError
    from unimerge.methods.frequency import FrParams

    if cfg.merge_method != "fr_merging":
        raise ConfigError(
            f"{path}: --kind free_merging builds its backbone with FR-Merging; set `merge_method: fr_merging` "
            f"(not {cfg.merge_method!r}) and its `parameters:` (cutoff, lambda)."
        )
    if any(not isinstance(v, (int, float)) for v in cfg.parameters.values()):
        raise ConfigError(f"{path}: --kind free_merging takes plain cutoff/lambda values (no gradients).")
    params = FrParams.model_validate(cfg.parameters)
    weights: dict[str, float] = {}
    for spec in cfg.merged_specs():
        w = spec.parameters.get("weight", 1.0)
        if not isinstance(w, (int, float)):
            raise ConfigError(f"{path}: model {spec.model!r}: --kind free_merging takes a plain `weight` value.")
        weights[spec.model] = float(w)
    return params.cutoff, params.lambda_, [weights.get(r, 1.0) for r in refs]


def masks(
    config: Annotated[Path, typer.Argument(help="Merge config naming base_model and the experts.")],
    output: Annotated[Path, typer.Argument(help="Mask file to write (.safetensors).")],
    kind: Annotated[str, typer.Option(help="emr, tall or free_merging.")] = "emr",
    tall_lambda: Annotated[float, typer.Option(min=0.0, max=10.0, help="TALL's lambda.")] = 0.4,
    density: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="free_merging: fraction of entries per expert, in (0, 1).")
    ] = 0.01,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle")] = False,
) -> None:
    """Compute per-task masks (EMR or TALL) or experts (FREE-Merging) to rebuild each task's model later."""
    from unimerge.cli.common import guard as _guard
    from unimerge.cli.common import out as _out
    from unimerge.config import load_config
    from unimerge.errors import ConfigError
    from unimerge.io import open_checkpoint
    from unimerge.io import resolve_ref as _resolve_ref
    from unimerge.taskexperts import compute_task_experts, save_task_experts
    from unimerge.taskmasks import compute_task_masks, save_task_masks

    def run() -> tuple[int, list[str]]:
        if kind not in ("emr", "tall", "free_merging"):
            raise ConfigError(f"--kind must be 'emr', 'tall' or 'free_merging', not {kind!r}.")
        cfg = load_config(config)
        if cfg.base_model is None:
            raise ConfigError(f"{config}: per-task masks need `base_model:`.")
        cdir = config.resolve().parent
        refs = [r for r in cfg.expert_refs() if r != cfg.base_model]
        base = open_checkpoint(_resolve_ref(cfg.base_model, cdir), allow_pickle=allow_pickle)
        experts = [open_checkpoint(_resolve_ref(r, cdir), allow_pickle=allow_pickle) for r in refs]
        names = _task_names(refs)
        states = {n: _LazyState(e) for n, e in zip(names, experts, strict=True)}
        if kind == "free_merging":
            cutoff, lam, weights = _fr_settings(cfg, refs, config)
            te = compute_task_experts(states, _LazyState(base), cutoff=cutoff, lambda_=lam, density=density,
                                      weights=weights)
            return save_task_experts(output, te), names
        method: Literal["emr", "tall"] = "emr" if kind == "emr" else "tall"
        tm = compute_task_masks(states, _LazyState(base), method=method, tall_lambda=tall_lambda)
        return save_task_masks(output, tm), names

    size, names = _guard(run)
    _out.print(f"wrote {kind} masks for tasks {names} to {output} ({size / 1e6:.1f} MB)")


def task(
    masks_file: Annotated[Path, typer.Argument(help="Mask (or expert) file from `unimerge masks`.")],
    base_dir: Annotated[Path, typer.Argument(help="The base model folder the masks were computed against.")],
    output_dir: Annotated[Path, typer.Argument(help="Folder for the task-specific model.")],
    task_name: Annotated[str, typer.Option("--task", help="Task name (or index) to rebuild.")],
    force: Annotated[bool, typer.Option("--force")] = False,
) -> None:
    """Rebuild one task's model from the base and a mask file, as a Hugging Face folder."""
    from unimerge.cli.common import guard as _guard
    from unimerge.cli.common import out as _out
    from unimerge.io import open_checkpoint
    from unimerge.io.writer import OutTensor, ShardedWriter, copy_model_files
    from unimerge.taskexperts import is_task_experts_file, load_expert_model
    from unimerge.taskmasks import load_task_model

    def run() -> int:
        base = open_checkpoint(base_dir)
        state = {n: base.read(n) for n in base.tensors()}
        sel: str | int = int(task_name) if task_name.isdigit() else task_name
        load = load_expert_model if is_task_experts_file(masks_file) else load_task_model
        rebuilt = load(state, masks_file, sel)
        outs = [OutTensor(n, tuple(t.shape), t.dtype) for n, t in rebuilt.items()]
        with ShardedWriter(output_dir, outs, force=force, metadata={"unimerge_task": task_name}) as w:
            for n, t in rebuilt.items():
                w.write(n, t.contiguous())
            copy_model_files(base.root, w)
            w.commit()
        return len(outs)

    n = _guard(run)
    _out.print(f"wrote task {task_name!r} ({n} tensors) to {output_dir}")
