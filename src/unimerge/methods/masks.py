"""Mask-based merging: PCB, Consensus (TALL masks), MagMax and Localize-and-Stitch.

Papers and reference code these functions follow:

- **PCB-Merging**: Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024,
  https://arxiv.org/abs/2410.02396, code ``duguodong7/pcb-merging`` (``pcb-merging.py``).
- **Consensus merging / TALL masks**: Wang et al., "Localizing Task Information for Improved Model
  Merging and Compression", ICML 2024, https://arxiv.org/abs/2405.07813, code ``nik-dim/tall_masks``.
- **MagMax**: Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning",
  ECCV 2024, https://arxiv.org/abs/2407.06322, code ``danielm1405/magmax``.
- **Localize-and-Stitch** (dataless variant): He et al., "Localize-and-Stitch: Efficient Model Merging
  via Sparse Task Arithmetic", TMLR 2025, https://arxiv.org/abs/2408.13656.

The reference implementations flatten the whole model into one vector; here every statistic (quantiles,
min-max normalisation, top-k) is taken per tensor, as mergekit does for TIES. Every function receives
task vectors ``x`` of shape ``(n_models, *shape)`` and returns the merged task vector ``(*shape)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from unimerge.methods.primitives import (
    elect_sign,
    expand_like,
    sparsify_magnitude,
    weighted_sum,
)
from unimerge.methods.registry import register_method

__all__ = [
    "consensus_mask",
    "consensus_ta",
    "consensus_ties",
    "localize_stitch",
    "magmax",
    "pcb",
    "pcb_scores",
    "tall_masks",
]

_CONFIG = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)


# --------------------------------------------------------------------------------------------- PCB


class PcbParams(BaseModel):
    """PCB-Merging parameters (names follow the reference code: ``pcb_ratio`` -> ``ratio``)."""

    model_config = _CONFIG
    ratio: float = Field(default=0.1, gt=0.0, le=1.0, description="fraction of entries kept per task")
    clamp_ratio: float = Field(default=0.0001, ge=0.0, le=0.1, description="outlier clamp quantile")
    lambda_: float = Field(default=1.0, alias="lambda", ge=0.0, le=10.0, description="scaling")


def _kth_smallest(v: Tensor, index: int) -> Tensor:
    """``sort(v, dim=1)[:, index]`` (0-based) by selection, without a full sort: ``(n, d) -> (n, 1)``."""
    return torch.kthvalue(v, index + 1, dim=1, keepdim=True).values


def _quantile_clamp(v: Tensor, ratio: float) -> Tensor:
    """Clamp each row of ``v`` ``(n, d)`` so its ``int(d * ratio)`` smallest and largest entries are cut.

    The reference ``clamp`` takes ``sorted[int(d * r)]`` and ``sorted[int(d * (1 - r) - 1)]``; the upper
    index also clips the largest entry whenever ``d * r`` is not an integer, which matters only for the
    small tensors a per-tensor merge sees. We clip exactly ``int(d * r)`` entries at each end.
    """
    d = v.shape[1]
    cut = min(int(d * ratio), (d - 1) // 2)
    if cut == 0:
        return v
    return torch.clamp(v, _kth_smallest(v, cut), _kth_smallest(v, d - 1 - cut))


def _minmax(v: Tensor, flat: Tensor | float) -> Tensor:
    """Min-max normalise each row of ``v`` ``(n, d)`` to ``[0, 1]``; constant rows become ``flat``.

    (The reference divides by zero on a constant row.)
    """
    lo = v.amin(dim=1, keepdim=True)
    span = v.amax(dim=1, keepdim=True) - lo
    is_flat = span == 0
    out = (v - lo) / torch.where(is_flat, torch.ones_like(span), span)
    return torch.where(is_flat, torch.as_tensor(flat, dtype=v.dtype), out)


def pcb_scores(x: Tensor, ratio: float, clamp_ratio: float = 0.0001) -> tuple[Tensor, Tensor]:
    """PCB balancing: the kept scores and the outlier-clamped task vectors.

    Intra-balancing ``exp(n * minmax(|tau_i|)^2)`` times inter-balancing ``tanh(tau_i * sum_j tau_j)``
    (``PCB_merge`` in the reference code, per tensor here). Each task's scores are clamped from below at
    their ``int(d * (1 - ratio))``-th smallest value and min-max normalised, so the entries above that
    threshold (about the top ``ratio``) get scores in ``(0, 1]`` and the others 0.

    Args:
        x: task vectors ``(n, *shape)``.
        ratio: fraction of entries kept per task.
        clamp_ratio: magnitudes are clamped to their ``[clamp_ratio, 1 - clamp_ratio]`` quantiles.

    Returns:
        ``(scale, clamped)``, both ``(n, *shape)``.
    """
    n = x.shape[0]
    flat = x.reshape(n, -1)  # (n, d)
    d = flat.shape[1]
    if d == 0:
        return torch.zeros_like(x), x
    mag = _quantile_clamp(flat.abs(), clamp_ratio)  # (n, d)
    clamped = flat.sign() * mag
    intra = torch.exp(n * _minmax(mag, (mag > 0).to(mag.dtype)) ** 2)  # (n, d); constant row: all max
    inter = torch.tanh(flat * flat.sum(dim=0, keepdim=True))  # (n, d)
    balance = intra * inter
    lo = _kth_smallest(balance, min(int(d * (1 - ratio)), d - 1))
    scale = _minmax(torch.clamp(balance, min=lo), 0.0)  # (n, d): 0 at or below the threshold
    return scale.reshape(x.shape), clamped.reshape(x.shape)


@register_method(
    "pcb",
    params=PcbParams,
    family="sparsify",
    needs_base=True,
    paper="https://arxiv.org/abs/2410.02396",
    grid={"ratio": (0.05, 0.1, 0.2), "lambda": (1.0, 1.2)},
)
def pcb(
    x: Tensor,
    params: PcbParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """PCB-Merging: balance parameter competition within and across tasks, drop, rescale, merge.

    ``merged = lambda * sum_i(w_i * tau_i * s_i) / sum_i(s_i)`` with PCB scores ``s_i`` (see
    :func:`pcb_scores`); the per-model ``weight`` plays the reference code's per-task ``lams``.
    """
    scale, clamped = pcb_scores(x, params.ratio, params.clamp_ratio)  # (n, *shape) each
    tvs = clamped * expand_like(per_model["weight"], x)
    merged = (tvs * scale).sum(dim=0) / torch.clamp(scale.sum(dim=0), min=1e-12)
    return params.lambda_ * merged


# ------------------------------------------------------------------------------- Consensus / TALL


def tall_masks(x: Tensor, tau_mtl: Tensor, tall_lambda: float | Tensor) -> Tensor:
    """TALL masks ``m_t = |tau_t| > |tau_MTL - tau_t| * lambda_t`` (strict, as the reference code).

    Args:
        x: task vectors ``(n, *shape)``.
        tau_mtl: the multi-task vector ``(*shape)``.
        tall_lambda: a scalar, or one value per task ``(n,)``.

    Returns:
        Boolean masks ``(n, *shape)``.
    """
    lam = torch.as_tensor(tall_lambda, dtype=x.dtype, device=x.device)
    if lam.dim() == 1:
        lam = expand_like(lam, x)
    return x.abs() > (tau_mtl - x).abs() * lam


def consensus_mask(x: Tensor, tau_mtl: Tensor, tall_lambda: float, k: int) -> Tensor:
    """Entries whose TALL mask is on for at least ``k`` tasks: ``(n, *shape) -> (*shape)`` bool."""
    return tall_masks(x, tau_mtl, tall_lambda).sum(dim=0) >= k


class ConsensusParams(BaseModel):
    """Consensus merging on task arithmetic."""

    model_config = _CONFIG
    k: int = Field(default=2, ge=0, le=1000, description="keep entries used by at least k tasks")
    tall_lambda: float = Field(default=0.4, ge=0.0, le=10.0, description="TALL mask threshold")
    lambda_: float = Field(default=1.0, alias="lambda", ge=0.0, le=10.0, description="scaling")


class ConsensusTiesParams(ConsensusParams):
    """Consensus merging on TIES (top-``density`` trim, sign election, disjoint sum)."""

    density: float = Field(default=0.2, gt=0.0, le=1.0, description="TIES fraction kept per task")


@register_method(
    "consensus_ta",
    params=ConsensusParams,
    family="mask",
    needs_base=True,
    paper="https://arxiv.org/abs/2405.07813",
    grid={"lambda": (0.1, 0.2, 0.3, 0.5, 1.0), "tall_lambda": (0.4, 0.6)},
)
def consensus_ta(
    x: Tensor,
    params: ConsensusParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Consensus Task Arithmetic: task arithmetic restricted to entries at least ``k`` TALL masks use.

    ``tau_MTL = sum_i w_i tau_i``; TALL masks compare each (unweighted) ``tau_i`` with ``tau_MTL``;
    ``merged = lambda * tau_MTL * 1[#masks >= k]``.
    """
    tau_mtl = weighted_sum(x, per_model["weight"])  # (*shape)
    keep = consensus_mask(x, tau_mtl, params.tall_lambda, params.k)
    return params.lambda_ * tau_mtl * keep


@register_method(
    "consensus_ties",
    params=ConsensusTiesParams,
    family="mask",
    needs_base=True,
    paper="https://arxiv.org/abs/2405.07813",
    grid={"lambda": (0.5, 0.7, 1.0), "tall_lambda": (0.4, 0.6)},
)
def consensus_ties(
    x: Tensor,
    params: ConsensusTiesParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Consensus TIES: the TIES multi-task vector (disjoint *sum*, as the reference) masked by consensus.

    The trim is TIES' (:func:`unimerge.methods.primitives.sparsify_magnitude`): each weighted task vector
    keeps ``max(1, int(density * numel))`` entries, so a small tensor keeps its largest entry (the
    reference code trims the flattened model and has no small tensors; ours is per tensor).
    """
    density = torch.full((x.shape[0],), params.density)
    trimmed = sparsify_magnitude(x * expand_like(per_model["weight"], x), density)  # (n, *shape)
    tau_mtl = (trimmed * elect_sign(trimmed, "sum")).sum(dim=0)  # (*shape)
    keep = consensus_mask(x, tau_mtl, params.tall_lambda, params.k)
    return params.lambda_ * tau_mtl * keep


# ------------------------------------------------------------------------------------------ MagMax


class ScaleParams(BaseModel):
    """A single scaling coefficient applied to the merged task vector."""

    model_config = _CONFIG
    lambda_: float = Field(default=1.0, alias="lambda", ge=0.0, le=10.0, description="scaling")


@register_method(
    "magmax",
    params=ScaleParams,
    family="mask",
    needs_base=True,
    paper="https://arxiv.org/abs/2407.06322",
    grid={"lambda": (0.5, 0.7, 1.0)},
)
def magmax(
    x: Tensor,
    params: ScaleParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """MagMax: per entry, the (weighted) task-vector value of largest magnitude, times ``lambda``.

    On equal magnitudes the later model wins, as in the reference ``merge_max_abs`` (``>=``).
    """
    wx = x * expand_like(per_model["weight"], x)  # (n, *shape)
    best, best_abs = wx[0], wx[0].abs()  # (*shape) each
    for i in range(1, x.shape[0]):
        cur = wx[i].abs()
        take = cur >= best_abs
        best, best_abs = torch.where(take, wx[i], best), torch.where(take, cur, best_abs)
    return params.lambda_ * best


# ------------------------------------------------------------------------------ Localize-and-Stitch


class LocalizeStitchParams(BaseModel):
    """Dataless Localize-and-Stitch parameters."""

    model_config = _CONFIG
    sparsity: float = Field(default=0.1, gt=0.0, le=1.0, description="fraction localised per task")


@register_method(
    "localize_stitch",
    params=LocalizeStitchParams,
    family="mask",
    needs_base=True,
    paper="https://arxiv.org/abs/2408.13656",
    grid={"sparsity": (0.01, 0.05, 0.1, 0.2)},
)
def localize_stitch(
    x: Tensor,
    params: LocalizeStitchParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Dataless Localize-and-Stitch: keep each task's top-``sparsity`` entries by magnitude, stitch.

    Stitching divides every mask by the number of masks covering an entry (``gamma_i / sum_k gamma_k``),
    so overlapping entries are averaged and the others added. Selected entries that are exactly zero do
    not count as overlap. Each task keeps ``max(1, int(sparsity * numel))`` entries of a tensor (the TIES
    trim, :func:`unimerge.methods.primitives.sparsify_magnitude`): a tensor under ``1 / sparsity`` entries
    keeps its largest one rather than dropping the task.
    """
    density = torch.full((x.shape[0],), params.sparsity)
    local = sparsify_magnitude(x, density)  # (n, *shape)
    mask = local != 0
    count = mask.sum(dim=0).clamp(min=1)  # (*shape)
    return (local * expand_like(per_model["weight"], x)).sum(dim=0) / count
