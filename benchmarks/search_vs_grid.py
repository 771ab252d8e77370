"""A 64-trial `unimerge search` against grid search of the same methods (issue 16's acceptance).

Over the experts of a finished benchmark run (``unimerge bench --suite quick --out BENCH``: its
experts, suite, seed and splits), two searches with the same evaluator (``data: {suite}``: every
trial scored on the suite's val split, the chosen one once on test):

1. ``strategy: grid``: every point of each method's registered grid (what the benchmark does for each
   data-free method), so its best trial is the best grid-searched data-free method;
2. ``strategy: tpe`` with ``--budget`` trials (default 64) over the same methods, their registered
   grids taken as ranges (``unimerge.tune``'s space).

It reports each one's best validation score and its test score, next to the benchmark table's test
scores, and whether the search reached the grid's validation score. Outputs (never committed):
``OUT/grid/`` and ``OUT/tpe/`` (each a search folder: ``search.json``, ``best/``, ``report.html``)
and ``OUT/comparison.md``.

Usage::

    python benchmarks/search_vs_grid.py --bench bench-out --out search-out --budget 64 --workers 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

from unimerge.bench.model import pretrained_dir
from unimerge.methods import get_method
from unimerge.tune import SearchResult, search

METHODS = ["task_arithmetic", "ties", "dare_ties", "tsv_m", "iso_c", "pcb"]


def search_config(
    results: dict[str, Any], methods: list[str], strategy: str, budget: int, seed: int
) -> dict[str, Any]:
    """A search over the benchmark's experts, scored on its suite's splits."""
    return {
        "base_model": str(pretrained_dir()),
        "models": [{"model": results["experts"][t]} for t in results["tasks"]],
        "data": {"suite": results["suite"], "seed": results["seed"]},
        "search": {"methods": methods, "budget": budget, "strategy": strategy, "seed": seed, "batch": 4},
    }


def _row(label: str, found: SearchResult, seconds: float) -> str:
    test = sum(found.test.values()) / len(found.test)
    ok = sum(r["status"] == "ok" for r in found.trials)
    return (f"| {label} | {ok} | {found.best['method']} {found.best['params']} | "
            f"{100 * found.best['objective']:.2f} | {100 * test:.2f} | {seconds:.0f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=Path, required=True, help="a finished `unimerge bench` output folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--workers", type=int, default=2, help="local Ray workers (0: no Ray)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    results = json.loads((args.bench / "results.json").read_text())
    grid_size = sum(math.prod(len(v) for v in get_method(m).grid.values()) for m in args.methods)
    runs = {}
    for label, strategy, budget in (("grid", "grid", grid_size), ("tpe", "tpe", args.budget)):
        cfg = search_config(results, args.methods, strategy, budget, args.seed)
        start = time.perf_counter()
        runs[label] = (search(cfg, args.out / label, workers=args.workers), time.perf_counter() - start)
    grid, tpe = runs["grid"][0], runs["tpe"][0]
    gain = tpe.best["objective"] - grid.best["objective"]
    bench = {r["method"]: 100 * r["avg"] for r in results["rows"]}
    lines = [
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, suite "
        f"{results['suite']}, methods {args.methods}, {args.workers} Ray workers",
        "",
        "| search | trials | best trial | validation (mean acc.) | test (mean acc.) | wall s |",
        "|---|---|---|---|---|---|",
        _row(f"grid: every registered grid point ({grid_size})", *runs["grid"]),
        _row(f"TPE, {args.budget} trials", *runs["tpe"]),
        "",
        f"TPE reached the grid's best validation score: {'yes' if gain >= -1e-12 else 'NO'} "
        f"({100 * gain:+.2f} points). The benchmark table's test scores of the same experts: "
        + ", ".join(f"{m} {v:.1f}" for m, v in bench.items()),
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "comparison.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
