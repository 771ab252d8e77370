"""``unimerge provenance MERGED --base BASE --candidates A B C --out FILE``: which experts went in.

Least squares of the merged model's task vector on the candidates' task vectors, over the whole model
(:func:`unimerge.diagnose.provenance`); writes ``FILE`` (JSON: ``{components: [{model, weight,
present}], residual, tensors, ...}``) all at once and prints the components and the residual.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from unimerge.cli.common import guard, out, progress_bars, warn

__all__ = ["provenance"]


def provenance(
    models: Annotated[
        list[Path],
        typer.Argument(
            metavar="MERGED --candidates A B ...",
            help="MERGED, then the candidate models (after --candidates), all fine-tuned from --base.",
            show_default=False,
        ),
    ],
    base: Annotated[Path, typer.Option("--base", help="The base model the candidates were fine-tuned from.")],
    out_file: Annotated[Path, typer.Option("--out", help="JSON file to write.")],
    candidates_flag: Annotated[
        bool, typer.Option("--candidates", help="Marks where the candidate list starts (after MERGED).")
    ] = False,
    present: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="A candidate is present when |weight| >= this x the largest |weight|."
        ),
    ] = 0.1,
    force: Annotated[bool, typer.Option("--force", help="Replace FILE if it exists.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle")] = False,
) -> None:
    """Estimate which candidates went into MERGED and with what weight (data-free least squares)."""
    from unimerge.errors import ConfigError, MergeError

    def run() -> dict[str, Any]:
        from unimerge.diagnose import provenance as estimate
        from unimerge.io.atomic import atomic_write_text

        if len(models) < 2:
            raise ConfigError("Give the merged model and at least one candidate: MERGED --candidates A B ...")
        if out_file.exists() and not force:
            raise MergeError(
                f"Output file {out_file} already exists. Pass --force to replace it, or choose another file."
            )
        with progress_bars() as report:
            doc = estimate(models[0], base, models[1:], allow_pickle=allow_pickle, progress=report,
                           present_relative=present)  # fmt: skip
        atomic_write_text(out_file, json.dumps(doc, indent=2) + "\n")
        return doc

    doc = guard(run)
    warn(doc["warnings"])
    _print(doc)
    out.print(f"wrote {out_file} in {doc['seconds']:.2f} s")


def _labels(refs: list[str]) -> list[str]:
    """The shortest trailing path parts that tell the models apart (``fever/encoder``, not ``encoder``)."""
    parts = [Path(r.split("+")[-1]).parts or (r,) for r in refs]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return refs


def _print(doc: dict[str, Any]) -> None:
    comps = doc["components"]
    table = Table(title=f"provenance of {doc['merged']}")
    for col in ("model", "weight", "present"):
        table.add_column(col)
    for name, c in zip(_labels([c["model"] for c in comps]), comps, strict=True):
        table.add_row(name, f"{c['weight']:.4f}", "yes" if c["present"] else "no")
    out.print(table)
    r = doc["residual"]
    out.print(
        "residual (share of the merged task vector no candidate explains): "
        + ("- (merged equals base)" if r is None else f"{r:.4f}")
    )
    out.print(doc["note"], highlight=False)
