"""Does ``unimerge diagnose`` predict merged accuracy? The study of issue 13 on the text12 benchmark.

1. One diagnosis of the pretrained encoder and every expert; each task subset's diagnostics are
   derived from it (:func:`unimerge.diagnose.predict.subset_overall`) and checked against direct
   diagnoses of ``--check`` subsets (exact but for randomized-SVD noise in the subspace numbers).
2. Normalized accuracy per subset, for task arithmetic and the data-free methods of the scaling study:
   the benchmark's ``scaling`` records, plus the subsets of another seed (``--extra-seed``) evaluated
   by the bench's own :func:`~unimerge.bench.runner.run_scaling` at each row's chosen parameters (the
   heads and experts load from the cache; nothing trains). These methods draw no random numbers, so
   the seed only picks the subsets.
3. Spearman's rho of every score against task arithmetic's and the best method's normalized accuracy,
   with 95% bootstrap intervals over subsets, and the partial rho within subset size (both ranked,
   each size's mean rank removed): does a score predict beyond "more tasks merge worse"?

Writes ``OUT/predicts.json`` and ``OUT/predicts.png``, prints a markdown table. The diagnosis, the
check and the extra evaluations are kept in ``OUT`` and reused by a rerun (delete them to redo).

Usage::

    UNIMERGE_CACHE=/tmp/t12cache python benchmarks/diagnose_predicts.py --out /tmp/diagpred \\
        --results /tmp/t12all/results.json --cache /tmp/t12cache
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unimerge.diagnose import DiagnoseOptions, diagnose_models, summary_scores
from unimerge.diagnose.predict import bootstrap_ci, partial_spearman, spearman, subset_overall
from unimerge.io.atomic import atomic_write_text

METHODS = ("task_arithmetic", "ties", "tsv_m", "iso_cts", "cart")  # the data-free scaled methods
TARGETS = {"TA": "task_arithmetic", "best": "best"}
SKIP = ("sign_conflict_rate",)  # the all-model sign election is not derivable from pairs


def _cached(path: Path, make: Callable[[], Any]) -> Any:
    """``make()``, kept as JSON at ``path`` and read back on a rerun."""
    if path.exists():
        return json.loads(path.read_text())
    value = make()
    atomic_write_text(path, json.dumps(value))
    return value


def _encoders(results: dict[str, Any]) -> list[Path]:
    paths = [Path(results["experts"][t]) for t in results["tasks"]]
    missing = [str(p) for p in paths if not (p / "meta.json").exists()]
    if missing:  # prepare() would train them: refuse instead
        raise SystemExit(f"Experts not in the cache (nothing is trained here): {missing}")
    return [p / "encoder" for p in paths]


def _diagnose(base: Path, encoders: Sequence[Path]) -> dict[str, Any]:
    d = diagnose_models(base, encoders, DiagnoseOptions(threads=2))
    return {"models": d.models, "overall": d.overall, "settings": d.settings, "seconds": d.seconds}


def _scores(overall: dict[str, Any], idx: Sequence[int]) -> dict[str, float | None]:
    out = summary_scores(subset_overall(overall, idx))
    return {k: v for k, v in out.items() if k not in SKIP}


def _check(base: Path, encoders: Sequence[Path], overall: dict[str, Any],
           picks: Sequence[Sequence[int]]) -> list[dict[str, Any]]:  # fmt: skip
    """Derived subset scores against a direct diagnosis of the subset."""
    out = []
    for idx in picks:
        direct = _diagnose(base, [encoders[i] for i in idx])
        want = {k: v for k, v in summary_scores(direct["overall"]).items() if k not in SKIP}
        got = _scores(overall, idx)
        diff = {k: abs(got[k] - v) for k, v in want.items() if v is not None and got[k] is not None}  # type: ignore[operator]
        out.append({"idx": list(idx), "derived": got, "direct": want, "abs_diff": diff,
                    "seconds": direct["seconds"]})  # fmt: skip
    return out


def _extra(results: dict[str, Any], cache: Path, seed: int, per_size: int) -> dict[str, Any]:
    """Scaling records of the subsets of ``seed`` (``per_size`` per size), by the bench's runner."""
    from rich.console import Console

    from unimerge.bench.runner import get_suite, prepare, run_scaling

    expected = [str(p.parent) for p in _encoders(results)]
    suite = get_suite(results["suite"])
    prep = prepare(suite, seed=int(results["seed"]), root=cache, console=Console(stderr=True))
    if [str(e.path) for e in prep.experts] != expected:
        raise SystemExit(f"The cache's experts {[str(e.path) for e in prep.experts]} are not {expected}.")
    rows = [r for r in results["rows"] if r["method"] in METHODS]
    prep = dataclasses.replace(prep, suite=dataclasses.replace(suite, scaling_subsets=per_size), seed=seed)
    reuse = {m: results["scaling"][m] for m in METHODS}
    return run_scaling(prep, rows, reuse=reuse)


def _subsets(results: dict[str, Any], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per distinct subset with every method's normalized accuracy."""
    found: dict[tuple[str, ...], dict[str, Any]] = {}
    for source, scaling in (("results", results["scaling"]), ("extra", extra)):
        for m in METHODS:
            for r in scaling.get(m, []):
                rec = found.setdefault(tuple(r["tasks"]), {"tasks": r["tasks"], "source": source, "acc": {}})
                rec["acc"].setdefault(m, r["normalized_avg"])
    out = [r for r in found.values() if set(r["acc"]) == set(METHODS)]
    for r in out:
        r["idx"] = [results["tasks"].index(t) for t in r["tasks"]]
        r["n_tasks"] = len(r["tasks"])
        r["best_method"] = max(METHODS, key=lambda m: r["acc"][m])
        r["best"] = r["acc"][r["best_method"]]
    return sorted(out, key=lambda r: (r["n_tasks"], r["idx"]))


def _rho(x: np.ndarray, y: np.ndarray, n: np.ndarray, boot: int) -> dict[str, Any]:
    """Spearman's rho and the partial rho within sizes ``n``, each with its bootstrap interval."""

    def plain(i: np.ndarray) -> float:
        return spearman(x[i], y[i])

    def within(i: np.ndarray) -> float:
        return partial_spearman(x[i], y[i], n[i])

    return {"rho": plain(np.arange(len(x))), "ci": bootstrap_ci(plain, len(x), n_boot=boot),
            "partial": within(np.arange(len(x))), "partial_ci": bootstrap_ci(within, len(x), n_boot=boot)}  # fmt: skip


def _target(r: dict[str, Any], key: str) -> float:
    return float(r["acc"][key] if key in r["acc"] else r[key])


def _correlations(subsets: Sequence[dict[str, Any]], names: Sequence[str], boot: int) -> dict[str, Any]:
    """Score -> target (``TA``, ``best``) -> :func:`_rho`."""
    n = np.array([r["n_tasks"] for r in subsets], dtype=float)
    out: dict[str, Any] = {}
    for name in names:
        x = np.array([r["n_tasks"] if name == "n_tasks" else r["scores"][name] for r in subsets], dtype=float)
        out[name] = {
            label: _rho(x, np.array([_target(r, key) for r in subsets]), n, boot)
            for label, key in TARGETS.items()
        }
    return out


def _fmt(c: dict[str, Any], kind: str = "") -> str:
    rho, ci = c[kind or "rho"], c[f"{kind}_ci" if kind else "ci"]
    return f"{rho:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if np.isfinite(rho) else "n/a"


def _table(corr: dict[str, Any]) -> str:
    lines = ["| score | ρ vs TA [95% CI] | ρ vs best [95% CI] | partial ρ vs TA (within size) [95% CI] | "
             "partial ρ vs best [95% CI] |", "|---|---|---|---|---|"]  # fmt: skip
    for name, c in corr.items():
        cells = [_fmt(c["TA"]), _fmt(c["best"]), _fmt(c["TA"], "partial"), _fmt(c["best"], "partial")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(subsets: Sequence[dict[str, Any]], name: str, corr: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["scores"][name] for r in subsets]
    n = [r["n_tasks"] for r in subsets]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True, constrained_layout=True)
    for ax, (label, key) in zip(axes, TARGETS.items(), strict=True):
        y = [_target(r, key) for r in subsets]
        sc = ax.scatter(x, y, c=n, cmap="viridis", s=36, edgecolors="k", linewidths=0.4)
        c = corr[name][label]
        who = "task arithmetic" if label == "TA" else "best method"
        ax.set_title(f"{who}: ρ = {c['rho']:+.2f}, within size {c['partial']:+.2f}", fontsize=10)
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("normalized accuracy (text12, 400 test examples per task)")
    fig.colorbar(sc, ax=axes, label="tasks merged")
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _parse() -> argparse.Namespace:
    default = next((p for p in (Path("/tmp/t12all/results.json"), Path("/tmp/t12s1/results.json"))
                    if p.exists()), Path("results.json"))  # fmt: skip
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (outside the repository)")
    p.add_argument(
        "--results", type=Path, default=default, help="the benchmark's results.json (with scaling)"
    )
    p.add_argument("--cache", type=Path, default=Path("/tmp/t12cache"), help="the benchmark's cache")
    p.add_argument("--extra-seed", type=int, default=1, help="seed of the extra subsets")
    p.add_argument("--per-size", type=int, default=3, help="extra subsets per size (0: none)")
    p.add_argument("--check", type=int, default=3, help="subsets diagnosed directly to check the derivation")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    return p.parse_args()


def main() -> None:
    args = _parse()
    from unimerge.bench.model import pretrained_dir

    start = time.perf_counter()
    results = json.loads(args.results.read_text())
    encoders, base = _encoders(results), pretrained_dir(args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    full = _cached(args.out / "diagnosis_all.json", lambda: _diagnose(base, encoders))
    seconds["diagnose_all"] = time.perf_counter() - t
    t = time.perf_counter()
    extra = _cached(args.out / "extra_scaling.json",
                    lambda: _extra(results, args.cache, args.extra_seed, args.per_size) if args.per_size else {})  # fmt: skip
    seconds["extra_scaling"] = time.perf_counter() - t
    subsets = _subsets(results, extra)
    for r in subsets:
        r["scores"] = _scores(full["overall"], r["idx"])
    by_size = {r["n_tasks"]: r["idx"] for r in subsets if r["n_tasks"] < len(encoders)}
    picks = [by_size[k] for k in sorted(by_size)[: args.check]]  # one of each of the smallest sizes
    t = time.perf_counter()
    check = _cached(args.out / "check.json", lambda: _check(base, encoders, full["overall"], picks))
    seconds["check"] = time.perf_counter() - t

    names = ["n_tasks"] + [
        k for k in subsets[0]["scores"] if all(r["scores"][k] is not None for r in subsets)
    ]
    corr = _correlations(subsets, names, args.boot)
    diag = [k for k in names if k != "n_tasks"]
    best = max(diag, key=lambda k: abs(corr[k]["TA"]["rho"]))
    _plot(subsets, best, corr, args.out / "predicts.png")
    seconds["total"] = time.perf_counter() - start
    doc = {"results": str(args.results), "methods": list(METHODS), "extra_seed": args.extra_seed,
           "n_subsets": len(subsets), "sizes": sorted({r["n_tasks"] for r in subsets}), "boot": args.boot,
           "correlations": corr, "best_predictor": best, "check": check, "subsets": subsets,
           "diagnosis_seconds": full["seconds"], "seconds": seconds}  # fmt: skip
    atomic_write_text(args.out / "predicts.json", json.dumps(doc, indent=1))
    _report(doc, corr)


def _report(doc: dict[str, Any], corr: dict[str, Any]) -> None:
    subsets = doc["subsets"]
    wins = {m: sum(r["best_method"] == m for r in subsets) for m in doc["methods"]}
    print(f"{doc['n_subsets']} subsets of sizes {doc['sizes']}; best method wins: {wins}")
    spread = {
        k: float(np.std([r["scores"][k] for r in subsets])) for k in doc["correlations"] if k != "n_tasks"
    }
    for c in doc["check"]:  # float32 sums differ in rounding; randomized SVDs in their draws
        rel = {k: v / spread[k] if spread.get(k) else 0.0 for k, v in c["abs_diff"].items()}
        off = ", ".join(f"{k} {c['abs_diff'][k]:.2g} ({r:.1%})" for k, r in rel.items() if r >= 1e-3)
        print(f"check {c['idx']}: {sum(r < 1e-3 for r in rel.values())}/{len(rel)} scores agree within 0.1% "
              f"of their spread over subsets; the others: {off or 'none'}")  # fmt: skip
    secs = {k: round(v, 1) for k, v in doc["seconds"].items()}
    print(f"best predictor (|ρ vs TA|): {doc['best_predictor']}; seconds {secs}\n")
    print(_table(corr))


if __name__ == "__main__":
    main()
