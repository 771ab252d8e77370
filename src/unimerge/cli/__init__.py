"""The ``unimerge`` command: parse, call the library, print (merge | validate | methods | moe | bench | diagnose | masks | task | provenance | extract-lora | search)."""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table

from unimerge.cli.common import guard, out, progress_bars, warn

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Merge fine-tuned models into one.")
DEVICES = ("cpu", "cuda")  # unimerge.options.DEVICES, spelled here so `--help` needs no torch
Executor = Literal["local", "ray"]


def _size(text: str) -> int:
    from unimerge.io.writer import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


def _bandwidth(text: str) -> float:
    """Bytes per second from ``"2GB/s"``, ``"500MB"`` or ``"10Gbit/s"`` (bits: divided by 8)."""
    from unimerge.io.writer import parse_size

    raw = text.strip().removesuffix("/s")
    bits = raw.lower().endswith("bit")
    try:
        return parse_size(raw[:-3] + "B" if bits else raw) / (8 if bits else 1)
    except ValueError:
        raise typer.BadParameter(
            f"Cannot read bandwidth {text!r}; write e.g. 2GB/s, 500MB/s or 10Gbit/s."
        ) from None


def _device(name: str) -> str:
    if name.split(":")[0] not in DEVICES:
        raise typer.BadParameter(f"{name!r} is not a device; use one of {', '.join(DEVICES)} (or cuda:N).")
    return name


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="unimerge or mergekit YAML config.")],
    output_dir: Annotated[Path, typer.Argument(help="Folder to write the merged model to.")],
    threads: Annotated[int, typer.Option(min=1, max=256, help="Worker threads.")] = 2,
    device: Annotated[
        str, typer.Option(callback=_device, help="Compute device: cpu or cuda (cuda:N for one GPU).")
    ] = "cpu",
    out_shard_size: Annotated[str, typer.Option(help="Max bytes per output shard, e.g. 2GB, 500MB.")] = "2GB",
    seed: Annotated[
        int | None, typer.Option(min=0, help="Seed for random methods (overrides the config).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT_DIR if it exists.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Read pytorch_model.bin pickles (weights_only=True).")
    ] = False,
    executor: Annotated[
        Executor, typer.Option(help="local: this process's threads; ray: tensor jobs as Ray tasks.")
    ] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to run on (default: a local Ray with --threads CPUs).")
    ] = None,
) -> None:
    """Merge the models in CONFIG and write a Hugging Face folder to OUTPUT_DIR."""
    from unimerge.api import run_merge  # `align:` configs too (unimerge.align.run)
    from unimerge.execute import RunOptions
    from unimerge.io.writer import format_size

    opts = RunOptions(threads=threads, device=device, out_shard_size=_size(out_shard_size), force=force,
                      seed=seed, allow_pickle=allow_pickle)  # fmt: skip
    from unimerge.lora.run import is_adapter_config

    if guard(lambda: is_adapter_config(config)):  # PEFT adapters: update level (refuses `align:`)
        from unimerge.cli.lora import merge_adapter_config

        merge_adapter_config(config, output_dir, opts)
        return
    with progress_bars() as report:
        if executor == "ray":
            from unimerge.cluster import run_merge_on_ray

            result = guard(
                lambda: run_merge_on_ray(config, output_dir, opts, address=ray_address, progress=report)
            )
        else:
            result = guard(lambda: run_merge(config, output_dir, opts, progress=report))
    warn(result.warnings)
    out.print(f"wrote {result.tensors} tensors ({format_size(result.bytes_written)}) to {result.out_dir} "
              f"in {result.seconds:.2f} s")  # fmt: skip


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="unimerge or mergekit YAML config.")],
    output_dir: Annotated[Path, typer.Argument(help="Planned output folder (checked, not written).")] = Path(
        "merged"
    ),
    threads: Annotated[int, typer.Option(min=1, max=256)] = 2,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle")] = False,
    executor: Annotated[
        Executor, typer.Option(help="ray: also plan the merge across --nodes Ray nodes.")
    ] = "local",
    nodes: Annotated[
        int, typer.Option(min=1, max=100_000, help="Ray nodes to plan for (--executor ray).")
    ] = 1,
    disk_bandwidth: Annotated[
        str, typer.Option(help="Shared storage's total throughput (one machine: its disk), e.g. 2GB/s.")
    ] = "2GB/s",
    network_bandwidth: Annotated[
        str, typer.Option(help="Each node's network link, e.g. 10Gbit/s.")
    ] = "10Gbit/s",
    compute_ns: Annotated[
        float, typer.Option(min=0.0, help="Method's cost per input element on one node, ns (0: I/O only).")
    ] = 0.0,
) -> None:
    """Check CONFIG against the inputs (headers, data, sidecars) without merging; print a summary."""
    from unimerge.api import check_merge  # adapter configs: their plan (unimerge.lora)
    from unimerge.execute import RunOptions

    opts = RunOptions(threads=threads, allow_pickle=allow_pickle)
    check = guard(lambda: check_merge(config, output_dir, opts))
    warn(check.warnings)
    table = Table(title=f"{config}: OK", show_header=False)
    for key, value in check.rows:
        table.add_row(key, value)
    out.print(table)
    if executor == "ray":
        from unimerge.cli.cluster import print_cluster_plan

        disk, net = _bandwidth(disk_bandwidth), _bandwidth(network_bandwidth)
        guard(lambda: print_cluster_plan(config, output_dir, opts, nodes, disk, net, compute_ns))


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
    out.print(table)


def _register_subcommands() -> None:
    from unimerge.cli.bench import bench
    from unimerge.cli.diagnose import diagnose
    from unimerge.cli.lora import extract_lora
    from unimerge.cli.masks import masks, task
    from unimerge.cli.moe import moe
    from unimerge.cli.provenance import provenance
    from unimerge.cli.search import search

    app.command("bench")(bench)
    app.command("diagnose")(diagnose)
    app.command("extract-lora")(extract_lora)
    app.command("moe")(moe)
    app.command("masks")(masks)
    app.command("task")(task)
    app.command("provenance")(provenance)
    app.command("search")(search)


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
