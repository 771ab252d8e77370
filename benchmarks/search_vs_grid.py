"""A 64-trial `unimerge search` against the benchmark's grid search (issue 16's acceptance).

The benchmark (``unimerge bench --suite quick --out BENCH``) tunes every data-free method on its
registered grid on validation and reports the chosen point on test. This runs one search over the
same experts, data and splits (``data: {suite}``: the suite's val split per trial, test once for
the chosen trial) with ``--budget`` trials (default 64, TPE) over the data-free methods that did
best in the benchmark, their registered parameters as ranges, and compares:

- the search's best validation objective (mean accuracy) with the best grid-searched data-free
  method's validation score, both re-scored by the search's own evaluator (the same code path, so
  any difference in protocol between the two programs cannot decide the comparison);
- the search's test score beside the benchmark table's test scores.

Writes ``OUT/search.json``, ``OUT/best/``, ``OUT/report.html`` (the search's) and
``OUT/comparison.md``.

Usage::

    python benchmarks/search_vs_grid.py --bench bench-out --out search-out --budget 64 --workers 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path
from typing import Any

from unimerge.bench.model import pretrained_dir
from unimerge.methods import TensorMethod, get_method
from unimerge.tune import Trial, parse_search_config, search
from unimerge.tune.jobs import evaluator

TOP = 6  # data-free methods of the benchmark, best validation first, that form the space


def data_free_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmark's tuned data-free rows, best validation score first."""
    rows = [
        r for r in results["rows"] if "val_avg" in r and isinstance(get_method(r["method"]), TensorMethod)
    ]
    return sorted(rows, key=lambda r: -r["val_avg"])


def search_config(results: dict[str, Any], methods: list[str], budget: int, seed: int) -> dict[str, Any]:
    return {
        "base_model": str(pretrained_dir()),
        "models": [{"model": results["experts"][t]} for t in results["tasks"]],
        "data": {"suite": results["suite"], "seed": results["seed"]},
        "search": {"methods": methods, "budget": budget, "strategy": "tpe", "seed": seed, "batch": 4},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=Path, required=True, help="a finished `unimerge bench` output folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="local Ray workers (0: no Ray)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    results = json.loads((args.bench / "results.json").read_text())
    rows = data_free_rows(results)
    methods = [r["method"] for r in rows[:TOP]]
    cfg = search_config(results, methods, args.budget, args.seed)
    start = time.perf_counter()
    found = search(cfg, args.out, workers=args.workers)
    seconds = time.perf_counter() - start
    ev = evaluator(parse_search_config(cfg).model_dump_json(), None)  # the search's own scoring
    grid_best = rows[0]
    grid_val = ev.score(Trial(method=grid_best["method"], params=grid_best["params"]), "validation")
    grid_obj = sum(grid_val.values()) / len(grid_val)
    search_obj = found.best["objective"]
    test = sum(found.test.values()) / len(found.test)
    lines = [
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"{args.budget} TPE trials over {methods}, {args.workers} Ray workers, {seconds:.0f} s",
        "",
        "| | method | validation (mean acc.) | test (mean acc.) |",
        "|---|---|---|---|",
        f"| best grid-searched data-free method | {grid_best['method']} {grid_best['params']} | "
        f"{100 * grid_obj:.2f} | {100 * grid_best['avg']:.2f} |",
        f"| search, best of {args.budget} trials | {found.best['method']} {found.best['params']} | "
        f"{100 * search_obj:.2f} | {100 * test:.2f} |",
        "",
        f"search >= grid on validation: {'yes' if search_obj >= grid_obj - 1e-12 else 'NO'} "
        f"({100 * (search_obj - grid_obj):+.2f} points)",
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "comparison.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
