"""Whole-model magnitude thresholds by streaming histograms equal an exact sort of the whole model."""

from __future__ import annotations

import pytest
import torch

from unimerge.methods._global import global_magnitude_threshold


def _stream(tensors):
    def deltas():
        yield from ((str(i), t) for i, t in enumerate(tensors))

    return deltas


def test_hand_computed_case() -> None:
    # model 0 entries |.|: 1 2 3 4 | 5 6 ; model 1: 6 5 4 3 | 2 1 (two tensors)
    a = torch.tensor([[1.0, -2.0, 3.0, -4.0], [-6.0, 5.0, -4.0, 3.0]])
    b = torch.tensor([[5.0, -6.0], [2.0, -1.0]])
    th = global_magnitude_threshold(_stream([a, b]), torch.tensor([0.5, 1 / 3]))
    # k = 3 of 6 -> third largest of {1..6} is 4; k = int(6/3) = 2 -> second largest is 5
    assert th.tolist() == [4.0, 5.0]


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.9])
def test_matches_kthvalue_over_the_concatenated_model(density: float) -> None:
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(2, 64, 32, generator=g) * s for s in (1.0, 1e-3, 30.0)] + [torch.randn(2, 9, generator=g)]
    th = global_magnitude_threshold(_stream(ts), torch.full((2,), density))
    flat = torch.cat([t.reshape(2, -1) for t in ts], 1).abs()
    k = int(density * flat.shape[1])
    for i in range(2):
        assert th[i] == flat[i].kthvalue(flat.shape[1] - k + 1).values
        assert int((flat[i] >= th[i]).sum()) == k


def test_edges_keep_all_or_nothing() -> None:
    x = torch.randn(2, 10)
    th = global_magnitude_threshold(_stream([x]), torch.tensor([1.0, 0.05]))
    assert th[0] == 0.0 and th[1] == float("inf")  # int(0.05 * 10) == 0 entries kept
