"""Fisher merging: a Fisher-weighted average of the experts' parameters.

Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging"
(https://arxiv.org/abs/2111.09832): ``theta* = sum_i w_i F_i theta_i / sum_i w_i F_i`` elementwise,
with ``F_i`` the diagonal Fisher information of expert ``i`` on its own task, floored by ``eps``
(``eps`` added to every Fisher, as FusionBench's ``minimal_fisher_weight``, so tensors with no signal
fall back to the weighted average).

Two estimates of the Fisher (both from the task's training split, ``problem.budget`` examples):

- ``mode="empirical"``: gradients of ``log p(y|x)`` at the true labels (labelled data).
- ``mode="sampled"``: ``y`` drawn from the expert's own prediction ``p(.|x)`` (unlabelled data; one
  sample per example, an unbiased estimate of the "true" Fisher the paper uses).

``normalize`` divides each expert's Fisher by its global L2 norm over all tensors (FusionBench's
``normalize_fisher_weight``), so tasks with larger gradients do not dominate.

Per-tensor pure function :func:`fisher_merge` and the state-dict level :func:`fisher_state_dict`
take precomputed Fishers (e.g. sidecars loaded with ``load_stats``), for the streaming engine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from unimerge.methods import Batch, MergedModel, MergeProblem, expand_like, register_model_method
from unimerge.modelmerge.stats import (
    LogProbs,
    average_state,
    check_experts,
    collect_fisher,
    count,
    draw,
    finish,
    load_state,
    varying_names,
    work_module,
)

__all__ = [
    "FisherParams",
    "compute_fishers",
    "fisher",
    "fisher_merge",
    "fisher_state_dict",
    "normalize_fishers",
]


class FisherParams(BaseModel):
    """Parameters of ``fisher``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mode: Literal["empirical", "sampled"] = Field(
        default="empirical", description="Fisher from true labels, or from labels sampled from the model."
    )
    normalize: bool = Field(default=False, description="Divide each expert's Fisher by its global L2 norm.")
    eps: float = Field(default=1e-6, ge=0.0, le=1.0, description="Added to every Fisher entry.")
    micro_batch: int = Field(default=1, ge=1, le=256, description="Examples per gradient (1: exact).")
    batch_size: int = Field(default=16, ge=1, le=1024, description="Examples per drawn batch.")
    bf16: bool = Field(default=True, description="bf16 autocast for forward passes.")


def fisher_merge(params: Tensor, fishers: Tensor, weights: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Fisher-weighted average of one tensor.

    Args:
        params: the experts' tensors ``(n, *shape)``.
        fishers: their diagonal Fishers ``(n, *shape)`` (non-negative).
        weights: per-expert weights ``(n,)`` (default: all ones).
        eps: added to every Fisher entry (with equal Fishers the result is the weighted average).

    Returns:
        ``sum_i w_i (F_i + eps) theta_i / sum_i w_i (F_i + eps)``: ``(*shape)``.
    """
    if params.shape != fishers.shape:
        raise ValueError(f"params {tuple(params.shape)} and fishers {tuple(fishers.shape)} differ in shape")
    w = torch.ones(params.shape[0]) if weights is None else weights
    f = (fishers.to(params) + eps) * expand_like(w, params)  # (n, *shape)
    return (f * params).sum(0) / f.sum(0)


def normalize_fishers(fishers: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Each expert's Fishers divided by their global L2 norm over all tensors (zero Fishers unchanged)."""
    out = []
    for f in fishers:
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in f.values()))
        out.append({k: v / norm if norm > 0 else v.clone() for k, v in f.items()})
    return out


def fisher_state_dict(
    experts: Sequence[Mapping[str, Tensor]],
    fishers: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    eps: float = 1e-6,
) -> dict[str, Tensor]:
    """Fisher-merge whole state dicts (float32, float64 for float64 inputs).

    Tensors without a Fisher get the weighted average; tensors equal in every expert and integer
    buffers are taken from expert 0.
    """
    w = torch.tensor(weights if weights is not None else [1.0] * len(experts), dtype=torch.float64)
    out = average_state(experts, weights)
    for k in fishers[0]:
        ref = experts[0][k]
        cdtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        x = torch.stack([sd[k].to(cdtype) for sd in experts])  # (n, *shape)
        f = torch.stack([fi[k].to(cdtype) for fi in fishers])  # (n, *shape)
        out[k] = fisher_merge(x, f, w.to(cdtype), eps).to(ref.dtype)
    return out


def _log_probs(problem: MergeProblem, task: int) -> LogProbs:
    def fn(module: nn.Module, batch: Batch) -> Tensor:
        return torch.log_softmax(problem.logits(module, task, batch).float(), dim=-1)  # (b, k)

    return fn


def compute_fishers(problem: MergeProblem, params: FisherParams) -> tuple[list[dict[str, Tensor]], int]:
    """Each expert's diagonal Fisher on its own task (only tensors on which the experts differ).

    Returns:
        (one name -> Fisher dict per expert, examples used per task).
    """
    module = work_module(problem)
    names = varying_names(problem.experts)
    g = torch.Generator().manual_seed(problem.seed)
    fishers, used = [], 0
    for i, sd in enumerate(problem.experts):
        load_state(module, sd)
        batches = draw(problem, i, labeled=params.mode == "empirical", batch_size=params.batch_size)
        f, _ = collect_fisher(
            module,
            batches,
            _log_probs(problem, i),
            mode=params.mode,
            micro_batch=params.micro_batch,
            names=names,
            generator=g,
            bf16=params.bf16,
            device=problem.device,
        )
        fishers.append(f)
        used = max(used, count(batches))
    return fishers, used


@register_model_method(
    "fisher",
    params=FisherParams,
    family="data",
    needs_base=True,
    paper="https://arxiv.org/abs/2111.09832",
    data="labeled",
    grid={"normalize": (False, True)},
)
def fisher(problem: MergeProblem, params: FisherParams) -> MergedModel:
    """Fisher merging: Fisher-weighted average of the experts (empirical or sampled diagonal Fisher)."""
    check_experts(problem)
    fishers, used = compute_fishers(problem, params)
    if params.normalize:
        fishers = normalize_fishers(fishers)
    merged = fisher_state_dict(problem.experts, fishers, eps=params.eps)
    return finish(problem, merged, used, labeled=params.mode == "empirical")
