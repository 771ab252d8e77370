"""WUDI-Merging: data-free interference minimisation guided by the task vectors.

Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via
Task Vectors", ICML 2025, https://arxiv.org/abs/2503.08099 (code: github.com/nathanielyvo/WUDI-Merging,
and the authors' FusionBench port ``fusion_bench/method/WUDI/wudi.py``).

For every linear layer (2-D task vectors ``tau_i``, ``(out, in)``) the merged task vector ``tau_m``
minimises the interference bound

    L(tau_m) = sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2

with Adam (lr ``1e-5``, 300 steps, betas (0.9, 0.999), eps 1e-8, no weight decay), starting from the
task-arithmetic sum ``sum_i tau_i``; no scaling coefficient is applied afterwards. Tensors that are
not 2-D get the mean task vector, as in the reference code.

The loss is quadratic: ``grad = 2 (tau_m H - B)`` with ``H = sum_i tau_i^T tau_i / ||tau_i||^2``
``(in, in)`` and ``B = sum_i tau_i tau_i^T tau_i / ||tau_i||^2`` ``(out, in)``. ``H`` and the gradient
at the start are computed once, so each step costs one ``(out, in) x (in, in)`` product instead of
the reference's ``3 T`` products of ``(out, in) x (in, out)`` size (about ``3 T out / in`` times
fewer flops); the Adam update is written out (``torch.optim.Adam``'s arithmetic, checked against it
in the tests), so it runs on the tensor's device without autograd. Nothing is random.

A per-model ``weight`` scales that model's task vector first (default 1.0: the paper's method).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from unimerge.methods.registry import register_method
from unimerge.methods.subspace import is_matrix_stack, weighted

__all__ = ["WudiParams", "wudi", "wudi_loss", "wudi_optimise", "wudi_quadratic"]


class WudiParams(BaseModel):
    """WUDI parameters (defaults: the paper's and the reference code's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int = Field(default=300, ge=0, le=100_000, description="Adam iterations per matrix")
    lr: float = Field(default=1e-5, gt=0.0, le=1.0, description="Adam learning rate")


def _inv_sq_norms(x: Tensor) -> Tensor:
    """``1 / ||tau_i||_F^2`` per task ``(n,)``; a zero task vector (no interference term) gets 0."""
    sq = x.reshape(x.shape[0], -1).square().sum(dim=1)  # (n,)
    return torch.where(sq > 0, 1.0 / torch.where(sq > 0, sq, torch.ones_like(sq)), 0.0)


def wudi_quadratic(x: Tensor) -> tuple[Tensor, Tensor]:
    """``H`` ``(in, in)`` and ``B`` ``(out, in)`` of the WUDI loss for task matrices ``x`` ``(n, out, in)``.

    ``grad L(tau_m) = 2 (tau_m H - B)``, so the unconstrained optimum solves ``tau_m H = B``.
    """
    h, c = _accumulate(x, torch.zeros_like(x[0]))
    return h, -c


def _accumulate(x: Tensor, anchor: Tensor) -> tuple[Tensor, Tensor]:
    """``H`` and ``C = sum_i (anchor - tau_i) tau_i^T tau_i / ||tau_i||^2``, half the gradient at ``anchor``.

    One task at a time, so no ``(n, in, in)`` stack is held. The differences are formed first, as
    autograd of the loss does, so exactly orthogonal tasks give an exactly zero gradient at their sum.
    """
    w = _inv_sq_norms(x)  # (n,)
    h = x.new_zeros(x.shape[-1], x.shape[-1])  # (in, in)
    c = torch.zeros_like(anchor)  # (out, in)
    for i in range(x.shape[0]):
        gram = x[i].mT @ x[i]  # (in, in)
        h += w[i] * gram
        c += w[i] * ((anchor - x[i]) @ gram)
    return h, c


def wudi_loss(merged: Tensor, x: Tensor) -> Tensor:
    """The WUDI objective ``sum_i ||(merged - tau_i) tau_i^T||^2 / ||tau_i||^2`` (a scalar)."""
    inner = (merged.unsqueeze(0) - x) @ x.mT  # (n, out, out)
    return (inner.square().sum(dim=(1, 2)) * _inv_sq_norms(x)).sum()


def wudi_optimise(
    x: Tensor,
    steps: int = 300,
    lr: float = 1e-5,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Tensor:
    """Minimise the WUDI loss for task matrices ``x`` ``(n, out, in)`` with Adam from their sum.

    Tracks ``delta = tau_m - sum_i tau_i`` with ``grad = 2 (delta H + C)``, ``C`` the half-gradient at
    the sum (see :func:`_accumulate`); the Adam arithmetic is ``torch.optim.Adam``'s.
    """
    start = x.sum(dim=0)  # (out, in)
    h, c = _accumulate(x, start)
    delta = torch.zeros_like(start)
    m1, m2 = torch.zeros_like(start), torch.zeros_like(start)
    beta1, beta2 = betas
    for t in range(1, steps + 1):
        grad = 2.0 * torch.addmm(c, delta, h)
        m1.lerp_(grad, 1.0 - beta1)
        m2.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (m2.sqrt() / (1.0 - beta2**t) ** 0.5).add_(eps)
        delta.addcdiv_(m1, denom, value=-lr / (1.0 - beta1**t))
    return start + delta


@register_method(
    "wudi",
    params=WudiParams,
    family="optimise",
    needs_base=True,
    paper="https://arxiv.org/abs/2503.08099",
    grid={"lr": (1e-5, 3e-5, 1e-4)},
)
def wudi(
    x: Tensor,
    params: WudiParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """WUDI-Merging: per matrix, Adam on the task-vector-guided interference loss from the sum."""
    x = weighted(x, per_model)  # (n, *shape)
    if not is_matrix_stack(x):
        return x.mean(dim=0)
    return wudi_optimise(x, steps=params.steps, lr=params.lr)
