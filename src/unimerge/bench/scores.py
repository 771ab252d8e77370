"""Benchmark rows and their statistics: accuracies, normalized means, bootstrap intervals, p-values.

A row's ``normalized_avg`` is the mean over tasks of accuracy divided by that task's individual
expert's accuracy (1.0 means every task is as good as its own expert). A row also keeps every test
example's correctness (``correct``: per task, ``"n:base64"`` of the bit-packed booleans), from
which :func:`add_statistics` computes

- ``ci95``: the 95% percentile bootstrap interval of ``avg`` (examples resampled with replacement
  within each task, :data:`N_BOOT` times; the mean over tasks of each resample's accuracy), and
- ``p_vs_task_arithmetic``: the two-sided paired bootstrap p-value of ``avg`` minus task
  arithmetic's ``avg`` (both rows resampled with the *same* indices, so what the two methods get
  right on the same examples cancels; Efron & Tibshirani 1993, ch. 16; Koehn 2004 for the paired
  form in NLP evaluation). A difference is marked significant when p < :data:`ALPHA`.

Shared by the data-free runner (:mod:`~unimerge.bench.runner`) and the data-aware rows
(:mod:`~unimerge.bench.data_aware`).
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor

__all__ = [
    "ALPHA",
    "N_BOOT",
    "REFERENCE",
    "add_statistics",
    "bootstrap_avgs",
    "correct_row",
    "normalized",
    "pack_correct",
    "paired_p",
    "percentile_ci",
    "round_floats",
    "scaling_trend",
    "summarize",
    "unpack_correct",
]

N_BOOT = 2000
ALPHA = 0.05
REFERENCE = "task_arithmetic"  # every row is compared with this one


def normalized(per_task: Mapping[str, float], individual: Mapping[str, float]) -> float:
    """Mean over tasks of accuracy / the task's individual expert accuracy."""
    return sum(acc / individual[t] for t, acc in per_task.items()) / len(per_task)


def summarize(method: str, per_task: Mapping[str, float], individual: Mapping[str, float]) -> dict[str, Any]:
    """A table row: per-task accuracies, their mean and the normalized mean."""
    return {
        "method": method,
        "per_task": dict(per_task),
        "avg": sum(per_task.values()) / len(per_task),
        "normalized_avg": normalized(per_task, individual),
    }


def pack_correct(correct: Tensor) -> str:
    """Per-example correctness ``(n,)`` bool as ``"n:base64"`` of its packed bits."""
    bits = np.packbits(correct.detach().cpu().numpy().astype(bool))
    return f"{correct.numel()}:{base64.b64encode(bits.tobytes()).decode()}"


def unpack_correct(packed: str) -> np.ndarray:
    """Inverse of :func:`pack_correct`: ``(n,)`` bool."""
    n, data = packed.split(":", 1)
    bits = np.frombuffer(base64.b64decode(data), dtype=np.uint8)
    return np.unpackbits(bits, count=int(n)).astype(bool)


def correct_row(
    method: str, correct: Mapping[str, Tensor], individual: Mapping[str, float]
) -> dict[str, Any]:
    """A row from per-example test correctness: accuracies, means, and the packed examples."""
    per_task = {t: float(c.float().mean()) for t, c in correct.items()}
    return summarize(method, per_task, individual) | {
        "correct": {t: pack_correct(c) for t, c in correct.items()}
    }


def _resample(task: str, n: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n)`` example indices for ``task``: the same for every row (seeded by the task)."""
    digest = hashlib.sha256(f"{seed}:{task}".encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:8], "little")))
    return rng.integers(0, n, size=(n_boot, n))


def bootstrap_avgs(correct: Mapping[str, str], n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``(n_boot,)`` bootstrap replicates of the mean over tasks of accuracy (see the module docstring)."""
    total = np.zeros(n_boot)
    for task in sorted(correct):
        c = unpack_correct(correct[task])
        total += c[_resample(task, c.size, n_boot, seed)].mean(axis=1)
    return total / len(correct)


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` percentile interval of bootstrap ``samples``."""
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided paired bootstrap p-value of ``mean(a) - mean(b)`` from replicates made with the same
    indices: twice the share of replicates on the far side of zero (at most 1)."""
    diff = a - b
    below, above = float(np.mean(diff <= 0)), float(np.mean(diff >= 0))
    return min(1.0, 2 * min(below, above))


def add_statistics(rows: Sequence[dict[str, Any]], n_boot: int = N_BOOT, seed: int = 0) -> None:
    """Give every row with ``correct`` its ``ci95`` and, when task arithmetic has a row,
    ``delta_vs_task_arithmetic`` (``avg`` minus task arithmetic's), ``p_vs_task_arithmetic`` and
    ``significant`` (in place)."""
    samples = {r["method"]: bootstrap_avgs(r["correct"], n_boot, seed) for r in rows if "correct" in r}
    ref_row = next((r for r in rows if r["method"] == REFERENCE and r["method"] in samples), None)
    for row in rows:
        if row["method"] not in samples:
            continue
        row["ci95"] = list(percentile_ci(samples[row["method"]]))
        if ref_row is not None and row is not ref_row:
            p = paired_p(samples[row["method"]], samples[REFERENCE])
            row["delta_vs_task_arithmetic"] = row["avg"] - ref_row["avg"]
            row["p_vs_task_arithmetic"] = p
            row["significant"] = p < ALPHA


def scaling_trend(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Least-squares line of ``normalized_avg`` against ``n_tasks``: ``slope`` (per added task),
    ``intercept`` and ``r2``."""
    x = np.array([r["n_tasks"] for r in records], dtype=float)
    y = np.array([r["normalized_avg"] for r in records], dtype=float)
    if x.size < 2 or np.ptp(x) == 0:
        return {"slope": 0.0, "intercept": float(y.mean()) if y.size else 0.0, "r2": 0.0}
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss = float(((y - y.mean()) ** 2).sum())
    return {
        "slope": float(slope),
        "intercept": float(intercept),
        "r2": 1 - float((resid**2).sum()) / ss if ss else 1.0,
    }


def round_floats(obj: Any, digits: int = 4) -> Any:
    """``obj`` with every float rounded to ``digits`` decimals (for a readable results.json); floats
    under ``10**-digits`` keep ``digits`` significant digits instead (a learning rate of 1e-5 stays)."""
    if isinstance(obj, float):
        if math.isnan(obj) or math.isinf(obj):
            return obj
        return float(f"{obj:.{digits}g}") if 0 < abs(obj) < 10**-digits else round(obj, digits)
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj
