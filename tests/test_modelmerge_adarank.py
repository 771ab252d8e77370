"""AdaRank: closed forms at zero steps (task arithmetic, truncated task arithmetic, CART) and a learned prune.

The learned case is a toy whose answer is known: one linear layer, task ``a`` reads hidden unit 1 of
inputs along ``e_2``, task ``b`` reads unit 0 of inputs along ``e_1``. Task ``a``'s task matrix is
``diag(-1.5, 1, 0, 0)``: its *top* singular component (1.5, on ``e_1``) only cancels part of task
``b``'s ``diag(2, 0, 0, 0)`` and does nothing on ``a``'s own inputs, its second one (1.0, on ``e_2``) is
all of task ``a``. Minimising the entropy must prune ``a``'s top component and keep the rest.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from _modelmerge_a_toy import FakeTask, mlp_problem, problem
from unimerge.methods import MergeProblem, TensorMethod, get_method
from unimerge.methods.subspace import CartParams
from unimerge.modelmerge.adarank import AdaRankParams, adarank, adarank_merge


def _truncate(tau: Tensor, k: int) -> Tensor:
    """The best rank-``k`` approximation of ``tau`` ``(m, n)``, by hand from its SVD."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def test_all_components_kept_and_no_steps_is_task_arithmetic() -> None:
    p = mlp_problem(n=3)
    res = adarank(p, AdaRankParams(steps=0, init=0.4, rank_fraction=1.0, bf16=False))
    for k, b in p.base.state_dict().items():
        expected = b + 0.4 * sum(e[k] - b for e in p.experts)
        torch.testing.assert_close(res.state[k], expected, atol=1e-5, rtol=1e-5, msg=k)
    assert res.history == [] and res.coefficients.shape == (3, 4)  # 3 tasks x {0,2}.{weight,bias}


def test_initial_rank_keeps_the_top_components_of_each_task() -> None:
    """rank_fraction 0.4: int(6 * 0.4) = 2 components of the (8, 6) matrix, int(8 * 0.4) = 3 of the (8, 8)."""
    p = mlp_problem(n=3)
    res = adarank(p, AdaRankParams(steps=0, init=0.3, rank_fraction=0.4, bf16=False))
    base = p.base.state_dict()
    for k, rank in (("0.weight", 2), ("2.weight", 3)):
        expected = base[k] + 0.3 * sum(_truncate(e[k] - base[k], rank) for e in p.experts)
        torch.testing.assert_close(res.state[k], expected, atol=1e-5, rtol=1e-5, msg=k)
        kept = (res.logits[k] > 0).sum(dim=-1)
        assert kept.tolist() == [rank] * 3
    for k in ("0.bias", "2.bias"):  # not matrices: scaled task vectors, no mask
        torch.testing.assert_close(res.state[k], base[k] + 0.3 * sum(e[k] - base[k] for e in p.experts))


def test_cart_base_with_no_steps_is_the_registered_cart() -> None:
    p = mlp_problem(n=3)
    res = adarank(p, AdaRankParams(base_merge="cart", steps=0, init=2.0, rank_fraction=0.34, bf16=False))
    cart = get_method("cart", TensorMethod)
    base = p.base.state_dict()
    for k, b in base.items():
        x = torch.stack([e[k] - b for e in p.experts])  # (3, *shape)
        want = b + cart.fn(
            x,
            CartParams.model_validate({"rank_fraction": 0.34, "lambda": 2.0}),
            {"weight": torch.ones(3)},
            base=b,
            generator=None,
        )
        torch.testing.assert_close(res.state[k], want, atol=1e-5, rtol=1e-5, msg=k)


def test_defaults_follow_the_reference_configs() -> None:
    assert (AdaRankParams().prior, AdaRankParams().start_fraction) == (0.3, 1.0)
    cart = AdaRankParams(base_merge="cart")
    assert (cart.prior, cart.start_fraction) == (2.3, 0.16)
    assert AdaRankParams(init=0.5, rank_fraction=0.5).prior == 0.5
    with pytest.raises(ValidationError):
        AdaRankParams.model_validate({"base_merge": "ties"})
    with pytest.raises(ValidationError):
        AdaRankParams(rank_fraction=0.0)


class LineTask(FakeTask):
    """Inputs ``t * direction`` with ``t ~ N(0, 1)`` (seeded per task)."""

    def __init__(self, name: str, direction: Tensor, offset: int) -> None:
        super().__init__(name, 4, offset)
        self.direction = direction

    def inputs(self, n: int, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(1000 * self.offset + seed)
        return torch.randn(n, 1, generator=g) * self.direction


def _reads(unit: int) -> nn.Linear:
    """A 2-class head with logits ``(3 f_unit, -3 f_unit)``."""
    head = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0, unit], head.weight[1, unit] = 3.0, -3.0
    return head.eval()


def _conflict_problem() -> tuple[MergeProblem, Tensor]:
    base = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        base.weight.zero_()
    eye = torch.eye(4)
    tau_a = torch.diag(torch.tensor([-1.5, 1.0, 0.0, 0.0]))
    tau_b = torch.diag(torch.tensor([2.0, 0.0, 0.0, 0.0]))
    tasks = [LineTask("a", eye[1], 0), LineTask("b", eye[0], 1)]
    p = problem(base, [{"weight": tau_a}, {"weight": tau_b}], tasks, {"a": _reads(1), "b": _reads(0)})
    return p, tau_a


def test_entropy_falls_and_the_conflicting_top_component_is_pruned() -> None:
    p, tau_a = _conflict_problem()
    u, s, _ = torch.linalg.svd(tau_a)
    assert float(s[0]) == pytest.approx(1.5) and abs(float(u[0, 0])) == pytest.approx(1.0)  # on b's unit 0
    res = adarank(p, AdaRankParams(steps=60, bf16=False))
    assert res.history[-1] < res.history[0] - 0.2
    logits = res.logits["weight"]  # (2 tasks, 4 components)
    assert float(logits[0, 0]) < 0, "a's top component (the conflict) is pruned"
    assert float(logits[0, 1]) > 0 and float(logits[1, 0]) > 0, "a's own and b's top components stay"
    # The merged weight holds no trace of a's top component: unit 0 gets only lambda_b * 2.
    lam = res.coefficients[:, 0]
    torch.testing.assert_close(res.state["weight"][0, 0], 2.0 * lam[1])
    torch.testing.assert_close(res.state["weight"][1, 1], 1.0 * lam[0])


def test_same_problem_same_result_and_details() -> None:
    p = mlp_problem(n=2, budget=16)
    one = adarank_merge(p, AdaRankParams(steps=3, bf16=False))
    two = adarank_merge(p, AdaRankParams(steps=3, bf16=False))
    for k, v in one.module.state_dict().items():
        assert torch.equal(v, two.module.state_dict()[k]), k
    assert one.examples_used == 16 and one.labeled is False and one.task_modules == {}
    assert one.details["kept_fraction_per_task"] == [1.0, 1.0]  # 3 small steps cannot flip a +0.1 logit
    assert len(one.details["entropy_first_last"]) == 2
