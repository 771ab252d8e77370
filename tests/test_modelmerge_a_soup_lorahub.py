"""Greedy soup (order, acceptance, stop) and LoraHub-style search (full fine-tunes and LoRA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _modelmerge_a_toy import FakeTask, heads, mlp, perturbed, problem, teacher_of
from unimerge.modelmerge.lorahub import LoraHubParams, cma_minimize, lorahub, lorahub_search, task_loss
from unimerge.modelmerge.soup import SoupParams, greedy_select, greedy_soup, soup_search


def test_greedy_select_skips_and_stops_as_documented() -> None:
    table = {(2,): 0.8, (2, 0): 0.7, (2, 1): 0.85, (2, 1, 3): 0.85, (2, 0, 1): 0.9}
    score = lambda members: table[tuple(members)]  # noqa: E731
    skip = greedy_select([2, 0, 1, 3], score, "skip")
    assert skip.chosen == [2, 1, 3]  # 0 lowers the score and is skipped; 3 ties (>=) and is kept
    assert skip.scores == [0.8, 0.7, 0.85, 0.85]
    stop = greedy_select([2, 0, 1, 3], score, "stop")
    assert stop.chosen == [2] and stop.scores == [0.8, 0.7]


def _soup_problem():
    base = mlp()
    good = perturbed(base, 0.3, seed=1)
    near = {k: v + 1e-4 for k, v in good.items()}
    bad = perturbed(base, 3.0, seed=2)
    hs = heads(2)
    tasks = [FakeTask(f"t{i}", 6, i, teacher_of(base, good, hs[f"t{i}"])) for i in range(2)]
    return problem(base, [bad, good, near], tasks, hs, budget=32), good, near


def test_greedy_soup_ranks_by_accuracy_and_leaves_out_the_bad_expert() -> None:
    p, good, near = _soup_problem()
    trace, state, used = soup_search(p, SoupParams(bf16=False))
    assert trace.order == [1, 2, 0]  # good and near tie at 100%, bad last
    assert trace.chosen == [1, 2] and trace.scores[0] == 1.0 and trace.scores[2] < 1.0
    torch.testing.assert_close(state["0.weight"], (good["0.weight"] + near["0.weight"]) / 2)
    out = greedy_soup(p, SoupParams())
    assert out.labeled and out.examples_used == used == 32


def test_cma_minimize_finds_a_known_optimum() -> None:
    pytest.importorskip("cma")
    f = lambda x: (x[0] - 0.7) ** 2 + (x[1] + 0.2) ** 2  # noqa: E731
    x, fx, hist = cma_minimize(f, [0.0, 0.0], 0.5, (-1.5, 1.5), 120, seed=0)
    assert abs(x[0] - 0.7) < 0.02 and abs(x[1] + 0.2) < 0.02 and fx == min(hist) and len(hist) <= 120
    x1, _, _ = cma_minimize(lambda x: (x[0] - 0.5) ** 2, [0.0], 0.5, (-1.0, 1.0), 21, seed=0)
    assert x1 == [0.5]  # 1-D: a grid with step 0.1


def test_lorahub_beats_uniform_weights_on_full_fine_tunes() -> None:
    pytest.importorskip("cma")
    base = mlp()
    e0, e1 = perturbed(base, 0.5, seed=1), perturbed(base, 0.5, seed=2)
    hs = heads(1)
    task = FakeTask("t0", 6, 0, teacher_of(base, e0, hs["t0"]))  # labels from expert 0: optimum w = (1, 0)
    p = problem(base, [e0, e1], [task], hs, budget=48)
    params = LoraHubParams(evaluations=40, reg=0.0, examples=48, bf16=False)
    res = lorahub_search(p, params)
    uniform = lorahub_search(p, params.model_copy(update={"evaluations": 1, "init": 0.5}))  # w = (0.5, 0.5)
    assert res.score < uniform.score and res.weights[0] > res.weights[1]
    out = lorahub(p, params)  # the same seeded search again
    assert out.labeled and out.examples_used == 48
    for k, v in res.state.items():
        assert torch.equal(out.module.state_dict()[k], v)


class LoraLinear(nn.Module):
    """``y = x (W0 + B A)^T``: a frozen weight plus a LoRA adapter."""

    def __init__(self, dim: int, out: int, rank: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, dim))
        self.lora_A = nn.Parameter(torch.zeros(rank, dim))
        self.lora_B = nn.Parameter(torch.zeros(out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight + self.lora_B @ self.lora_A).T


def test_lorahub_composes_lora_adapters() -> None:
    pytest.importorskip("cma")
    torch.manual_seed(0)
    base = LoraLinear(6, 8, rank=2).eval()
    w0 = base.weight.detach().clone()
    adapters = [{"weight": w0, "lora_A": torch.randn(2, 6), "lora_B": torch.randn(8, 2)} for _ in range(3)]
    hs = {"t0": nn.Linear(8, 3)}
    task = FakeTask("t0", 6, 0, teacher_of(base, adapters[2], hs["t0"]))
    p = problem(base, adapters, [task], hs, budget=48)
    res = lorahub_search(p, LoraHubParams(evaluations=30, examples=48, bf16=False))
    w = res.weights
    torch.testing.assert_close(
        res.state["lora_A"], sum(wi * a["lora_A"] for wi, a in zip(w, adapters, strict=True))
    )
    torch.testing.assert_close(
        res.state["lora_B"], sum(wi * a["lora_B"] for wi, a in zip(w, adapters, strict=True))
    )
    assert torch.equal(res.state["weight"], w0)
    m = LoraLinear(6, 8, 2).eval()
    data = [list(task.labeled(48, 32, 0))]
    m.load_state_dict({"weight": w0, **{k: sum(a[k] for a in adapters) / 3 for k in ("lora_A", "lora_B")}})
    uniform = task_loss(p, m, data, bf16=False)  # plain average of the adapters
    assert res.score < uniform


def test_lorahub_rejects_data_methods_and_weight_overrides() -> None:
    with pytest.raises(ValueError, match="needs data"):
        LoraHubParams(method="regmean")
    with pytest.raises(ValueError, match="searches"):
        LoraHubParams(method_params={"weight": 1.0})


def test_lorahub_params_are_checked_when_read() -> None:
    """An empty search box, or a bad parameter of the composed method, fails at parse time (not mid-run)."""
    with pytest.raises(ValueError, match="lower < upper"):
        LoraHubParams(lower=0.5, upper=0.5, init=0.5)
    with pytest.raises(ValueError, match="density"):
        LoraHubParams(method="ties", method_params={"density": 2.0})
    with pytest.raises(ValueError, match="has no parameter 'densty'"):
        LoraHubParams(method="ties", method_params={"densty": 0.5})
    assert LoraHubParams(method="ties", method_params={"density": 0.5}).method_params == {"density": 0.5}
