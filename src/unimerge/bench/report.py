"""The benchmark's outputs besides results.json: a rich table and a self-contained ``report.html``.

The HTML page inlines its plots as PNG data URIs (matplotlib, Agg backend), so it can be mailed or
attached to CI artifacts as one file: the results table, per-task accuracy per method (grouped bars),
the validation sweep of each method's grid, and (with ``--scaling``) normalized accuracy against
the number of merged tasks.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["render_html", "render_markdown", "results_table"]


def _all_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = sorted(results["rows"], key=lambda r: -r["avg"])
    return [*results.get("baselines", []), *rows]


def _fmt_params(params: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (params or {}).items())


def _shown_params(row: Mapping[str, Any]) -> str:
    """Chosen grid point (data-free) or, for data-aware rows, the data they used."""
    budget = row.get("data_budget")
    if budget:
        kind = "labelled" if budget.get("labeled") else "unlabelled"
        n = budget["examples_per_task"]
        shown = f"defaults; {n} {kind} examples per task" if n else "defaults; no data"
        total, dense = row.get("params_total"), row.get("params_dense")
        if total and dense and total != dense:
            shown += f"; stores {total / dense:.3f}x the dense parameters"
        return shown
    return _fmt_params(row.get("params"))


def render_markdown(results: Mapping[str, Any]) -> str:
    """The results as a Markdown table (what the README shows): test accuracy % per task, mean,
    normalized mean, chosen parameters and merge seconds, best method first; skipped methods below."""
    tasks = results["tasks"]
    head = ["method", *tasks, "avg", "norm.", "chosen params / data", "merge s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n_base = len(results.get("baselines", []))
    for i, row in enumerate(_all_rows(results)):
        name = row["method"] if i < n_base else f"`{row['method']}`"
        cells = [f"{100 * row['per_task'][t]:.1f}" for t in tasks]
        seconds = f"{row['seconds']:.1f}" if i >= n_base and "seconds" in row else ""
        means = [f"{100 * row['avg']:.1f}", f"{100 * row['normalized_avg']:.1f}"]
        lines.append("| " + " | ".join([name, *cells, *means, _shown_params(row), seconds]) + " |")
    skipped = [f"`{s['method']}` ({s['reason'].split('.')[0]})" for s in results.get("skipped", [])]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def results_table(results: Mapping[str, Any]) -> Table:
    """A rich table: one line per baseline and per method, test accuracy per task (%)."""
    tasks = results["tasks"]
    table = Table(title=f"unimerge bench --suite {results['suite']} ({results['model']}): test accuracy %")
    table.add_column("method")
    for t in tasks:
        table.add_column(t, justify="right")
    for col in ("avg", "norm.", "params", "merge s"):
        table.add_column(col, justify="right" if col != "params" else "left")
    n_base = len(results.get("baselines", []))
    for i, row in enumerate(_all_rows(results)):
        cells = [f"{100 * row['per_task'][t]:.1f}" for t in tasks]
        seconds = f"{row['seconds']:.2f}" if "seconds" in row else ""
        style = "dim" if i < n_base else None
        table.add_row(
            row["method"],
            *cells,
            f"{100 * row['avg']:.1f}",
            f"{100 * row['normalized_avg']:.1f}",
            _shown_params(row),
            seconds,
            style=style,
            end_section=i == n_base - 1,
        )
    for skip in results.get("skipped", []):
        table.add_row(
            skip["method"], *["-"] * len(tasks), "-", "-", f"skipped: {skip['reason'][:60]}", "", style="dim"
        )
    return table


def _png(fig: Figure) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _bars(results: Mapping[str, Any]) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    rows, tasks = _all_rows(results), results["tasks"]
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(tasks) + 0.25 * len(rows)), 4.2))
    x = np.arange(len(tasks))
    cmap = plt.get_cmap("tab20")
    for i, row in enumerate(rows):
        ax.bar(
            x + (i - (len(rows) - 1) / 2) * width,
            [100 * row["per_task"][t] for t in tasks],
            width,
            label=row["method"],
            color=cmap(i % 20),
        )
    ax.set_xticks(x, tasks, rotation=20, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Per-task accuracy (merged encoder, each task's own head)")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def _sweep_axis(row: Mapping[str, Any]) -> str | None:
    """The swept parameter to draw on the x axis: ``lambda`` if swept, else the first numeric one."""
    params = [g["params"] for g in row.get("grid", [])]
    swept = [
        k
        for k in (params[0] if params else {})
        if len({repr(p[k]) for p in params}) > 1 and all(isinstance(p[k], (int, float)) for p in params)
    ]
    return "lambda" if "lambda" in swept else (swept[0] if swept else None)


def _sweeps(results: Mapping[str, Any]) -> str | None:
    import matplotlib.pyplot as plt

    drawn = [(r, k) for r in results["rows"] if (k := _sweep_axis(r))]
    if not drawn:
        return None
    keys = sorted({k for _, k in drawn})
    fig, axes = plt.subplots(1, len(keys), figsize=(5.0 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for row, k in drawn:
            if k != key:
                continue
            best: dict[float, float] = {}  # value -> best validation mean over the other parameters
            for g in row["grid"]:
                v = float(g["params"][key])
                best[v] = max(best.get(v, 0.0), g["val_avg"])
            xs = sorted(best)
            ax.plot(xs, [100 * best[v] for v in xs], marker="o", label=row["method"])
        ax.set_xlabel(key)
        ax.set_ylabel("validation accuracy, mean over tasks (%)")
        ax.set_title(f"Validation sweep over {key}")
        ax.legend(fontsize=7)
    return _png(fig)


def _scaling(results: Mapping[str, Any]) -> str | None:
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    scaling = results.get("scaling")
    if not scaling:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, records in scaling.items():
        ks = sorted({r["k"] for r in records})
        vals = [[100 * r["normalized_avg"] for r in records if r["k"] == k] for k in ks]
        ax.errorbar(
            ks,
            [np.mean(v) for v in vals],
            yerr=[np.std(v) for v in vals],
            marker="o",
            capsize=3,
            label=method,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of merged tasks")
    ax.set_ylabel("normalized accuracy (%)")
    ax.set_title("Task scaling (mean ± std over random task subsets, test)")
    ax.legend(fontsize=7)
    return _png(fig)


def _table_html(results: Mapping[str, Any]) -> str:
    tasks = results["tasks"]
    head = "".join(
        f"<th>{html.escape(c)}</th>" for c in ["method", *tasks, "avg", "normalized", "params", "merge s"]
    )
    body = []
    for row in _all_rows(results):
        cells = [f"<td>{100 * row['per_task'][t]:.1f}</td>" for t in tasks]
        cls = ' class="baseline"' if "seconds" not in row else ""
        seconds = f"{row['seconds']:.2f}" if "seconds" in row else ""
        body.append(
            f"<tr{cls}><td>{html.escape(row['method'])}</td>{''.join(cells)}"
            f"<td><b>{100 * row['avg']:.1f}</b></td><td>{100 * row['normalized_avg']:.1f}</td>"
            f"<td>{html.escape(_shown_params(row))}</td><td>{seconds}</td></tr>"
        )
    for skip in results.get("skipped", []):
        body.append(
            f'<tr class="skipped"><td>{html.escape(skip["method"])}</td>'
            f'<td colspan="{len(tasks) + 4}">skipped: {html.escape(skip["reason"])}</td></tr>'
        )
    return f'<table id="results"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}tr.baseline{background:#f4f4f4;color:#555}
tr.skipped{color:#999}img{max-width:100%;margin:1em 0}"""


def render_html(results: Mapping[str, Any]) -> str:
    """The self-contained report page for ``results`` (the results.json dict)."""
    figures: Sequence[tuple[str, str | None]] = [
        ("Per-task accuracy", _bars(results)),
        ("Hyperparameter sweeps on validation", _sweeps(results)),
        ("Task scaling", _scaling(results)),
    ]
    imgs = "".join(f'<h2>{title}</h2><img alt="{title}" src="{uri}">' for title, uri in figures if uri)
    meta = html.escape(
        f"suite {results['suite']} · model {results['model']} · seed {results.get('seed')} · "
        f"{results.get('date', '')} · {results.get('machine', '')}"
    )
    note = (
        "Accuracy on each task's test split of the merged encoder with that task's own head. "
        "Hyperparameters chosen on validation from each method's documented grid; normalized = "
        "merged / individual expert accuracy, averaged over tasks."
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>unimerge bench: {results['suite']}"
        f"</title><style>{_CSS}</style></head><body><h1>unimerge bench: {html.escape(results['suite'])}</h1>"
        f"<p>{meta}</p><p>{note}</p>{_table_html(results)}{imgs}</body></html>"
    )
