"""AdaMerging: entropy, coefficient shapes and bounds, entropy minimisation on a toy problem."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from _modelmerge_a_toy import mlp_problem
from unimerge.modelmerge.adamerging import (
    AdaMergingParams,
    adamerge,
    entropy,
    layer_wise_adamerging,
    task_wise_adamerging,
)


def test_entropy_hand_computed() -> None:
    torch.testing.assert_close(entropy(torch.zeros(2, 4)), torch.tensor(math.log(4)))
    # p = (0.5, 0.5, 0) up to exp(-inf): H = ln 2
    torch.testing.assert_close(entropy(torch.tensor([[0.0, 0.0, -1e4]])), torch.tensor(math.log(2)))


def test_zero_steps_is_task_arithmetic_at_init() -> None:
    p = mlp_problem(n=3)
    res = adamerge(p, AdaMergingParams(steps=0, init=0.3, bf16=False), "task")
    base = p.base.state_dict()
    for k, v in base.items():
        expected = v + 0.3 * sum(e[k] - v for e in p.experts)
        torch.testing.assert_close(res.state[k], expected, atol=1e-6, rtol=1e-6)


def test_layer_wise_entropy_decreases_and_coefficients_stay_in_bounds() -> None:
    p = mlp_problem(n=3, budget=32)
    params = AdaMergingParams(steps=25, lr=0.05, init=0.3, lower=0.0, upper=0.6, bf16=False)
    res = adamerge(p, params, "layer")
    n_tensors = len(list(p.base.parameters()))  # 0.weight, 0.bias, 2.weight, 2.bias
    assert res.coefficients.shape == (n_tensors, 3) and len(res.names) == n_tensors == 4
    assert res.coefficients.min() >= 0.0 and res.coefficients.max() <= 0.6
    assert res.history[-1] < res.history[0] - 0.05
    assert not torch.allclose(res.coefficients, torch.full_like(res.coefficients, 0.3))


def test_task_wise_has_one_coefficient_per_task_and_returns_a_model() -> None:
    p = mlp_problem(n=2, budget=16)
    res = adamerge(p, AdaMergingParams(steps=10, lr=0.05, bf16=False), "task")
    assert res.coefficients.shape == (1, 2)
    assert res.history[-1] < res.history[0]
    out = task_wise_adamerging(p, AdaMergingParams(steps=2))
    assert out.examples_used == 16 and out.labeled is False
    lo, hi = out.details["coefficients_range"]  # reported for the benchmark's rows
    assert 0.0 <= lo <= hi <= 1.0 and len(out.details["coefficients_per_task"]) == 2
    assert len(out.details["entropy_first_last"]) == 2
    assert layer_wise_adamerging(p, AdaMergingParams(steps=1)).module is not p.base


def test_bounds_are_validated() -> None:
    with pytest.raises(ValidationError, match="lower <= init <= upper"):
        AdaMergingParams(init=0.9, upper=0.5)
