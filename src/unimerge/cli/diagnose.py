"""``unimerge diagnose CONFIG --out DIR``: measure conflict, scale and entanglement before merging.

Plans CONFIG as ``unimerge merge`` does (same checks, same errors), streams the tensors once and
writes ``DIR/diagnosis.json`` and ``DIR/diagnosis.html``; prints a short summary and the verdict.
The work is done by :mod:`unimerge.diagnose`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from unimerge.cli.common import guard, out, progress_bars, warn

__all__ = ["diagnose"]


def diagnose(
    config: Annotated[Path, typer.Argument(help="unimerge or mergekit YAML config (with base_model).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for diagnosis.json and diagnosis.html.")],
    top_k: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=100.0,
            help="Percent of each task vector's entries (by magnitude, per "
            "tensor) kept for the top-k sign conflicts and the sign election, as TIES trims; "
            "100 keeps all.",
        ),
    ] = 20.0,  # fmt: skip
    threads: Annotated[int, typer.Option(min=1, max=256, help="Worker threads.")] = 2,
    device: Annotated[str, typer.Option(help="Compute device: cpu or cuda (cuda:N).")] = "cpu",
    seed: Annotated[int | None, typer.Option(min=0, help="Seed of the randomized SVDs.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace DIR if it exists.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle")] = False,
) -> None:
    """Diagnose the merge in CONFIG (data-free): cosine, sign conflicts, norms, subspace overlap."""
    from unimerge.diagnose import DiagnoseOptions, run_diagnose
    from unimerge.errors import ConfigError

    def run() -> dict[str, Any]:
        if top_k <= 0.0:
            raise ConfigError("--top-k must be above 0 (a percent in (0, 100]).")
        opts = DiagnoseOptions(top_k=top_k / 100.0, threads=threads, device=device, seed=seed,
                               allow_pickle=allow_pickle)  # fmt: skip
        with progress_bars() as report:
            return run_diagnose(config, out_dir, opts, force=force, progress=report)

    doc = guard(run)
    warn(doc.get("warnings", []))
    _print_summary(doc)
    out.print(
        f"wrote {out_dir / 'diagnosis.json'} and {out_dir / 'diagnosis.html'} in {doc['seconds']:.2f} s"
    )


def _pairs(doc: dict[str, Any]) -> Table:
    from unimerge.diagnose.report import short_names

    o, names = doc["overall"], short_names(doc["models"])
    table = Table(title="pairs of task vectors")
    for col in ("pair", "cosine", "sign conflict (top-k)", "sign conflict (all)", "subspace overlap"):
        table.add_column(col)
    n = len(names)
    for i in range(n):
        for j in range(i + 1, n):
            vals = [o["cosine"], o["sign_conflict"], o["sign_conflict_all"], o.get("subspace_overlap")]
            table.add_row(f"{names[i]} / {names[j]}", *(_num(m[i][j] if m else None) for m in vals))
    return table


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _print_summary(doc: dict[str, Any]) -> None:
    from unimerge.diagnose.report import short_names

    o = doc["overall"]
    models = Table(title="task vectors")
    for col in ("model", "norm", "norm / base norm", "effective rank"):
        models.add_column(col)
    er = o.get("effective_rank")
    for i, name in enumerate(short_names(doc["models"])):
        models.add_row(name, _num(o["norms"][i]), _num(o["relative_update"][i]), _num(er[i] if er else None))
    out.print(models)
    if len(doc["models"]) > 1:
        out.print(_pairs(doc))
    out.print(
        f"sign election conflict {_num(o['sign_conflict_rate'])}, norm ratio {_num(o['norm_ratio'])}, "
        f"normalisation sensitivity {_num(o['normalization_sensitivity'])}"
    )
    out.print(f"[bold]verdict:[/] {doc['verdict']['text']}", highlight=False)
