"""Fisher merging: the per-tensor formula, the Fisher estimates (empirical and sampled), the method."""

from __future__ import annotations

import torch
from torch import nn

from _modelmerge_a_toy import FakeTask, mlp_problem, problem
from unimerge.modelmerge.fisher import (
    FisherParams,
    compute_fishers,
    fisher,
    fisher_merge,
    fisher_state_dict,
    normalize_fishers,
)
from unimerge.modelmerge.stats import collect_fisher


def _log_probs(module: nn.Module, batch: dict) -> torch.Tensor:
    return torch.log_softmax(module(batch["x"]), dim=-1)


def test_fisher_merge_hand_computed() -> None:
    params = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    fishers = torch.tensor([[1.0, 0.0], [3.0, 1.0]])
    # (1*1 + 3*3) / (1 + 3) = 2.5 ; (0*2 + 1*4) / (0 + 1) = 4
    torch.testing.assert_close(fisher_merge(params, fishers, eps=0.0), torch.tensor([2.5, 4.0]))
    # weights 3:1 on the first entry: (3*1*1 + 1*3*3) / (3*1 + 1*3) = 2
    torch.testing.assert_close(
        fisher_merge(params, fishers, torch.tensor([3.0, 1.0]), eps=0.0)[0], torch.tensor(2.0)
    )


def test_equal_fishers_give_the_average() -> None:
    experts = [{"w": torch.randn(3, 4), "n": torch.tensor(5)} for _ in range(3)]
    f = torch.rand(3, 4)
    out = fisher_state_dict(experts, [{"w": f}] * 3, eps=0.0)
    torch.testing.assert_close(out["w"], torch.stack([e["w"] for e in experts]).mean(0))
    assert out["n"] == 5
    out = fisher_state_dict(experts, [{"w": f}] * 3, weights=[2.0, 1.0, 1.0], eps=0.0)
    expected = (2 * experts[0]["w"] + experts[1]["w"] + experts[2]["w"]) / 4
    torch.testing.assert_close(out["w"], expected)


def test_normalize_fishers_hand_computed() -> None:
    out = normalize_fishers([{"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}])
    torch.testing.assert_close(out[0]["a"], torch.tensor([0.6]))
    torch.testing.assert_close(out[0]["b"], torch.tensor([0.8]))


def test_empirical_fisher_of_softmax_regression_is_closed_form() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, bias=False)
    x = torch.randn(10, 4)
    y = torch.randint(0, 3, (10,))
    f, seen = collect_fisher(lin, [{"x": x, "labels": y}], _log_probs, mode="empirical", bf16=False)
    p = torch.softmax(x @ lin.weight.detach().T, -1)  # (10, 3)
    grad = torch.nn.functional.one_hot(y, 3) - p  # d log p(y|x) / d logits
    expected = torch.einsum("nk,nd->kd", grad**2, x**2) / 10  # mean of squared per-example gradients
    torch.testing.assert_close(f["weight"], expected, atol=1e-6, rtol=1e-5)
    assert seen == 10 and lin.weight.requires_grad  # requires_grad restored


def test_sampled_fisher_converges_to_the_true_fisher() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(2, 3, bias=False)
    x = torch.tensor([[1.0, -2.0]]).repeat(3000, 1)  # one input, many label samples
    g = torch.Generator().manual_seed(0)
    f, _ = collect_fisher(lin, [{"x": x}], _log_probs, mode="sampled", micro_batch=1, generator=g, bf16=False)
    p = torch.softmax(x[0] @ lin.weight.detach().T, -1)  # (3,)
    true = (p * (1 - p) ** 2 + (1 - p) * p**2)[:, None] * x[0] ** 2  # E_y (e_y - p)^2 x^2
    torch.testing.assert_close(f["weight"], true, rtol=0.1, atol=1e-3)


def test_empirical_and_sampled_both_computed_on_a_problem() -> None:
    p = mlp_problem(n=2, budget=16)
    emp, used = compute_fishers(p, FisherParams(mode="empirical", bf16=False))
    smp, _ = compute_fishers(p, FisherParams(mode="sampled", bf16=False))
    assert used == 16 and set(emp[0]) == set(smp[0]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for a, b in zip(emp, smp, strict=True):
        assert all((v >= 0).all() for v in a.values())
        assert any(not torch.allclose(a[k], b[k]) for k in a)
    again, _ = compute_fishers(p, FisherParams(mode="sampled", bf16=False))
    assert all(torch.equal(smp[0][k], again[0][k]) for k in smp[0])  # seeded


def test_fisher_method_on_copies_returns_the_expert_and_reports_data() -> None:
    p = mlp_problem(n=1, budget=8)
    p.experts, p.tasks = [p.experts[0]] * 2, [p.tasks[0]] * 2
    out = fisher(p, FisherParams())
    for k, v in p.experts[0].items():
        torch.testing.assert_close(out.module.state_dict()[k], v, atol=1e-6, rtol=1e-6)
    assert out.examples_used == 8 and out.labeled
    assert fisher(p, FisherParams(mode="sampled")).labeled is False


def test_fisher_method_weights_each_expert_by_its_own_task() -> None:
    # Expert i only changes the row its own task's head reads; Fisher keeps each expert's row.
    base = nn.Linear(2, 2, bias=False).eval()
    with torch.no_grad():
        base.weight.zero_()
    e0 = {"weight": torch.tensor([[1.0, 0.0], [5.0, 5.0]])}
    e1 = {"weight": torch.tensor([[7.0, 7.0], [0.0, 1.0]])}
    h0, h1 = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        h0.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # reads output 0 only
        h1.weight.copy_(torch.tensor([[0.0, 1.0], [0.0, -1.0]]))  # reads output 1 only
    tasks = [
        FakeTask("t0", 2, 0, lambda x: x[:, :1].repeat(1, 2)),
        FakeTask("t1", 2, 1, lambda x: x[:, :1].repeat(1, 2)),
    ]
    p = problem(base, [e0, e1], tasks, {"t0": h0, "t1": h1}, budget=16)
    w = fisher(p, FisherParams(eps=1e-12, bf16=False)).module.weight.detach()
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), atol=1e-4, rtol=1e-4)
