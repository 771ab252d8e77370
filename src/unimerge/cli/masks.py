"""``unimerge masks`` and ``unimerge task``: per-task masks (EMR, TALL) or experts (FREE-Merging).

``unimerge masks CONFIG MASKS.safetensors`` computes EMR's (or TALL's) shared vector, bit-packed
per-task masks and rescalers from the base and expert models of a merge config; with
``--kind free_merging`` (the config's ``merge_method`` must be ``fr_merging``, whose parameters build the
backbone) it computes the FR-Merging vector and one sparse expert per task (``--density``).
``unimerge task MASKS.safetensors BASE_DIR OUT_DIR --task NAME`` rebuilds task NAME's model
(``W_base + lambda_t * M_t * vector``, or ``W_base + tau_FR + e_t``) as a Hugging Face folder, streaming
the base tensor by tensor. The work is done by :mod:`unimerge.taskmodels`.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from unimerge.cli.common import guard, out

__all__ = ["Kind", "masks", "task"]


class Kind(str, Enum):
    """``--kind``: the task models to compute (:data:`unimerge.taskmodels.TaskModelKind`)."""

    emr = "emr"
    tall = "tall"
    free_merging = "free_merging"


def masks(
    config: Annotated[Path, typer.Argument(help="Merge config naming base_model and the experts.")],
    output: Annotated[Path, typer.Argument(help="Mask file to write (.safetensors).")],
    kind: Annotated[Kind, typer.Option(help="emr, tall or free_merging.")] = Kind.emr,
    tall_lambda: Annotated[float, typer.Option(min=0.0, max=10.0, help="TALL's lambda.")] = 0.4,
    density: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="free_merging: fraction of entries per expert, in (0, 1).")
    ] = 0.01,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle")] = False,
) -> None:
    """Compute per-task masks (EMR or TALL) or experts (FREE-Merging) to rebuild each task's model later."""
    from unimerge.taskmodels import build_task_models

    built = guard(
        lambda: build_task_models(
            config, output, kind.value, tall_lambda=tall_lambda, density=density, allow_pickle=allow_pickle
        )
    )
    out.print(
        f"wrote {kind.value} masks for tasks {list(built.tasks)} to {output} ({built.size / 1e6:.1f} MB)"
    )


def task(
    masks_file: Annotated[Path, typer.Argument(help="Mask (or expert) file from `unimerge masks`.")],
    base_dir: Annotated[Path, typer.Argument(help="The base model folder the masks were computed against.")],
    output_dir: Annotated[Path, typer.Argument(help="Folder for the task-specific model.")],
    task_name: Annotated[str, typer.Option("--task", help="Task name (or index) to rebuild.")],
    force: Annotated[bool, typer.Option("--force")] = False,
) -> None:
    """Rebuild one task's model from the base and a mask file, as a Hugging Face folder."""
    from unimerge.taskmodels import rebuild_task

    n = guard(lambda: rebuild_task(masks_file, base_dir, output_dir, task_name, force=force))
    out.print(f"wrote task {task_name!r} ({n} tensors) to {output_dir}")
