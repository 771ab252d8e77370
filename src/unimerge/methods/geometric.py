"""Geometric (interpolation) merges: SLERP, NuSLERP, Multi-SLERP, Model Stock and NearSwap.

Every method follows mergekit's definition (``mergekit/merge_methods/*.py``): the same names,
parameter names, defaults and edge cases, so a mergekit YAML gives the same tensors (to float32
rounding).

- ``slerp``: spherical linear interpolation from the base to one other model; K. Shoemake,
  "Animating rotation with quaternion curves", SIGGRAPH 1985, https://doi.org/10.1145/325165.325242.
- ``nuslerp``: mergekit's weight-parametrised SLERP of two models (or of their task vectors when a
  base is given), whole-tensor, row- or column-wise.
- ``multislerp``: mergekit's spherical barycentre of many models,
  https://goddard.blog/posts/multislerp-wow-what-a-cool-idea.
- ``model_stock``: D.-H. Jang, S. Yun, D. Han, "Model Stock: All we need is just a few fine-tuned
  models", ECCV 2024, https://arxiv.org/abs/2403.19522.
- ``nearswap``: move the base towards the other model where their values are close,
  https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001.

The Karcher mean lives in ``karcher.py``.

Models and the base: all methods here need (``slerp``, ``model_stock``, ``nearswap``) or optionally use
(``nuslerp``, ``multislerp``) a base, so ``x`` holds the models *other than* the base and the base
tensor arrives in ``base``. A mergekit SLERP config listing two models, one of them ``base_model``,
therefore gives ``slerp`` one model in ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from unimerge.errors import ConfigError, MergeError
from unimerge.methods.primitives import weighted_sum
from unimerge.methods.registry import register_method

__all__ = [
    "ModelStockParams",
    "MultiSlerpParams",
    "NearSwapParams",
    "NuSlerpParams",
    "SlerpParams",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "nuslerp_pair",
    "slerp",
    "slerp_pair",
]


def _one_other_model(method: str, x: Tensor) -> None:
    """Raise a ConfigError unless ``x`` holds exactly one model besides the base."""
    if x.shape[0] != 1:
        raise ConfigError(
            f"Method {method!r} interpolates between the base model and exactly one other model, but got "
            f"{x.shape[0]} models besides the base. List one model plus `base_model:` (mergekit: two "
            "models, one of them the base), or use multislerp, karcher or model_stock to merge more."
        )


# ---------------------------------------------------------------------------------------------- slerp


class SlerpParams(BaseModel):
    """``t``: 0 returns the base, 1 the other model (mergekit requires it; we default to 0.5)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    t: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Interpolation factor: 0 gives the base, 1 the other model."
    )


def slerp_pair(
    t: float,
    v0: Tensor,
    v1: Tensor,
    *,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
    out: Tensor | None = None,
) -> Tensor:
    """Shoemake's SLERP of two whole tensors, as mergekit computes it.

    The angle comes from the tensors normalised to unit Frobenius norm (a norm <= ``eps`` is left
    as is); the weights ``sin((1-t)θ)/sin θ`` and ``sin(tθ)/sin θ`` multiply the *unnormalised*
    tensors, so norms interpolate too. Nearly colinear tensors (``|cos θ| > dot_threshold``) are
    linearly interpolated.

    Args:
        t: Interpolation factor; 0 gives ``v0``, 1 gives ``v1``.
        v0: Start tensor (the base), any shape.
        v1: End tensor, same shape.
        dot_threshold: Colinearity threshold on ``|cos θ|``.
        eps: Norms at or below this are not normalised.
        out: Where to write the result (may be ``v1``, not ``v0``); a new tensor when ``None``.

    Returns:
        The interpolated tensor, shape of ``v0``.
    """
    n0, n1 = float(v0.norm()), float(v1.norm())
    d0, d1 = (n0 if n0 > eps else 1.0), (n1 if n1 > eps else 1.0)
    dot = float(torch.dot(v0.reshape(-1), v1.reshape(-1))) / (d0 * d1)  # no normalised copies
    if abs(dot) > dot_threshold:
        s0, s1 = 1.0 - t, t
    else:
        theta = math.acos(dot)
        s0 = math.sin(theta * (1 - t)) / math.sin(theta)
        s1 = math.sin(theta * t) / math.sin(theta)
    return torch.mul(v1, s1, out=out).add_(v0, alpha=s0)


@register_method(
    "slerp",
    params=SlerpParams,
    family="geometric",
    needs_base=True,
    inputs="tensors",
    paper="https://doi.org/10.1145/325165.325242",
    max_models=1,
    grid={"t": (0.3, 0.5, 0.7)},
)
def slerp(
    x: Tensor,
    params: SlerpParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """SLERP from the base (``t=0``) to the one other model (``t=1``), whole tensor at a time.

    Only two models: more raise a ConfigError. With the other model equal to the base the result is
    that model (colinear -> linear interpolation of two equal tensors). Per-model weights are unused.
    """
    _one_other_model("slerp", x)
    if base is None:
        raise ConfigError("Method 'slerp' needs a base model: set `base_model:` (the t=0 end).")
    return slerp_pair(params.t, base, x[0], out=x[0])  # (*shape); x is ours to overwrite


# -------------------------------------------------------------------------------------------- nuslerp


class NuSlerpParams(BaseModel):
    """mergekit's global NuSLERP options."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    nuslerp_flatten: bool = Field(default=True, description="Interpolate each tensor as one flat vector.")
    nuslerp_row_wise: bool = Field(
        default=False, description="Interpolate row vectors (else columns) when not flattened."
    )


def nuslerp_pair(
    t: float, v0: Tensor, v1: Tensor, *, row_wise: bool = False, flatten: bool = True, eps: float = 1e-8
) -> Tensor:
    """mergekit's NuSLERP of two tensors: whole-tensor, or one SLERP per vector along a dimension.

    With ``flatten`` the whole tensor is one vector; otherwise each vector along the last dimension
    (``row_wise=False``, i.e. each row of a ``(out, in)`` matrix) or along dimension 0
    (``row_wise=True``, each column) is interpolated separately. Vectors whose angle has
    ``|sin θ| < eps`` are linearly interpolated. Unlike :func:`slerp_pair` there is no threshold on
    ``cos θ``, and normalisation clamps norms at ``1e-7``.

    Args:
        t: Interpolation factor; 0 gives ``v0``, 1 gives ``v1``.
        v0: First tensor, any shape.
        v1: Second tensor, same shape.
        row_wise: Interpolate along dimension 0 instead of the last one (ignored with ``flatten``).
        flatten: Treat the whole tensor as one vector.
        eps: Colinearity threshold on ``|sin θ|``.

    Returns:
        The interpolated tensor, shape of ``v0``.
    """
    shape = v0.shape
    if flatten or v0.dim() <= 1:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)  # (D,)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)  # vectors along the old dim 0
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos((u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1))  # (..., 1)
    sin = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin
    res = torch.where(sin.abs() < eps, (1 - t) * v0 + t * v1, res)
    if row_wise and not flatten and len(shape) > 1:
        res = res.transpose(0, -1)
    return res.reshape(shape)


@register_method(
    "nuslerp",
    params=NuSlerpParams,
    family="geometric",
    needs_base=False,
    optional_base=True,
    inputs="tensors",
    paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    grid={"nuslerp_flatten": (True, False)},
)
def nuslerp(
    x: Tensor,
    params: NuSlerpParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """NuSLERP of two models with ``t = w_1 / (w_0 + w_1)``; with a base, SLERP of the task vectors.

    ``t`` is 0.5 when the weights sum to ~0 (``|w_0 + w_1| < 1e-6``), as in mergekit. One model is
    returned as is; more than two raise a ConfigError (the base is not one of the two).
    """
    n = x.shape[0]
    if n == 1:
        return x[0]
    if n != 2:
        raise ConfigError(
            f"Method 'nuslerp' merges exactly two models (plus an optional base_model), got {n}. "
            "Use multislerp or karcher to merge more models."
        )
    w0, w1 = (float(v) for v in per_model["weight"])
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    opts = {"row_wise": params.nuslerp_row_wise, "flatten": params.nuslerp_flatten}
    if base is None:
        return nuslerp_pair(t, x[0], x[1], **opts)
    return base + nuslerp_pair(t, x[0] - base, x[1] - base, **opts)  # (*shape)


# ----------------------------------------------------------------------------------------- multislerp


class MultiSlerpParams(BaseModel):
    """mergekit's Multi-SLERP options."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    normalize_weights: bool = Field(default=True, description="Divide the weights by their sum.")
    eps: float = Field(default=1e-8, gt=0.0, le=1e-2, description="Guard against division by zero norms.")


@register_method(
    "multislerp",
    params=MultiSlerpParams,
    family="geometric",
    needs_base=False,
    optional_base=True,
    inputs="tensors",
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
)
def multislerp(
    x: Tensor,
    params: MultiSlerpParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Spherical barycentre of many models (of their task vectors when a base is given).

    mergekit normalises each flattened input ``v_i`` to ``u_i = v_i / (|v_i| + eps)``, takes the
    weighted mean ``M = sum w_i u_i``, projects the ``u_i`` onto the tangent space at
    ``m = M / |M|``, averages them there and maps back with the exponential map, then rescales by
    ``sum w_i |v_i|``. The weighted tangent average is ``M - (M . m) m = 0`` identically, so the
    exponential map returns ``m`` (``cos(eps) = 1`` in float32) and the result is
    ``m * sum w_i |v_i|``; that closed form is computed here (equal to mergekit to rounding).

    When ``|M| < eps`` mergekit falls back to ``w_0 v_0 + w_1 v_1`` for two models and raises for
    more; here the linear fallback is also used when every input is ~zero (e.g. a tensor no expert
    changed from the base), otherwise a MergeError is raised. One model is returned as is.
    """
    n = x.shape[0]
    if n == 1:
        return x[0]
    v = (x - base if base is not None else x).reshape(n, -1)  # (n, D)
    w = per_model["weight"].to(device=v.device, dtype=v.dtype)  # (n,)
    if params.normalize_weights:
        if abs(float(w.sum())) < 1e-12:
            raise ConfigError("Method 'multislerp': the model weights sum to 0 and cannot be normalised.")
        w = w / w.sum()
    norms = v.norm(dim=-1)  # (n,)
    mean = weighted_sum(v / (norms[:, None] + params.eps), w)  # (D,)
    mean_norm = float(mean.norm())
    if mean_norm < params.eps:
        if n != 2 and bool((norms > params.eps).any()):
            raise MergeError(
                "Method 'multislerp': the weighted mean direction of the inputs is zero (antipodal "
                "tensors whose weights cancel). Change the model weights."
            )
        res = weighted_sum(v, w)  # (D,)
    else:
        res = mean * (float((norms * w).sum()) / mean_norm)  # (D,)
    res = res.reshape(x.shape[1:])
    return res + base if base is not None else res


# ---------------------------------------------------------------------------------------- model stock


class ModelStockParams(BaseModel):
    """``filter_wise``: one ratio per row (last dimension) instead of one per tensor."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    filter_wise: bool = Field(
        default=False, description="One interpolation ratio per output row instead of per tensor."
    )


def model_stock_ratio(x: Tensor, filter_wise: bool = False) -> Tensor:
    """Model Stock's interpolation ratio ``t = N cos θ / (1 + (N-1) cos θ)`` from task vectors.

    ``cos θ`` is the mean over pairs ``i < j`` of the cosine between task vectors ``i`` and ``j``
    (mergekit's choice for ``N > 2``; the paper's two-model case is exact); norm products are clamped
    at ``1e-6`` and cosines to ``[-1, 1]``. Where the denominator vanishes (``|1 + (N-1) cos θ| < 1e-6``:
    task vectors pointing in opposite directions, e.g. ``τ`` and ``-τ``) there is no finite estimate and
    ``t = 0`` keeps the base, as mergekit 0.1.5 does.

    Args:
        x: Task vectors ``(n, *shape)``, ``n >= 2``.
        filter_wise: One ratio per vector along the last dimension (1-D tensors: one row, one ratio;
            a tensor with one column: one ratio per entry).

    Returns:
        ``(rows,)`` ratios: one row for the whole tensor, or ``prod(shape[:-1])`` rows if filter-wise.
    """
    n = x.shape[0]
    rows = x.reshape(n, -1, x.shape[-1]) if filter_wise and x.dim() >= 2 else x.reshape(n, 1, -1)
    gram = torch.einsum("ird,jrd->rij", rows, rows)  # (r, n, n)
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()  # (r, n)
    denom = (norms[:, :, None] * norms[:, None, :]).clamp(min=1e-6)
    i, j = torch.triu_indices(n, n, offset=1, device=x.device)
    cos = (gram / denom).clamp(-1, 1)[:, i, j].mean(dim=-1)  # (r,)
    denominator = 1 + (n - 1) * cos  # (r,)
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))


@register_method(
    "model_stock",
    params=ModelStockParams,
    family="geometric",
    needs_base=True,
    paper="https://arxiv.org/abs/2403.19522",
    grid={"filter_wise": (False, True)},
)
def model_stock(
    x: Tensor,
    params: ModelStockParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Base + ``t`` times the mean task vector, ``t`` from the angle between the task vectors.

    ``x`` is the task vectors ``(n, *shape)`` (the engine adds the base back), ``n >= 2``. As in the
    paper and mergekit the average is uniform: per-model weights are unused. ``N`` copies of one
    expert give ``cos θ = 1``, ``t = 1``: the expert; opposed experts (``1 + (N-1) cos θ = 0``) give
    the base.
    """
    n = x.shape[0]
    if n < 2:
        raise ConfigError(
            f"Method 'model_stock' needs at least two fine-tuned models besides the base, got {n}."
        )
    t = model_stock_ratio(x, params.filter_wise)  # (r,)
    mean = x.mean(dim=0)  # (*shape)
    return (t[:, None] * mean.reshape(t.shape[0], -1)).reshape(mean.shape)


# ------------------------------------------------------------------------------------------- nearswap


class NearSwapParams(BaseModel):
    """``t``: the sameness threshold, in weight units (mergekit requires it; we default to 1e-4)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    t: float = Field(default=1e-4, gt=0.0, le=1e3, description="Sameness threshold, in weight units.")


@register_method(
    "nearswap",
    params=NearSwapParams,
    family="geometric",
    needs_base=True,
    inputs="tensors",
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    max_models=1,
    grid={"t": (1e-4, 1e-3, 1e-2)},
)
def nearswap(
    x: Tensor,
    params: NearSwapParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per entry, ``base + w (other - base)`` with ``w = clamp(t / |base - other|, 0, 1)``.

    Entries closer than ``t`` are taken from the other model, distant ones stay near the base; equal
    entries take the other model's value. ``|base - other|`` is clamped at ``1e-6`` first, as mergekit
    does (so with ``t < 1e-6`` entries closer than ``1e-6`` move by ``t / 1e-6``). Only two models: the
    base and one other. An expert equal to the base is returned unchanged; a different base is, by
    design, only partly swapped towards the expert, so the result is not the expert.
    """
    _one_other_model("nearswap", x)
    if base is None:
        raise ConfigError("Method 'nearswap' needs a base model: set `base_model:`.")
    other = x[0]  # (*shape)
    w = (params.t / (base - other).abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    return w * other + (1 - w) * base
