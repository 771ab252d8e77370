"""Diagnose a merge before evaluating it: directional conflict, scale mismatch, task entanglement.

``unimerge diagnose CONFIG --out DIR`` plans CONFIG as ``unimerge merge`` does, streams its tensors
once and writes ``DIR/diagnosis.json`` and ``DIR/diagnosis.html`` (data-free: nothing is evaluated).

- :mod:`~unimerge.diagnose.stats`: the statistics, pure functions of tensors, additive over tensors;
- :mod:`~unimerge.diagnose.stream`: plan, stream and accumulate (:func:`diagnose`, :func:`diagnose_models`);
- :mod:`~unimerge.diagnose.verdict`: the dominant cause, with named, documented thresholds;
- :mod:`~unimerge.diagnose.report`: the JSON document and the self-contained HTML page;
- :mod:`~unimerge.diagnose.lineage`: which candidates went into a merged model (:func:`provenance`).

Example:
    >>> doc = run_diagnose("ties.yaml", "diagnosis/")
    >>> doc["verdict"]["dominant"], summary_scores(doc["overall"])["mean_sign_conflict"]
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unimerge.config import MergeConfig
from unimerge.diagnose.lineage import provenance
from unimerge.diagnose.report import diagnosis_json, write_report
from unimerge.diagnose.stats import SubspaceSettings
from unimerge.diagnose.stream import DiagnoseOptions, Diagnosis, diagnose, diagnose_models
from unimerge.diagnose.verdict import summary_scores, verdict
from unimerge.options import Progress

__all__ = [
    "DiagnoseOptions",
    "Diagnosis",
    "SubspaceSettings",
    "diagnose",
    "diagnose_models",
    "provenance",
    "run_diagnose",
    "summary_scores",
    "verdict",
]


def run_diagnose(
    config: MergeConfig | str | Path | Mapping[str, Any],
    out_dir: str | Path,
    options: DiagnoseOptions = DiagnoseOptions(),
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Diagnose ``config`` and write ``out_dir/diagnosis.json`` and ``out_dir/diagnosis.html``
    (all or nothing; an existing ``out_dir`` is an error unless ``force``). Returns the JSON document."""
    from unimerge.io.atomic import exists_error

    out = Path(out_dir)
    if out.exists() and not force:
        raise exists_error(out)  # before reading any tensor
    d = diagnose(config, out, options, progress)
    doc = diagnosis_json(d, verdict(d.overall))
    write_report(doc, out, force=force)
    return doc
