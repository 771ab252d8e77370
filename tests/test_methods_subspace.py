"""Closed-form checks of the subspace merges: TSV-M / TSV-C, Iso-C, Iso-CTS, CART, STAR."""

from __future__ import annotations

import math

import pytest
import torch

from unimerge import merge_state_dicts
from unimerge.methods import get_method
from unimerge.methods.isotropic import IsoCParams, IsoCtsParams, iso_c, iso_cts, iso_cts_split
from unimerge.methods.subspace import (
    CartParams,
    StarParams,
    TsvParams,
    cart,
    polar_factor,
    star,
    star_truncate,
    tsv_compress,
    tsv_m,
    tsv_reconstruct,
)

F64 = torch.float64


def ones(n: int) -> dict[str, torch.Tensor]:
    return {"weight": torch.ones(n, dtype=F64)}


def diag(*values: float) -> torch.Tensor:
    return torch.diag(torch.tensor(values, dtype=F64))


def run(fn, x, params, weights=None):
    per_model = ones(x.shape[0]) if weights is None else {"weight": torch.tensor(weights, dtype=F64)}
    return fn(x, params, per_model, base=None, generator=None)


# ----------------------------------------------------------------------------- TSV-M


def test_tsv_m_orthogonal_tasks_keep_their_top_half_and_scale() -> None:
    # T=2 -> each task keeps int(4 / 2) = 2 triplets; task 1 loses its 0.5 component.
    x = torch.stack([diag(4, 1, 0.5, 0), diag(0, 0, 3, 2)])
    assert torch.allclose(run(tsv_m, x, TsvParams()), diag(4, 1, 3, 2), atol=1e-12)
    assert torch.allclose(run(tsv_m, x, TsvParams(alpha=1.5)), diag(6, 1.5, 4.5, 3), atol=1e-12)


def test_tsv_m_orthogonalises_overlapping_singular_vectors() -> None:
    # tau_1 = 2 e1 e1^T, tau_2 = a a^T with a at 60 degrees: the polar factor of [e1, a] rotates e1
    # by -15 and a by +15 degrees, so the merge is 2 u1 u1^T + u2 u2^T with u1 at -15, u2 at 75 degrees:
    # [[1 + cos^2 15, -sin 15 cos 15], [-sin 15 cos 15, 1 + sin^2 15]].
    a = torch.tensor([0.5, math.sqrt(3) / 2], dtype=F64)
    x = torch.stack([diag(2, 0), torch.outer(a, a)])
    c2 = (2 + math.sqrt(3)) / 4  # cos^2 15
    expected = torch.tensor([[1 + c2, -0.25], [-0.25, 2 - c2]], dtype=F64)
    assert torch.allclose(run(tsv_m, x, TsvParams()), expected, atol=1e-12)


def test_tsv_m_identical_experts_give_the_rank_truncated_expert() -> None:
    # Duplicate singular vectors: the pseudo-polar factor gives U_r S_r V_r^T (here r = 2 of 4).
    tau = diag(3, 2, 1, 0.5)
    x = torch.stack([tau, tau])
    assert torch.allclose(run(tsv_m, x, TsvParams()), diag(3, 2, 0, 0), atol=1e-10)
    # with every triplet kept the expert comes back exactly
    assert torch.allclose(run(tsv_m, x, TsvParams(rank_fraction=1.0)), tau, atol=1e-10)


def _reference_tsv_m(x: torch.Tensor) -> torch.Tensor:
    """The official code's steps: zero-padded (m, q) / (q, k) blocks, orthogonal factor u_u @ v_u."""
    n, m, k = x.shape
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    q = s.shape[-1]
    r = int(q * (1 / n))
    sum_u, sum_s, sum_v = (
        torch.zeros(m, q, dtype=x.dtype),
        torch.zeros(q, dtype=x.dtype),
        torch.zeros(q, k, dtype=x.dtype),
    )
    for i in range(n):
        sum_u[:, i * r : (i + 1) * r] = u[i, :, :r]
        sum_s[i * r : (i + 1) * r] = s[i, :r]
        sum_v[i * r : (i + 1) * r] = vh[i, :r]
    uu, _, vu = torch.linalg.svd(sum_u, full_matrices=False)
    uv, _, vv = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot([uu, vu, torch.diag(sum_s), uv, vv])


def test_tsv_m_matches_reference_steps_on_generic_matrices() -> None:
    x = torch.randn(3, 9, 7, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.allclose(run(tsv_m, x, TsvParams()), _reference_tsv_m(x), atol=1e-10)


def test_tsv_m_non_matrix_tensors_are_averaged_then_scaled_and_weights_scale_tasks() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=F64)
    assert torch.allclose(run(tsv_m, x, TsvParams(alpha=0.5)), torch.tensor([1.0, 2.0], dtype=F64))
    m = torch.stack([diag(4, 1, 0, 0), diag(0, 0, 3, 2)])
    assert torch.allclose(run(tsv_m, m, TsvParams(), weights=[1.0, -1.0]), diag(4, 1, -3, -2), atol=1e-12)


def test_polar_factor_is_orthonormal_and_fixes_orthonormal_input() -> None:
    a = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    p = polar_factor(a)
    assert torch.allclose(p.T @ p, torch.eye(3, dtype=F64), atol=1e-12)
    q, _ = torch.linalg.qr(a)
    assert torch.allclose(polar_factor(q), q, atol=1e-12)
    assert torch.equal(polar_factor(torch.zeros(3, 2)), torch.zeros(3, 2))


# ----------------------------------------------------------------------------- TSV-C


def test_tsv_compress_storage_ratio_and_reconstruction_error() -> None:
    # 8x8 diagonal tasks, rank_fraction 0.25 -> r = 2: stored 2 * (8 + 8 + 1) = 34 of 64 per task.
    t0 = diag(5, 4, 3, 2, 1, 0, 0, 0)
    t1 = diag(0, 0, 0, 0, 0, 1, 7, 2)
    f = tsv_compress(torch.stack([t0, t1]), rank_fraction=0.25)
    assert f.stored_numbers == 68
    assert f.storage_ratio == pytest.approx(34 / 64)
    assert torch.allclose(tsv_reconstruct(f, 0), diag(5, 4, 0, 0, 0, 0, 0, 0), atol=1e-12)
    assert torch.allclose(tsv_reconstruct(f, 1), diag(0, 0, 0, 0, 0, 0, 7, 2), atol=1e-12)
    # Eckart-Young: the error is the norm of the dropped singular values, sqrt(9 + 4 + 1) for task 0
    assert torch.linalg.norm(t0 - tsv_reconstruct(f, 0)).item() == pytest.approx(math.sqrt(14))


def test_tsv_compress_defaults_to_one_over_t_and_keeps_vectors_dense() -> None:
    x = torch.randn(4, 12, 8, generator=torch.Generator().manual_seed(2))
    f = tsv_compress(x)
    assert f.u.shape == (4, 12, 2) and f.s.shape == (4, 2) and f.vh.shape == (4, 2, 8)
    assert f.storage_ratio == pytest.approx(2 * (12 + 8 + 1) / (12 * 8))
    bias = torch.randn(3, 5)
    fb = tsv_compress(bias, 0.5)
    assert fb.storage_ratio == 1.0 and torch.equal(tsv_reconstruct(fb, 2), bias[2])
    with pytest.raises(ValueError, match="out of range"):
        tsv_reconstruct(fb, 3)
    with pytest.raises(ValueError, match="rank_fraction"):
        tsv_compress(x, 1.5)


# ----------------------------------------------------------------------------- Iso-C / Iso-CTS


def test_iso_c_flattens_the_spectrum_of_the_sum() -> None:
    # sum = diag(3, 2, 1): mean singular value 2 -> 2 I
    x = torch.stack([diag(3, 0, 0), diag(0, 2, 1)])
    assert torch.allclose(run(iso_c, x, IsoCParams()), 2 * torch.eye(3, dtype=F64), atol=1e-12)
    # sum = [[0, 3], [1, 0]] = P diag(3, 1) with P a permutation: 2 * P, scaled by alpha = 0.5
    y = torch.tensor([[[0.0, 3.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 0.0]]], dtype=F64)
    expected = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    assert torch.allclose(run(iso_c, y, IsoCParams(alpha=0.5)), expected, atol=1e-12)
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    assert torch.allclose(run(iso_c, v, IsoCParams(alpha=2.0)), torch.tensor([4.0, 6.0], dtype=F64))


def test_iso_cts_split_follows_the_reference_rounding() -> None:
    assert iso_cts_split(384, 8, 0.8) == (304, 10)  # int(307.2) = 307; round(77 / 8) * 8 = 80
    assert iso_cts_split(4, 3, 0.25) == (1, 1)
    assert iso_cts_split(10, 3, 0.0) == (1, 3)
    assert iso_cts_split(4, 8, 0.8) == (4, 0)  # too small for task dimensions: Iso-C
    assert iso_cts_split(5, 8, 0.0) == (5, 0)


def test_iso_cts_common_plus_task_specific_directions() -> None:
    # sum = diag(15, 0, 2, 3); common = top-1 (e1, 15); residuals give e2 (1), e3 (2), e4 (3).
    # All four directions are orthonormal; the mean singular value is (15 + 1 + 2 + 3) / 4 = 5.25.
    x = torch.stack([diag(5, 1, 0, 0), diag(5, -1, 2, 0), diag(5, 0, 0, 3)])
    out = run(iso_cts, x, IsoCtsParams(common_space_fraction=0.25, alpha=2.0))
    assert torch.allclose(out, 10.5 * torch.eye(4, dtype=F64), atol=1e-12)


def _reference_iso_cts(x: torch.Tensor, frac: float) -> torch.Tensor:
    """The official code's steps, with zero-initialised (m, q) / (q, k) buffers filled task by task."""
    n, m, k = x.shape
    q = min(m, k)
    c = int(q * frac)
    c = q - round((q - c) / n) * n
    u, s, v = torch.linalg.svd(x.sum(0), full_matrices=False)
    uc, sc, vc = u[:, :c], s[:c], v[:c]
    p = int((q - c) / n)
    cu, cs, cv = (
        torch.zeros(m, q, dtype=x.dtype),
        torch.zeros(q, dtype=x.dtype),
        torch.zeros(q, k, dtype=x.dtype),
    )
    for i in range(n):
        ut, st, vt = torch.linalg.svd(x[i] - uc @ uc.T @ x[i], full_matrices=False)
        cu[:, i * p : (i + 1) * p], cs[i * p : (i + 1) * p], cv[i * p : (i + 1) * p] = (
            ut[:, :p],
            st[:p],
            vt[:p],
        )
    cu[:, n * p : n * p + c], cs[n * p : n * p + c], cv[n * p : n * p + c] = uc, sc, vc
    a, _, b = torch.linalg.svd(cu, full_matrices=False)
    a2, _, b2 = torch.linalg.svd(cv, full_matrices=False)
    return torch.linalg.multi_dot([a @ b, torch.diag(torch.ones_like(cs) * cs.mean()), a2 @ b2])


def test_iso_cts_matches_reference_steps_on_generic_matrices() -> None:
    x = torch.randn(3, 10, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    out = run(iso_cts, x, IsoCtsParams(common_space_fraction=0.5))
    assert torch.allclose(out, _reference_iso_cts(x, 0.5), atol=1e-10)


# ----------------------------------------------------------------------------- CART


def test_cart_mean_plus_low_rank_centred_residuals() -> None:
    # mean = diag(2, 1.5, 0.5); centred: diag(4, -1.5, -.5), diag(-2, 3, -.5), diag(-2, -1.5, 1);
    # rank 1 keeps diag(4,0,0), diag(0,3,0), diag(-2,0,0): sum diag(2, 3, 0).
    x = torch.stack([diag(6, 0, 0), diag(0, 4.5, 0), diag(0, 0, 1.5)])
    out = run(cart, x, CartParams(rank_fraction=0.34, **{"lambda": 2.0}))
    assert torch.allclose(out, diag(6, 7.5, 0.5), atol=1e-12)
    assert torch.allclose(run(cart, x, CartParams(rank_fraction=0.34, lambda_=0.0)), diag(2, 1.5, 0.5))


def test_cart_two_tasks_and_vectors_reduce_to_the_average() -> None:
    # with two tasks the centred vectors are negatives of each other, so their truncations cancel
    x = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert torch.allclose(run(cart, x, CartParams()), x.mean(0), atol=1e-12)
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    assert torch.allclose(run(cart, v, CartParams()), torch.tensor([2.0, 3.0], dtype=F64))


def test_cart_returns_identical_experts_through_merge_state_dicts() -> None:
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g)}
    expert = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    out = merge_state_dicts("cart", [expert, expert, expert], base=base, rank_fraction=0.5, **{"lambda": 1.5})
    for k in base:
        assert torch.allclose(out[k], expert[k], atol=1e-6)


# ----------------------------------------------------------------------------- STAR


def test_star_truncate_keeps_eta_of_the_nuclear_norm_and_rescales() -> None:
    # diag(3, 2, 1): nuclear 6, cumsum (3, 5, 6). eta .5 -> rank 1, 3 * 6/3; eta .6 -> rank 2, (3, 2) * 6/5
    x = diag(3, 2, 1).unsqueeze(0)
    assert torch.allclose(star_truncate(x, 0.5)[0], diag(6, 0, 0), atol=1e-12)
    assert torch.allclose(star_truncate(x, 0.6)[0], diag(3.6, 2.4, 0), atol=1e-12)
    assert torch.allclose(star_truncate(x, 1.0)[0], diag(3, 2, 1), atol=1e-12)
    assert torch.equal(star_truncate(torch.zeros(1, 3, 2, dtype=F64), 0.4), torch.zeros(1, 3, 2, dtype=F64))


def test_star_averages_the_truncated_tasks() -> None:
    # task 1 -> diag(6, 0, 0); task 2 = diag(0, 0, 4) is rank 1 already: mean diag(3, 0, 2)
    x = torch.stack([diag(3, 2, 1), diag(0, 0, 4)])
    assert torch.allclose(run(star, x, StarParams(eta=0.5)), diag(3, 0, 2), atol=1e-12)
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    assert torch.allclose(run(star, v, StarParams()), torch.tensor([2.0, 3.0], dtype=F64))


# ----------------------------------------------------------------------------- registry, dtype


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts", "cart", "star"])
def test_registered_data_free_subspace_methods_keep_shape_and_dtype(name: str) -> None:
    info = get_method(name)
    assert info.family == "subspace" and info.needs_base and info.inputs == "deltas" and not info.random
    assert info.paper.startswith("https://arxiv.org/abs/")
    x = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(6), dtype=F64)
    out = info.fn(x, info.params(), ones(3), base=None, generator=None)
    assert out.shape == (7, 5) and out.dtype == F64
    assert torch.equal(out, info.fn(x, info.params(), ones(3), base=None, generator=None))
