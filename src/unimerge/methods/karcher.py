"""Karcher (Riemannian / Fréchet) mean of model weights on the unit hypersphere.

H. Karcher, "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl. Math. 30 (1977),
https://doi.org/10.1002/cpa.3160300502; as merged by mergekit (``merge_methods/karcher.py``): each
tensor is split into its direction (a point on the unit sphere) and its norm; the directions are
averaged by the fixed-point iteration for the spherical Karcher mean, the norms arithmetically.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from unimerge.errors import ConfigError
from unimerge.methods.primitives import weighted_sum
from unimerge.methods.registry import register_method

__all__ = ["KarcherParams", "karcher", "karcher_mean_direction"]


class KarcherParams(BaseModel):
    """mergekit's Karcher options: iteration cap and tolerance (angles, norms, step length)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_iter: int = Field(
        default=10, ge=0, le=1000, description="Fixed-point iterations of the Karcher mean."
    )
    tol: float = Field(
        default=1e-5, gt=0.0, le=1e-1, description="Stop when the update's norm falls below this."
    )


def karcher_mean_direction(units: Tensor, alphas: Tensor, *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Weighted Karcher mean of unit vectors on the sphere, by Riemannian gradient steps.

    Starts at the normalised weighted Euclidean mean (the first point if that is ~zero). Each step
    maps the points to the tangent space at the current mean with the log map,
    ``log_u(u_i) = θ_i / sin θ_i (u_i - cos θ_i u)`` (points within ``tol`` radians are skipped),
    averages them with ``alphas`` and follows the exponential map; it stops when the step is
    shorter than ``tol`` or after ``max_iter`` steps.

    Args:
        units: ``(k, D)`` unit vectors.
        alphas: ``(k,)`` weights summing to 1.
        max_iter: Maximum number of steps.
        tol: Tolerance on angles, norms and step length.

    Returns:
        ``(D,)`` unit vector.
    """
    u = weighted_sum(units, alphas)  # (D,)
    norm = float(u.norm())
    u = units[0].clone() if norm < tol else u / norm
    for _ in range(max_iter):
        dots = (units @ u).clamp(-1.0, 1.0)  # (k,)
        theta = torch.arccos(dots)
        coef = torch.where(theta < tol, torch.zeros_like(theta), alphas * theta / torch.sin(theta))
        tangent = weighted_sum(units, coef) - (coef * dots).sum() * u  # (D,)
        step = tangent.norm()
        if float(step) < tol:
            break
        u = torch.cos(step) * u + torch.sin(step) * (tangent / step)
        norm = float(u.norm())
        if norm > tol:
            u = u / norm
    return u


@register_method(
    "karcher",
    params=KarcherParams,
    family="geometric",
    needs_base=False,
    inputs="tensors",
    paper="https://doi.org/10.1002/cpa.3160300502",
)
def karcher(
    x: Tensor,
    params: KarcherParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Karcher mean of the models' directions, scaled by the weighted mean of their norms.

    Works on the raw tensors ``x`` ``(n, *shape)``; ``base`` is not used: as in mergekit, a
    ``base_model`` is averaged like any other model (the method neither needs nor optionally uses a
    base, so the engine lists it among the merged models). Weights are normalised to sum to 1 (mergekit: always uniform, which the
    default weights give). Tensors with norm <= ``tol`` take no part in the direction but count
    (as 0) in the norm average; if all are that small the result is zero.
    """
    n = x.shape[0]
    if n == 1:
        return x[0]
    w = per_model["weight"].to(device=x.device, dtype=x.dtype)  # (n,)
    if abs(float(w.sum())) < 1e-12:
        raise ConfigError("Method 'karcher': the model weights sum to 0 and cannot be normalised.")
    alphas = w / w.sum()
    flat = x.reshape(n, -1)  # (n, D)
    norms: Tensor = flat.norm(dim=-1)  # (n,)
    valid = norms > params.tol
    if not bool(valid.any()):
        return torch.zeros_like(x[0])
    units = flat[valid] / norms[valid, None]  # (k, D)
    a = alphas[valid] / alphas[valid].sum()
    direction = karcher_mean_direction(units, a, max_iter=params.max_iter, tol=params.tol)  # (D,)
    return (direction * (alphas * norms).sum()).reshape(x.shape[1:])
