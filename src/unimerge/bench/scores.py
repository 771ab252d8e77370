"""Benchmark rows: per-task accuracies, their mean and the normalized mean, rounded for JSON.

A row's ``normalized_avg`` is the mean over tasks of accuracy divided by that task's individual
expert's accuracy (1.0 means every task is as good as its own expert). Shared by the data-free
runner (:mod:`~unimerge.bench.runner`) and the data-aware rows (:mod:`~unimerge.bench.data_aware`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["normalized", "round_floats", "summarize"]


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
