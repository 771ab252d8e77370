"""The benchmark's outputs besides results.json: a rich table and a self-contained ``report.html``.

The HTML page inlines its plots as PNG data URIs (matplotlib, Agg backend), so it can be mailed or
attached to CI artifacts as one file: the results table, per-task accuracy per method (grouped bars),
the validation sweep of each method's grid, and (with ``--scaling``) normalized accuracy against
the number of merged tasks. Every row shows its 95% bootstrap interval and whether it differs
significantly from task arithmetic (paired bootstrap, :mod:`unimerge.bench.scores`): ``▲`` better,
``▼`` worse, ``=`` no significant difference, ``ref`` for task arithmetic itself.
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

__all__ = ["render_html", "render_markdown", "results_table", "scaling_markdown", "scaling_png"]


def _all_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = sorted(results["rows"], key=lambda r: -r["avg"])
    return [*results.get("baselines", []), *rows]


def _interval(row: Mapping[str, Any]) -> str:
    """``avg``'s 95% bootstrap interval, in %."""
    ci = row.get("ci95")
    return f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}" if ci else ""


def _versus(row: Mapping[str, Any]) -> str:
    """The comparison with task arithmetic: ▲ / ▼ (significant), = (not), ref, or blank."""
    if row["method"] == "task_arithmetic":
        return "ref"
    if "significant" not in row:
        return ""
    if not row["significant"]:
        return "="
    return "▲" if row["delta_vs_task_arithmetic"] > 0 else "▼"


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
    head = ["method", *tasks, "avg", "95% CI", "vs TA", "norm.", "chosen params / data", "merge s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n_base = len(results.get("baselines", []))
    for i, row in enumerate(_all_rows(results)):
        name = row["method"] if i < n_base else f"`{row['method']}`"
        cells = [f"{100 * row['per_task'][t]:.1f}" for t in tasks]
        seconds = f"{row['seconds']:.1f}" if i >= n_base and "seconds" in row else ""
        means = [
            f"{100 * row['avg']:.1f}",
            _interval(row),
            _versus(row),
            f"{100 * row['normalized_avg']:.1f}",
        ]
        lines.append("| " + " | ".join([name, *cells, *means, _shown_params(row), seconds]) + " |")
    skipped = [f"`{s['method']}` ({s['reason'].split('.')[0]})" for s in results.get("skipped", [])]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    scaling = scaling_markdown(results)
    if scaling:
        lines += [
            "",
            "Task scaling (normalized accuracy %, mean over the random subsets of each size):",
            "",
            scaling.rstrip("\n"),
        ]
    return "\n".join(lines) + "\n"


def results_table(results: Mapping[str, Any]) -> Table:
    """A rich table: one line per baseline and per method, test accuracy per task (%)."""
    tasks = results["tasks"]
    table = Table(title=f"unimerge bench --suite {results['suite']} ({results['model']}): test accuracy %")
    table.add_column("method")
    for t in tasks:
        table.add_column(t, justify="right")
    for col in ("avg", "95% CI", "vs TA", "norm.", "params", "merge s"):
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
            _interval(row),
            _versus(row),
            f"{100 * row['normalized_avg']:.1f}",
            _shown_params(row),
            seconds,
            style=style,
            end_section=i == n_base - 1,
        )
    for skip in results.get("skipped", []):
        table.add_row(
            skip["method"],
            *["-"] * len(tasks),
            "-",
            "",
            "",
            "-",
            f"skipped: {skip['reason'][:60]}",
            "",
            style="dim",
        )
    return table


def _png_bytes(fig: Figure) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _png(fig: Figure | None) -> str | None:
    if fig is None:
        return None
    return "data:image/png;base64," + base64.b64encode(_png_bytes(fig)).decode()


def _bars(results: Mapping[str, Any]) -> str | None:
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


def scaling_png(results: Mapping[str, Any]) -> bytes | None:
    """The task-scaling plot as PNG bytes (``OUT/scaling.png``), or ``None`` without ``scaling``."""
    fig = _scaling_figure(results)
    return None if fig is None else _png_bytes(fig)


def _scaling_figure(results: Mapping[str, Any]) -> Figure | None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    scaling = results.get("scaling")
    if not scaling:
        return None
    trends = results.get("scaling_trend", {})
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    for method, records in scaling.items():
        ns, vals = _by_size(records)
        mean = [sum(v) / len(v) for v in vals]
        slope = trends.get(method, {}).get("slope")
        label = method + (f" ({100 * slope:+.2f}/task)" if slope is not None else "")
        (line,) = ax.plot(ns, mean, marker="o", label=label)
        ax.fill_between(
            ns, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(), alpha=0.15
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of merged tasks")
    ax.set_ylabel("normalized accuracy (%)")
    ax.set_title("Task scaling: mean over random task subsets (band: min to max), test")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _by_size(records: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[list[float]]]:
    """Subset sizes in order, and each size's normalized accuracies (%)."""
    ns = sorted({int(r["n_tasks"]) for r in records})
    return ns, [[100 * r["normalized_avg"] for r in records if r["n_tasks"] == n] for n in ns]


def scaling_markdown(results: Mapping[str, Any]) -> str:
    """The task-scaling study as a Markdown table: mean normalized accuracy (%) per subset size, and
    the fitted line (per added task, and R^2), one method per line; empty without ``scaling``."""
    scaling = results.get("scaling")
    if not scaling:
        return ""
    sizes = sorted({int(r["n_tasks"]) for recs in scaling.values() for r in recs})
    head = ["method", *[f"{n} tasks" for n in sizes], "trend / task", "R²"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, records in scaling.items():
        ns, vals = _by_size(records)
        means = dict(zip(ns, (sum(v) / len(v) for v in vals), strict=True))
        trend = results.get("scaling_trend", {}).get(method, {})
        cells = [f"{means[n]:.1f}" if n in means else "" for n in sizes]
        fit = [f"{100 * trend['slope']:+.2f}", f"{trend['r2']:.2f}"] if trend else ["", ""]
        lines.append("| " + " | ".join([f"`{method}`", *cells, *fit]) + " |")
    return "\n".join(lines) + "\n"


def _table_html(results: Mapping[str, Any]) -> str:
    tasks = results["tasks"]
    head = "".join(
        f"<th>{html.escape(c)}</th>"
        for c in ["method", *tasks, "avg", "95% CI", "vs TA", "normalized", "params", "merge s"]
    )
    body = []
    for row in _all_rows(results):
        cells = [f"<td>{100 * row['per_task'][t]:.1f}</td>" for t in tasks]
        cls = ' class="baseline"' if "seconds" not in row else ""
        seconds = f"{row['seconds']:.2f}" if "seconds" in row else ""
        body.append(
            f"<tr{cls}><td>{html.escape(row['method'])}</td>{''.join(cells)}"
            f"<td><b>{100 * row['avg']:.1f}</b></td><td>{_interval(row)}</td><td>{_versus(row)}</td>"
            f"<td>{100 * row['normalized_avg']:.1f}</td>"
            f"<td>{html.escape(_shown_params(row))}</td><td>{seconds}</td></tr>"
        )
    for skip in results.get("skipped", []):
        body.append(
            f'<tr class="skipped"><td>{html.escape(skip["method"])}</td>'
            f'<td colspan="{len(tasks) + 6}">skipped: {html.escape(skip["reason"])}</td></tr>'
        )
    return f'<table id="results"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


_HOW_TO_READ = (
    "<h2>How to read this</h2><ul>"
    "<li><b>Accuracy</b> is on each task's test split, of the merged encoder read by that task's frozen "
    "head: a linear classifier fitted on the pretrained encoder's unit-norm features before any "
    "fine-tuning. So <i>pretrained</i> is every merge's lambda = 0 point, and a merge helps when it "
    "lands above it.</li>"
    "<li>Each method's hyperparameters are chosen on validation from its documented grid; the chosen "
    "point is reported on test.</li>"
    "<li><b>Normalized</b> = merged accuracy / the task's own expert's accuracy, averaged over tasks "
    "(100 = as good as every expert).</li>"
    "<li><b>95% CI</b>: the range the mean over tasks would fall in for 95% of test sets like this one "
    "(bootstrap over test examples). Two rows whose intervals overlap may still differ: "
    "<b>vs TA</b> compares each row with task arithmetic on the same examples (paired bootstrap): "
    "▲ significantly better, ▼ significantly worse (p &lt; 0.05), = no significant difference.</li>"
    "</ul>"
)

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}tr.baseline{background:#f4f4f4;color:#555}
tr.skipped{color:#999}img{max-width:100%;margin:1em 0}"""


def render_html(results: Mapping[str, Any]) -> str:
    """The self-contained report page for ``results`` (the results.json dict)."""
    figures: Sequence[tuple[str, str | None]] = [
        ("Per-task accuracy", _bars(results)),
        ("Hyperparameter sweeps on validation", _sweeps(results)),
        ("Task scaling", _png(_scaling_figure(results))),
    ]
    imgs = "".join(f'<h2>{title}</h2><img alt="{title}" src="{uri}">' for title, uri in figures if uri)
    meta = html.escape(
        f"suite {results['suite']} · model {results['model']} · seed {results.get('seed')} · "
        f"{results.get('date', '')} · {results.get('machine', '')}"
    )
    note = _HOW_TO_READ
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>unimerge bench: {results['suite']}"
        f"</title><style>{_CSS}</style></head><body><h1>unimerge bench: {html.escape(results['suite'])}</h1>"
        f"<p>{meta}</p><p>{note}</p>{_table_html(results)}{imgs}</body></html>"
    )
