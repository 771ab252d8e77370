"""WUDI-Merging: the objective, the Adam steps, the closed-form optimum and the contract."""

from __future__ import annotations

import pytest
import torch

from unimerge.methods import get_method
from unimerge.methods.wudi import WudiParams, wudi, wudi_loss, wudi_optimise, wudi_quadratic

F64 = torch.float64


def run(x: torch.Tensor, params: WudiParams, weights: list[float] | None = None) -> torch.Tensor:
    w = torch.ones(x.shape[0], dtype=x.dtype) if weights is None else torch.tensor(weights, dtype=x.dtype)
    return wudi(x, params, {"weight": w}, base=None, generator=None)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_loss_by_hand() -> None:
    # tau_1 = [[1, 0]], tau_2 = [[0, 2]], merged = [[1, 1]]:
    # ((m - t1) t1^T)^2 / |t1|^2 = (0)^2 / 1 = 0; ((m - t2) t2^T)^2 / |t2|^2 = (1*0 + (-1)*2)^2 / 4 = 1
    x = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]], dtype=F64)
    assert wudi_loss(torch.tensor([[1.0, 1.0]], dtype=F64), x).item() == pytest.approx(1.0)
    # a zero task vector adds no term (and no division by zero)
    z = torch.cat([x, torch.zeros(1, 1, 2, dtype=F64)])
    assert wudi_loss(torch.tensor([[1.0, 1.0]], dtype=F64), z).item() == pytest.approx(1.0)


def test_adam_steps_match_autograd_and_torch_adam() -> None:
    x = randn(3, 5, 4, seed=0)
    steps, lr = 25, 1e-2
    ref = torch.nn.Parameter(x.sum(0).clone())
    opt = torch.optim.Adam([ref], lr=lr, weight_decay=0)
    for _ in range(steps):
        opt.zero_grad()
        wudi_loss(ref, x).backward()
        opt.step()
    assert torch.allclose(wudi_optimise(x, steps=steps, lr=lr), ref.detach(), atol=1e-10)


def test_quadratic_form_gives_the_autograd_gradient() -> None:
    x = randn(4, 3, 6, seed=1)
    m = randn(3, 6, seed=2).requires_grad_(True)
    wudi_loss(m, x).backward()
    h, b = wudi_quadratic(x)
    assert torch.allclose(2 * (m.detach() @ h - b), m.grad, atol=1e-10)


def test_orthogonal_task_vectors_keep_the_sum() -> None:
    # disjoint input columns: tau_j tau_i^T = 0 for i != j, so the sum has zero loss and zero gradient
    x = torch.zeros(3, 4, 6, dtype=F64)
    g = torch.Generator().manual_seed(3)
    for i in range(3):
        x[i, :, 2 * i : 2 * i + 2] = torch.randn(4, 2, generator=g, dtype=F64)
    assert wudi_loss(x.sum(0), x).item() == 0.0
    assert torch.equal(run(x, WudiParams(lr=1e-2)), x.sum(0))


def test_loss_decreases_from_the_sum() -> None:
    x = randn(4, 6, 5, seed=4)
    out = run(x, WudiParams(steps=200, lr=1e-2))
    assert wudi_loss(out, x) < 0.5 * wudi_loss(x.sum(0), x)


def test_converges_to_the_closed_form_optimum() -> None:
    # tau_m H = B at the optimum; here H (3 x 3) is invertible
    x = randn(3, 4, 3, seed=5)
    h, b = wudi_quadratic(x)
    exact = torch.linalg.solve(h, b.T).T
    out = wudi_optimise(x, steps=4000, lr=1e-2)
    assert torch.allclose(out, exact, atol=2e-3)
    # identical experts: the optimum is the expert itself (reached only when converged, not in 300 x 1e-5)
    tau = randn(4, 3, seed=6)
    same = torch.stack([tau, tau, tau])
    assert torch.allclose(wudi_optimise(same, steps=4000, lr=1e-2), tau, atol=2e-3)


def test_non_matrix_tensors_are_averaged_and_weights_scale_tasks() -> None:
    v = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=F64)
    assert torch.equal(run(v, WudiParams()), torch.tensor([2.0, 4.0], dtype=F64))
    x = randn(2, 3, 4, seed=7)
    scaled = torch.stack([x[0], -2 * x[1]])
    assert torch.allclose(
        run(x, WudiParams(steps=10, lr=1e-3), weights=[1.0, -2.0]), run(scaled, WudiParams(steps=10, lr=1e-3))
    )


def test_registered_deterministic_and_dtype_preserving() -> None:
    info = get_method("wudi")
    assert info.family == "optimise" and info.needs_base and not info.random
    assert info.params().steps == 300 and info.params().lr == 1e-5
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(8))
    a, b = run(x, WudiParams(steps=20)), run(x, WudiParams(steps=20))
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape == (5, 4)
    with pytest.raises(ValueError):
        WudiParams(steps=-1)
