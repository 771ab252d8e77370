"""``unimerge masks`` and ``unimerge task``: per-task masks (EMR, TALL) and task-specific models.

``unimerge masks CONFIG MASKS.safetensors`` computes EMR's (or TALL's) shared vector, bit-packed
per-task masks and rescalers from the base and expert models of a merge config;
``unimerge task MASKS.safetensors BASE_DIR OUT_DIR --task NAME`` rebuilds task NAME's model
``W_base + lambda_t * M_t * vector`` as a Hugging Face folder (written atomically).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Literal

import typer
from torch import Tensor

__all__ = ["masks", "task"]


class _LazyState(Mapping[str, Tensor]):
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
    names = [Path(r.split("+")[-1]).name or f"model_{i}" for i, r in enumerate(refs)]
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def masks(
    config: Annotated[Path, typer.Argument(help="Merge config naming base_model and the experts.")],
    output: Annotated[Path, typer.Argument(help="Mask file to write (.safetensors).")],
    kind: Annotated[str, typer.Option(help="emr or tall.")] = "emr",
    tall_lambda: Annotated[float, typer.Option(min=0.0, max=10.0, help="TALL's lambda.")] = 0.4,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle")] = False,
) -> None:
    """Compute per-task masks (EMR or TALL) so each task's model can be rebuilt later."""
    from unimerge.cli import _guard, _out
    from unimerge.config import load_config
    from unimerge.errors import ConfigError
    from unimerge.io.checkpoint import open_checkpoint
    from unimerge.plan import _resolve_ref
    from unimerge.taskmasks import compute_task_masks, save_task_masks

    def run() -> tuple[int, list[str]]:
        if kind not in ("emr", "tall"):
            raise ConfigError(f"--kind must be 'emr' or 'tall', not {kind!r}.")
        cfg = load_config(config)
        if cfg.base_model is None:
            raise ConfigError(f"{config}: per-task masks need `base_model:`.")
        cdir = config.resolve().parent
        refs = [r for r in cfg.expert_refs() if r != cfg.base_model]
        base = open_checkpoint(_resolve_ref(cfg.base_model, cdir), allow_pickle=allow_pickle)
        experts = [open_checkpoint(_resolve_ref(r, cdir), allow_pickle=allow_pickle) for r in refs]
        names = _task_names(refs)
        method: Literal["emr", "tall"] = "emr" if kind == "emr" else "tall"
        tm = compute_task_masks({n: _LazyState(e) for n, e in zip(names, experts, strict=True)},
                                _LazyState(base), method=method, tall_lambda=tall_lambda)
        return save_task_masks(output, tm), names

    size, names = _guard(run)
    _out.print(f"wrote {kind} masks for tasks {names} to {output} ({size / 1e6:.1f} MB)")


def task(
    masks_file: Annotated[Path, typer.Argument(help="Mask file from `unimerge masks`.")],
    base_dir: Annotated[Path, typer.Argument(help="The base model folder the masks were computed against.")],
    output_dir: Annotated[Path, typer.Argument(help="Folder for the task-specific model.")],
    task_name: Annotated[str, typer.Option("--task", help="Task name (or index) to rebuild.")],
    force: Annotated[bool, typer.Option("--force")] = False,
) -> None:
    """Rebuild one task's model from the base and a mask file, as a Hugging Face folder."""
    from unimerge.cli import _guard, _out
    from unimerge.io.checkpoint import open_checkpoint
    from unimerge.io.writer import OutTensor, ShardedWriter, copy_model_files
    from unimerge.taskmasks import load_task_model

    def run() -> int:
        base = open_checkpoint(base_dir)
        state = {n: base.read(n) for n in base.tensors()}
        sel: str | int = int(task_name) if task_name.isdigit() else task_name
        rebuilt = load_task_model(state, masks_file, sel)
        outs = [OutTensor(n, tuple(t.shape), t.dtype) for n, t in rebuilt.items()]
        with ShardedWriter(output_dir, outs, force=force, metadata={"unimerge_task": task_name}) as w:
            for n, t in rebuilt.items():
                w.write(n, t.contiguous())
            copy_model_files(base.root, w)
            w.commit()
        return len(outs)

    n = _guard(run)
    _out.print(f"wrote task {task_name!r} ({n} tensors) to {output_dir}")
