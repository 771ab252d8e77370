"""``unimerge moe CONFIG OUT``: a Mixtral mixture of experts from dense models (mergekit-moe's YAML).

The work is done by :mod:`unimerge.moe`; the options mirror ``mergekit-moe``'s (``--seed`` is its
``--random-seed``).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from unimerge.cli.common import guard, out, progress_bars, warn

__all__ = ["LayoutChoice", "moe"]


class LayoutChoice(str, Enum):
    """``--layout``: the output tensor names (:data:`unimerge.moe.Layout`)."""

    fused = "fused"
    classic = "classic"


def moe(
    config: Annotated[Path, typer.Argument(help="mergekit-moe YAML config.")],
    output_dir: Annotated[Path, typer.Argument(help="Folder to write the Mixtral model to.")],
    layout: Annotated[
        LayoutChoice,
        typer.Option(help="fused: transformers 5 / mergekit 0.1.5 tensor names; classic: Hub Mixtral names."),
    ] = LayoutChoice.fused,
    seed: Annotated[int, typer.Option(min=0, help="Seed of random gates and noise_scale.")] = 0,
    device: Annotated[
        str, typer.Option(help="Where the base model runs for hidden gates: cpu, cuda, cuda:N.")
    ] = "cpu",
    out_shard_size: Annotated[str, typer.Option(help="Max bytes per output shard, e.g. 2GB, 500MB.")] = "2GB",
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT_DIR if it exists.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Read pytorch_model.bin pickles (weights_only=True).")
    ] = False,
    allow_all_same: Annotated[
        bool,
        typer.Option(
            "--i-understand-this-is-not-useful-without-training",
            help="Allow every expert to be the same model (to train the MoE afterwards).",
        ),
    ] = False,
) -> None:
    """Build a sparse mixture of experts (Mixtral) from a base model and dense expert models."""
    from unimerge.io.writer import format_size, parse_size
    from unimerge.moe import MoEOptions, build_moe

    if device.split(":")[0] not in ("cpu", "cuda"):
        raise typer.BadParameter(
            f"{device!r} is not a device; use cpu, cuda or cuda:N.", param_hint="--device"
        )
    try:
        shard = parse_size(out_shard_size)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--out-shard-size") from None
    opts = MoEOptions(layout=layout.value, seed=seed, device=device, out_shard_size=shard, force=force,
                      allow_pickle=allow_pickle, allow_all_same=allow_all_same)  # fmt: skip
    with progress_bars() as report:
        result = guard(lambda: build_moe(config, output_dir, opts, progress=report))
    warn(result.warnings)
    out.print(f"wrote {result.tensors} tensors ({format_size(result.bytes_written)}) to {result.out_dir} "
              f"in {result.seconds:.2f} s")  # fmt: skip
