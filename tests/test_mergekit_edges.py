"""Edge cases where unimerge follows mergekit 0.1.5, each computed by hand.

Small tensors keep at least one entry in the magnitude trim (mergekit's ``sparsify.magnitude``:
``k = max(1, int(density * numel))``) and none in Breadcrumbs' (``magnitude_outliers``: ``int(density *
numel)``); Model Stock keeps the base where ``1 + (N-1) cos θ`` vanishes; NearSwap clamps the distance at
1e-6; in ``slices:`` a source's filters see its own layer numbers; a ``base_model`` missing from
``models:`` joins a ``karcher`` (or globally weighted ``linear``) merge. ``test_mergekit_golden.py``
compares whole merges with mergekit's own outputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from _fixtures import load_all_tensors, make_tiny_llama
from unimerge.core import merge_state_dicts
from unimerge.execute import RunOptions, run_merge
from unimerge.methods.geometric import model_stock_ratio
from unimerge.methods.primitives import breadcrumbs_mask, sparsify_magnitude, trim_count

# Two task vectors of 4 entries: at density 0.1, int(0.4) = 0 but the trim keeps each one's largest.
TAU = [[0.1, -0.4, 0.2, 0.3], [0.5, 0.1, -0.2, 0.0]]


def _merge(method: str, deltas: list[list[float]], base: list[float] | None = None, **params) -> torch.Tensor:
    """Merge task vectors given as lists on a base (zeros by default); returns the merged tensor."""
    b = torch.tensor(base) if base is not None else torch.zeros(len(deltas[0]))
    experts = [{"w": b + torch.tensor(d)} for d in deltas]
    return merge_state_dicts(method, experts, {"w": b}, **params)["w"]


def _close(actual: torch.Tensor, expected: list[float] | list[list[float]]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------ magnitude trim


@pytest.mark.parametrize(
    ("density", "numel", "k"),
    [(0.05, 16, 1), (0.3, 100, 30), (0.01, 64, 1), (0.5, 0, 0), (1.0, 10, 10), (0.0, 10, 0), (0.7, 10, 7)],
)
def test_trim_count_keeps_at_least_one(density: float, numel: int, k: int) -> None:
    assert trim_count(density, numel) == k


def test_sparsify_magnitude_keeps_the_largest_entry_of_a_small_tensor() -> None:
    x = torch.tensor(TAU)  # (2, 4)
    kept = sparsify_magnitude(x, torch.tensor([0.1, 0.1]))
    _close(kept, [[0.0, -0.4, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]])


def test_ties_on_a_small_tensor_keeps_each_largest_entry() -> None:
    # trimmed: [0, -.4, 0, 0] and [.5, 0, 0, 0]; elected signs +, -, (0: +), (0: +); each entry has one
    # agreeing model of weight 1: the disjoint mean is the trimmed values themselves (before: all zeros).
    _close(_merge("ties", TAU, density=0.1), [0.5, -0.4, 0.0, 0.0])
    _close(_merge("ties", TAU, density=0.1, weight=[1.0, 0.5], normalize=False), [0.25, -0.4, 0.0, 0.0])


def test_magnitude_prune_on_a_small_tensor() -> None:
    _close(_merge("magnitude_prune", TAU, density=0.1, weight=[2.0, 1.0]), [0.5, -0.8, 0.0, 0.0])


def test_consensus_ties_on_a_small_tensor() -> None:
    # tau_MTL = [.5, -.4, 0, 0]. TALL masks |tau_t| > 0.4 |tau_MTL - tau_t|: task 1 [F, T, T, T],
    # task 2 [T, F, T, F]; every entry has at least one (k = 1), so tau_MTL is kept whole.
    _close(_merge("consensus_ties", TAU, density=0.1, k=1), [0.5, -0.4, 0.0, 0.0])


def test_localize_stitch_on_a_small_tensor() -> None:
    # each task keeps its largest entry; no overlap, so the stitch is their sum
    _close(_merge("localize_stitch", TAU, sparsity=0.1), [0.5, -0.4, 0.0, 0.0])
    # the same entry for both tasks: averaged
    _close(_merge("localize_stitch", [[0.0, 3.0], [0.0, 1.0]], sparsity=0.1), [0.0, 2.0])


def test_breadcrumbs_keeps_int_density_entries_as_mergekit() -> None:
    x = torch.tensor(TAU[0])  # |x| ascending: .1 (0), .2 (2), .3 (3), .4 (1)
    assert not breadcrumbs_mask(x, 0.1, 0.01).any()  # target int(0.4) = 0: nothing (mergekit too)
    assert breadcrumbs_mask(x, 0.5, 0.0).tolist() == [False, True, False, True]  # gamma 0: the top 2
    # density .75, gamma .5: target 3, n_top 2 -> n_bot = max(0, 4 - 3 - 2) = 0: the 3 smallest
    assert breadcrumbs_mask(x, 0.75, 0.5).tolist() == [True, False, True, True]
    _close(_merge("breadcrumbs", TAU, density=0.1), [0.0, 0.0, 0.0, 0.0])


# ---------------------------------------------------------------------------------------- model stock


def test_model_stock_keeps_the_base_for_opposed_task_vectors() -> None:
    base = [0.5, -0.5]
    _close(_merge("model_stock", [[1.0, 2.0], [-1.0, -2.0]], base=base), base)  # N = 2, cos = -1
    s = math.sqrt(3) / 2  # three unit vectors 120 degrees apart: mean cos = -1/2, 1 + 2 cos = 0
    _close(_merge("model_stock", [[1.0, 0.0], [-0.5, s], [-0.5, -s]], base=base), base)
    assert torch.equal(model_stock_ratio(torch.tensor([[1.0, 2.0], [-1.0, -2.0]])), torch.tensor([0.0]))


def test_model_stock_filter_wise_one_column_and_one_dimension() -> None:
    # shape (3, 1): each row is one entry; cos = -1, 1, -1 -> t = 0 (singular), 2 cos / (1 + cos) = 1, 0
    x = torch.tensor([[[1.0], [2.0], [-1.0]], [[-1.0], [3.0], [1.0]]])  # (2, 3, 1)
    assert torch.equal(model_stock_ratio(x, filter_wise=True), torch.tensor([0.0, 1.0, 0.0]))
    experts = [{"w": x[0]}, {"w": x[1]}]
    got = merge_state_dicts("model_stock", experts, {"w": torch.zeros(3, 1)}, filter_wise=True)["w"]
    _close(got, [[0.0], [2.5], [0.0]])
    # a 1-D tensor is one row: cos 60 degrees = 1/2 -> t = 1 / 1.5 = 2/3 of the mean [.75, sqrt(3)/4]
    tau = [[1.0, 0.0], [0.5, math.sqrt(3) / 2]]
    want = [2 / 3 * 0.75, 2 / 3 * math.sqrt(3) / 4]
    _close(_merge("model_stock", tau, filter_wise=True), want)
    _close(_merge("model_stock", tau), want)


def test_nearswap_clamps_the_distance_at_1e6() -> None:
    # |base - other| = 5e-7 -> clamped to 1e-6: w = 1e-7 / 1e-6 = 0.1 (not 1e-7 / 5e-7 = 0.2)
    got = _merge("nearswap", [[5e-7, 0.5]], base=[0.0, 0.0], t=1e-7)
    torch.testing.assert_close(got, torch.tensor([5e-8, 1e-7]), atol=0.0, rtol=1e-5)  # 0.5: w = 1e-7 / 0.5


# ------------------------------------------------------------------------------------------- configs


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("llamas")
    base = make_tiny_llama(d / "base", n_layers=3)
    return {
        "base": base,
        "e1": make_tiny_llama(d / "e1", perturb_from=base, seed=1),
        "e2": make_tiny_llama(d / "e2", perturb_from=base, seed=2),
    }


def test_slice_source_filters_see_the_sources_layer_numbers(llamas: dict[str, Path], tmp_path: Path) -> None:
    only_layer_1 = [{"filter": "layers.1.", "value": 1.0}, {"value": 0.0}]
    cfg = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {
                        "model": str(llamas["e1"]),
                        "layer_range": [1, 2],
                        "parameters": {"weight": only_layer_1},
                    },
                    {"model": str(llamas["e2"]), "layer_range": [1, 2], "parameters": {"weight": 1.0}},
                ]
            }
        ],
    }
    run_merge(cfg, tmp_path / "o", RunOptions(threads=1))
    got, e1, e2 = (load_all_tensors(p) for p in (tmp_path / "o", llamas["e1"], llamas["e2"]))
    # output layer 0 is input layer 1: e1's filter matches its own name "...layers.1...", weight 1
    name_in, name_out = "model.layers.1.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(got[name_out], (e1[name_in] + e2[name_in]) / 2)


def test_unlisted_base_joins_karcher_and_globally_weighted_linear(
    llamas: dict[str, Path], tmp_path: Path
) -> None:
    base_sd, e1 = load_all_tensors(llamas["base"]), load_all_tensors(llamas["e1"])
    cfg = {
        "merge_method": "karcher",
        "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas["e1"])}],
    }
    result = run_merge(cfg, tmp_path / "k", RunOptions(threads=1))
    want = merge_state_dicts("karcher", [e1, base_sd])
    got = load_all_tensors(tmp_path / "k")
    assert all(torch.allclose(got[n], want[n], atol=1e-7, rtol=1e-6) for n in want)
    assert any("merged as one more model" in w for w in result.warnings)
    lin = {**cfg, "merge_method": "linear", "parameters": {"weight": 1.0}}
    run_merge(lin, tmp_path / "l", RunOptions(threads=1))
    got = load_all_tensors(tmp_path / "l")
    name = "lm_head.weight"
    torch.testing.assert_close(got[name], (e1[name] + base_sd[name]) / 2)
    # without a global weight mergekit stops ("Missing required parameter weight"): the base stays out
    lin_w = {
        **cfg,
        "merge_method": "linear",
        "models": [{"model": str(llamas["e1"]), "parameters": {"weight": 2.0}}],
    }
    result = run_merge(lin_w, tmp_path / "m", RunOptions(threads=1))
    assert torch.equal(load_all_tensors(tmp_path / "m")[name], e1[name]) and not result.warnings
