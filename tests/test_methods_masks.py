"""Hand-computed cases for the mask-based methods: PCB, Consensus (TA/TIES), MagMax, Localize-and-Stitch, EMR."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from unimerge.core import merge_state_dicts
from unimerge.errors import ConfigError
from unimerge.methods import get_method
from unimerge.methods.emr import emr_elect, emr_rescalers
from unimerge.methods.masks import _quantile_clamp, pcb_scores, tall_masks

MASK_METHODS = ["pcb", "consensus_ta", "consensus_ties", "magmax", "localize_stitch", "emr"]


def _merge(method: str, deltas: list[list[float]], **params) -> torch.Tensor:
    """Merge task vectors given as lists on a zero base; returns the merged task vector."""
    base = {"w": torch.zeros(len(deltas[0]))}
    experts = [{"w": torch.tensor(d)} for d in deltas]
    return merge_state_dicts(method, experts, base, **params)["w"]


def _close(actual: torch.Tensor, expected: list[float], tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------- PCB


def test_pcb_scores_and_merge_by_hand():
    # tau1 = [1, 2, -1, .5], tau2 = [3, -1, 1, .5], n = 2, sum = [4, 1, 0, 1].
    # |tau1| minmax = [1/3, 1, 1/3, 0] -> intra1 = exp(2 * [1/9, 1, 1/9, 0]);
    # |tau2| minmax = [1, .2, .2, 0]   -> intra2 = exp(2 * [1, .04, .04, 0]).
    # inter1 = tanh([4, 2, 0, .5]); inter2 = tanh([12, -1, 0, .5]).
    a = math.exp(2 / 9) * math.tanh(4)  # 1.24801
    b = math.exp(2) * math.tanh(2)  # 7.12325
    c = math.tanh(0.5)  # 0.46212
    p = math.exp(2) * math.tanh(12)  # 7.38906
    # ratio .75: threshold = sorted[int(4 * .25)] = 2nd smallest. Row 1 sorted [0, c, a, b] -> c;
    # row 2 sorted [-e^.08 tanh 1, 0, c, p] -> 0. Clamp from below, then min-max:
    s1 = [(a - c) / (b - c), 1.0, 0.0, 0.0]  # [0.11798, 1, 0, 0]
    s2 = [1.0, 0.0, 0.0, c / p]  # [1, 0, 0, 0.06254]
    x = torch.tensor([[1.0, 2.0, -1.0, 0.5], [3.0, -1.0, 1.0, 0.5]])
    scale, clamped = pcb_scores(x, ratio=0.75, clamp_ratio=0.0)
    torch.testing.assert_close(scale, torch.tensor([s1, s2]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clamped, x)
    # merged = sum(tau * s) / sum(s): [(0.11798 + 3) / 1.11798, 2, 0 (no score), .5]
    _close(_merge("pcb", x.tolist(), ratio=0.75), [2.788938, 2.0, 0.0, 0.5])
    # per-model weight (the reference's lams) scales each task vector, lambda the result
    _close(
        _merge("pcb", x.tolist(), ratio=0.75, weight=[2.0, 1.0], **{"lambda": 0.5}),
        [0.5 * (2 * 0.117982 + 3) / 1.117982, 2.0, 0.0, 0.5 * 0.5 * (0.0625408 + 0) / 0.0625408],
    )


def test_pcb_default_ratio_keeps_entries_above_the_90th_percentile():
    # n = 1, tau = 1..20: intra = exp(minmax^2), inter = tanh(tau^2) ~ 1, scores increase with tau.
    # threshold = sorted[int(20 * .9)] = sorted[18] -> only the largest entry (20) is kept.
    merged = _merge("pcb", [[float(i) for i in range(1, 21)]])
    expected = [0.0] * 19 + [20.0]
    _close(merged, expected)


def test_pcb_outlier_clamp_cuts_int_d_ratio_entries_each_end():
    v = torch.arange(1.0, 11.0).reshape(1, 10)
    _close(_quantile_clamp(v, 0.1)[0], [2, 2, 3, 4, 5, 6, 7, 8, 9, 9])
    _close(_quantile_clamp(v, 0.05)[0], list(range(1, 11)))  # int(10 * .05) = 0: nothing clipped
    _close(_quantile_clamp(v, 0.2)[0], [3, 3, 3, 4, 5, 6, 7, 8, 8, 8])


def test_pcb_constant_tensor_has_no_nan():
    merged = _merge("pcb", [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert torch.isfinite(merged).all()


# ----------------------------------------------------------------------------------- Consensus


CONSENSUS_TVS = [[1.0, 2.0, 3.0, 0.5], [2.0, 1.0, -1.0, 0.5], [1.0, -1.0, 1.0, 0.0]]


def test_tall_masks_by_hand():
    # tau_MTL = [4, 2, 3, 1]; m_t = |tau_t| > |tau_MTL - tau_t| * .4
    # e0: 1 > 1.2 F, 2 > .8 T, 1 > 1.2 F;  e1: 2 > 0 T, 1 > .4 T, 1 > 1.2 F
    # e2: 3 > 0 T, 1 > 1.6 F, 1 > .8 T;    e3: .5 > .2 T, .5 > .2 T, 0 > .4 F
    x = torch.tensor(CONSENSUS_TVS)
    masks = tall_masks(x, x.sum(0), 0.4)
    expected = [[False, True, True, True], [True, True, False, True], [False, False, True, False]]
    assert masks.tolist() == expected
    # per-task lambdas: task 0 with lambda .2 also keeps e0 (1 > .6)
    per_task = tall_masks(x, x.sum(0), torch.tensor([0.2, 0.4, 0.4]))
    assert per_task[0].tolist() == [True, True, True, True]


def test_consensus_ta_by_hand():
    # counts [1, 2, 2, 2] >= k = 2 keep e1..e3 of tau_MTL = [4, 2, 3, 1]
    _close(_merge("consensus_ta", CONSENSUS_TVS), [0.0, 2.0, 3.0, 1.0])
    _close(_merge("consensus_ta", CONSENSUS_TVS, **{"lambda": 0.5}), [0.0, 1.0, 1.5, 0.5])
    _close(_merge("consensus_ta", CONSENSUS_TVS, k=3), [0.0, 0.0, 0.0, 0.0])
    _close(_merge("consensus_ta", CONSENSUS_TVS, tall_lambda=0.2), [4.0, 2.0, 3.0, 1.0])
    _close(_merge("consensus_ta", CONSENSUS_TVS, k=0), [4.0, 2.0, 3.0, 1.0])  # k = 0: plain TA


def test_consensus_ta_identical_experts_with_mean_weights_is_identity():
    tv = [0.3, -1.0, 2.0, 0.0]
    _close(_merge("consensus_ta", [tv] * 4, weight=0.25), tv)


def test_consensus_ties_by_hand():
    # density .4 of 5 -> top 2 each: [4, -3, 0, 0, 0] and [-2.5, 0, 3, 0, 0].
    # sign (sum) [+, -, +, +, +] -> disjoint sum tau_MTL = [4, -3, 3, 0, 0].
    # TALL (raw tau, .4): e0: 4 > 0 T, 2.5 > 2.6 F -> 1 (drop); e1: 3 > 0 T, 1 > .8 T -> keep;
    # e2: 2 > .4 T, 3 > 0 T -> keep.
    tvs = [[4.0, -3.0, 2.0, 1.0, 0.5], [-2.5, -1.0, 3.0, 0.2, 2.0]]
    _close(_merge("consensus_ties", tvs, density=0.4), [0.0, -3.0, 3.0, 0.0, 0.0])
    _close(_merge("consensus_ties", tvs, density=0.4, k=1), [4.0, -3.0, 3.0, 0.0, 0.0])


# -------------------------------------------------------------------------------------- MagMax


def test_magmax_by_hand():
    tvs = [[1.0, -3.0, 2.0, 0.0], [-2.0, 1.0, -2.0, 0.0], [0.5, 2.0, 1.0, 0.0]]
    # max |.|: e0 -2, e1 -3, e2 tie 2 / -2 -> the later task (-2) wins, e3 0
    _close(_merge("magmax", tvs), [-2.0, -3.0, -2.0, 0.0])
    _close(_merge("magmax", tvs, **{"lambda": 0.5}), [-1.0, -1.5, -1.0, 0.0])
    # weights apply before the selection: task 2 becomes [-.5, .25, -.5, 0]
    _close(_merge("magmax", tvs, weight=[1.0, 0.25, 1.0]), [1.0, -3.0, 2.0, 0.0])


# -------------------------------------------------------------------------- Localize-and-Stitch


def test_localize_stitch_by_hand():
    tvs = [[4.0, -1.0, 0.5, 3.0], [1.0, -2.0, 0.1, 1.5]]
    # sparsity .5 -> top 2 each: {e0, e3} and {e1, e3}; e3 is shared -> averaged (3 + 1.5) / 2
    _close(_merge("localize_stitch", tvs, sparsity=0.5), [4.0, -2.0, 0.0, 2.25])
    # weights scale the stitched values, not the localisation
    _close(_merge("localize_stitch", tvs, sparsity=0.5, weight=[1.0, 2.0]), [4.0, -4.0, 0.0, 3.0])
    _close(_merge("localize_stitch", tvs, sparsity=1.0), [2.5, -1.5, 0.3, 2.25])


# ----------------------------------------------------------------------------------------- EMR


EMR_TVS = [[1.0, -2.0, 3.0, 0.0, 0.5], [2.0, 1.0, -1.0, 0.0, -0.5], [-1.0, 1.0, 2.0, 0.0, 0.0]]


def test_emr_elect_by_hand():
    # sums [2, 0, 4, 0, 0] -> signs [+, -, +, -, -] (a zero sum elects -, as the reference code)
    tau_uni, masks = emr_elect(torch.tensor(EMR_TVS))
    _close(tau_uni, [2.0, -2.0, 3.0, 0.0, -0.5])
    assert masks.tolist() == [
        [True, True, True, False, False],
        [True, False, False, False, True],
        [False, False, True, False, False],
    ]
    _close(_merge("emr", EMR_TVS), [2.0, -2.0, 3.0, 0.0, -0.5])
    _close(_merge("emr", EMR_TVS, **{"lambda": 0.5}), [1.0, -1.0, 1.5, 0.0, -0.25])


def test_emr_rescalers_sum_per_tensor_means():
    x = torch.tensor(EMR_TVS)
    tau_uni, masks = emr_elect(x)
    # mean|tau_t| = [6.5, 4.5, 4] / 5; mean|M_t tau_uni| = [7, 2.5, 3] / 5
    _close(emr_rescalers([(x, tau_uni, masks)], 3), [6.5 / 7, 4.5 / 2.5, 4 / 3])
    # a second tensor [2], [-1], [1]: tau_uni = [2], masks [T, F, T]
    y = torch.tensor([[2.0], [-1.0], [1.0]])
    u2, m2 = emr_elect(y)
    got = emr_rescalers([(x, tau_uni, masks), (y, u2, m2)], 3)
    _close(got, [(1.3 + 2) / (1.4 + 2), (0.9 + 1) / (0.5 + 0), (0.8 + 1) / (0.6 + 2)])


def test_emr_rescaler_of_an_all_zero_task_is_one():
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    u, m = emr_elect(x)
    _close(emr_rescalers([(x, u, m)], 2), [1.0, 1.0])


# ---------------------------------------------------------------------------------- registration


@pytest.mark.parametrize("name", MASK_METHODS)
def test_registration_and_grid(name):
    info = get_method(name)
    assert (
        info.family in ("mask", "sparsify")
        and info.needs_base
        and info.paper.startswith("https://arxiv.org/")
    )
    assert info.data == "none" and not info.random
    keys = set(info.param_schema())
    assert set(info.grid) <= keys
    combos = list(itertools.product(*info.grid.values()))
    assert 1 <= len(combos) <= 12  # each point costs one benchmark merge
    # every grid point validates
    for combo in combos:
        _merge(name, [[1.0, -2.0, 0.5], [0.5, 1.0, -1.0]], **dict(zip(info.grid, combo, strict=True)))


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("pcb", {"ratio": 0.0}),
        ("pcb", {"clamp_ratio": 0.5}),
        ("consensus_ta", {"k": -1}),
        ("consensus_ties", {"density": 1.5}),
        ("magmax", {"lambda": -1.0}),
        ("localize_stitch", {"sparsity": 0.0}),
        ("emr", {"bogus": 1.0}),
    ],
)
def test_bad_parameters_raise_config_error(name, params):
    with pytest.raises(ConfigError):
        _merge(name, [[1.0, 2.0], [2.0, 1.0]], **params)


@pytest.mark.parametrize("name", ["magmax", "emr"])
def test_identity_on_identical_experts_at_defaults(name):
    tv = [0.3, -1.0, 2.0, 0.0, 1e-3]
    _close(_merge(name, [tv] * 3), tv)


@pytest.mark.parametrize("name", MASK_METHODS)
def test_shape_dtype_preserved(name):
    base = {"w": torch.zeros(3, 5, dtype=torch.bfloat16)}
    g = torch.Generator().manual_seed(0)
    experts = [{"w": torch.randn(3, 5, generator=g).to(torch.bfloat16)} for _ in range(3)]
    out = merge_state_dicts(name, experts, base)["w"]
    assert out.shape == (3, 5) and out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
