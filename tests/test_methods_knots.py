"""Closed-form checks of KnOTS (unimerge.methods.knots)."""

from __future__ import annotations

import pytest
import torch

from unimerge import ConfigError, merge_state_dicts
from unimerge.methods.knots import KnotsParams, knots, knots_basis

R = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)  # a rotation (3-4-5)
# [D1 D2] has orthogonal rows (4*1 + 1*2 + (-3)*(-1) + 1.5*(-6) = 0) of distinct norms, so the SVD of
# [R D1, R D2] = R [D1 D2] has U = R (up to column order and signs) and coefficients C_i = U^T R D_i = D_i.
# No entry is 0: a 0 coefficient comes out of the SVD as +-1e-16 and would count in a disjoint mean.
D1 = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
D2 = torch.tensor([[-3.0, 1.5], [-1.0, -6.0]], dtype=torch.float64)


def run(
    x: torch.Tensor, weights: list[float] | None = None, density: float = 1.0, seed: int | None = None, **kw
):
    n = x.shape[0]
    per_model = {
        "weight": torch.tensor(weights or [1.0] * n, dtype=x.dtype),
        "density": torch.full((n,), density, dtype=torch.float32),
    }
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return knots(x.clone(), KnotsParams(**kw), per_model, base=None, generator=g)


def test_basis_reconstructs_each_task_and_coefficients_are_projections() -> None:
    x = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, c = knots_basis(x)
    assert u.shape == (6, 6) and c.shape == (3, 6, 4)  # rank of the (6, 12) concatenation
    torch.testing.assert_close(u.T @ u, torch.eye(6, dtype=torch.float64))
    for i in range(3):
        torch.testing.assert_close(u @ c[i], x[i])  # dW_i = U C_i
        torch.testing.assert_close(c[i], u.T @ x[i])  # C_i = diag(s) V_i^T = U^T dW_i


def test_task_arithmetic_inner_at_full_rank_is_task_arithmetic() -> None:
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1))
    w = [0.5, -1.0, 2.0]
    got = run(x, w, inner="task_arithmetic", **{"lambda": 0.3})
    want = 0.3 * (0.5 * x[0] - 1.0 * x[1] + 2.0 * x[2])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_ties_in_the_shared_basis_by_hand() -> None:
    """TIES at density 0.5 on C_1 = D1, C_2 = D2 (2 of 4 entries each): D1 keeps 4 and 2, D2 keeps -3 and -6;
    elected signs: (0,0) 4-3 > 0 -> 4; (1,1) 2-6 < 0 -> -6; so C = [[4, 0], [0, -6]] and the merge is
    R C = [[2.4, 4.8], [3.2, -3.6]]. TIES on the raw updates R D1 = [[1.6, -1], [3.8, 2]] and
    R D2 = [[-1, 5.7], [-3, -2.4]] keeps {3.8, 2} and {5.7, -3}: [[0, 5.7], [3.8, 2]]."""
    x = torch.stack([R @ D1, R @ D2])
    got = run(x, density=0.5, inner="ties")
    torch.testing.assert_close(got, torch.tensor([[2.4, 4.8], [3.2, -3.6]], dtype=torch.float64))
    zero = {"w": torch.zeros(2, 2)}
    raw = merge_state_dicts("ties", [{"w": x[0].float()}, {"w": x[1].float()}], zero, density=0.5)
    torch.testing.assert_close(raw["w"], torch.tensor([[0.0, 5.7], [3.8, 2.0]]))


@pytest.mark.parametrize("inner", ["ties", "dare_ties"])
def test_weights_scale_coefficients_before_the_election(inner: str) -> None:
    """weights (1, 3), density 1 (nothing dropped): C_2 = 3 D2 = [[-9, 4.5], [-3, -18]]; signs: (0,0) 4-9 < 0
    -> -9; (0,1) (1+4.5)/2 = 2.75 (divided by the agreeing count, not the weights); (1,0) 1-3 < 0 -> -3;
    (1,1) 2-18 < 0 -> -18; times lambda 2."""
    x = torch.stack([R @ D1, R @ D2])
    got = run(x, [1.0, 3.0], seed=0, inner=inner, **{"lambda": 2.0})
    want = 2.0 * R @ torch.tensor([[-9.0, 2.75], [-3.0, -18.0]], dtype=torch.float64)
    torch.testing.assert_close(got, want)


def test_dare_linear_drops_coefficients_at_the_density_and_rescales() -> None:
    """One model: the merge is U (M * C) / density for a Bernoulli(density) mask M of the coefficients."""
    tau = torch.randn(40, 30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = run(tau[None], density=0.25, seed=5, inner="dare_linear")
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    c = s[:, None] * vh  # (30, 30)
    ratio = (u.T @ got) / c  # 0 where dropped, 1 / density where kept
    kept = ratio.abs() > 1.0
    torch.testing.assert_close(ratio[kept], torch.full_like(ratio[kept], 4.0))
    assert float(ratio[~kept].abs().max()) < 1e-8
    frac = float(kept.double().mean())  # 900 draws: sd of the rate = sqrt(0.25 * 0.75 / 900) ~ 0.014
    assert abs(frac - 0.25) < 0.06
    again = run(tau[None], density=0.25, seed=5, inner="dare_linear")
    assert torch.equal(got, again)
    assert not torch.equal(got, run(tau[None], density=0.25, seed=6, inner="dare_linear"))


def test_rank_keeps_the_leading_singular_directions() -> None:
    tau = torch.randn(6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = run(tau[None], inner="task_arithmetic", rank=2)
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    torch.testing.assert_close(got, (u[:, :2] * s[:2]) @ vh[:2])  # the best rank-2 approximation


def test_vectors_use_the_inner_method_on_the_plain_task_vectors() -> None:
    """Biases: TIES at density 0.5 on (3, -1, 0.5, 2) and (-1, 4, 0.25, -3) keeps {3, 2} and {4, -3}:
    signs (+, +, any, -) -> (3, 4, 0, -3)."""
    x = torch.tensor([[3.0, -1.0, 0.5, 2.0], [-1.0, 4.0, 0.25, -3.0]])
    torch.testing.assert_close(run(x, density=0.5), torch.tensor([3.0, 4.0, 0.0, -3.0]))


def test_conv_kernels_are_flattened_to_matrices() -> None:
    x = torch.randn(2, 4, 3, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = run(x, density=0.5)
    flat = run(x.reshape(2, 4, 12), density=0.5)
    torch.testing.assert_close(got, flat.reshape(4, 3, 2, 2))


def test_zero_updates_merge_to_zero() -> None:
    assert torch.equal(run(torch.zeros(2, 3, 4), density=0.5), torch.zeros(3, 4))


@pytest.mark.parametrize(
    ("params", "word"),
    [
        ({"inner": "magmax"}, "inner"),
        ({"rank": 0}, "rank"),
        ({"density": 0.0}, "density"),
        ({"tol": -1.0}, "tol"),
    ],
)
def test_bad_parameters_are_rejected(params: dict, word: str) -> None:
    sd = {"w": torch.ones(2, 2)}
    with pytest.raises(ConfigError, match=word):
        merge_state_dicts("knots", [sd, sd], {"w": torch.zeros(2, 2)}, **params)
