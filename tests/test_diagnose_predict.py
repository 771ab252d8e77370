"""Subset diagnostics derived from a full diagnosis, and the rank statistics of issue 13's study."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unimerge.diagnose import summary_scores
from unimerge.diagnose.predict import bootstrap_ci, partial_spearman, ranks, spearman, subset_overall
from unimerge.diagnose.stats import Stats, summarize, tensor_stats


def _stats(tau: dict[str, torch.Tensor], base: dict[str, torch.Tensor], idx: list[int]) -> Stats:
    """The summed statistics of the models ``idx`` (exact SVDs: no generator)."""
    per = [tensor_stats(tau[k][idx].clone(), base[k], top_k=0.3) for k in tau]
    total = per[0]
    for s in per[1:]:
        total = total + s
    return total


def _model(seed: int, n: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w1": (12, 7), "w2": (5, 9), "b": (7,)}
    scale = torch.linspace(0.5, 3.0, n, dtype=torch.float64)  # float64: Gram sums exact to rounding
    tau = {k: torch.randn(n, *s, generator=g, dtype=torch.float64) * scale.view(n, *[1] * len(s))
           for k, s in shapes.items()}  # fmt: skip
    tau["w1"][1] = tau["w1"][0] * 0.5 + 0.1 * tau["w1"][1]  # a correlated pair
    base = {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    return tau, base


@pytest.mark.parametrize("idx", [[0, 1], [1, 3, 4], [4, 0, 2], [0, 1, 2, 3, 4]])
def test_subset_of_the_full_diagnosis_equals_diagnosing_the_subset(idx: list[int]) -> None:
    tau, base = _model(0, 5)
    full = summarize(_stats(tau, base, list(range(5))))
    direct = summarize(_stats(tau, base, idx))
    derived = subset_overall(full, idx)
    assert derived["sign_conflict_rate"] is None  # the all-model election is not pairwise
    for key, value in direct.items():
        if key != "sign_conflict_rate":
            assert np.array(derived[key], dtype=float) == pytest.approx(
                np.array(value, dtype=float), rel=1e-9, abs=1e-12, nan_ok=True
            ), key
    a, b = summary_scores(derived), summary_scores(direct)
    assert {k: v for k, v in a.items() if k != "sign_conflict_rate"} == pytest.approx(
        {k: v for k, v in b.items() if k != "sign_conflict_rate"}, rel=1e-9
    )


def test_normalization_sensitivity_of_a_subset_by_hand() -> None:
    # two orthogonal task vectors of norms 1 and 3: mean norm 2, c = (2, 2/3), d = (-1, 1/3);
    # sensitivity^2 = (1 * 1 + 1/9 * 9) / (1 + 9) = 0.2
    overall = {
        "cosine": [[1.0, 0.0, 0.5], [0.0, 1.0, 0.2], [0.5, 0.2, 1.0]],
        "norms": [1.0, 3.0, 10.0],
    }
    sub = subset_overall(overall, [0, 1])
    assert sub["normalization_sensitivity"] == pytest.approx(0.2**0.5)
    assert sub["norm_ratio"] == pytest.approx(3.0)
    assert sub["cosine"] == [[1.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize("idx", [[0], [0, 0], [0, 3], []])
def test_a_bad_subset_is_refused(idx: list[int]) -> None:
    with pytest.raises(ValueError, match="two or more distinct models"):
        subset_overall({"norms": [1.0, 2.0, 3.0], "cosine": np.eye(3).tolist()}, idx)


def test_ranks_share_ties() -> None:
    assert ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert ranks([1, 1, 1]).tolist() == [2.0, 2.0, 2.0]


def test_spearman_by_hand() -> None:
    # d = (-1, 1, -1, 1, 0): rho = 1 - 6 * 4 / (5 * 24) = 0.8
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [9, 4, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 2, 3], [5, 5, 5]))
    # with ties: ranks (1.5, 1.5, 3, 4) and (1, 2, 3, 4): Pearson of those
    assert spearman([0, 0, 1, 2], [1, 2, 3, 4]) == pytest.approx(
        np.corrcoef([1.5, 1.5, 3, 4], [1, 2, 3, 4])[0, 1]
    )


def test_partial_spearman_removes_the_group() -> None:
    # across groups x and y rise together (rho 0.6); within each group they move apart
    x, y, groups = [1, 2, 3, 4], [2, 1, 4, 3], ["a", "a", "b", "b"]
    assert spearman(x, y) == pytest.approx(0.6)
    assert partial_spearman(x, y, groups) == pytest.approx(-1.0)
    # a one-member group adds nothing
    assert partial_spearman([*x, 9], [*y, 0], [*groups, "c"]) == pytest.approx(-1.0)


def test_bootstrap_ci_of_a_mean_matches_the_normal_interval() -> None:
    data = np.array([0.0, 1.0] * 50)  # mean 0.5, standard error 0.05
    lo, hi = bootstrap_ci(lambda i: float(data[i].mean()), len(data), n_boot=4000, seed=1)
    assert lo == pytest.approx(0.5 - 1.96 * 0.05, abs=0.015)
    assert hi == pytest.approx(0.5 + 1.96 * 0.05, abs=0.015)
    assert bootstrap_ci(lambda i: float(data[i].mean()), len(data), n_boot=50, seed=3) == bootstrap_ci(
        lambda i: float(data[i].mean()), len(data), n_boot=50, seed=3
    )
    assert all(np.isnan(bootstrap_ci(lambda i: float("nan"), 5, n_boot=10)))
