"""mkdocs hook: the method reference (``docs/methods.md``) generated from the live registry.

``docs/methods.md`` holds the marker ``<!-- unimerge:methods -->``; this hook replaces it with one
section per registered method (:func:`unimerge.methods.list_methods`), grouped by kind, then family:
what the registry declares (kind, family, data needs, base, randomness, paper, summary), a parameter
table from :meth:`~unimerge.methods.MethodInfo.param_schema`, the grid the benchmark searches, and the
method's rows of the published results tables.

The results are parsed from ``docs/benchmark.md`` (:func:`parse_results`), so every figure exists once,
next to the command, date and machine that produced it; a method without a row says so.

``tests/test_docs.py`` calls :func:`render_methods` on the live registry without building the site.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

MARKER = "<!-- unimerge:methods -->"
RESULTS_PAGE = "benchmark.md"
_KINDS = (("tensor", "Tensor methods"), ("model", "Model methods"))
_BOUND_OPS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_ANCHOR = re.compile(r"\{#([\w-]+)\}\s*$")
_CODE = re.compile(r"`([^`]+)`")


@dataclass(frozen=True)
class ResultRow:
    """One method's row of a published results table (figures as printed, never recomputed)."""

    suite: str
    anchor: str
    avg: str
    norm: str
    chosen: str
    seconds: str


# --- the published results ------------------------------------------------------------------------


def _cells(line: str) -> list[str]:
    """The cells of one Markdown table row (outer pipes removed, cells stripped)."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table_rows(lines: Sequence[str], start: int) -> tuple[list[str], list[list[str]], int]:
    """The header and body rows of the table starting at ``lines[start]``, and the index after it."""
    header = _cells(lines[start])
    end = start + 2  # header, then the |---| separator
    rows = []
    while end < len(lines) and lines[end].lstrip().startswith("|"):
        rows.append(_cells(lines[end]))
        end += 1
    return header, rows, end


def _suite_of(heading: str) -> tuple[str | None, str]:
    """The suite a results heading names (its first code span) and its explicit anchor (``{#id}``)."""
    anchor = _ANCHOR.search(heading)
    code = _CODE.search(heading)
    return (code.group(1) if code else None), (anchor.group(1) if anchor else "")


def parse_results(markdown: str) -> dict[str, dict[str, ResultRow]]:
    """suite -> method -> row, from every results table of the benchmark page.

    A results table has the columns ``method``, ``avg``, ``norm.``, ``chosen params / data`` and
    ``merge s``; its suite is the first code span of the heading above it (``### `text8` {#results-text8}``).
    Rows whose first cell is not a code span (the references: probe, experts, multi-task) are skipped.
    """
    lines = markdown.splitlines()
    out: dict[str, dict[str, ResultRow]] = {}
    suite, anchor, i = None, "", 0
    while i < len(lines):
        heading = _HEADING.match(lines[i])
        if heading:
            suite, anchor = _suite_of(heading.group(2))
        is_table = lines[i].lstrip().startswith("|") and i + 1 < len(lines) and "---" in lines[i + 1]
        if not is_table:
            i += 1
            continue
        header, rows, i = _table_rows(lines, i)
        if suite is None or not {"method", "avg", "norm.", "chosen params / data", "merge s"} <= set(header):
            continue
        col = {name: header.index(name) for name in header}
        for cells in rows:
            name = _CODE.fullmatch(cells[col["method"]])
            if name:
                out.setdefault(suite, {})[name.group(1)] = ResultRow(
                    suite,
                    anchor,
                    cells[col["avg"]],
                    cells[col["norm."]],
                    cells[col["chosen params / data"]],
                    cells[col["merge s"]],
                )
    return out


# --- one method ------------------------------------------------------------------------------------


def _escape(text: str) -> str:
    """``text`` safe in a table cell (pipes escaped, newlines joined)."""
    return " ".join(text.split()).replace("|", "\\|")


def format_type(ann: Any) -> str:
    """A readable type: ``float``, ``float | None``, ``'total' | 'frequency'``, ``tuple[str, ...]``."""
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(format_type(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else format_type(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if ann is type(None):
        return "None"
    return getattr(ann, "__name__", str(ann))


def format_value(value: Any) -> str:
    """A default or grid value as a config would write it."""
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, int) and value > 2**32 and (value + 1).bit_count() == 1:
        return f"2**{(value + 1).bit_length() - 1} - 1"  # 9223372036854775807 -> 2**63 - 1
    return str(value)


def format_bounds(bounds: Mapping[str, float]) -> str:
    """``{"gt": 0, "le": 1}`` -> ``0 < x ≤ 1``; ``{"ge": 0}`` -> ``x ≥ 0``; ``{}`` -> ``—``."""
    lower = [(op, v) for op, v in bounds.items() if op in ("gt", "ge")]
    upper = [(op, v) for op, v in bounds.items() if op in ("lt", "le")]
    if lower and upper:
        (lo_op, lo), (up_op, up) = lower[0], upper[0]
        left = "<" if lo_op == "gt" else "≤"
        return f"{format_value(lo)} {left} x {_BOUND_OPS[up_op]} {format_value(up)}"
    if lower or upper:
        op, v = (lower or upper)[0]
        return f"x {_BOUND_OPS[op]} {format_value(v)}"
    return "—"


def _annotations(info: Any) -> dict[str, Any]:
    """Parameter name as written in a config (alias or name) -> its annotation."""
    out: dict[str, Any] = {}
    for model in (info.params, info.model_params):
        for name, f in model.model_fields.items():
            out[f.alias or name] = f.annotation
    return out


def param_table(info: Any) -> list[str]:
    """The method's parameters: name, scope, type, default, bounds, description."""
    schema = info.param_schema()
    types_ = _annotations(info)
    lines = ["| parameter | scope | type | default | bounds | description |", "|---|---|---|---|---|---|"]
    for name, p in schema.items():
        scope = "global" if p["scope"] == "global" else "per model"
        lines.append(
            f"| `{name}` | {scope} | `{format_type(types_[name])}` | `{format_value(p['default'])}` "
            f"| {format_bounds(p['bounds'])} | {_escape(p['description']) or '—'} |"
        )
    return lines


def grid_lines(info: Any, suite_grids: Mapping[str, Mapping[str, Sequence[Any]]]) -> list[str]:
    """What the benchmark searches for this method (registered grid, and any suite's own grid)."""

    def fmt(grid: Mapping[str, Sequence[Any]]) -> str:
        return "; ".join(
            f"`{k}` ∈ {{{', '.join(format_value(v) for v in vals)}}}" for k, vals in grid.items()
        )

    if info.kind == "model":
        registered = f" (registered grid, not searched: {fmt(info.grid)})" if info.grid else ""
        return [
            f"**Benchmark grid:** none; the benchmark runs data-aware methods once at their defaults{registered}."
        ]
    lines = [
        f"**Benchmark grid** (searched on validation): {fmt(info.grid) if info.grid else 'none (defaults)'}."
    ]
    for suite, grid in sorted(suite_grids.items()):
        lines.append(f"Suite `{suite}` searches its own, coarser grid: {fmt(grid)}.")
    return lines


def result_lines(name: str, results: Mapping[str, Mapping[str, ResultRow]]) -> list[str]:
    """The method's rows of the published results tables (from the benchmark page)."""
    rows = [suite_rows[name] for _, suite_rows in sorted(results.items(), reverse=True) if name in suite_rows]
    if not rows:
        return ["**Benchmark:** not in the published table."]
    lines = [
        "**Benchmark** (test accuracy %; command, date and machine with each table on the "
        f"[benchmark page]({RESULTS_PAGE})):",
        "",
        "| suite | avg | norm. | chosen params / data | merge s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        suite = f"[`{r.suite}`]({RESULTS_PAGE}#{r.anchor})" if r.anchor else f"`{r.suite}`"
        lines.append(f"| {suite} | {r.avg} | {r.norm} | {r.chosen or '—'} | {r.seconds or '—'} |")
    return lines


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def method_section(
    info: Any,
    results: Mapping[str, Mapping[str, ResultRow]],
    suite_grids: Mapping[str, Mapping[str, Sequence[Any]]],
) -> list[str]:
    """One method's section: heading, summary, facts, parameters, grid, benchmark rows."""
    base = "yes" if info.needs_base else ("optional" if getattr(info, "optional_base", False) else "no")
    paper = f"[{info.paper.split('://', 1)[-1]}]({info.paper})" if info.paper else "—"
    return [
        f"### `{info.name}` {{#{info.name}}}",
        "",
        _escape(info.summary) or "—",
        "",
        f"**Paper:** {paper}",
        "",
        "| kind | family | data | needs base | random |",
        "|---|---|---|---|---|",
        f"| {info.kind} | {info.family} | {info.data} | {base} | {_yes(info.random)} |",
        "",
        *param_table(info),
        "",
        *grid_lines(info, suite_grids),
        "",
        *result_lines(info.name, results),
        "",
    ]


# --- the page ----------------------------------------------------------------------------------------


def index_table(methods: Sequence[Any], results: Mapping[str, Mapping[str, ResultRow]]) -> list[str]:
    """One line per method: name (linked), kind, family, data needs, published averages."""
    suites = sorted(results, reverse=True)
    head = " | ".join(f"`{s}` avg" for s in suites)
    lines = [f"| method | kind | family | data | {head} |", "|---|---|---|---|" + "---|" * len(suites)]
    for m in methods:
        avgs = " | ".join(results[s][m.name].avg if m.name in results[s] else "—" for s in suites)
        lines.append(f"| [`{m.name}`](#{m.name}) | {m.kind} | {m.family} | {m.data} | {avgs} |")
    return lines


def render_methods(
    methods: Sequence[Any],
    results: Mapping[str, Mapping[str, ResultRow]],
    suite_grids: Mapping[str, Mapping[str, Mapping[str, Sequence[Any]]]] | None = None,
) -> str:
    """The method reference as Markdown: an index table, then every method grouped by kind and family.

    ``suite_grids``: method -> suite -> that suite's own grid (``Suite.grids``), when it has one.
    """
    ordered = sorted(methods, key=lambda m: ([k for k, _ in _KINDS].index(m.kind), m.family, m.name))
    lines = [f"{len(ordered)} methods are registered.", "", *index_table(ordered, results), ""]
    for kind, title in _KINDS:
        of_kind = [m for m in ordered if m.kind == kind]
        if of_kind:  # an anchor for the kind, then one section per family
            lines += [f'<a id="{kind}-methods"></a>', ""]
        for family in dict.fromkeys(m.family for m in of_kind):
            lines += [f"## {title}: `{family}` {{#{kind}-{family}}}", ""]
            for m in (m for m in of_kind if m.family == family):
                lines += method_section(m, results, (suite_grids or {}).get(m.name, {}))
    return "\n".join(lines)


def live_suite_grids() -> dict[str, dict[str, dict[str, tuple[Any, ...]]]]:
    """method -> suite -> grid, for the suites that replace a method's registered grid."""
    from unimerge.data import SUITES

    out: dict[str, dict[str, dict[str, tuple[Any, ...]]]] = {}
    for suite in SUITES.values():
        for method, grid in suite.grids:
            out.setdefault(method, {})[suite.name] = dict(grid)
    return out


def render_live(docs_dir: Path) -> str:
    """The reference for the registry as installed, with the results of ``docs_dir/benchmark.md``."""
    from unimerge.methods import list_methods

    results = parse_results((docs_dir / RESULTS_PAGE).read_text(encoding="utf-8"))
    return render_methods(list_methods(), results, live_suite_grids())


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs event: fill the marker on the methods page."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render_live(Path(config["docs_dir"])))
