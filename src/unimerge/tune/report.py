"""``OUT/report.html``: the search trace (objective per trial, best so far) and the chosen recipe.

One self-contained file: an inline SVG chart and two tables, no scripts.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unimerge.io import atomic_write_text

__all__ = ["trace_svg", "write_report"]

_W, _H, _PAD = 640, 240, 36


def _xy(i: int, v: float, n: int, lo: float, hi: float) -> tuple[float, float]:
    x = _PAD + (_W - 2 * _PAD) * (i / max(n - 1, 1))
    y = _H - _PAD - (_H - 2 * _PAD) * ((v - lo) / (hi - lo) if hi > lo else 0.5)
    return round(x, 1), round(y, 1)


def trace_svg(records: Sequence[Mapping[str, Any]]) -> str:
    """An SVG of each trial's objective (dots; failed trials as crosses on the axis) and the best so far."""
    n = len(records)
    values = [r["objective"] for r in records if r["status"] == "ok"]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img">',
             f'<rect width="{_W}" height="{_H}" fill="white" stroke="#ccc"/>',
             f'<text x="{_PAD}" y="20" font-size="12">objective per trial (dots), best so far (line); '
             f"range {lo:.4f} to {hi:.4f}</text>"]  # fmt: skip
    best: float | None = None
    line = []
    for r in records:
        i = int(r["index"])
        if r["status"] != "ok":
            x, y = _xy(i, lo, n, lo, hi)
            parts.append(f'<text x="{x - 4}" y="{y + 4}" fill="#c00" font-size="12">x</text>')
            continue
        x, y = _xy(i, r["objective"], n, lo, hi)
        title = html.escape(f"trial {i}: {r['method']} {json.dumps(r['params'])} -> {r['objective']:.4f}")
        parts.append(f'<circle cx="{x}" cy="{y}" r="3" fill="#36c"><title>{title}</title></circle>')
        best = r["objective"] if best is None else max(best, r["objective"])
        line.append("{},{}".format(*_xy(i, best, n, lo, hi)))
    if line:
        parts.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="#e80" stroke-width="2"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def _row(r: Mapping[str, Any]) -> str:
    cells = [str(r["index"]), r["method"], json.dumps(r["params"]), json.dumps(r["per_model"])]
    if r["status"] == "ok":
        cells += [f"{r['objective']:.4f}", json.dumps(r["scores"]), str(r.get("seconds"))]
    else:
        cells += ["failed", r.get("error", ""), ""]
    return "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"


def write_report(
    path: Path, records: Sequence[Mapping[str, Any]], best: Mapping[str, Any], recipe_yaml: str
) -> None:
    """Write the report (atomically)."""
    head = "".join(f"<th>{h}</th>" for h in ("trial", "method", "params", "per model", "objective",
                                              "validation scores", "seconds"))  # fmt: skip
    test = html.escape(json.dumps(best["test"]))
    body = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>unimerge search</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}}pre{{background:#f6f6f6;padding:1em}}</style>
</head><body>
<h1>unimerge search</h1>
<p>{len(records)} trials; best: trial {best["index"]}, validation objective {best["objective"]:.4f},
test objective {best["test_objective"]:.4f} (test scores {test}).</p>
{trace_svg(records)}
<h2>Best recipe (<code>best/unimerge_config.yaml</code>)</h2>
<pre>{html.escape(recipe_yaml)}</pre>
<h2>Trials</h2>
<table><tr>{head}</tr>
{"".join(_row(r) for r in records)}
</table></body></html>
"""
    atomic_write_text(path, body)
