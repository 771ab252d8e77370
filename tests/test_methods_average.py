"""mergekit's ``linear`` (weighted model soup): numbers worked by hand."""

from __future__ import annotations

import pytest
import torch

from unimerge.core import merge_state_dicts
from unimerge.errors import ConfigError
from unimerge.methods import get_method

A = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0, -4.0]])}
B = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0, 4.0]])}


def test_linear_weighted_average():
    out = merge_state_dicts("linear", [A, B], weight=[1.0, 3.0])
    torch.testing.assert_close(out["w"], torch.tensor([2.5, 5.0]))  # (1+9)/4, (2+18)/4
    torch.testing.assert_close(out["b"], torch.tensor([[3.0, 2.0]]))  # (0+12)/4, (-4+12)/4


def test_linear_uniform_soup_and_unnormalized_sum():
    torch.testing.assert_close(merge_state_dicts("linear", [A, B])["w"], torch.tensor([2.0, 4.0]))
    out = merge_state_dicts("linear", [A, B], weight=[1.0, 3.0], normalize=False)
    torch.testing.assert_close(out["w"], torch.tensor([10.0, 20.0]))


def test_linear_ignores_base_and_returns_identical_model():
    out = merge_state_dicts("linear", [A, A, A], base=B, weight=[0.2, 0.3, 0.5])
    torch.testing.assert_close(out["w"], A["w"])
    assert not get_method("linear").needs_base and get_method("linear").inputs == "tensors"


def test_linear_keeps_dtype():
    half = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    assert merge_state_dicts("linear", [half, half])["w"].dtype == torch.bfloat16


def test_linear_zero_weight_sum_is_a_config_error():
    with pytest.raises(ConfigError, match="sum to 0"):
        merge_state_dicts("linear", [A, B], weight=[1.0, -1.0])
    out = merge_state_dicts("linear", [A, B], weight=[1.0, -1.0], normalize=False)
    torch.testing.assert_close(out["w"], torch.tensor([-2.0, -4.0]))
