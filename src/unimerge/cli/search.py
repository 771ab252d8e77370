"""``unimerge search CONFIG OUT``: search methods and their parameters; trials run on Ray.

The work is done by :mod:`unimerge.tune`; this prints the progress and the chosen trial.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from unimerge.cli.common import err, guard, out, progress_bars

__all__ = ["search"]


def search(
    config: Annotated[Path, typer.Argument(help="Search config: models, data:, search: (docs/search.md).")],
    output_dir: Annotated[Path, typer.Argument(help="Folder for search.json, best/ and report.html.")],
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: a local Ray on this machine).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=0, help="Local Ray CPUs (default: all cores); 0 runs trials one by one without Ray."
        ),
    ] = None,
) -> None:
    """Search merge methods and their parameters on validation data; write the best merge to OUT/best/."""
    from unimerge.tune import search as run_search

    def go() -> bool:
        try:
            with progress_bars() as report:
                result = run_search(
                    config, output_dir, ray_address=ray_address, workers=workers, progress=report
                )
        except KeyboardInterrupt:
            err.print(
                f"interrupted: the finished trials are kept in {output_dir / 'search.json'}; run the same "
                "command again to resume.",
                highlight=False,
            )
            return False
        best = result.best
        failed = sum(r["status"] != "ok" for r in result.trials)
        out.print(
            f"{len(result.trials)} trials ({failed} failed); best: trial {best['index']} {best['method']} "
            f"{best['params']} validation {best['objective']:.4f}; test "
            + ", ".join(f"{t} {v:.4f}" for t, v in result.test.items()),
            highlight=False,
        )
        out.print(f"wrote {output_dir / 'best'} and {output_dir / 'report.html'}", highlight=False)
        return True

    if not guard(go):
        raise typer.Exit(130)
