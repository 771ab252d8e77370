"""The ``unimerge`` command: a thin layer over the library (merge | validate | methods | bench)."""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from unimerge.errors import UnimergeError

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Merge fine-tuned models into one.")
_err = Console(stderr=True)
_out = Console()
T = TypeVar("T")


def _guard(fn: Callable[[], T]) -> T:
    """Run ``fn``; a bad-input error becomes one paragraph on stderr and exit code 2 (no traceback)."""
    try:
        return fn()
    except UnimergeError as err:
        _err.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except (KeyboardInterrupt, MemoryError) as err:
        _err.print(f"[bold red]error:[/] interrupted ({type(err).__name__}); nothing was written to the output.")
        raise typer.Exit(130 if isinstance(err, KeyboardInterrupt) else 3) from None
    except Exception as err:  # noqa: BLE001 - a bug, not bad input: one line unless UNIMERGE_DEBUG is set
        if os.environ.get("UNIMERGE_DEBUG"):
            raise
        _err.print(f"[bold red]internal error:[/] {type(err).__name__}: {err}. Nothing was written to the output. "
                   "Re-run with UNIMERGE_DEBUG=1 for a traceback and report it.", highlight=False)
        raise typer.Exit(3) from None


def _size(text: str) -> int:
    from unimerge.io.writer import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="unimerge or mergekit YAML config.")],
    output_dir: Annotated[Path, typer.Argument(help="Folder to write the merged model to.")],
    threads: Annotated[int, typer.Option(min=1, max=256, help="Worker threads.")] = 2,
    device: Annotated[str, typer.Option(help="cpu or cuda (compute device).")] = "cpu",
    out_shard_size: Annotated[str, typer.Option(help="Max bytes per output shard, e.g. 2GB, 500MB.")] = "2GB",
    seed: Annotated[int | None, typer.Option(min=0, help="Seed for random methods (overrides the config).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT_DIR if it exists.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Read pytorch_model.bin pickles (weights_only=True).")
    ] = False,
) -> None:
    """Merge the models in CONFIG and write a Hugging Face folder to OUTPUT_DIR."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from unimerge.config import load_config
    from unimerge.execute import RunOptions, plan_config, run_plan

    opts = RunOptions(threads=threads, device=device, out_shard_size=_size(out_shard_size), force=force,
                      seed=seed, allow_pickle=allow_pickle)

    def run() -> Any:
        cfg = load_config(config)
        if cfg.data is not None:
            return _data_merge(cfg, config, output_dir, opts)
        plan = plan_config(cfg, output_dir, allow_pickle=allow_pickle, config_dir=config.resolve().parent)
        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=_err, transient=True) as bar:
            task = bar.add_task(f"merging ({plan.method.name})", total=len(plan.jobs))
            return run_plan(plan, output_dir, opts, lambda done, total: bar.update(task, completed=done))

    result = _guard(run)
    for w in result.warnings:
        _err.print(f"[yellow]warning:[/] {w}", highlight=False)
    _out.print(f"wrote {result.tensors} tensors ({_fmt_bytes(result.bytes_written)}) to {result.out_dir} "
               f"in {result.seconds:.2f} s")


def _data_merge(cfg: Any, config: Path, output_dir: Path, opts: Any) -> Any:
    """A config with `data:`: statistics and merge passes with one progress bar per phase."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from unimerge.datamerge import run_data_merge

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=_err, transient=True) as bar:
        bars: dict[str, Any] = {}

        def report(what: str, done: int, total: int) -> None:
            if what not in bars:
                bars[what] = bar.add_task(what, total=total)
            bar.update(bars[what], completed=done, total=total)

        return run_data_merge(cfg, output_dir, opts, config_dir=config.resolve().parent, progress=report)


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="unimerge or mergekit YAML config.")],
    output_dir: Annotated[Path, typer.Argument(help="Planned output folder (checked, not written).")] = Path(
        "merged"
    ),
    threads: Annotated[int, typer.Option(min=1, max=256)] = 2,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle")] = False,
) -> None:
    """Check CONFIG against the inputs' headers without reading tensor data; print a summary."""
    from unimerge.config import load_config
    from unimerge.execute import plan_config

    cfg = _guard(lambda: load_config(config))
    if cfg.data is not None:
        _validate_data(cfg, config, output_dir, allow_pickle)
        return
    cdir = config.resolve().parent
    plan = _guard(lambda: plan_config(cfg, output_dir, allow_pickle=allow_pickle, config_dir=cdir))
    s = plan.summary(threads)
    for w in plan.warnings:
        _err.print(f"[yellow]warning:[/] {w}", highlight=False)
    table = Table(title=f"{config}: OK", show_header=False)
    table.add_row("method", f"{plan.method.name} ({plan.method.family})")
    for ck in plan.checkpoints:
        table.add_row("base" if plan.base is not None and ck is plan.checkpoints[plan.base] else "model", ck.ref)
    table.add_row("tensors", str(s["tensors"]))
    table.add_row("bytes to read", _fmt_bytes(s["bytes_read"]))
    table.add_row("bytes to write", _fmt_bytes(s["bytes_written"]))
    table.add_row(f"peak memory (est., {threads} threads)", _fmt_bytes(s["peak_memory"]))
    _out.print(table)


def _validate_data(cfg: Any, config: Path, output_dir: Path, allow_pickle: bool) -> None:
    """A config with `data:`: every check short of a forward pass; models, tasks, sidecars."""
    from unimerge.datamerge.run import describe

    rows = _guard(lambda: describe(cfg, config.resolve().parent, output_dir, allow_pickle=allow_pickle))
    table = Table(title=f"{config}: OK", show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    _out.print(table)


@app.command()
def methods(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
    family: Annotated[str | None, typer.Option(help="Only this family.")] = None,
) -> None:
    """List the registered merge methods."""
    from unimerge.methods import list_methods

    infos = list_methods(family=family)
    if as_json:
        sys.stdout.write(json.dumps([m.to_json() for m in infos], indent=2, default=str) + "\n")
        return
    table = Table(title=f"{len(infos)} merge methods")
    for col in ("name", "family", "base", "data", "parameters", "summary"):
        table.add_column(col)
    for m in infos:
        params = ", ".join(f"{k}={v['default']}" for k, v in m.param_schema().items())
        table.add_row(m.name, m.family, "yes" if m.needs_base else "", m.data, params, m.summary)
    _out.print(table)


def _register_subcommands() -> None:
    from unimerge.cli.bench import bench
    from unimerge.cli.masks import masks, task

    app.command("bench")(bench)
    app.command("masks")(masks)
    app.command("task")(task)


_register_subcommands()


def main() -> None:
    """Console-script entry point (also ``python -m unimerge``); the process is the command's.

    - Asks PyTorch's CPU allocator for transparent huge pages (``THP_MEM_ALLOC_ENABLE``, read once, at
      the first allocation): a merge allocates many fresh buffers of hundreds of MB, and with 4 KiB
      pages their first touch costs more than the arithmetic (3-4x, measured on a 131 MB tensor).
    - Keeps the garbage collector off torch's objects. Importing torch creates objects that live
      until exit; collecting during the import and traversing them all again while the interpreter
      shuts down cost 0.25 s and 0.6 s per run here, as much as a small merge. So torch is imported
      with collection paused, and what is alive then, and at exit, is frozen (``gc.freeze``: skipped
      by every later collection). Collection stays on while the command runs.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if len(sys.argv) > 1 and not {"--help", "-h"} & set(sys.argv[1:]):  # a command will run: it needs torch
        gc.disable()
        try:
            import unimerge.execute  # noqa: F401 - torch and the method registry
        finally:
            gc.enable()
        gc.freeze()
    try:
        app()
    finally:
        gc.freeze()
