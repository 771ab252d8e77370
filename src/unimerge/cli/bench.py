"""``unimerge bench``: the offline merging benchmark (see :mod:`unimerge.bench`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from unimerge.cli.common import guard

__all__ = ["bench"]


def bench(
    suite: str = typer.Option(
        "quick",
        "--suite",
        help="text12 (12 tasks, every data-free method), text8 (8 of them, the same experts), quick (4 tasks, "
        "core methods, the README example) or smoke (2 tasks, CI).",
    ),
    out: Path = typer.Option(..., "--out", help="Folder for results.json and report.html."),
    methods: list[str] | None = typer.Option(
        None,
        "--methods",
        help="Method to run (repeat the option, or comma-separate); groups: free, data, all. "
        "Default: the suite's methods.",
    ),
    reuse: list[Path] | None = typer.Option(
        None,
        "--reuse",
        help="Earlier output folder of the same suite and seed: its finished rows are copied, not rerun "
        "(repeat the option; give --out itself to resume an interrupted run).",
    ),
    scaling: bool = typer.Option(
        False, "--scaling", help="Also merge 2, 4, ..., N tasks and plot accuracy vs N."
    ),
    jobs: int = typer.Option(
        0,
        "--jobs",
        min=0,
        max=64,
        help="Experts trained at once on a cold cache (worker processes, one thread each; the bits do not "
        "depend on it). 0: one per CPU core.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the data splits, training and random methods."),
    threads: int | None = typer.Option(
        None,
        "--threads",
        help="torch CPU threads for merging and evaluation (default: torch's choice; 1 is often faster on a "
        "busy machine). Experts always train on 1 thread, so they do not depend on this.",
    ),
) -> None:
    """Fine-tune one expert per task (cached), merge them with every method, report accuracy per task."""
    import torch
    from transformers.utils import logging as hf_logging

    from unimerge.bench.main import run_bench

    if threads:
        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    names = [m for item in methods or [] for m in item.split(",") if m.strip()]
    console = Console(width=None if sys.stdout.isatty() else 200)
    workers = jobs or os.cpu_count() or 1
    guard(
        lambda: run_bench(
            suite,
            out,
            names or None,
            scaling=scaling,
            seed=seed,
            reuse=reuse or (),
            console=console,
            jobs=workers,
        )
    )
