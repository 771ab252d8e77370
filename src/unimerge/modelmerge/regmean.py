"""RegMean and RegMean++: closed-form merging of linear layers from their input Gram matrices.

RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models",
https://arxiv.org/abs/2212.09849): for each linear layer (``y = x W^T``), the merged weight minimises
``sum_i ||X_i W^T - X_i W_i^T||^2`` over the experts' own inputs ``X_i``, so
``W = (sum_i W_i G_i) (sum_i G_i)^-1`` with ``G_i = X_i^T X_i / rows`` (mean over the task's
non-padding tokens, as FusionBench computes it). ``alpha`` scales the Gram matrices' off-diagonal
entries (``G <- alpha G + (1 - alpha) diag(G)``, FusionBench's ``reduce_non_diagonal_ratio``).
All other tensors (biases, embeddings, norms) are averaged. Where ``sum_i G_i`` is singular the
solution is taken on its range and the remaining directions keep the average (``W = mean_i W_i +
(sum_i (W_i - mean W) G_i) (sum_i G_i)^+``, identical to the formula above when it is invertible).

RegMean++ (Nguyen et al. 2025, https://arxiv.org/abs/2508.03121; reference code
``nthehai01/RegMean-plusplus``): the same closed form, but merged block by block: the inputs of
block ``l`` come from the *merged* model's blocks ``< l`` (embeddings averaged first), and the Gram
matrices of block ``l``'s linear layers are collected by running expert ``i``'s block ``l`` on task
``i``'s merged-model activations. Blocks are the children of the largest ``nn.ModuleList`` /
``nn.Sequential`` in the module (``encoder.layer`` for BERT); tensors outside the blocks are averaged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import cast

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from unimerge.errors import PlanError
from unimerge.methods import Batch, MergedModel, MergeProblem, register_model_method
from unimerge.modelmerge.stats import (
    average_state,
    check_experts,
    collect_grams,
    count,
    draw,
    finish,
    linear_modules,
    load_state,
    varying_names,
    weight_name,
    work_module,
)

__all__ = [
    "RegMeanParams",
    "compute_grams",
    "find_blocks",
    "regmean",
    "regmean_merge",
    "regmean_plusplus",
    "regmean_state_dict",
    "scale_off_diagonal",
]


class RegMeanParams(BaseModel):
    """Parameters of ``regmean`` and ``regmean_plusplus``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    alpha: float = Field(default=0.95, ge=0.0, le=1.0, description="Scale of the Gram off-diagonals.")
    batch_size: int = Field(default=16, ge=1, le=1024, description="Examples per forward pass.")
    bf16: bool = Field(default=True, description="bf16 autocast for forward passes.")


def scale_off_diagonal(grams: Tensor, alpha: float) -> Tensor:
    """``alpha * G + (1 - alpha) * diag(G)`` on the last two dimensions: ``(..., d, d)``."""
    diag = torch.diag_embed(torch.diagonal(grams, dim1=-2, dim2=-1))  # (..., d, d)
    return alpha * grams + (1.0 - alpha) * diag


def regmean_merge(weights: Tensor, grams: Tensor, alpha: float = 1.0) -> Tensor:
    """RegMean's closed form for one linear layer (computed in float64).

    Args:
        weights: the experts' weights ``(n, out, in)`` (``y = x W^T``).
        grams: their input Gram matrices ``(n, in, in)``.
        alpha: scale of the Gram matrices' off-diagonal entries.

    Returns:
        ``(sum_i W_i G_i) (sum_i G_i)^-1``: ``(out, in)`` in ``weights``' dtype.
    """
    if weights.dim() != 3 or grams.shape != (weights.shape[0], weights.shape[2], weights.shape[2]):
        raise ValueError(
            f"regmean_merge needs weights (n, out, in) and grams (n, in, in); got "
            f"{tuple(weights.shape)} and {tuple(grams.shape)}"
        )
    g = scale_off_diagonal(grams.to(device=weights.device, dtype=torch.float64), alpha)  # (n, in, in)
    w = weights.to(torch.float64)  # (n, out, in)
    mean = w.mean(0)  # (out, in)
    rhs = torch.einsum("noi,nij->oj", w - mean, g)  # (out, in): sum_i (W_i - mean) G_i
    return (mean + _solve_right(rhs, g.sum(0))).to(weights.dtype)


def _solve_right(rhs: Tensor, gram: Tensor) -> Tensor:
    """``rhs @ gram^-1`` for a symmetric PSD ``gram``: Cholesky when it is positive definite, else the
    pseudo-inverse (directions without data get nothing)."""
    chol, info = torch.linalg.cholesky_ex(gram)  # (in, in)
    d = torch.diagonal(chol)
    if int(info) == 0 and float(d.min()) ** 2 > 1e-12 * float(d.max()) ** 2:  # well conditioned enough
        return torch.cholesky_solve(rhs.T, chol).T  # (out, in)
    return rhs @ cast(Tensor, torch.linalg.pinv(gram, hermitian=True))  # torch.linalg is untyped


def regmean_state_dict(
    experts: Sequence[Mapping[str, Tensor]], grams: Sequence[Mapping[str, Tensor]], alpha: float = 1.0
) -> dict[str, Tensor]:
    """RegMean on whole state dicts: tensors with a Gram in every expert's stats get the closed form,
    the other floating tensors the average, integer buffers expert 0's value."""
    out = average_state(experts)
    for k in grams[0]:
        if all(k in g for g in grams) and experts[0][k].dim() == 2:
            w = torch.stack([sd[k] for sd in experts])  # (n, out, in)
            out[k] = regmean_merge(w, torch.stack([g[k] for g in grams]), alpha).to(experts[0][k].dtype)
    return out


def _run(problem: MergeProblem) -> Callable[[nn.Module, Batch], Tensor]:
    def run(module: nn.Module, batch: Batch) -> Tensor:
        return problem.features(module, batch)

    return run


def compute_grams(problem: MergeProblem, params: RegMeanParams) -> tuple[list[dict[str, Tensor]], int]:
    """Each expert's Gram matrices on its own task's unlabelled data (layers the experts disagree on).

    Returns:
        (one ``"{layer}.weight"`` -> ``(in, in)`` dict per expert, examples used per task).
    """
    module = work_module(problem)
    varying = set(varying_names(problem.experts))
    layers = {n: m for n, m in linear_modules(module).items() if weight_name(n) in varying}
    grams, used = [], 0
    for i, sd in enumerate(problem.experts):
        load_state(module, sd)
        batches = draw(problem, i, labeled=False, batch_size=params.batch_size)
        grams.append(
            collect_grams(
                module, batches, _run(problem), layers=layers, bf16=params.bf16, device=problem.device
            )
        )
        used = max(used, count(batches))
    return grams, used


@register_model_method(
    "regmean",
    params=RegMeanParams,
    family="data",
    needs_base=True,
    paper="https://arxiv.org/abs/2212.09849",
    data="unlabeled",
    grid={"alpha": (0.7, 0.95)},
)
def regmean(problem: MergeProblem, params: RegMeanParams) -> MergedModel:
    """RegMean: per-layer least-squares merge of linear weights from input Gram matrices."""
    check_experts(problem)
    grams, used = compute_grams(problem, params)
    return finish(problem, regmean_state_dict(problem.experts, grams, params.alpha), used, labeled=False)


def find_blocks(module: nn.Module) -> tuple[str, list[nn.Module]]:
    """The model's sequence of blocks: children of its largest ``ModuleList``/``Sequential``.

    Returns:
        (the container's name, ``""`` for the module itself; its children in order).

    Raises:
        PlanError: no container with at least two children.
    """
    best: tuple[int, str, list[nn.Module]] | None = None
    for name, m in module.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2:
            size = sum(p.numel() for p in m.parameters())
            if best is None or size > best[0]:
                best = (size, name, list(m))
    if best is None:
        raise PlanError(
            f"regmean_plusplus merges block by block but {type(module).__name__} has no "
            "nn.ModuleList/nn.Sequential of blocks; use regmean instead."
        )
    return best[1], best[2]


@register_model_method(
    "regmean_plusplus",
    params=RegMeanParams,
    family="data",
    needs_base=True,
    paper="https://arxiv.org/abs/2508.03121",
    data="unlabeled",
    grid={"alpha": (0.7, 0.95)},
)
def regmean_plusplus(problem: MergeProblem, params: RegMeanParams) -> MergedModel:
    """RegMean++: RegMean block by block, each block's inputs from the already-merged blocks."""
    check_experts(problem)
    module = work_module(problem)
    merged = average_state(problem.experts)
    load_state(module, merged)
    prefix, blocks = find_blocks(module)
    varying = set(varying_names(problem.experts))
    data = [
        draw(problem, i, labeled=False, batch_size=params.batch_size) for i in range(len(problem.experts))
    ]
    for idx, block in enumerate(blocks):
        start = f"{prefix}.{idx}." if prefix else f"{idx}."
        names = [k for k in merged if k.startswith(start)]
        layers = {n: m for n, m in linear_modules(module, within=block).items() if weight_name(n) in varying}
        if not layers:
            continue
        grams = []
        for i, sd in enumerate(problem.experts):
            load_state(module, {k: sd[k] for k in names}, strict=False)  # expert i's block, merged prefix
            grams.append(
                collect_grams(
                    module,
                    data[i],
                    _run(problem),
                    layers=layers,
                    stop_after=block,
                    bf16=params.bf16,
                    device=problem.device,
                )
            )
        for k in grams[0]:
            w = torch.stack([sd[k] for sd in problem.experts])  # (n, out, in)
            merged[k] = regmean_merge(w, torch.stack([g[k] for g in grams]), params.alpha).to(merged[k].dtype)
        load_state(module, {k: merged[k] for k in names}, strict=False)
    return finish(problem, merged, max(count(d) for d in data), labeled=False)
