"""Task arithmetic and the sparsify-then-merge family, as one generalized function.

Every method here is mergekit's "generalized task arithmetic"
(``mergekit/merge_methods/generalized_task_arithmetic.py``) with a different sparsifier and sign
consensus, registered under mergekit's names, parameters and defaults:

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
the sign-agreement mask (all ones without consensus) and ``D`` is ``sum_i m_i w_i`` when ``normalize``
is on (1 otherwise, or where it is 0). ``int8_mask`` is accepted and changes nothing in float32;
``task_arithmetic`` accepts ``density`` and ``rescale`` as mergekit does, and like mergekit ignores them.

Deliberate differences from mergekit: Breadcrumbs keeps its middle band when ``int(gamma * numel)``
is 0 (mergekit's slice ``[n_bot:-0]`` is empty, which zeroes the whole task vector of any tensor
under ``1/gamma`` entries, or of every tensor when ``gamma: 0``); DELLA gives a row of length 1 keep
probability ``density`` (mergekit divides 0 by 0); among equal magnitudes the lowest indices are
kept (mergekit: whatever ``argsort`` returns); random masks come from the per-tensor generator, so
they are reproducible and have mergekit's distribution but not its (global-RNG) draws.

Papers: task arithmetic, Ilharco et al. 2023 (https://arxiv.org/abs/2212.04089); TIES, Yadav et al.
2023 (https://arxiv.org/abs/2306.01708); DARE, Yu et al. 2024 (https://arxiv.org/abs/2311.03099);
Model Breadcrumbs, Davari & Belilovsky 2024 (https://arxiv.org/abs/2312.06795); DELLA, Deep et al.
2024 (https://arxiv.org/abs/2406.11617); SCE / FuseChat, Wan et al. 2024
(https://arxiv.org/abs/2408.07990). ``magnitude_prune`` is PEFT's name for TIES' trim step followed by
a weighted sum (``peft/utils/merge_utils.py``); mergekit has no method of that name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from torch import Tensor

from unimerge.methods._global import global_magnitude_threshold
from unimerge.methods.primitives import (
    SignMethod,
    consensus_sums,
    expand_like,
    sparsify_breadcrumbs,
    sparsify_magnitude,
    sparsify_random,
    sparsify_rank_magnitude,
    sparsify_threshold,
    topk_mask,
    variance_over_models,
    weighted_sum,
)
from unimerge.methods.registry import ModelWeight, register_method

__all__ = ["generalized_task_arithmetic", "sce"]

# (x (n, *shape), per_model, rescale, generator) -> x sparsified in place (n, *shape)
Sparsifier = Callable[[Tensor, Mapping[str, Tensor], bool, "torch.Generator | None"], Tensor]


class GTAParams(BaseModel):
    """Global parameters shared by every generalized-task-arithmetic method (mergekit's names)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    int8_mask: bool = Field(default=False, description="Accepted for mergekit configs; no effect in float32.")
    normalize: bool = Field(default=False, description="Divide by the sum of the (kept) models' weights.")
    rescale: bool = Field(default=False, description="Rescale sparsified task vectors to their L1 norm.")
    lambda_: float = Field(default=1.0, alias="lambda", ge=-100.0, le=100.0, description="Final scale.")


class DensityWeight(ModelWeight):
    """Per-model weight and density (fraction of task-vector entries kept)."""

    density: float = Field(default=1.0, gt=0.0, le=1.0)


class BreadcrumbsWeight(DensityWeight):
    """Per-model weight, density and gamma (fraction of largest-magnitude entries dropped)."""

    gamma: float = Field(default=0.01, ge=0.0, le=1.0)


class DellaWeight(DensityWeight):
    """Per-model weight, density and epsilon (half-width of DELLA's keep-probability range)."""

    epsilon: float = Field(default=0.15, ge=0.0, lt=0.5)

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


def _magnitude(
    x: Tensor, pm: Mapping[str, Tensor], rescale: bool, generator: torch.Generator | None
) -> Tensor:
    if "threshold" in pm:  # trim_scope: global
        return sparsify_threshold(x, pm["density"], pm["threshold"], rescale=rescale, norm="l1", inplace=True)
    return sparsify_magnitude(x, pm["density"], rescale=rescale, norm="l1", inplace=True)


def _random(x: Tensor, pm: Mapping[str, Tensor], rescale: bool, generator: torch.Generator | None) -> Tensor:
    return sparsify_random(x, pm["density"], rescale=rescale, generator=generator, norm="l1", inplace=True)


def _outliers(
    x: Tensor, pm: Mapping[str, Tensor], rescale: bool, generator: torch.Generator | None
) -> Tensor:
    return sparsify_breadcrumbs(x, pm["density"], pm["gamma"], rescale=rescale, norm="l1", inplace=True)


def _rank(x: Tensor, pm: Mapping[str, Tensor], rescale: bool, generator: torch.Generator | None) -> Tensor:
    return sparsify_rank_magnitude(
        x, pm["density"], pm["epsilon"], rescale=rescale, generator=generator, norm="l1", inplace=True
    )


def generalized_task_arithmetic(
    x: Tensor,
    per_model: Mapping[str, Tensor],
    *,
    sparsifier: Sparsifier | None,
    consensus: SignMethod | None,
    normalize: bool,
    rescale: bool,
    lam: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sparsify each task vector, weight, elect signs, sum, normalise, scale (module docstring).

    Args:
        x: task vectors ``(n, *shape)``; overwritten (the engine hands every method a fresh buffer).
        per_model: ``weight`` and the sparsifier's fractions, each ``(n,)``.
        sparsifier: one of the per-model sparsifiers, or ``None`` for plain task arithmetic.
        consensus: TIES sign election (``sum`` or ``count``), or ``None``.
        normalize: divide by the summed weights of the models kept at each entry.
        rescale: passed to the sparsifier (L1-norm rescaling).
        lam: final scale (mergekit's ``lambda``).
        generator: randomness for the random sparsifiers.

    Returns:
        The merged task vector ``(*shape)``.
    """
    w = per_model["weight"].to(device=x.device, dtype=x.dtype)  # (n,)
    weighted = None
    if sparsifier is not None:
        weighted = sparsifier(x, per_model, rescale, generator).mul_(expand_like(w, x))  # x, (n, *shape)
    if consensus is None:
        mixed = weighted.sum(dim=0) if weighted is not None else weighted_sum(x, w, out=x[0])  # (*shape)
        total = float(w.sum())
        divisor: Tensor | float = 1.0 if abs(total) < 1e-8 else total
    else:
        weighted = weighted if weighted is not None else x.mul_(expand_like(w, x))
        mixed, _ = consensus_sums(weighted, w, consensus, normalize=normalize)  # (*shape)
        return mixed.mul_(lam) if lam != 1.0 else mixed
    if normalize:
        mixed = mixed.div_(divisor)
    return mixed.mul_(lam) if lam != 1.0 else mixed


@dataclass(frozen=True)
class _Variant:
    name: str
    summary: str
    sparsifier: Sparsifier | None
    consensus: SignMethod | None
    normalize: bool
    rescale: bool
    model_params: type[BaseModel]
    paper: str
    grid: dict[str, tuple[Any, ...]]
    family: Literal["sparsify", "task_arithmetic"] = "sparsify"
    random: bool = False
    global_trim: bool = False  # accepts trim_scope: global (whole-model top-k, a statistics pass first)


def _register(v: _Variant) -> None:
    """Register ``v`` under its name with its own defaults for ``normalize``/``rescale``."""
    params = create_model(
        "".join(p.title() for p in v.name.split("_")) + "Params",
        __base__=GTAParams,
        normalize=(
            bool,
            Field(default=v.normalize, description=GTAParams.model_fields["normalize"].description),
        ),
        rescale=(bool, Field(default=v.rescale, description=GTAParams.model_fields["rescale"].description)),
        **({"trim_scope": (Literal["tensor", "global"], Field(default="tensor", description=_TRIM_SCOPE))}
           if v.global_trim else {}),
    )

    def merge(
        x: Tensor,
        p: Any,
        per_model: Mapping[str, Tensor],
        *,
        base: Tensor | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        return generalized_task_arithmetic(
            x,
            per_model,
            sparsifier=v.sparsifier,
            consensus=v.consensus,
            normalize=p.normalize,
            rescale=p.rescale,
            lam=p.lambda_,
            generator=generator,
        )

    merge.__name__ = merge.__qualname__ = v.name
    merge.__doc__ = v.summary
    register_method(
        v.name,
        params=params,
        model_params=v.model_params,
        family=v.family,
        needs_base=True,
        paper=v.paper,
        random=v.random,
        grid=v.grid,
        prepare=_global_trim if v.global_trim else None,
    )(merge)


_TRIM_SCOPE = (
    "tensor: keep the top density of each tensor (mergekit); global: of the whole model, as the TIES "
    "reference code does (the engine makes a streaming statistics pass first)"
)


def _global_trim(
    params: Any, per_model: Mapping[str, Tensor], deltas: Callable[[], Iterator[tuple[str, Tensor]]]
) -> dict[str, Tensor]:
    """With ``trim_scope: global``, each model's magnitude threshold over the whole model."""
    if getattr(params, "trim_scope", "tensor") != "global":
        return {}
    return {"threshold": global_magnitude_threshold(deltas, per_model["density"])}


_TA = "https://arxiv.org/abs/2212.04089"
_TIES = "https://arxiv.org/abs/2306.01708"
_DARE = "https://arxiv.org/abs/2311.03099"
_CRUMBS = "https://arxiv.org/abs/2312.06795"
_DELLA = "https://arxiv.org/abs/2406.11617"

_ONLY_LAMBDA = {"lambda": (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)}
_MEAN_GRID = {"density": (0.2, 0.5), "lambda": (0.5, 0.7, 1.0, 1.5)}  # normalised (mean) merges
_SUM_GRID = {"density": (0.3, 0.5), "lambda": (0.1, 0.2, 0.3, 0.5, 0.7)}  # unnormalised sums of 4-8 experts
_CRUMB_GRID = {"density": (0.5, 0.9), "lambda": (0.1, 0.2, 0.3, 0.5, 0.7)}


_VARIANTS = (
    _Variant("task_arithmetic", "Task arithmetic: base + lambda * sum_i w_i tau_i (negative weights negate).",
             None, None, normalize=False, rescale=False, model_params=DensityWeight, paper=_TA, grid=_ONLY_LAMBDA,
             family="task_arithmetic"),
    _Variant("magnitude_prune", "Magnitude pruning of each task vector (TIES trim), then a weighted sum.",
             _magnitude, None, normalize=False, rescale=False, model_params=DensityWeight, paper=_TIES,
             grid={"density": (0.2, 0.5), "lambda": (0.1, 0.2, 0.3, 0.5, 1.0)}),
    _Variant("ties", "TIES: trim by magnitude, elect sign, disjoint weighted mean.",
             _magnitude, "sum", normalize=True, rescale=False, model_params=DensityWeight, paper=_TIES, grid=_MEAN_GRID,
             global_trim=True),
    _Variant("dare_linear", "DARE: random drop with rescale, then a weighted sum.",
             _random, None, normalize=False, rescale=True, model_params=DensityWeight, paper=_DARE, grid=_SUM_GRID,
             random=True),
    _Variant("dare_ties", "DARE + TIES: random drop with rescale, elect sign, sum of agreeing entries.",
             _random, "sum", normalize=False, rescale=True, model_params=DensityWeight, paper=_DARE, grid=_SUM_GRID,
             random=True),
    _Variant("breadcrumbs", "Model Breadcrumbs: drop the largest (gamma) and smallest entries, weighted sum.",
             _outliers, None, normalize=False, rescale=False, model_params=BreadcrumbsWeight, paper=_CRUMBS,
             grid=_CRUMB_GRID),
    _Variant("breadcrumbs_ties", "Model Breadcrumbs with TIES sign election.",
             _outliers, "sum", normalize=False, rescale=False, model_params=BreadcrumbsWeight, paper=_CRUMBS,
             grid=_CRUMB_GRID),
    _Variant("della_linear", "DELLA without sign election: magnitude-rank random drop, rescale, weighted sum.",
             _rank, None, normalize=False, rescale=True, model_params=DellaWeight, paper=_DELLA, grid=_SUM_GRID,
             random=True),
    _Variant("della", "DELLA: magnitude-rank random drop, rescale, elect sign, disjoint weighted mean.",
             _rank, "sum", normalize=True, rescale=True, model_params=DellaWeight, paper=_DELLA,
             grid={"density": (0.3, 0.5), "lambda": (0.7, 1.0, 1.5)}, random=True),
)  # fmt: skip

for _v in _VARIANTS:
    _register(_v)


class SCEParams(BaseModel):
    """SCE's global parameters (mergekit's ``sce``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    select_topk: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Fraction of highest-variance entries kept."
    )
    int8_mask: bool = Field(default=False, description="Accepted for mergekit configs; no effect in float32.")


def _sce_weights(x: Tensor) -> Tensor:
    """Matrix-level weights: mean square of each task vector, normalised to sum 1 (uniform if ~0)."""
    flat = x.reshape(x.shape[0], -1)  # (n, m)
    w = torch.stack([torch.dot(row, row) for row in flat]) / flat.shape[1]  # (n,) mean squares
    total = float(w.sum())
    return torch.full_like(w, 1.0 / w.numel()) if abs(total) < 1e-6 else w / total


@register_method(
    "sce",
    params=SCEParams,
    family="sparsify",
    needs_base=True,
    paper="https://arxiv.org/abs/2408.07990",
    grid={"select_topk": (0.1, 0.3, 0.5, 1.0)},
)
def sce(
    x: Tensor,
    params: SCEParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """SCE: select high-variance entries, weight models by mean square, erase minority signs.

    Follows mergekit's ``sce.py``: the top ``select_topk`` fraction of the entries with non-zero
    variance across models is kept in every task vector; each model's weight is the mean square of
    its (selected) task vector over the sum of them; entries disagreeing with the elected sign
    (``sum``) are erased; the result is the weight-normalised sum. The per-model ``weight`` is not
    used (SCE computes its own weights, and mergekit's ``sce`` takes none).
    """
    if params.select_topk < 1.0:
        var = variance_over_models(x)  # (*shape)
        keep = topk_mask(var, int(torch.count_nonzero(var) * params.select_topk))  # mergekit's k
        x = x * keep.to(x.dtype)  # (n, *shape)
    w = _sce_weights(x)  # (n,)
    mixed, den = consensus_sums(x, w, "sum", scales=w)  # elect on x, sum w_i x_i: (*shape) each
    return mixed.div_(den.clamp_(min=1e-6))
