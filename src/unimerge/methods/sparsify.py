"""Task arithmetic and the sparsify-then-merge family: TIES, DARE, Breadcrumbs, DELLA.

Every method here is mergekit's "generalized task arithmetic"
(``mergekit/merge_methods/generalized_task_arithmetic.py``) with a different sparsifier and sign
consensus, registered under mergekit's names, parameters and defaults; each is one function composed
from :mod:`unimerge.methods.primitives` (SCE, which computes its own weights, is in :mod:`.sce`):

=================  ==========================  =========  =========  =========
name               sparsifier (per model)      consensus  normalize  rescale
=================  ==========================  =========  =========  =========
task_arithmetic    none                        none       False      (unused)
magnitude_prune    magnitude top-k             none       False      False
ties               magnitude top-k             sum        True       False
dare_linear        random (Bernoulli)          none       False      True
dare_ties          random (Bernoulli)          sum        False      True
breadcrumbs        drop largest gamma + small  none       False      False
breadcrumbs_ties   drop largest gamma + small  sum        False      False
della_linear       random, rank-magnitude      none       False      True
della              random, rank-magnitude      sum        True       True
=================  ==========================  =========  =========  =========

For task vectors ``tau_i`` with weights ``w_i``: ``tau'_i = sparsify(tau_i)`` (``rescale`` keeps each
tensor's L1 norm, as mergekit does), then ``merged = lambda * sum_i m_i w_i tau'_i / D`` where ``m_i`` is
the sign-agreement mask (all ones without consensus: :func:`linear_combine`; TIES' election:
:func:`consensus_combine`) and ``D`` is ``sum_i m_i w_i`` when ``normalize`` is on (1 otherwise, or
where it is 0). ``int8_mask`` is accepted and changes nothing in float32; ``task_arithmetic`` accepts
``density`` and ``rescale`` as mergekit does, and like mergekit ignores them.

Small tensors as in mergekit 0.1.5: the TIES trim keeps at least one entry (``max(1, int(density *
numel))``), Breadcrumbs keeps ``int(density * numel)`` (none under ``1 / density`` entries).
``benchmarks/mergekit_parity.py`` runs every method through both tools. Deliberate differences from
mergekit: DELLA gives a row of length 1 keep probability ``density`` (mergekit divides 0 by 0 and stops);
among equal magnitudes at a trim boundary the lowest indices are kept (mergekit: the order of torch's
unstable CPU ``argsort``, which depends on the whole tensor and differs on CUDA; reproducing it would
take a full sort of every such tensor); random masks come from the per-tensor generator, so they are
reproducible and have mergekit's distribution but not its (global-RNG) draws; bf16 inputs are computed
in fp32 and rounded once (mergekit rounds to bf16 after every step).

Papers: task arithmetic, Ilharco et al. 2023 (https://arxiv.org/abs/2212.04089); TIES, Yadav et al.
2023 (https://arxiv.org/abs/2306.01708); DARE, Yu et al. 2024 (https://arxiv.org/abs/2311.03099);
Model Breadcrumbs, Davari & Belilovsky 2024 (https://arxiv.org/abs/2312.06795); DELLA, Deep et al.
2024 (https://arxiv.org/abs/2406.11617). ``magnitude_prune`` is PEFT's name for TIES' trim step
followed by a weighted sum (``peft/utils/merge_utils.py``); mergekit has no method of that name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from unimerge.methods._global import global_magnitude_threshold
from unimerge.methods.primitives import (
    consensus_sums,
    expand_like,
    sparsify_breadcrumbs,
    sparsify_magnitude,
    sparsify_random,
    sparsify_rank_magnitude,
    sparsify_threshold,
    weighted_sum,
)
from unimerge.methods.registry import ModelWeight, register_method

__all__ = [
    "BreadcrumbsParams",
    "BreadcrumbsTiesParams",
    "BreadcrumbsWeight",
    "DareLinearParams",
    "DareTiesParams",
    "DellaLinearParams",
    "DellaParams",
    "DellaWeight",
    "DensityWeight",
    "GTAParams",
    "MagnitudePruneParams",
    "TaskArithmeticParams",
    "TiesParams",
    "breadcrumbs",
    "breadcrumbs_ties",
    "consensus_combine",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "global_trim",
    "linear_combine",
    "magnitude_prune",
    "task_arithmetic",
    "ties",
]

_TA = "https://arxiv.org/abs/2212.04089"
_TIES = "https://arxiv.org/abs/2306.01708"
_DARE = "https://arxiv.org/abs/2311.03099"
_CRUMBS = "https://arxiv.org/abs/2312.06795"
_DELLA = "https://arxiv.org/abs/2406.11617"

_ONLY_LAMBDA = {"lambda": (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)}
_MEAN_GRID = {"density": (0.2, 0.5), "lambda": (0.5, 0.7, 1.0, 1.5)}  # normalised (mean) merges
_SUM_GRID = {"density": (0.3, 0.5), "lambda": (0.1, 0.2, 0.3, 0.5, 0.7)}  # unnormalised sums of 4-8 experts
_CRUMB_GRID = {"density": (0.5, 0.9), "lambda": (0.1, 0.2, 0.3, 0.5, 0.7)}


def _normalize(default: bool) -> Any:
    return Field(default=default, description="Divide by the sum of the (kept) models' weights.")


def _rescale(default: bool) -> Any:
    return Field(default=default, description="Rescale sparsified task vectors to their L1 norm.")


class GTAParams(BaseModel):
    """Global parameters shared by every generalized-task-arithmetic method (mergekit's names)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    int8_mask: bool = Field(default=False, description="Accepted for mergekit configs; no effect in float32.")
    normalize: bool = _normalize(False)
    rescale: bool = _rescale(False)
    lambda_: float = Field(default=1.0, alias="lambda", ge=-100.0, le=100.0, description="Final scale.")


class DensityWeight(ModelWeight):
    """Per-model weight and density (fraction of task-vector entries kept)."""

    density: float = Field(default=1.0, gt=0.0, le=1.0, description="Fraction of task-vector entries kept.")


class BreadcrumbsWeight(DensityWeight):
    """Per-model weight, density and gamma (fraction of largest-magnitude entries dropped)."""

    gamma: float = Field(
        default=0.01, ge=0.0, le=1.0, description="Fraction of largest-magnitude entries dropped."
    )


class DellaWeight(DensityWeight):
    """Per-model weight, density and epsilon (half-width of DELLA's keep-probability range)."""

    epsilon: float = Field(
        default=0.15, ge=0.0, lt=0.5, description="Half-width of the keep-probability range."
    )

    @model_validator(mode="after")
    def _check_range(self) -> DellaWeight:
        if self.density < 1.0 and not (
            self.density - self.epsilon > 0.0 and self.density + self.epsilon < 1.0
        ):
            raise ValueError(
                f"DELLA keep probabilities density +/- epsilon must lie in (0, 1), got density={self.density}, "
                f"epsilon={self.epsilon}; lower epsilon or move density away from 0 and 1"
            )
        return self


def _normalize_and_scale(merged: Tensor, w: Tensor, params: GTAParams) -> Tensor:
    """Divide by ``sum(w)`` with ``normalize`` (unless it is ~0), then scale by ``lambda``: in place."""
    if params.normalize:
        total = float(w.sum())
        merged = merged.div_(1.0 if abs(total) < 1e-8 else total)
    return merged.mul_(params.lambda_) if params.lambda_ != 1.0 else merged


def linear_combine(x: Tensor, weights: Tensor, params: GTAParams) -> Tensor:
    """``lambda * sum_i w_i x_i``, divided by ``sum_i w_i`` with ``normalize``.

    ``x`` is the sparsified task vectors ``(n, *shape)`` (overwritten), ``weights`` is ``(n,)``;
    returns ``(*shape)``.
    """
    w = weights.to(device=x.device, dtype=x.dtype)  # (n,)
    merged = x.mul_(expand_like(w, x)).sum(dim=0)  # (*shape)
    return _normalize_and_scale(merged, w, params)


def consensus_combine(x: Tensor, weights: Tensor, params: GTAParams) -> Tensor:
    """TIES' combine: weight, elect each entry's sign (``sum``), add the agreeing entries, scale.

    With ``normalize`` each entry is divided by the summed weights of the models that agree there
    (a disjoint weighted mean; a zero divisor counts as 1). ``x`` is the sparsified task vectors
    ``(n, *shape)`` (overwritten), ``weights`` is ``(n,)``; returns ``(*shape)``.
    """
    w = weights.to(device=x.device, dtype=x.dtype)  # (n,)
    weighted = x.mul_(expand_like(w, x))  # (n, *shape)
    merged, _ = consensus_sums(weighted, w, "sum", normalize=params.normalize)  # (*shape)
    return merged.mul_(params.lambda_) if params.lambda_ != 1.0 else merged


# Each method gets x: the stacked task vectors (n, *shape), a fresh buffer it may overwrite.


class TaskArithmeticParams(GTAParams):
    """``task_arithmetic``'s parameters; ``rescale`` is accepted (as by mergekit) and unused."""

    normalize: bool = _normalize(False)
    rescale: bool = _rescale(False)


@register_method(
    "task_arithmetic",
    params=TaskArithmeticParams,
    model_params=DensityWeight,
    family="task_arithmetic",
    needs_base=True,
    paper=_TA,
    grid=_ONLY_LAMBDA,
)
def task_arithmetic(
    x: Tensor,
    params: TaskArithmeticParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Task arithmetic: base + lambda * sum_i w_i tau_i (negative weights negate)."""
    w = per_model["weight"].to(device=x.device, dtype=x.dtype)  # (n,)
    merged = weighted_sum(x, w, out=x[0])  # (*shape), summed into x's first row
    return _normalize_and_scale(merged, w, params)


class MagnitudePruneParams(GTAParams):
    """``magnitude_prune``'s parameters."""

    normalize: bool = _normalize(False)
    rescale: bool = _rescale(False)


@register_method(
    "magnitude_prune",
    params=MagnitudePruneParams,
    model_params=DensityWeight,
    family="sparsify",
    needs_base=True,
    paper=_TIES,
    grid={"density": (0.2, 0.5), "lambda": (0.1, 0.2, 0.3, 0.5, 1.0)},
)
def magnitude_prune(
    x: Tensor,
    params: MagnitudePruneParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Magnitude pruning of each task vector (TIES trim), then a weighted sum."""
    trimmed = sparsify_magnitude(x, per_model["density"], rescale=params.rescale, norm="l1", inplace=True)
    return linear_combine(trimmed, per_model["weight"], params)


class TiesParams(GTAParams):
    """``ties``' parameters: a weighted mean by default; the trim per tensor or over the whole model."""

    normalize: bool = _normalize(True)
    rescale: bool = _rescale(False)
    trim_scope: Literal["tensor", "global"] = Field(
        default="tensor",
        description=(
            "tensor: keep the top density of each tensor (mergekit); global: of the whole model, as the TIES "
            "reference code does (the engine makes a streaming statistics pass first)"
        ),
    )


def global_trim(
    params: TiesParams, per_model: Mapping[str, Tensor], deltas: Callable[[], Iterator[tuple[str, Tensor]]]
) -> dict[str, Tensor]:
    """``ties``' statistics pass: with ``trim_scope: global``, each model's magnitude threshold over the
    whole model (``per_model["threshold"]``, ``(n,)``)."""
    if params.trim_scope != "global":
        return {}
    return {"threshold": global_magnitude_threshold(deltas, per_model["density"])}


@register_method(
    "ties",
    params=TiesParams,
    model_params=DensityWeight,
    family="sparsify",
    needs_base=True,
    paper=_TIES,
    grid=_MEAN_GRID,
    prepare=global_trim,
)
def ties(
    x: Tensor,
    params: TiesParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """TIES: trim by magnitude, elect sign, disjoint weighted mean.

    With ``trim_scope: global``, :func:`global_trim` has put each model's whole-model magnitude
    threshold in ``per_model["threshold"]`` and the trim keeps the entries at or above it.
    """
    density = per_model["density"]  # (n,)
    if "threshold" in per_model:  # trim_scope: global
        threshold = per_model["threshold"]  # (n,)
        trimmed = sparsify_threshold(x, density, threshold, rescale=params.rescale, norm="l1", inplace=True)
    else:
        trimmed = sparsify_magnitude(x, density, rescale=params.rescale, norm="l1", inplace=True)
    return consensus_combine(trimmed, per_model["weight"], params)


class DareLinearParams(GTAParams):
    """``dare_linear``'s parameters: the kept entries are rescaled by default."""

    normalize: bool = _normalize(False)
    rescale: bool = _rescale(True)


@register_method(
    "dare_linear",
    params=DareLinearParams,
    model_params=DensityWeight,
    family="sparsify",
    needs_base=True,
    paper=_DARE,
    random=True,
    grid=_SUM_GRID,
)
def dare_linear(
    x: Tensor,
    params: DareLinearParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """DARE: random drop with rescale, then a weighted sum."""
    density = per_model["density"]  # (n,)
    kept = sparsify_random(x, density, rescale=params.rescale, generator=generator, norm="l1", inplace=True)
    return linear_combine(kept, per_model["weight"], params)


class DareTiesParams(GTAParams):
    """``dare_ties``' parameters: the kept entries are rescaled by default, the agreeing ones summed."""

    normalize: bool = _normalize(False)
    rescale: bool = _rescale(True)


@register_method(
    "dare_ties",
    params=DareTiesParams,
    model_params=DensityWeight,
    family="sparsify",
    needs_base=True,
    paper=_DARE,
    random=True,
    grid=_SUM_GRID,
)
def dare_ties(
    x: Tensor,
    params: DareTiesParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """DARE + TIES: random drop with rescale, elect sign, sum of agreeing entries."""
    density = per_model["density"]  # (n,)
    kept = sparsify_random(x, density, rescale=params.rescale, generator=generator, norm="l1", inplace=True)
    return consensus_combine(kept, per_model["weight"], params)


class BreadcrumbsParams(GTAParams):
    """``breadcrumbs``' parameters."""

    normalize: bool = _normalize(False)
    rescale: bool = _rescale(False)


@register_method(
    "breadcrumbs",
    params=BreadcrumbsParams,
    model_params=BreadcrumbsWeight,
    family="sparsify",
    needs_base=True,
    paper=_CRUMBS,
    grid=_CRUMB_GRID,
)
def breadcrumbs(
    x: Tensor,
    params: BreadcrumbsParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Model Breadcrumbs: drop the largest (gamma) and smallest entries, weighted sum."""
    density, gamma = per_model["density"], per_model["gamma"]  # (n,) each
    kept = sparsify_breadcrumbs(x, density, gamma, rescale=params.rescale, norm="l1", inplace=True)
    return linear_combine(kept, per_model["weight"], params)


class BreadcrumbsTiesParams(GTAParams):
    """``breadcrumbs_ties``' parameters: the agreeing entries are summed by default."""

    normalize: bool = _normalize(False)
    rescale: bool = _rescale(False)


@register_method(
    "breadcrumbs_ties",
    params=BreadcrumbsTiesParams,
    model_params=BreadcrumbsWeight,
    family="sparsify",
    needs_base=True,
    paper=_CRUMBS,
    grid=_CRUMB_GRID,
)
def breadcrumbs_ties(
    x: Tensor,
    params: BreadcrumbsTiesParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Model Breadcrumbs with TIES sign election."""
    density, gamma = per_model["density"], per_model["gamma"]  # (n,) each
    kept = sparsify_breadcrumbs(x, density, gamma, rescale=params.rescale, norm="l1", inplace=True)
    return consensus_combine(kept, per_model["weight"], params)


class DellaLinearParams(GTAParams):
    """``della_linear``'s parameters: the kept entries are rescaled by default."""

    normalize: bool = _normalize(False)
    rescale: bool = _rescale(True)


@register_method(
    "della_linear",
    params=DellaLinearParams,
    model_params=DellaWeight,
    family="sparsify",
    needs_base=True,
    paper=_DELLA,
    random=True,
    grid=_SUM_GRID,
)
def della_linear(
    x: Tensor,
    params: DellaLinearParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """DELLA without sign election: magnitude-rank random drop, rescale, weighted sum."""
    density, eps = per_model["density"], per_model["epsilon"]  # (n,) each
    kept = sparsify_rank_magnitude(
        x, density, eps, rescale=params.rescale, generator=generator, norm="l1", inplace=True
    )
    return linear_combine(kept, per_model["weight"], params)


class DellaParams(GTAParams):
    """``della``'s parameters: the kept entries are rescaled, then a weighted mean, by default."""

    normalize: bool = _normalize(True)
    rescale: bool = _rescale(True)


@register_method(
    "della",
    params=DellaParams,
    model_params=DellaWeight,
    family="sparsify",
    needs_base=True,
    paper=_DELLA,
    random=True,
    grid={"density": (0.3, 0.5), "lambda": (0.7, 1.0, 1.5)},
)
def della(
    x: Tensor,
    params: DellaParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """DELLA: magnitude-rank random drop, rescale, elect sign, disjoint weighted mean."""
    density, eps = per_model["density"], per_model["epsilon"]  # (n,) each
    kept = sparsify_rank_magnitude(
        x, density, eps, rescale=params.rescale, generator=generator, norm="l1", inplace=True
    )
    return consensus_combine(kept, per_model["weight"], params)
