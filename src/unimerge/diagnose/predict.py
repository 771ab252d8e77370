"""Does the diagnosis predict merged accuracy? Subset diagnostics and rank correlations (issue 13).

- :func:`subset_overall`: the ``overall`` section of a diagnosis of some of the models, derived from
  the diagnosis of all of them (pairwise matrices restricted, norms picked, normalisation sensitivity
  rebuilt from the Gram matrix ``G_ij = cos_ij ||tau_i|| ||tau_j||``), so that one streaming pass
  serves every task subset;
- :func:`spearman`, :func:`partial_spearman` and :func:`bootstrap_ci`: Spearman's rho (average ranks
  on ties), the same after removing a grouping variable (e.g. the number of merged tasks), and a
  percentile bootstrap interval over observations. NumPy only.

Exact for cosines, sign-conflict rates (pooled counts per pair do not depend on the other models),
norms, norm ratio and normalisation sensitivity; the subspace overlaps and effective ranks of a
direct diagnosis of the subset differ by randomized-SVD noise (each model's random projection is
drawn in model order). The all-model sign-election rate is not pairwise and is left out (``None``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from unimerge.diagnose.stats import normalization_sensitivity

__all__ = ["bootstrap_ci", "partial_spearman", "ranks", "spearman", "subset_overall"]

_PAIRWISE = ("cosine", "sign_conflict", "sign_conflict_all", "subspace_overlap", "subspace_overlap_chance")
_PER_MODEL = ("norms", "relative_update", "effective_rank", "effective_rank_fraction")


def _array(values: Any) -> np.ndarray:
    """A float array of a JSON-ready list (``None`` becomes NaN)."""
    return np.array(values, dtype=float)


def _plain(a: np.ndarray) -> Any:
    return [_plain(x) for x in a] if a.ndim else (float(a) if np.isfinite(a) else None)


def subset_overall(overall: Mapping[str, Any], idx: Sequence[int]) -> dict[str, Any]:
    """The ``overall`` section (:func:`~unimerge.diagnose.stats.summarize`'s keys) for the models
    ``idx`` (positions in ``overall``'s model order), from the full diagnosis' ``overall``.

    Raises:
        ValueError: fewer than two models, or a position repeated or out of range.
    """
    n = len(overall["norms"])
    if len(idx) < 2 or len(set(idx)) != len(idx) or not all(0 <= i < n for i in idx):
        raise ValueError(f"A subset needs two or more distinct models among 0..{n - 1}; got {list(idx)}.")
    sel = np.asarray(idx)
    out: dict[str, Any] = {k: _plain(_array(overall[k])[np.ix_(sel, sel)]) for k in _PAIRWISE if k in overall}
    out |= {k: _plain(_array(overall[k])[sel]) for k in _PER_MODEL if k in overall}
    norms = _array(out["norms"])
    cos = np.nan_to_num(_array(out["cosine"]))  # a zero task vector: no cosine, no Gram entries
    g = cos * np.outer(norms, norms)
    out["base_norm"] = overall.get("base_norm")
    out["norm_ratio"] = float(norms.max() / norms.min()) if norms.min() > 0 else None
    out["normalization_sensitivity"] = normalization_sensitivity(g)
    out["sign_conflict_rate"] = None  # the election over all models is not a pairwise quantity
    return out


def ranks(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing the mean of their ranks."""
    a = np.asarray(x, dtype=float)
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    r = np.empty(len(a))
    start = 0
    for end in range(1, len(a) + 1):
        if end == len(a) or sorted_a[end] != sorted_a[start]:
            r[order[start:end]] = 0.5 * (start + end - 1) + 1.0
            start = end
    return r


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else float("nan")


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks (NaN when either is constant)."""
    return _pearson(ranks(x), ranks(y))


def _within(r: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``r`` minus the mean of its group."""
    out: np.ndarray = r.copy()
    for g in np.unique(groups):
        m = groups == g
        out[m] -= r[m].mean()
    return out


def partial_spearman(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, groups: Sequence[Any] | np.ndarray
) -> float:
    """Spearman's rho of ``x`` and ``y`` within ``groups``: both are ranked over all observations,
    each group's mean rank is removed (a categorical control: any effect of the group, linear or
    not, goes), and the residuals are correlated. A one-member group contributes nothing."""
    g = np.asarray(groups)
    return _pearson(_within(ranks(x), g), _within(ranks(y), g))


def bootstrap_ci(
    stat: Callable[[np.ndarray], float],
    n: int,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """The percentile interval of ``stat(indices)`` over ``n_boot`` resamples of ``range(n)`` with
    replacement (resamples where ``stat`` is NaN, e.g. a constant resample, are dropped)."""
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)])
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)
