"""Benchmark statistics: packed correctness, bootstrap intervals, paired p-values, scaling trends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unimerge.bench.scores import (
    add_statistics,
    bootstrap_avgs,
    correct_row,
    pack_correct,
    paired_p,
    percentile_ci,
    scaling_trend,
    unpack_correct,
)


def _bits(n: int, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) < p


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_packed_correctness_round_trips(n: int) -> None:
    c = _bits(n, 0.6, n)
    assert np.array_equal(unpack_correct(pack_correct(c)), c.numpy())


def test_interval_of_a_known_proportion() -> None:
    """For one task of n examples with accuracy p the bootstrap interval is about p ± 1.96 sqrt(p(1-p)/n)."""
    c = torch.zeros(1000, dtype=torch.bool)
    c[:700] = True
    lo, hi = percentile_ci(bootstrap_avgs({"t": pack_correct(c)}))
    half = 1.96 * (0.7 * 0.3 / 1000) ** 0.5  # 0.0284
    assert lo < 0.7 < hi
    assert abs((hi - lo) / 2 - half) < 0.004


def test_mean_over_tasks_and_the_interval_narrows_with_more_tasks() -> None:
    one = {"t0": pack_correct(_bits(400, 0.6, 0))}
    many = {f"t{i}": pack_correct(_bits(400, 0.6, i)) for i in range(8)}
    w1 = np.subtract(*reversed(percentile_ci(bootstrap_avgs(one))))
    w8 = np.subtract(*reversed(percentile_ci(bootstrap_avgs(many))))
    assert w8 < w1 / 2  # independent tasks: the mean's spread falls like 1/sqrt(tasks)
    want = np.mean([unpack_correct(v).mean() for v in many.values()])
    assert abs(bootstrap_avgs(many).mean() - want) < 0.005


def test_paired_p_separates_a_real_difference_from_none() -> None:
    base = _bits(1000, 0.7, 1)
    better = base.clone()
    better[~base] = _bits(int((~base).sum()), 0.07, 2)  # fixes ~20 of the wrong answers, breaks none
    a, b = bootstrap_avgs({"t": pack_correct(better)}), bootstrap_avgs({"t": pack_correct(base)})
    assert paired_p(a, b) < 0.001
    assert paired_p(b, b) == 1.0
    # Unpaired intervals overlap here, yet pairing shows the difference (the point of the paired test).
    lo_a, _ = percentile_ci(a)
    _, hi_b = percentile_ci(b)
    assert lo_a < hi_b


def test_add_statistics_marks_rows_against_task_arithmetic() -> None:
    ta = _bits(500, 0.6, 3)
    good = ta | _bits(500, 0.3, 4)
    same = ta.clone()
    rows = [
        correct_row(m, {"t": c}, {"t": 1.0})
        for m, c in (("task_arithmetic", ta), ("ties", good), ("linear", same))
    ]
    add_statistics(rows)
    by = {r["method"]: r for r in rows}
    assert "p_vs_task_arithmetic" not in by["task_arithmetic"] and len(by["task_arithmetic"]["ci95"]) == 2
    assert by["ties"]["significant"] and by["ties"]["delta_vs_task_arithmetic"] > 0
    assert not by["linear"]["significant"] and by["linear"]["p_vs_task_arithmetic"] == 1.0


def test_statistics_are_deterministic() -> None:
    c = {"t": pack_correct(_bits(300, 0.5, 5))}
    assert np.array_equal(bootstrap_avgs(c, seed=1), bootstrap_avgs(c, seed=1))


def test_scaling_trend_is_the_least_squares_line() -> None:
    records = [{"n_tasks": n, "normalized_avg": 1.0 - 0.02 * n} for n in (2, 4, 6, 8)]
    trend = scaling_trend(records)
    assert trend["slope"] == pytest.approx(-0.02) and trend["intercept"] == pytest.approx(1.0)
    assert trend["r2"] == pytest.approx(1.0)
