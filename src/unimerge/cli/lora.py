"""LoRA commands: ``unimerge extract-lora BASE FINETUNED OUT`` and the adapter branch of ``unimerge merge``.

The work is done by :mod:`unimerge.lora`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from unimerge.cli.common import guard, out, progress_bars, warn

if TYPE_CHECKING:
    from unimerge.options import RunOptions

__all__ = ["error_table", "extract_lora", "merge_adapter_config"]


def error_table(title: str, rows: list[tuple[str, int, float]], limit: int = 40) -> Table:
    """Per module: rank and relative Frobenius error, the worst first (at most ``limit`` rows)."""
    table = Table(title=title)
    for col in ("module", "rank", "relative error"):
        table.add_column(col)
    for module, rank, err in sorted(rows, key=lambda r: -r[2])[:limit]:
        table.add_row(module, str(rank), f"{err:.3e}")
    if len(rows) > limit:
        table.caption = f"{len(rows) - limit} more modules in the JSON report"
    return table


def merge_adapter_config(config: Path, output_dir: Path, options: RunOptions) -> None:
    """``unimerge merge`` of a config whose models are PEFT adapters (:func:`unimerge.lora.run_adapter_merge`)."""
    from unimerge.io.writer import format_size
    from unimerge.lora import LoraMergeResult, run_adapter_merge

    with progress_bars() as report:
        result, lora = guard(lambda: run_adapter_merge(config, output_dir, options, report))
    warn(result.warnings)
    if isinstance(lora, LoraMergeResult) and lora.output == "peft_lora":
        rows = [(m, f.rank, lora.errors[m]) for m, f in lora.factors.items()]
        kind = "exact: factors concatenated" if lora.exact else "truncated SVD"
        out.print(error_table(f"{lora.method} adapter ({kind})", rows))
    elif not isinstance(lora, LoraMergeResult):
        out.print(
            f"PEFT add_weighted_adapter, combination_type {lora.combination_type} (new adapter r = {lora.rank})"
        )
    out.print(f"wrote {len(lora.modules)} merged modules ({format_size(result.bytes_written)}, "
              f"{lora.output}) to {result.out_dir} in {result.seconds:.2f} s")  # fmt: skip


def extract_lora(
    base: Annotated[Path, typer.Argument(help="The base model folder.")],
    finetuned: Annotated[Path, typer.Argument(help="The fully fine-tuned model folder (same architecture).")],
    output_dir: Annotated[Path, typer.Argument(help="Folder to write the PEFT LoRA adapter to.")],
    rank: Annotated[int | None, typer.Option(min=1, help="Rank of every module.")] = None,
    energy: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Keep this fraction of each update's squared singular values."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT_DIR if it exists.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Read pytorch_model.bin pickles (weights_only=True).")
    ] = False,
) -> None:
    """Extract a LoRA adapter from a full fine-tune: truncated SVD of FINETUNED - BASE per weight."""
    from unimerge.lora import extract_lora as run

    with progress_bars() as report:
        result = guard(lambda: run(base, finetuned, output_dir, rank=rank, energy=energy, force=force,
                                   allow_pickle=allow_pickle,
                                   progress=lambda done, total: report("extract", done, total)))  # fmt: skip
    rows = [(m, r, result.errors[m]) for m, r in result.ranks.items()]
    out.print(error_table("extracted modules", rows))
    left = result.left_out
    if left:
        warn([f"{len(left)} changed tensors are not LoRA weights and were not extracted: "
              + ", ".join(e["tensor"] for e in left[:8]) + (" ..." if len(left) > 8 else "")
              + " (see extraction.json)"])  # fmt: skip
    out.print(f"wrote {len(rows)} modules to {result.out_dir} ({result.unchanged} tensors unchanged) "
              f"in {result.seconds:.2f} s; per-module errors in {result.out_dir / 'extraction.json'}")  # fmt: skip
