"""What every ``unimerge`` command shares: the consoles, error handling, progress bars."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import typer
from rich.console import Console

from unimerge.errors import UnimergeError

if TYPE_CHECKING:
    from unimerge.options import Progress

__all__ = ["err", "guard", "out", "progress_bars", "warn"]

err = Console(stderr=True)
out = Console()
T = TypeVar("T")


def guard(fn: Callable[[], T]) -> T:
    """Run ``fn``; a bad-input error becomes one paragraph on stderr and exit code 2 (no traceback)."""
    try:
        return fn()
    except UnimergeError as error:
        err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except (KeyboardInterrupt, MemoryError) as error:
        err.print(
            f"[bold red]error:[/] interrupted ({type(error).__name__}); nothing was written to the output."
        )
        raise typer.Exit(130 if isinstance(error, KeyboardInterrupt) else 3) from None
    except Exception as error:  # noqa: BLE001 - a bug, not bad input: one line unless UNIMERGE_DEBUG is set
        if os.environ.get("UNIMERGE_DEBUG"):
            raise
        err.print(
            f"[bold red]internal error:[/] {type(error).__name__}: {error}. Nothing was written to the output. "
            "Re-run with UNIMERGE_DEBUG=1 for a traceback and report it.",
            highlight=False,
        )
        raise typer.Exit(3) from None


def warn(messages: list[str]) -> None:
    """Print each warning on stderr."""
    for message in messages:
        err.print(f"[yellow]warning:[/] {message}", highlight=False)


@contextlib.contextmanager
def progress_bars() -> Iterator[Progress]:
    """A ``progress(what, done, total)`` callback drawing one transient bar per phase on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def report(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        yield report
