"""TSV-C: each task keeps the top singular triplets of its layer task matrices; one compressed model per task.

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025,
https://arxiv.org/abs/2412.00081 (code: github.com/AntoAndGar/task_singular_vectors). TSV-Compress
replaces every 2-D task matrix ``Delta_t = theta_t - theta_0`` by its rank-``k`` truncation
``U_k diag(s_k) V_k^T`` (``k = rank_fraction * min(m, n)``, at least one; the paper's default
``1/T`` stores all ``T`` tasks in the space of one task vector); tensors that are not matrices (biases,
norms) keep their full task vector. Task ``t`` is then evaluated with its own model
``theta_0 + Delta_t^(k)``, so the method needs no data but the task identity at inference.

The factors come from :func:`unimerge.methods.subspace.tsv_compress`. Each task's module
(:class:`CompressedTask`) stores only its factors and shares the pretrained module: it rebuilds the
changed tensors on every forward (``functional_call``), so ``params_total`` counts what must be
stored: the pretrained model once plus ``r (m + n + 1)`` numbers per task and matrix (and the dense
task vectors of the other changed tensors). Tensors no expert changed cost nothing. The shared
``module`` of the result is the pretrained model (TSV-C has no merged model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.func import functional_call

from unimerge.methods import MergedModel, MergeProblem, register_model_method
from unimerge.methods.subspace import TSVFactors, tsv_compress
from unimerge.modelmerge._moe import count_params
from unimerge.modelmerge.stats import check_experts, work_module

__all__ = ["CompressedTask", "TaskFactors", "TsvCParams", "compress_experts", "tsv_c"]


class TsvCParams(BaseModel):
    """TSV-C parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rank_fraction: float | None = Field(
        default=None, gt=0.0, le=1.0, description="fraction of min(m, n) kept per task and matrix; None: 1/T"
    )


class TaskFactors(nn.Module):
    """One task's compressed task vector of one tensor: ``u (m, r)``, ``s (r,)``, ``vh (r, n)`` or ``dense``."""

    def __init__(self, factors: TSVFactors, task: int) -> None:
        super().__init__()
        self.dense: Tensor | None
        if factors.dense is not None:
            self.register_buffer("dense", factors.dense[task].clone())
            return
        u, s, vh = factors.factors()
        self.dense = None
        self.register_buffer("u", u[task].clone())  # (m, r)
        self.register_buffer("s", s[task].clone())  # (r,)
        self.register_buffer("vh", vh[task].clone())  # (r, n)

    def delta(self) -> Tensor:
        """The compressed task vector: ``U_r diag(s_r) V_r^T`` ``(m, n)``, or the dense one."""
        if self.dense is not None:
            return self.dense
        u, s, vh = self.get_buffer("u"), self.get_buffer("s"), self.get_buffer("vh")
        return (u * s) @ vh


class CompressedTask(nn.Module):
    """The shared pretrained ``base`` plus one task's factors: ``theta_0 + Delta_t^(k)`` at every forward."""

    def __init__(self, base: nn.Module, factors: Mapping[str, TaskFactors]) -> None:
        super().__init__()
        self.base = base
        self.factors = nn.ModuleList(factors.values())  # registered: moved, saved and counted with the task
        self.parts = dict(factors)  # the same modules, typed, by tensor name
        self.config = getattr(base, "config", None)

    def tensors(self) -> dict[str, Tensor]:
        """The changed tensors of this task's model, by state-dict name (dtypes as in the base)."""
        state = self.base.state_dict()
        return {
            name: (state[name].float() + f.delta()).to(state[name].dtype) for name, f in self.parts.items()
        }

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.base, self.tensors(), args, kwargs, strict=False)


def _changed(base: Mapping[str, Tensor], experts: list[Mapping[str, Tensor]]) -> list[str]:
    """Floating tensors of ``base`` that some expert changed."""
    return [
        k
        for k, v in base.items()
        if v.is_floating_point() and any(not torch.equal(e[k].to(v.device), v) for e in experts)
    ]


def compress_experts(problem: MergeProblem, rank_fraction: float | None) -> dict[str, TSVFactors]:
    """TSV-C factors of every changed tensor, by name (tasks stacked in the problem's order)."""
    base = {k: v.detach() for k, v in problem.base.state_dict().items()}
    experts = list(problem.experts)
    out = {}
    for name in _changed(base, experts):
        b = base[name].float()
        deltas = torch.stack([e[name].to(b.device).float() - b for e in experts])  # (n, *shape)
        out[name] = tsv_compress(deltas, rank_fraction)
    return out


def _storage_ratio(compressed: Mapping[str, TSVFactors]) -> float:
    """Numbers stored for all tasks over the numbers of their dense task vectors (changed tensors)."""
    stored = sum(f.stored_numbers for f in compressed.values())
    dense = sum(f.n_tasks * int(torch.Size(f.shape).numel()) for f in compressed.values())
    return stored / dense if dense else 0.0


@register_model_method(
    "tsv_c",
    params=TsvCParams,
    family="subspace",
    needs_base=True,
    paper="https://arxiv.org/abs/2412.00081",
    data="none",
)
def tsv_c(problem: MergeProblem, params: TsvCParams) -> MergedModel:
    """TSV-C: per task, the top singular triplets of each layer task matrix; each task its own model."""
    check_experts(problem, paired=True)
    base = work_module(problem)
    compressed = compress_experts(problem, params.rank_fraction)
    modules: dict[str, nn.Module] = {}
    for i, task in enumerate(problem.tasks):
        factors = {name: TaskFactors(f, i) for name, f in compressed.items()}
        modules[task.name] = CompressedTask(base, factors).to(problem.device)
    ranks = {name: int(f.s.shape[-1]) for name, f in compressed.items() if f.s is not None}
    return MergedModel(
        module=base,
        examples_used=0,
        labeled=False,
        task_modules=modules,
        params_total=count_params(base, *modules.values()),
        details={
            "storage_ratio": round(_storage_ratio(compressed), 6),
            "rank_range": [min(ranks.values()), max(ranks.values())] if ranks else [],
        },
    )
