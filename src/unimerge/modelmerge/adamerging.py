"""AdaMerging: learn task-arithmetic coefficients by minimising prediction entropy on unlabelled data.

Yang et al., ICLR 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning"
(https://arxiv.org/abs/2310.02575). The merged model is ``theta = theta_0 + sum_k lambda_k tau_k``
(task-wise: one ``lambda_k`` per task) or ``theta^l = theta_0^l + sum_k lambda_k^l tau_k^l``
(layer-wise: one coefficient per task and parameter tensor, as FusionBench's layer-wise AdaMerging
does). Coefficients start at ``init`` (the paper's 0.3), are trained with Adam to minimise the sum
over tasks of the mean Shannon entropy of each task head's predictions on that task's unlabelled
batches, and are clipped to ``[lower, upper]`` (the paper's ``[0, 1]``) after every step.

The forward pass is functional (:func:`torch.func.functional_call` on one frozen copy of the base):
the experts are held once as stacked task vectors and never copied per step. Only tensors some
expert changed get coefficients (the others equal the base in every merge). Data: ``problem.budget``
unlabelled training examples per task, cycled in batches of ``batch_size``; forward passes under bf16
autocast. Each step backpropagates one batch per task to detached copies of the merged tensors and
then the merge once. The defaults (100 steps of 8 examples per task, lr 5e-3) are a short budget
for 2 CPU cores; the paper trains 500 steps of 16 at lr 1e-3.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.func import functional_call

from unimerge.methods import Batch, MergedModel, MergeProblem, register_model_method
from unimerge.modelmerge.stats import autocast, check_experts, count, draw, finish, work_module

__all__ = [
    "AdaMergingParams",
    "AdaResult",
    "FunctionalView",
    "adamerge",
    "entropy",
    "entropy_step",
    "layer_wise_adamerging",
    "task_wise_adamerging",
]


class AdaMergingParams(BaseModel):
    """Parameters of ``task_wise_adamerging`` and ``layer_wise_adamerging``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int = Field(default=100, ge=0, le=10_000, description="Optimizer steps.")
    lr: float = Field(default=5e-3, gt=0.0, le=1.0, description="Adam learning rate.")
    init: float = Field(default=0.3, ge=-1.0, le=2.0, description="Initial coefficient.")
    lower: float = Field(default=0.0, ge=-1.0, le=2.0, description="Coefficients are clipped to >= lower.")
    upper: float = Field(default=1.0, ge=-1.0, le=2.0, description="Coefficients are clipped to <= upper.")
    batch_size: int = Field(default=8, ge=1, le=1024, description="Unlabelled examples per task per step.")
    bf16: bool = Field(default=True, description="bf16 autocast for forward passes.")

    @model_validator(mode="after")
    def _bounds(self) -> AdaMergingParams:
        if not self.lower <= self.init <= self.upper:
            raise ValueError(f"need lower <= init <= upper, got {self.lower}, {self.init}, {self.upper}")
        return self


@dataclass(frozen=True)
class AdaResult:
    """What :func:`adamerge` learned: coefficients ``(tensors or 1, n_models)``, names, entropy per step."""

    coefficients: Tensor
    names: list[str]
    history: list[float]
    state: dict[str, Tensor]
    examples: int


class FunctionalView(nn.Module):
    """Calls ``inner`` with some tensors replaced (``functional_call``); other attributes from ``inner``."""

    def __init__(self, inner: nn.Module, tensors: Mapping[str, Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_tensors", dict(tensors))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._inner, self._tensors, args, kwargs, strict=False)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_inner"), name)


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` over the batch: ``(b, k) -> ()``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def _merged(base: Mapping[str, Tensor], taus: Mapping[str, Tensor], lam: Tensor) -> dict[str, Tensor]:
    """``base + sum_k lam[j, k] tau_k`` for each name ``j`` (``lam`` is ``(1 or names, n)``)."""
    out = {}
    for j, (name, tau) in enumerate(taus.items()):
        row = lam[j if lam.shape[0] > 1 else 0]  # (n,)
        out[name] = base[name] + torch.tensordot(row, tau, dims=1)  # (*shape)
    return out


def entropy_step(
    problem: MergeProblem,
    module: nn.Module,
    merged: Mapping[str, Tensor],
    data: list[list[Batch]],
    step: int,
    bf16: bool,
) -> float:
    """Backpropagate the summed entropy of one batch per task into whatever ``merged`` was computed
    from (AdaMerging's coefficients, AdaRank's masks too); returns the summed entropy.

    Each task's backward stops at detached copies of the merged tensors, whose gradients add up;
    the merge itself is then backpropagated once per step (one task's activations held at a time).
    """
    leaves = {k: v.detach().requires_grad_() for k, v in merged.items()}
    view = FunctionalView(module, leaves)
    acc: dict[str, Tensor] = {}
    total = 0.0
    for t, batches in enumerate(data):
        with autocast(problem.device, bf16):
            loss = entropy(problem.logits(view, t, batches[step % len(batches)]))
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)  # heads get none
        for k, g in zip(leaves, grads, strict=True):
            if g is not None:
                acc[k] = acc[k] + g if k in acc else g
        total += float(loss.detach())
    if acc:
        torch.autograd.backward([merged[k] for k in acc], list(acc.values()))
    return total


def adamerge(
    problem: MergeProblem, params: AdaMergingParams, granularity: Literal["task", "layer"]
) -> AdaResult:
    """Train AdaMerging coefficients (see the module docstring) and return the merged state dict."""
    check_experts(problem, paired=False)
    module = work_module(problem)
    base = {k: v.to(problem.device) for k, v in module.state_dict().items()}
    names = [
        k
        for k, _ in module.named_parameters()
        if any(not torch.equal(sd[k].to(base[k].device), base[k]) for sd in problem.experts)
    ]
    taus = {
        k: torch.stack([sd[k].to(base[k]) - base[k] for sd in problem.experts]) for k in names
    }  # (n, *shape)
    rows = 1 if granularity == "task" else len(names)
    lam = torch.full((rows, len(problem.experts)), params.init, device=problem.device, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=params.lr)
    data = [draw(problem, t, labeled=False, batch_size=params.batch_size) for t in range(len(problem.tasks))]
    history = []
    for step in range(params.steps):
        opt.zero_grad(set_to_none=True)
        merged = _merged(base, taus, lam)
        history.append(entropy_step(problem, module, merged, data, step, params.bf16))
        opt.step()
        with torch.no_grad():
            lam.clamp_(params.lower, params.upper)
    with torch.no_grad():
        state = {**base, **_merged(base, taus, lam.detach())}
    return AdaResult(
        lam.detach().cpu(),
        names,
        history,
        {k: v.cpu() for k, v in state.items()},
        max(count(d) for d in data),
    )


def _finish(problem: MergeProblem, res: AdaResult) -> MergedModel:
    """The merged model, with the learned coefficients and the entropy at the first and last step."""
    merged = finish(problem, res.state, res.examples, labeled=False)
    lam = res.coefficients  # (1 or names, n)
    merged.details = {
        "coefficients_per_task": [round(float(v), 4) for v in lam.mean(dim=0)],
        "coefficients_range": [round(float(lam.min()), 4), round(float(lam.max()), 4)],
        "entropy_first_last": [round(res.history[0], 4), round(res.history[-1], 4)] if res.history else [],
    }
    return merged


_GRID: dict[str, tuple[Any, ...]] = {}  # one run at the defaults: each run is minutes of CPU on MiniLM


@register_model_method(
    "task_wise_adamerging",
    params=AdaMergingParams,
    family="data",
    needs_base=True,
    paper="https://arxiv.org/abs/2310.02575",
    data="unlabeled",
    grid=_GRID,
)
def task_wise_adamerging(problem: MergeProblem, params: AdaMergingParams) -> MergedModel:
    """Task-wise AdaMerging: one task-arithmetic coefficient per task, learned by entropy minimisation."""
    return _finish(problem, adamerge(problem, params, "task"))


@register_model_method(
    "layer_wise_adamerging",
    params=AdaMergingParams,
    family="data",
    needs_base=True,
    paper="https://arxiv.org/abs/2310.02575",
    data="unlabeled",
    grid=_GRID,
)
def layer_wise_adamerging(problem: MergeProblem, params: AdaMergingParams) -> MergedModel:
    """Layer-wise AdaMerging: one coefficient per task and parameter tensor, learned by entropy minimisation."""
    return _finish(problem, adamerge(problem, params, "layer"))
