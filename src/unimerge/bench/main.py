"""``run_bench``: one benchmark run from suite name to ``results.json`` and ``report.html``.

``results.json`` follows the contract in the design notes::

    {"suite", "model", "tasks": [...], "pretrained": {task: acc}, "individual": {task: acc},
     "rows": [{"method", "params", "per_task", "avg", "normalized_avg", "seconds", ...}], ...}

``pretrained`` is the pretrained encoder with each task's frozen head (every merge's lambda = 0
point) and ``individual`` each task's own expert, both on test. ``protocol`` names the head, the
features, the stopping rule and the statistics (:data:`unimerge.bench.recipes.PROTOCOL`). Every row
(references included) has ``ci95`` (the 95% bootstrap interval of ``avg``) and, besides task
arithmetic itself, ``p_vs_task_arithmetic`` and ``significant`` (:mod:`unimerge.bench.scores`),
and ``correct`` (each test example's correctness, packed). Extra keys: ``multitask`` (the
multi-task model per task), ``baselines`` (the three references as rows), ``skipped``
(``[{"method", "reason"}]``), ``data`` (split sizes, class counts), ``experts`` (paths of the
cached Hugging Face folders and each expert's training record), ``scaling`` (with ``--scaling``:
``{method: [{n_tasks, tasks, avg, normalized_avg}]}``) and ``scaling_trend`` (per method, the
least-squares line of normalized accuracy against the number of tasks), ``seed``, ``date``,
``machine``, ``seconds_total``, and per row ``val_avg``, ``family`` and ``grid`` (every grid
point's validation accuracies). With ``--scaling`` the run also writes ``scaling.png`` (the plot)
and ``results.md`` ends with the scaling table (:func:`~unimerge.bench.report.scaling_markdown`).
``results.json`` is rewritten after every method (with ``"complete": false``), so a long run that
is interrupted still leaves its finished rows behind.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from unimerge.bench.recipes import PROTOCOL
from unimerge.bench.report import render_html, render_markdown, results_table, scaling_png
from unimerge.bench.runner import (
    MODEL_NAME,
    Prepared,
    baselines,
    dataset_info,
    get_suite,
    grid_points,
    prepare,
    rich_progress,
    run_scaling,
    scaled_rows,
    scaling_subsets,
    select_methods,
    tune_method,
)
from unimerge.bench.scores import add_statistics, round_floats, scaling_trend
from unimerge.core import validate_params
from unimerge.errors import ConfigError
from unimerge.io.atomic import atomic_file, atomic_write_text
from unimerge.methods import MethodInfo, ModelMethod

__all__ = ["run_bench"]


def _machine() -> str:
    mem = ""
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        mem = f", {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB"
    return (
        f"{platform.machine()} {os.cpu_count()}-core CPU{mem}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def _skeleton(prep: Prepared, started: float) -> dict[str, Any]:
    names = [t.name for t in prep.tasks]
    base_rows = baselines(prep)
    return {
        "suite": prep.suite.name,
        "model": MODEL_NAME,
        "tasks": names,
        "protocol": PROTOCOL | _budget(prep),
        "pretrained": base_rows[0]["per_task"],
        "individual": prep.individual,
        **({"multitask": base_rows[2]["per_task"]} if len(base_rows) > 2 else {}),
        "rows": [],
        "skipped": [],
        "baselines": base_rows,
        "data": dataset_info(prep),
        "experts": {t: str(e.path) for t, e in zip(names, prep.experts, strict=True)},
        "training": {t: _training(e.meta) for t, e in zip(names, prep.experts, strict=True)},
        "seed": prep.seed,
        "scaling_test": prep.suite.scaling_test,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": _machine(),
        "complete": False,
        "seconds_total": round(time.perf_counter() - started, 1),
    }


def _budget(prep: Prepared) -> dict[str, Any]:
    suite = prep.suite
    return {
        "budget": {
            "lr": suite.lr,
            "batch_size": suite.batch_size,
            "step_cap": suite.steps,
            "eval_every": suite.eval_every,
            "patience": suite.patience,
            "multitask_step_cap": suite.mtl_steps,
            "multitask_eval_every": suite.mtl_eval_every,
        }
    }


def _training(meta: dict[str, Any]) -> dict[str, Any]:
    """An expert's training record: where validation peaked, how long it took."""
    return {k: meta.get(k) for k in ("best_step", "val_history", "train_seconds")}


def _reusable_rows(
    paths: Sequence[Path], results: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Finished rows of earlier runs of the same suite, seed and experts, by method, and their
    task-scaling records (where the runs read the same number of test examples per point).

    Raises:
        ConfigError: a ``results.json`` that is missing, unreadable or from another setup.
    """
    rows: dict[str, dict[str, Any]] = {}
    scaling: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        file = path / "results.json" if path.is_dir() else path
        try:
            old = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"Cannot reuse rows from {file}: {err}. Give a benchmark output folder."
            ) from None
        same = {k: old.get(k) for k in ("suite", "seed", "tasks", "experts", "protocol")}
        want = {k: results[k] for k in same}
        if same != want:
            diff = ", ".join(k for k in same if same[k] != want[k])
            raise ConfigError(
                f"Cannot reuse rows from {file}: its {diff} differ from this run's "
                f"(suite {results['suite']}, seed {results['seed']}). Reuse only runs of the same setup."
            )
        for row in old.get("rows", []):
            rows.setdefault(row["method"], row)
        if old.get("scaling_test") == results["scaling_test"]:
            for method, records in old.get("scaling", {}).items():
                scaling.setdefault(method, records)
    return rows, scaling


def _same_recipe(row: dict[str, Any], info: MethodInfo) -> bool:
    """Whether ``row`` was made with ``info``'s current grid (data-free) or defaults (data-aware)."""
    if not isinstance(info, ModelMethod):
        return bool([g["params"] for g in row.get("grid", [])] == _as_json(grid_points(info)))
    defaults = validate_params(info, {}, [])[0].model_dump(mode="json", by_alias=True)
    return bool(row.get("params") == _as_json(defaults))


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(round_floats(value)))


def _write(out: Path, results: dict[str, Any]) -> None:
    atomic_write_text(out / "results.json", json.dumps(round_floats(results), indent=2))


def run_bench(
    suite_name: str,
    out: Path,
    methods: Sequence[str] | None = None,
    scaling: bool = False,
    seed: int = 0,
    root: Path | None = None,
    console: Console | None = None,
    reuse: Sequence[Path] = (),
    jobs: int = 1,
) -> dict[str, Any]:
    """Run suite ``suite_name`` and write ``out/results.json`` and ``out/report.html``.

    Args:
        suite_name: ``text8``, ``quick`` or ``smoke``.
        out: output folder (created).
        methods: method names to run; default: the suite's default (all data-free methods for text8).
        scaling: also merge random subsets of 2..N tasks and plot normalized accuracy against N.
        seed: seed of the data splits, training and random methods.
        root: cache folder (default :func:`unimerge.io.cache_root`).
        console: where tables and progress go.
        reuse: earlier output folders (or ``results.json`` files) of the same suite, seed and
            experts: a method with a row there made with its current grid (data-aware: its current
            defaults) is not run again, its row is copied.
        jobs: experts trained at once (worker processes, one torch thread each) on a cold cache.

    Returns:
        The results dict written to ``results.json``.
    """
    console = console or Console()
    started = time.perf_counter()
    suite = get_suite(suite_name)
    infos = select_methods(suite, methods)
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(suite, seed, root, console, jobs=jobs)
    results = _skeleton(prep, started)
    done, done_scaling = _reusable_rows(reuse, results)
    reused_scaling: dict[str, list[dict[str, Any]]] = {}  # method -> records of a reused row
    with rich_progress(console) as progress:
        bar = progress.add_task(
            "methods (grid points on validation)", total=sum(len(grid_points(i)) for i in infos)
        )
        for info in infos:
            progress.update(bar, description=f"method {info.name}")
            if info.name in done and _same_recipe(done[info.name], info):
                row = done[info.name]
                if info.name in done_scaling:
                    reused_scaling[info.name] = done_scaling[info.name]
                progress.advance(bar, len(grid_points(info)))
            else:
                row = tune_method(prep, info, lambda n: progress.advance(bar, n))
            (results["skipped"] if "reason" in row else results["rows"]).append(row)
            _write(out, results)
        if scaling and results["rows"]:
            n_sub = len(scaling_subsets(len(prep.tasks), suite.scaling_subsets, seed))
            bar = progress.add_task("task scaling", total=len(scaled_rows(suite, results["rows"])) * n_sub)
            results["scaling"] = run_scaling(
                prep, results["rows"], lambda n: progress.advance(bar, n), reused_scaling
            )
            results["scaling_trend"] = {m: scaling_trend(r) for m, r in results["scaling"].items()}
    add_statistics([*results["baselines"], *results["rows"]], seed=seed)
    results["complete"] = True
    results["seconds_total"] = round(time.perf_counter() - started, 1)
    return _finish(out, results, console)


def _finish(out: Path, results: dict[str, Any], console: Console) -> dict[str, Any]:
    """Write the complete ``results.json``, ``report.html`` and ``results.md``; print the table."""
    final: dict[str, Any] = round_floats(results)
    _write(out, final)
    atomic_write_text(out / "report.html", render_html(final))
    atomic_write_text(out / "results.md", render_markdown(final))
    png = scaling_png(final)
    if png is not None:
        with atomic_file(out / "scaling.png") as tmp:
            tmp.write_bytes(png)
    console.print(results_table(final))
    files = f"{out / 'results.json'}, {out / 'results.md'} and {out / 'report.html'}"
    files += f" (and {out / 'scaling.png'})" if png is not None else ""
    console.print(f"Wrote {files} in {final['seconds_total']:.0f} s.")
    return final
