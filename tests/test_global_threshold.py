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
    ts = [torch.randn(2, 64, 32, generator=g) * s for s in (1.0, 1e-3, 30.0)] + [
        torch.randn(2, 9, generator=g)
    ]
    th = global_magnitude_threshold(_stream(ts), torch.full((2,), density))
    flat = torch.cat([t.reshape(2, -1) for t in ts], 1).abs()
    k = int(density * flat.shape[1])
    for i in range(2):
        assert th[i] == flat[i].kthvalue(flat.shape[1] - k + 1).values
        assert int((flat[i] >= th[i]).sum()) == k


def test_edges_keep_all_or_at_least_one() -> None:
    x = torch.tensor([[0.5, -2.0, 1.0, 0.25, 3.0], [0.5, -2.0, 1.0, 0.25, -3.0]])
    th = global_magnitude_threshold(_stream([x[:, :2], x[:, 2:]]), torch.tensor([1.0, 0.05]))
    # density 1 keeps everything; int(0.05 * 5) == 0, raised to 1 as the per-tensor trim: the largest |x|
    assert th[0] == 0.0 and th[1] == 3.0
    assert int((x[1].abs() >= th[1]).sum()) == 1


def test_ties_global_trim_keeps_the_models_top_entries_across_tensors(tmp_path) -> None:
    """trim_scope: global trims by the whole model's top-k (TIES reference code), per tensor otherwise."""
    from unimerge import merge_state_dicts

    base = {"a": torch.zeros(4), "b": torch.zeros(2)}
    # one expert: |tau| over the model = 1 2 3 4 | 10 20; density 0.5 keeps 3 entries: 4, 10, 20
    e = {"a": torch.tensor([1.0, -2.0, 3.0, -4.0]), "b": torch.tensor([10.0, -20.0])}
    g = merge_state_dicts("ties", [e], base, density=0.5, trim_scope="global")
    assert g["a"].tolist() == [0.0, 0.0, 0.0, -4.0] and g["b"].tolist() == [10.0, -20.0]
    t = merge_state_dicts("ties", [e], base, density=0.5)  # per tensor: top 2 of a, top 1 of b
    assert t["a"].tolist() == [0.0, 0.0, 3.0, -4.0] and t["b"].tolist() == [0.0, -20.0]


def test_global_trim_streams_through_the_engine(tmp_path) -> None:
    from _fixtures import load_all_tensors, make_tiny_llama
    from unimerge import merge_state_dicts, run_merge

    base = make_tiny_llama(tmp_path / "b")
    e1 = make_tiny_llama(tmp_path / "e1", perturb_from=base, seed=1)
    e2 = make_tiny_llama(tmp_path / "e2", perturb_from=base, seed=2)
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "parameters": {"trim_scope": "global", "density": 0.3},
        "models": [{"model": str(e1)}, {"model": str(e2)}],
    }
    run_merge(cfg, tmp_path / "o")
    got = load_all_tensors(tmp_path / "o")
    want = merge_state_dicts(
        "ties",
        [load_all_tensors(e1), load_all_tensors(e2)],
        load_all_tensors(base),
        density=0.3,
        trim_scope="global",
    )
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
