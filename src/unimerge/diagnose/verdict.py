"""The verdict: which of three causes of failed merges dominates, and which methods address it.

Each cause gets a severity, its strongest metric divided by that metric's threshold (1.0 = at the
threshold); the largest severity at or above 1.0 names the dominant cause, and every verdict reports
the numbers and thresholds that triggered it.

What the benchmark says about the thresholds (``benchmarks/diagnose_predicts.py`` on 31 text12
subsets, docs/diagnose.md): the mean pairwise top-k sign conflict of real experts sat at 0.476-0.490,
just under the 0.5 of independent signs, on every subset, and did not correlate with merged accuracy
(Spearman rho -0.03 against task arithmetic); the first threshold, 0.45, named directional conflict
dominant on all 31 subsets, so it is now 0.5: conflict counts only when signs disagree more often
than chance. The norm ratio (rho -0.52 against task arithmetic, -0.72 against the best method) and
the minimum cosine (+0.64, +0.73) tracked accuracy, but only through the number of merged tasks:
within one subset size no diagnostic predicted accuracy (every partial rho's interval contains 0).
The other thresholds are unchanged and not validated by that study.

- Directional conflict: the mean pairwise sign-conflict rate among each pair's top-k entries (0.5
  for independent signs) or a negative cosine between two task vectors.
- Scale mismatch: the max/min task-vector norm ratio (compared on a log scale) or the normalisation
  sensitivity (how far task arithmetic moves when every task vector is rescaled to the mean norm).
- Task entanglement: the mean pairwise overlap of top singular subspaces above what random
  subspaces of the same ranks would share, ``(overlap - chance) / (1 - chance)`` (0 for unrelated
  tasks, 1 for shared subspaces; the chance level matters for small matrices and high ranks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

__all__ = [
    "CAUSES",
    "METHODS_FOR",
    "NEGATIVE_COSINE_THRESHOLD",
    "NORMALIZATION_SENSITIVITY_THRESHOLD",
    "NORM_RATIO_THRESHOLD",
    "SIGN_CONFLICT_THRESHOLD",
    "SUBSPACE_OVERLAP_THRESHOLD",
    "scores",
    "summary_scores",
    "verdict",
]

SIGN_CONFLICT_THRESHOLD = 0.5
"""Mean pairwise sign conflict (top-k entries) at which conflict counts: the 0.5 of independent signs
(real experts on text12 sat at 0.476-0.490, and below-chance conflict did not predict accuracy)."""
NEGATIVE_COSINE_THRESHOLD = 0.1
"""A pairwise cosine below ``-NEGATIVE_COSINE_THRESHOLD`` counts as two tasks pulling apart."""
NORM_RATIO_THRESHOLD = 2.0
"""Max/min task-vector norm ratio at which scale mismatch counts (severity ``log r / log 2``)."""
NORMALIZATION_SENSITIVITY_THRESHOLD = 0.3
"""Relative move of task arithmetic under norm equalisation at which scale mismatch counts."""
SUBSPACE_OVERLAP_THRESHOLD = 0.3
"""Mean pairwise subspace overlap above chance, ``(overlap - chance) / (1 - chance)``, at which
entanglement counts."""

CAUSES = ("directional_conflict", "scale_mismatch", "task_entanglement")
METHODS_FOR = {
    "directional_conflict": "TIES-style sign election and trimming (ties, dare_ties, della, breadcrumbs_ties, "
    "consensus_ties)",
    "scale_mismatch": "normalisation and isotropic methods (iso_c, iso_cts, tsv_m; or rescale task vectors "
    "to equal norms / lower the weight of the largest)",
    "task_entanglement": "subspace methods (tsv_m, cart, star; KnOTS for LoRA adapters)",
}


class _Metric(NamedTuple):
    name: str
    value: float | None
    threshold: float | None
    severity: float | None  # value over threshold (1 = at the threshold)


def _off_diagonal(matrix: Sequence[Sequence[float | None]] | None) -> list[float]:
    if not matrix:
        return []
    return [v for i, row in enumerate(matrix) for j, v in enumerate(row) if i < j and v is not None]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _excess(overlap: float | None, chance: float | None) -> float | None:
    """``(overlap - chance) / (1 - chance)``: the overlap above what random subspaces share."""
    if overlap is None or chance is None or chance >= 1.0:
        return None
    return (overlap - chance) / (1.0 - chance)


def _metric(name: str, value: float | None, threshold: float | None, severity: float | None) -> _Metric:
    return _Metric(name, value, threshold, severity)


def _ratio(value: float | None, by: float) -> float | None:
    return None if value is None else value / by


def scores(overall: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per cause: ``severity`` (``None`` when not measurable) and the ``evidence`` it came from."""
    conflict = _mean(_off_diagonal(overall.get("sign_conflict")))
    min_cos = min(_off_diagonal(overall.get("cosine")), default=None)
    ratio, sens = overall.get("norm_ratio"), overall.get("normalization_sensitivity")
    overlap = _mean(_off_diagonal(overall.get("subspace_overlap")))
    excess = _excess(overlap, _mean(_off_diagonal(overall.get("subspace_overlap_chance"))))
    log_ratio = None if ratio is None else math.log(ratio)
    parts = {
        "directional_conflict": [
            _metric("mean_sign_conflict", conflict, SIGN_CONFLICT_THRESHOLD,
                    _ratio(conflict, SIGN_CONFLICT_THRESHOLD)),
            _metric("min_cosine", min_cos, -NEGATIVE_COSINE_THRESHOLD,
                    None if min_cos is None else -min_cos / NEGATIVE_COSINE_THRESHOLD),
        ],
        "scale_mismatch": [
            _metric("norm_ratio", ratio, NORM_RATIO_THRESHOLD, _ratio(log_ratio, math.log(NORM_RATIO_THRESHOLD))),
            _metric("normalization_sensitivity", sens, NORMALIZATION_SENSITIVITY_THRESHOLD,
                    _ratio(sens, NORMALIZATION_SENSITIVITY_THRESHOLD)),
        ],
        "task_entanglement": [
            _metric("mean_subspace_overlap_above_chance", excess, SUBSPACE_OVERLAP_THRESHOLD,
                    _ratio(excess, SUBSPACE_OVERLAP_THRESHOLD)),
            _metric("mean_subspace_overlap", overlap, None, None),
        ],
    }  # fmt: skip
    out: dict[str, dict[str, Any]] = {}
    for cause, metrics in parts.items():
        sev = [m.severity for m in metrics if m.severity is not None]
        out[cause] = {
            "severity": max(sev) if sev else None,
            "evidence": {m.name: {"value": m.value, "threshold": m.threshold} for m in metrics},
        }
    return out


def summary_scores(overall: dict[str, Any]) -> dict[str, float | None]:
    """Scalar diagnostics of a diagnosis' ``overall`` section (pairwise matrices averaged over pairs):
    candidates to correlate with merged accuracy, plus each cause's severity."""
    er = overall.get("effective_rank_fraction")
    out: dict[str, float | None] = {
        "mean_cosine": _mean(_off_diagonal(overall.get("cosine"))),
        "min_cosine": min(_off_diagonal(overall.get("cosine")), default=None),
        "mean_sign_conflict": _mean(_off_diagonal(overall.get("sign_conflict"))),
        "mean_sign_conflict_all": _mean(_off_diagonal(overall.get("sign_conflict_all"))),
        "sign_conflict_rate": overall.get("sign_conflict_rate"),
        "norm_ratio": overall.get("norm_ratio"),
        "normalization_sensitivity": overall.get("normalization_sensitivity"),
        "mean_subspace_overlap": _mean(_off_diagonal(overall.get("subspace_overlap"))),
        "mean_subspace_overlap_above_chance": _excess(
            _mean(_off_diagonal(overall.get("subspace_overlap"))),
            _mean(_off_diagonal(overall.get("subspace_overlap_chance"))),
        ),
        "mean_effective_rank_fraction": _mean([v for v in er or [] if v is not None]),
    }
    out.update({f"{k}_severity": c["severity"] for k, c in scores(overall).items()})
    return out


def verdict(overall: dict[str, Any]) -> dict[str, Any]:
    """``{dominant, severity, text, causes}``: the dominant cause (``"none"`` when every severity is
    below 1), its severity, one sentence naming the numbers and the method family, and all scores."""
    causes = scores(overall)
    ranked = sorted(
        ((c["severity"], name) for name, c in causes.items() if c["severity"] is not None), reverse=True
    )
    if not ranked or ranked[0][0] < 1.0:
        return {
            "dominant": "none",
            "severity": ranked[0][0] if ranked else None,
            "text": "No cause reaches its threshold: the task vectors look compatible; plain task "
            "arithmetic (task_arithmetic) is a reasonable first merge. " + _numbers(causes),
            "causes": causes,
        }
    sev, name = ranked[0]
    return {
        "dominant": name,
        "severity": sev,
        "text": f"Dominant cause: {name.replace('_', ' ')} (severity {sev:.2f}; 1 = threshold). "
        f"Addressed by {METHODS_FOR[name]}. " + _numbers(causes),
        "causes": causes,
    }


def _numbers(causes: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, c in causes.items():
        ev = ", ".join(
            f"{k} {e['value']:.3g}"
            + (f" (threshold {e['threshold']:.3g})" if e["threshold"] is not None else "")
            for k, e in c["evidence"].items()
            if e["value"] is not None
        )
        parts.append(f"{name.replace('_', ' ')}: {ev or 'not measured'}")
    return "; ".join(parts) + "."
