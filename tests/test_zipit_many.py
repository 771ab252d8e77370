"""ZipIt! for N >= 2 models (unimerge.align.zipmatch, unimerge.align.zipit.zip_models).

Two models must reproduce the two-model algorithm exactly (a copy of it is the reference below); N
copies of one model must zip back to it; a 3-model greedy order is worked out by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from test_align import CASES, mlp, scrambled
from unimerge.align import ZipMatrices, zip_matrices, zip_models, zipit
from unimerge.align.activations import CorrelationStats
from unimerge.errors import ConfigError

pytest.importorskip("scipy")


def two_model_reference(corr: Tensor, alpha: float, beta: float) -> ZipMatrices:
    """The two-model greedy matching as unimerge implemented it before N models (kept verbatim)."""
    two_c = corr.shape[0]
    c = two_c // 2
    sims = torch.nan_to_num(corr.detach().to(torch.float64).clone(), nan=0.0)
    sims.fill_diagonal_(-torch.inf)
    origin = torch.arange(two_c) >= c
    members = torch.eye(two_c, dtype=torch.float64)
    alive = torch.ones(two_c, dtype=torch.bool)
    budget = [int(c // 2 * beta)] * 2
    for _ in range(c):
        scores = sims.clone() if min(budget) <= 0 else sims
        for m in (0, 1):
            if budget[m] <= 0:
                same = alive & (origin == bool(m))
                block = same[:, None] & same[None, :] & torch.isfinite(scores)
                scores[block] = -1e30
        i, j = sorted(divmod(int(scores.reshape(-1).argmax()), two_c))
        if bool(origin[i]) == bool(origin[j]):
            budget[int(origin[i])] -= 1
        members[:, i] += members[:, j]
        alive[j] = False
        merged = (
            torch.minimum(sims[i], sims[j]) * alpha if alpha > 0 else torch.full_like(sims[i], -torch.inf)
        )
        sims[i, :], sims[:, i] = merged, merged
        sims[j, :], sims[:, j] = -torch.inf, -torch.inf
        sims[i, i] = -torch.inf
    unmerge = members[:, alive]
    return ZipMatrices(merge=(unmerge / unmerge.sum(0, keepdim=True)).T, unmerge=unmerge)


def correlation(features: Tensor) -> Tensor:
    stats = CorrelationStats(features.shape[1])
    stats.update(features, features)
    return stats.correlation()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("beta", [1.0, 0.5, 0.25, 0.0])
def test_two_models_give_exactly_the_two_model_algorithm(alpha: float, beta: float) -> None:
    gen = torch.Generator().manual_seed(int(10 * alpha + 100 * beta))
    for c in (1, 2, 5, 16):
        base = torch.randn(40, c, generator=gen, dtype=torch.float64)
        mix = torch.randn(c, 2 * c, generator=gen, dtype=torch.float64)
        feats = base @ mix + 0.5 * torch.randn(40, 2 * c, generator=gen, dtype=torch.float64)
        corr = correlation(feats)
        got, want = (
            zip_matrices(corr, alpha=alpha, beta=beta, models=2),
            two_model_reference(corr, alpha, beta),
        )
        assert torch.equal(got.unmerge, want.unmerge) and torch.equal(got.merge, want.merge)


def test_zipit_is_zip_models_of_two() -> None:
    a, b, x = mlp(0), mlp(1), torch.randn(64, 3, 4)
    one, other = zipit(a, b, [x], beta=0.5), zip_models([a, b], [x], beta=0.5)
    for k, v in one.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])


@pytest.mark.parametrize(("case", "n"), [("mlp", 3), ("mlp", 4), ("resnet", 3)])
def test_n_copies_of_one_model_zip_back_to_it(case: str, n: int) -> None:
    make, inputs = CASES[case]
    model, x = (mlp(0, nn.Tanh), torch.randn(64, 3, 4)) if case == "mlp" else (make(0), inputs())
    copies = [model] + [scrambled(model, x, seed=7 + k) for k in range(n - 1)]
    zipped = zip_models(copies, [x[: len(x) // 2], x[len(x) // 2 :]])
    with torch.no_grad():
        torch.testing.assert_close(zipped(x), model(x), atol=1e-5, rtol=1e-5)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(zipped.state_dict()[k], v, atol=1e-6, rtol=1e-6)


def test_three_models_greedy_order_by_hand() -> None:
    # features a0 a1 b0 b1 c0 c1 (C = 2); same-model budget floor(floor(2 * 2 / 3) * 1) = 1 per model
    names = ["a0", "a1", "b0", "b1", "c0", "c1"]
    pairs = {
        ("b0", "b1"): 0.95,  # 1: B = {b0, b1} (model b's one same-model merge)
        ("c0", "c1"): 0.9,  # 2: C = {c0, c1}; B-C would hold 4 > N = 3 features: never allowed
        ("a1", "b0"): 0.7,
        ("a1", "b1"): 0.6,  # 3: B-a1 = min(0.7, 0.6) = 0.6 beats C-a0 = 0.5, B-a0 = 0.3, C-a1 = 0.2
        ("a0", "c0"): 0.5,
        ("a0", "c1"): 0.55,  # 4: C-a0 = min(0.5, 0.55) = 0.5, the only allowed pair left
        ("a0", "b0"): 0.4,
        ("a0", "b1"): 0.3,
        ("a1", "c0"): 0.2,
        ("a1", "c1"): 0.25,
        ("a0", "a1"): 0.1,
    }
    corr = torch.eye(6, dtype=torch.float64)
    for (p, q), v in pairs.items():
        corr[names.index(p), names.index(q)] = corr[names.index(q), names.index(p)] = v
    z = zip_matrices(corr, models=3)
    # clusters are indexed by their first member: {a0, c0, c1} at 0, {a1, b0, b1} at 1
    want = torch.tensor([[1.0, 0], [0, 1], [0, 1], [0, 1], [1, 0], [1, 0]], dtype=torch.float64)
    assert torch.equal(z.unmerge, want)
    torch.testing.assert_close(z.merge, want.T / 3)


def test_three_models_fall_back_when_no_allowed_pair_is_left() -> None:
    # X = {a0, b0} (0.9), Y = {b1, c1} (0.85), Z = {a1, c0} (0.8): every pair of X, Y, Z shares a
    # model, so the last merge takes the highest min-linkage pair: X-Y = min(0.3, 0.2, 0.4, 0.35)
    names = ["a0", "a1", "b0", "b1", "c0", "c1"]
    pairs = {("a0", "b0"): 0.9, ("b1", "c1"): 0.85, ("a1", "c0"): 0.8}
    pairs |= {("a0", "b1"): 0.3, ("a0", "c1"): 0.2, ("b0", "b1"): 0.4, ("b0", "c1"): 0.35}  # X-Y: 0.2
    pairs |= {("a0", "a1"): 0.1, ("a0", "c0"): 0.15, ("b0", "a1"): 0.1, ("b0", "c0"): 0.1}  # X-Z: 0.1
    corr = torch.zeros(6, 6, dtype=torch.float64)
    for (p, q), v in pairs.items():
        corr[names.index(p), names.index(q)] = corr[names.index(q), names.index(p)] = v
    z = zip_matrices(corr, models=3)  # Y-Z: b1/c1 with a1/c0 all 0.0
    want = torch.tensor([[1.0, 0], [0, 1], [1, 0], [1, 0], [0, 1], [1, 0]], dtype=torch.float64)
    assert torch.equal(z.unmerge, want)
    torch.testing.assert_close(z.merge, want.T / want.sum(0)[:, None])


def test_zip_models_rejects_one_model_and_bad_sizes() -> None:
    with pytest.raises(ConfigError, match="at least 2 models"):
        zip_models([mlp(0)], [torch.randn(4, 3, 4)])
    with pytest.raises(ConfigError, match="N\\*C for N=3"):
        zip_matrices(torch.eye(8), models=3)
