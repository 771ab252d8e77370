"""Task arithmetic, TIES, DARE, Breadcrumbs, DELLA, magnitude_prune and SCE: numbers worked by hand.

Expected values follow mergekit's generalized task arithmetic (sparsify, weight, elect sign on the
weighted sum, divide by the kept models' weights when ``normalize``, scale by ``lambda``).
"""

from __future__ import annotations

import pytest
import torch

from unimerge.core import merge_state_dicts
from unimerge.errors import ConfigError
from unimerge.methods import get_method
from unimerge.methods.sce import SCEParams, sce
from unimerge.methods.sparsify import (
    BreadcrumbsParams,
    BreadcrumbsTiesParams,
    DareLinearParams,
    DareTiesParams,
    DellaLinearParams,
    DellaParams,
    MagnitudePruneParams,
    TaskArithmeticParams,
    TiesParams,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    magnitude_prune,
    task_arithmetic,
    ties,
)

T1 = torch.tensor([1.0, -2.0, 3.0, -0.5, 0.1])
T2 = torch.tensor([-1.5, 1.0, 2.0, 0.2, -4.0])
T3 = torch.tensor([0.5, -0.3, -1.0, 2.5, 0.0])
ZERO = {"w": torch.zeros(5)}
EXPERTS = [{"w": t} for t in (T1, T2, T3)]

TAUS = torch.tensor(  # three task vectors, stacked (3, 6); methods overwrite x: pass a clone
    [[4.0, -1.0, 2.0, -3.0, 0.5, 1.0], [2.0, 3.0, 1.0, -1.0, -5.0, 0.2], [1.0, -2.5, 4.0, 2.0, 3.0, -0.1]]
)

GTA = ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties", "breadcrumbs",
       "breadcrumbs_ties", "della_linear", "della"]  # fmt: skip


def merged(method: str, experts=EXPERTS, base=ZERO, **params) -> torch.Tensor:
    return merge_state_dicts(method, experts, base, **params)["w"]


def test_ties_hand_computed():
    # trim k = int(0.6*5) = 3: T1 -> [1,-2,3,0,0], T2 -> [-1.5,0,2,0,-4], T3 -> [.5,0,-1,2.5,0]
    # sums [0,-2,4,2.5,-4] elect [+,-,+,+,-] (0 elects +); mean of agreeing entries
    torch.testing.assert_close(merged("ties", density=0.6), torch.tensor([0.75, -2.0, 2.5, 2.5, -4.0]))
    torch.testing.assert_close(
        merged("ties", density=0.6, **{"lambda": 0.5}), torch.tensor([0.375, -1.0, 1.25, 1.25, -2.0])
    )
    # weights [1, .5, 2]: weighted trims [1,-2,3,0,0], [-.75,0,1,0,-2], [1,0,-2,5,0];
    # divisor = sum of kept models' weights: (1+1)/3, -2/1, (3+1)/1.5, 5/2, -2/.5
    torch.testing.assert_close(
        merged("ties", density=0.6, weight=[1.0, 0.5, 2.0]), torch.tensor([2 / 3, -2.0, 8 / 3, 2.5, -4.0])
    )
    # normalize off: plain sum of agreeing weighted entries
    torch.testing.assert_close(
        merged("ties", density=0.6, normalize=False), torch.tensor([1.5, -2.0, 5.0, 2.5, -4.0])
    )


def test_ties_called_directly_hand_computed():
    pm = {"weight": torch.tensor([1.0, 2.0, 0.5]), "density": torch.full((3,), 0.5)}
    # trim k = int(0.5*6) = 3: [4,0,2,-3,0,0], [2,3,0,0,-5,0], [0,-2.5,4,0,3,0]
    # weighted (1, 2, .5): [4,0,2,-3,0,0], [4,6,0,0,-10,0], [0,-1.25,2,0,1.5,0]
    # sums [8,4.75,4,-3,-8.5,0] elect [+,+,+,-,-,+]; agreeing sums [8,6,4,-3,-10,0]
    # divided by the agreeing models' weights [1+2, 2, 1+.5, 1, 2, none -> 1]
    mean = torch.tensor([8 / 3, 3.0, 8 / 3, -3.0, -5.0, 0.0])
    torch.testing.assert_close(ties(TAUS.clone(), TiesParams(), pm, base=None, generator=None), mean)
    half = TiesParams(**{"lambda": 0.5})
    assert half == TiesParams(lambda_=0.5) and half.normalize and half.trim_scope == "tensor"
    torch.testing.assert_close(ties(TAUS.clone(), half, pm, base=None, generator=None), mean * 0.5)
    summed = ties(TAUS.clone(), TiesParams(normalize=False), pm, base=None, generator=None)
    torch.testing.assert_close(summed, torch.tensor([8.0, 6.0, 4.0, -3.0, -10.0, 0.0]))


def test_dare_ties_called_directly_at_full_density():
    pm = {"weight": torch.ones(3), "density": torch.ones(3)}  # nothing dropped, nothing rescaled
    g = torch.Generator().manual_seed(0)
    # sums [7,-.5,7,-2,-1.5,1.1] elect [+,-,+,-,-,+]; dare_ties adds the agreeing entries (normalize off)
    out = dare_ties(TAUS.clone(), DareTiesParams(), pm, base=None, generator=g)
    torch.testing.assert_close(out, torch.tensor([7.0, -3.5, 7.0, -4.0, -5.0, 1.2]))
    out = dare_ties(TAUS.clone(), DareTiesParams(normalize=True), pm, base=None, generator=g)
    torch.testing.assert_close(out, torch.tensor([7 / 3, -1.75, 7 / 3, -2.0, -5.0, 0.6]))


@pytest.mark.parametrize(
    ("fn", "params"),
    [
        (task_arithmetic, TaskArithmeticParams),
        (magnitude_prune, MagnitudePruneParams),
        (ties, TiesParams),
        (dare_linear, DareLinearParams),
        (dare_ties, DareTiesParams),
        (breadcrumbs, BreadcrumbsParams),
        (breadcrumbs_ties, BreadcrumbsTiesParams),
        (della_linear, DellaLinearParams),
        (della, DellaParams),
        (sce, SCEParams),
    ],
)
def test_each_method_is_its_own_function_and_params_class(fn, params):
    info = get_method(fn.__name__)
    assert info.fn is fn and info.params is params


def test_ties_zero_sum_elects_plus_and_all_zero_entries_stay_zero():
    a, b = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([-2.0, 0.0, 3.0])  # task vectors
    # entry 0: sum 0 -> + elected, only a agrees; entry 1: nobody kept -> 0 (divisor 0 -> 1)
    out = merged("ties", [{"w": 1.0 + a}, {"w": 1.0 + b}], {"w": torch.ones(3)})
    torch.testing.assert_close(out, torch.tensor([3.0, 1.0, 4.0]))


def test_ties_count_vote_differs_from_sum():
    from unimerge.methods.primitives import consensus_sums

    x = torch.tensor([[1.0], [1.0], [-5.0]])
    assert consensus_sums(x, None, "count")[0].item() == 2.0  # 2 votes for +
    assert consensus_sums(x, None, "sum")[0].item() == -5.0  # the sum is negative


def test_task_arithmetic_with_base_weights_and_lambda():
    base = {"w": torch.ones(5)}
    # tau_i = T_i - 1; 1*tau1 - 1*tau2 + 0.5*tau3 = [2.75,-3.15,0.5,.55,4.1] - 0.5; * 0.5 lambda; + base
    expected = torch.ones(5) + 0.5 * (torch.tensor([2.75, -3.15, 0.5, 0.55, 4.1]) - 0.5)
    torch.testing.assert_close(
        merged("task_arithmetic", base=base, weight=[1, -1, 0.5], **{"lambda": 0.5}), expected
    )
    torch.testing.assert_close(
        merged("task_arithmetic", base=base, weight=[1, -1, 0.5], lambda_=0.5), expected
    )


def test_task_negation_with_negative_weight():
    base = torch.tensor([1.0, 2.0, 3.0])
    expert = torch.tensor([1.5, 1.0, 3.0])  # tau = [0.5, -1, 0]
    out = merged("task_arithmetic", [{"w": expert}], {"w": base}, weight=-1.0)
    torch.testing.assert_close(out, torch.tensor([0.5, 3.0, 3.0]))
    out = merged("magnitude_prune", [{"w": expert}], {"w": base}, weight=-0.5, density=0.4)  # keeps |-1| only
    torch.testing.assert_close(out, torch.tensor([1.0, 2.5, 3.0]))


def test_magnitude_prune_hand_computed():
    # the trimmed vectors of the TIES test, summed without sign election
    torch.testing.assert_close(
        merged("magnitude_prune", density=0.6), torch.tensor([0.0, -2.0, 4.0, 2.5, -4.0])
    )


def test_della_at_full_density_is_ties_without_trim():
    # sums [0,-1.3,4,2.2,-3.9] elect [+,-,+,+,-]; agreeing means (1+.5)/2, (-2-.3)/2, (3+2)/2, (.2+2.5)/2, -4
    torch.testing.assert_close(merged("della"), torch.tensor([0.75, -1.15, 2.5, 1.35, -4.0]))
    torch.testing.assert_close(merged("della"), merged("ties"))


def test_breadcrumbs_hand_computed():
    x = torch.tensor([0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -1.0])
    zero = {"w": torch.zeros(10)}
    kept = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, -0.6, 0.7, -0.8, 0.9, 0.0])  # drop top 1, bottom 4
    torch.testing.assert_close(merged("breadcrumbs", [{"w": x}], zero, density=0.5, gamma=0.1), kept)
    torch.testing.assert_close(
        merged("breadcrumbs", [{"w": x}], zero, density=0.5, gamma=0.1, rescale=True), kept * (5.5 / 3.5)
    )
    # with TIES: y keeps [-.1,.2,-.3,.4,-.5] (drops top 1 = index 9, bottom 4 = indices 5..8 after gamma)
    y = torch.tensor([-0.1, 0.2, -0.3, 0.4, -0.5, 0.06, 0.07, 0.08, 0.09, 2.0])
    both = merged("breadcrumbs_ties", [{"w": x}, {"w": y}], zero, density=0.5, gamma=0.1)
    # y trimmed: top1 = 2.0 dropped, keep 5 largest of the rest: -.5,.4,-.3,.2,-.1 -> indices 0..4
    # index 4: .5 (x) vs -.5 (y) sum 0 -> + elected -> .5; normalize off for breadcrumbs
    expected = torch.tensor([-0.1, 0.2, -0.3, 0.4, 0.5, -0.6, 0.7, -0.8, 0.9, 0.0])
    torch.testing.assert_close(both, expected)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della_linear", "della"])
def test_random_methods_same_seed_same_output(method):
    g = torch.Generator().manual_seed(0)
    experts = [{"w": torch.randn(64, 32, generator=g)} for _ in range(3)]
    base = {"w": torch.randn(64, 32, generator=g)}
    a = merge_state_dicts(method, experts, base, seed=5, density=0.4)["w"]
    assert torch.equal(a, merge_state_dicts(method, experts, base, seed=5, density=0.4)["w"])
    assert not torch.equal(a, merge_state_dicts(method, experts, base, seed=6, density=0.4)["w"])
    assert get_method(method).random


def test_dare_expected_value_and_l1_rescale():
    tau = torch.linspace(-1.0, 2.0, 300_000)
    out = merged("dare_linear", [{"w": tau}], {"w": torch.zeros_like(tau)}, density=0.25, seed=1)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.005
    factor = tau.abs().sum() / tau[kept].abs().sum()  # mergekit rescale: keep the L1 norm
    torch.testing.assert_close(out[kept], tau[kept] * factor, rtol=1e-4, atol=1e-6)  # float32 sums
    assert abs(factor.item() - 4.0) < 0.1
    assert abs(out.mean().item() - tau.mean().item()) < 0.02  # E[out] ~ tau
    bins_out, bins_tau = out.reshape(30, -1).mean(dim=1), tau.reshape(30, -1).mean(dim=1)
    torch.testing.assert_close(bins_out, bins_tau, atol=0.06, rtol=0)


@pytest.mark.parametrize(
    "method", ["dare_linear", "dare_ties", "della_linear", "della", "ties", "breadcrumbs"]
)
def test_density_one_keeps_everything(method):
    g = torch.Generator().manual_seed(2)
    experts = [{"w": torch.randn(8, 6, generator=g)} for _ in range(3)]
    base = {"w": torch.zeros(8, 6)}
    info = get_method(method)
    consensus = method in ("ties", "dare_ties", "della")
    reference = "ties" if consensus else "task_arithmetic"
    normalize = info.params.model_fields["normalize"].default
    out = merge_state_dicts(method, experts, base, density=1.0)  # breadcrumbs: gamma ignored at density 1
    ref = merge_state_dicts(reference, experts, base, normalize=normalize)
    torch.testing.assert_close(out["w"], ref["w"])


def test_della_keep_rate_follows_magnitude_rank():
    row = torch.tensor([0.1, -0.4, 0.3, 0.2, -0.5])
    tau = row.repeat(20_000, 1)
    out = merged(
        "della_linear", [{"w": tau}], {"w": torch.zeros_like(tau)}, density=0.5, epsilon=0.2, rescale=False
    )
    freq = (out != 0).float().mean(dim=0)
    torch.testing.assert_close(freq, torch.tensor([0.3, 0.6, 0.5, 0.4, 0.7]), atol=0.015, rtol=0)


def test_sce_hand_computed():
    s1, s2 = torch.tensor([1.0, -2.0, 0.0, 4.0]), torch.tensor([3.0, 2.0, -1.0, 0.0])
    zero = {"w": torch.zeros(4)}
    # weights: mean squares 21/4 and 14/4 -> 0.6, 0.4; signs of the plain sum [4,0,-1,4] -> [+,+,-,+]
    # entries: (.6*1+.4*3)/1, (.4*2)/.4, (.4*-1)/.4, (.6*4)/.6
    torch.testing.assert_close(
        merged("sce", [{"w": s1}, {"w": s2}], zero), torch.tensor([1.8, 2.0, -1.0, 4.0])
    )
    # select_topk .5: variances [1,4,.25,4] -> keep entries 1 and 3; weights 5/6, 1/6
    torch.testing.assert_close(
        merged("sce", [{"w": s1}, {"w": s2}], zero, select_topk=0.5), torch.tensor([0.0, 2.0, 0.0, 4.0])
    )


@pytest.mark.parametrize("method", [*GTA, "sce"])
def test_identical_experts_return_the_expert(method):
    g = torch.Generator().manual_seed(4)
    expert, base = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    n = 3
    info = get_method(method)
    normalized = method == "sce" or info.params.model_fields["normalize"].default
    out = merge_state_dicts(method, [{"w": expert}] * n, {"w": base}, weight=1.0 if normalized else 1.0 / n)[
        "w"
    ]
    torch.testing.assert_close(out, expert, atol=1e-5, rtol=0)


def test_int8_mask_accepted_and_changes_nothing():
    torch.testing.assert_close(merged("ties", density=0.6, int8_mask=True), merged("ties", density=0.6))
    torch.testing.assert_close(merged("sce", int8_mask=True), merged("sce"))


def test_multidimensional_tensors_keep_shape():
    g = torch.Generator().manual_seed(5)
    experts = [{"w": torch.randn(4, 3, 2, 2, generator=g)} for _ in range(2)]
    base = {"w": torch.zeros(4, 3, 2, 2)}
    for method in ("ties", "della", "breadcrumbs_ties", "dare_ties", "sce"):
        out = merge_state_dicts(method, experts, base, **({} if method == "sce" else {"density": 0.5}))["w"]
        assert out.shape == (4, 3, 2, 2) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {"density": 0.0}),
        ("ties", {"density": 1.5}),
        ("dare_ties", {"density": -0.1}),
        ("dare_linear", {"density": [0.5, 0.5, 2.0]}),
        ("breadcrumbs", {"gamma": 1.5}),
        ("della", {"density": 0.9, "epsilon": 0.15}),
        ("della", {"density": 0.1, "epsilon": 0.15}),
        ("della_linear", {"epsilon": 0.6}),
        ("sce", {"select_topk": 0.0}),
        ("task_arithmetic", {"lambda": 1000.0}),
        ("ties", {"gamma": 0.1}),
        ("task_arithmetic", {"epsilon": 0.1}),
    ],
)
def test_bad_parameters_raise_config_error(method, params):
    with pytest.raises(ConfigError):
        merged(method, **params)


def test_mergekit_defaults():
    expect = {  # name: (normalize, rescale)
        "task_arithmetic": (False, False), "ties": (True, False), "dare_ties": (False, True),
        "dare_linear": (False, True), "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False),
        "della": (True, True), "della_linear": (False, True), "magnitude_prune": (False, False),
    }  # fmt: skip
    for name, (normalize, rescale) in expect.items():
        schema = get_method(name).param_schema()
        assert (schema["normalize"]["default"], schema["rescale"]["default"]) == (normalize, rescale), name
        assert schema["lambda"]["default"] == 1.0 and schema["density"]["scope"] == "per_model"
    assert get_method("breadcrumbs").param_schema()["gamma"]["default"] == 0.01
    assert get_method("della").param_schema()["epsilon"]["default"] == 0.15
    assert get_method("sce").param_schema()["select_topk"]["default"] == 1.0
