"""``diagnosis.json`` and ``diagnosis.html``: written together, atomically, into one folder.

The HTML page is self-contained (no scripts, no network): heatmaps are tables with coloured cells,
per-layer profiles are inline SVG line charts, so it renders anywhere without plotting libraries.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unimerge.diagnose.stream import Diagnosis
from unimerge.io import atomic_dir

__all__ = ["diagnosis_html", "diagnosis_json", "short_names", "write_report"]

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
table.heat{border-collapse:collapse;margin:.5em 2em 1em 0;display:inline-table}
table.heat td,table.heat th{border:1px solid #ccc;padding:.3em .6em;text-align:center;font-size:.9em}
.verdict{border-left:4px solid #d62728;padding:.5em 1em;background:#fdf3f3}
.grid{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0}figcaption{font-size:.9em;font-weight:600}
table.list{border-collapse:collapse}table.list td,table.list th{padding:.2em .6em;border-bottom:1px solid #eee}
"""


def diagnosis_json(d: Diagnosis, verdict: dict[str, Any]) -> dict[str, Any]:
    """The ``diagnosis.json`` document: ``models``, ``overall``, ``tensors``, ``verdict`` (and
    ``base``, ``layers``, ``settings``)."""
    return {**d.to_json(), "verdict": verdict}


def short_names(refs: Sequence[str]) -> list[str]:
    """Each model's folder name, numbered where two are the same (labels for tables and plots)."""
    names = [Path(r.split("+")[-1]).name or r for r in refs]
    return [n if names.count(n) == 1 else f"{n} ({i})" for i, n in enumerate(names)]


def _colour(v: float | None, lo: float, hi: float) -> str:
    """White at ``lo`` to red at ``hi`` (blue below zero for signed scales)."""
    if v is None or not math.isfinite(v):
        return "#eee"
    if v < 0:
        t = min(1.0, -v / max(abs(lo), 1e-12))
        return f"rgb({int(255 - 180 * t)},{int(255 - 120 * t)},255)"
    t = min(1.0, max(0.0, (v - max(lo, 0.0)) / max(hi - max(lo, 0.0), 1e-12)))
    return f"rgb(255,{int(255 - 170 * t)},{int(255 - 190 * t)})"


def _heatmap(title: str, matrix: Sequence[Sequence[float | None]] | None, names: Sequence[str],
             lo: float, hi: float) -> str:  # fmt: skip
    if not matrix:
        return f"<p>{html.escape(title)}: not measured (no 2-D tensors).</p>"
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for name, row in zip(names, matrix, strict=True):
        cells = "".join(
            f'<td style="background:{_colour(v, lo, hi)}">{"–" if v is None else f"{v:.3f}"}</td>'
            for v in row
        )
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return f'<table class="heat"><caption>{html.escape(title)}</caption><tr><th></th>{head}</tr>{"".join(rows)}</table>'


def _line_chart(title: str, xs: Sequence[int], series: Sequence[tuple[str, Sequence[float | None]]]) -> str:
    """An inline SVG chart of ``series`` (label, values per x)."""
    w, h, pad, left = 440, 230, 30, 60
    vals = [v for _, ys in series for v in ys if v is not None and math.isfinite(v)]
    if not xs or not vals:
        return ""
    lo, hi = min(vals), max(vals)
    lo, hi = (lo - 0.5, hi + 0.5) if hi == lo else (lo, hi)
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def pt(x: float, y: float) -> str:
        return f"{left + (x - x0) / (x1 - x0) * (w - left - pad):.1f},{h - pad - (y - lo) / (hi - lo) * (h - 2 * pad):.1f}"

    lines, legend = [], []
    for k, (label, ys) in enumerate(series):
        c = _COLOURS[k % len(_COLOURS)]
        pts = " ".join(pt(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y))
        lines.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{pts}"/>')
        legend.append(
            f'<text x="{w - 5}" y="{12 + 12 * k}" font-size="11" text-anchor="end" fill="{c}">'
            f"{html.escape(label)}</text>"
        )
    axes = (
        f'<line x1="{left}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#888"/>'
        f'<line x1="{left}" y1="{pad}" x2="{left}" y2="{h - pad}" stroke="#888"/>'
        f'<text x="{left}" y="{h - pad + 15}" font-size="10">layer {x0}</text>'
        f'<text x="{w - pad}" y="{h - pad + 15}" font-size="10" text-anchor="end">{x1}</text>'
        f'<text x="{left - 3}" y="{h - pad}" font-size="10" text-anchor="end">{lo:.3g}</text>'
        f'<text x="{left - 3}" y="{pad + 4}" font-size="10" text-anchor="end">{hi:.3g}</text>'
    )
    svg = f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">{axes}{"".join(lines)}{"".join(legend)}</svg>'
    return f"<figure><figcaption>{html.escape(title)}</figcaption>{svg}</figure>"


def _pair_mean(matrix: Sequence[Sequence[float | None]] | None) -> float | None:
    vals = [v for i, r in enumerate(matrix or []) for j, v in enumerate(r) if i < j and v is not None]
    return sum(vals) / len(vals) if vals else None


def _profiles(layers: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    if not layers:
        return "<p>No layer stack found (tensor names without a layer index).</p>"
    xs = [int(r["layer"]) for r in layers]
    rel = [(n, [r["relative_update"][i] for r in layers]) for i, n in enumerate(names)]
    charts = [
        _line_chart("relative update ‖τ‖/‖θ₀‖ per model", xs, rel),
        _line_chart("mean pairwise cosine", xs, [("cosine", [_pair_mean(r["cosine"]) for r in layers])]),
        _line_chart(
            "mean pairwise sign conflict (top-k)",
            xs,
            [
                ("sign conflict", [_pair_mean(r["sign_conflict"]) for r in layers]),
                ("election conflict", [r["sign_conflict_rate"] for r in layers]),
            ],
        ),
        _line_chart(
            "mean pairwise subspace overlap",
            xs,
            [
                ("overlap", [_pair_mean(r.get("subspace_overlap")) for r in layers]),
                ("random subspaces", [_pair_mean(r.get("subspace_overlap_chance")) for r in layers]),
            ],
        ),
    ]
    return '<div class="grid">' + "".join(charts) + "</div>"


def _model_table(doc: dict[str, Any], names: Sequence[str]) -> str:
    o = doc["overall"]
    rows = []
    for i, n in enumerate(names):
        er = o.get("effective_rank")
        cells = [
            html.escape(doc["models"][i]),
            f"{o['norms'][i]:.4g}" if o["norms"][i] is not None else "–",
            f"{o['relative_update'][i]:.4g}" if o["relative_update"][i] is not None else "–",
            f"{er[i]:.3g}" if er and er[i] is not None else "–",
        ]
        rows.append(f"<tr><th>{html.escape(n)}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "<tr><th>model</th><th>path</th><th>‖τ‖</th><th>‖τ‖/‖θ₀‖</th><th>effective rank</th></tr>"
    return f'<table class="list">{head}{"".join(rows)}</table>'


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def diagnosis_html(doc: dict[str, Any]) -> str:
    """The self-contained HTML page for a ``diagnosis.json`` document."""
    names = short_names(doc["models"])
    o, v = doc["overall"], doc["verdict"]
    scalars = "".join(
        f"<tr><th>{k}</th><td>{_fmt(o.get(k))}</td></tr>"
        for k in ("sign_conflict_rate", "norm_ratio", "normalization_sensitivity", "base_norm")
    )
    heat = (
        _heatmap("cosine of task vectors", o["cosine"], names, -1.0, 1.0)
        + _heatmap(f"sign conflict (top {doc['settings']['top_k']:.0%})", o["sign_conflict"], names, 0.0, 0.6)
        + _heatmap("sign conflict (all non-zero)", o["sign_conflict_all"], names, 0.0, 0.6)
        + _heatmap("subspace overlap", o.get("subspace_overlap"), names, 0.0, 1.0)
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>unimerge diagnosis</title>"
        f"<style>{_CSS}</style></head><body><h1>Merge diagnosis</h1>"
        f"<p>base: {html.escape(doc['base'])}</p>"
        f'<div class="verdict"><b>Verdict:</b> {html.escape(v["text"])}</div>'
        f"<h2>Models</h2>{_model_table(doc, names)}"
        f'<h2>Whole model</h2><table class="list">{scalars}</table>'
        f"<h2>Heatmaps</h2>{heat}"
        f"<h2>Per-layer profiles</h2>{_profiles(doc['layers'], names)}"
        f"<p style='font-size:.8em;color:#666'>settings: {html.escape(json.dumps(doc['settings']))}</p>"
        "</body></html>"
    )


def write_report(doc: dict[str, Any], out_dir: Path, *, force: bool = False) -> None:
    """Write ``diagnosis.json`` and ``diagnosis.html`` into ``out_dir``, all or nothing."""
    with atomic_dir(Path(out_dir), exists="replace" if force else "error") as tmp:
        (tmp / "diagnosis.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        (tmp / "diagnosis.html").write_text(diagnosis_html(doc), encoding="utf-8")
