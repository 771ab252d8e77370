"""WEMoE: weight-ensembling mixture of experts (Tang et al., ICML 2024).

"Merging Multi-Task Models via Weight-Ensembling Mixture of Experts", https://arxiv.org/abs/2402.00433
(reference code: FusionBench ``models/we_moe.py``, ``method/we_moe``).

The MLP linears of each block become :class:`WEMoELinear` s whose weights are built per input:
``W(x) = W_0 + sum_i r_i(x) tau_i`` (``tau_i`` the task vectors of that layer). The router of a block
is the paper's two-layer MLP (``d -> d -> n``, ReLU; bias of the output layer initialised to
``init_lambda``, weights ~ N(0, 0.01)); it reads the hidden states entering the block (the input of the
block's first target linear), and its outputs are averaged over tokens, so each example gets one
weight vector for the whole block. Every other tensor is merged by task arithmetic (``lambda``). The
routers are trained at test time by minimising the entropy of every task head's predictions on
unlabeled batches (Adam), the only parameters that move. As in the reference code, training mixes
each (single-task) batch with its mean routing weights (one weight matrix per batch, cheap); after
training every example gets its own mixture.

Targets are grouped into blocks by the regular expression ``group`` (default: the name up to the
first numeric component, ``encoder.layer.3``); a group's first target in module order is its entry
(it owns the router and must run first in the forward pass: ``intermediate.dense`` before
``output.dense``, ``gate_proj`` before ``up_proj``/``down_proj``).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from unimerge.errors import MergeError
from unimerge.methods import MergedModel, MergeProblem, register_model_method
from unimerge.modelmerge._moe import (
    MLP_TARGETS,
    backward,
    count_params,
    cycle_batches,
    dense_copy,
    frozen_heads,
    linear_at,
    match_linears,
    record_method,
    replace_module,
    task_arithmetic_state,
    task_vectors,
)
from unimerge.modelmerge.stats import autocast

__all__ = ["WEMoELinear", "WEMoEParams", "entropy", "link_groups", "routing_summary", "wemoe"]


class WEMoEParams(BaseModel):
    """WEMoE's hyperparameters (paper defaults scaled to small unlabeled budgets)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)
    lambda_: float = Field(
        default=0.3,
        alias="lambda",
        ge=0.0,
        le=10.0,
        description="task-arithmetic scaling of the non-MLP tensors",
    )
    init_lambda: float = Field(default=0.3, ge=-10.0, le=10.0, description="initial routing weight")
    steps: int = Field(default=40, ge=0, le=100000, description="router training steps")
    lr: float = Field(default=1e-3, gt=0.0, le=1.0, description="Adam learning rate")
    batch_size: int = Field(default=16, ge=1, le=4096, description="examples per task per step")
    targets: tuple[str, ...] = Field(
        default=MLP_TARGETS, min_length=1, max_length=32, description="regexes of the MLP nn.Linear names"
    )
    group: str = Field(
        default=r"^(.*?\.\d+)\.",
        min_length=1,
        max_length=200,
        description="regex whose first group names a target's block",
    )
    bf16: bool = Field(default=True, description="bf16 autocast during training")


class _Route:
    """The routing weights of one block, shared by its linears during one forward pass."""

    def __init__(self) -> None:
        self.weights: Tensor | None = None


class WEMoELinear(nn.Module):
    """A linear layer whose weight is ``W_0 + sum_i r_i tau_i`` with per-example router weights."""

    kind: ClassVar[str] = "wemoe_linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n: int,
        bias: bool,
        group: str,
        entry: bool,
        init_lambda: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.n = in_features, out_features, n
        self.group, self.entry, self.init_lambda = group, entry, init_lambda
        self.weight = nn.Parameter(torch.zeros(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.tau_weight = nn.Parameter(torch.zeros(n, out_features, in_features), requires_grad=False)
        self.tau_bias = nn.Parameter(torch.zeros(n, out_features), requires_grad=False) if bias else None
        self.router = _make_router(in_features, n, init_lambda) if entry else None
        self.route = _Route()
        self.batch_reduce = False  # True: mix by the batch's mean routing weights (cheap; used in training)

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "n": self.n,
            "bias": self.bias is not None,
            "group": self.group,
            "entry": self.entry,
            "init_lambda": self.init_lambda,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> WEMoELinear:
        return cls(**cfg)

    def _weights(self, x: Tensor) -> Tensor:
        if self.router is not None:  # the block's entry linear
            w = cast(Tensor, self.router(x))  # (b, *tokens, n)
            if w.dim() > 2:
                w = w.mean(dim=tuple(range(1, w.dim() - 1)))  # (b, n)
            self.route.weights = w
            return w
        shared = self.route.weights
        if shared is None or shared.shape[0] != x.shape[0]:
            raise MergeError(
                f"WEMoE block {self.group!r}: a non-entry linear ran before the block's router; the group's "
                "first target in module order must be the first one called (check `targets`/`group`)."
            )
        return shared

    def forward(self, x: Tensor) -> Tensor:
        w = self._weights(x)  # (b, n)
        dtype = x.dtype
        if self.batch_reduce:  # one weight for the whole batch (training, as the reference code)
            wm = w.mean(0).to(dtype)  # (n,)
            weight = self.weight.to(dtype) + torch.tensordot(wm, self.tau_weight.to(dtype), dims=1)
            bias = None
            if self.bias is not None and self.tau_bias is not None:  # both present or both absent
                bias = self.bias.to(dtype) + wm @ self.tau_bias.to(dtype)
            return F.linear(x, weight, bias)
        tau_t = self.tau_weight.to(dtype).transpose(1, 2).reshape(self.n, -1)  # (n, in * out)
        delta_t = (w.to(dtype) @ tau_t).view(-1, self.in_features, self.out_features)  # (b, in, out)
        xs = x.reshape(x.shape[0], -1, self.in_features)  # (b, m, in)
        out = F.linear(xs, self.weight.to(dtype)) + torch.bmm(xs, delta_t.to(xs.dtype))  # (b, m, out)
        if self.bias is not None and self.tau_bias is not None:
            out = out + (self.bias.to(dtype) + w.to(dtype) @ self.tau_bias.to(dtype)).unsqueeze(1)
        return out.reshape(*x.shape[:-1], self.out_features)


def _make_router(d: int, n: int, init_lambda: float) -> nn.Sequential:
    hidden, out = nn.Linear(d, d), nn.Linear(d, n)
    router = nn.Sequential(hidden, nn.ReLU(), out)
    with torch.no_grad():
        for layer, bias in ((hidden, 0.0), (out, init_lambda)):
            layer.weight.normal_(0.0, 0.01)
            layer.bias.fill_(bias)
    return router


def link_groups(module: nn.Module) -> None:
    """Let the linears of each block share one routing slot (after building or loading a model).

    Raises:
        MergeError: a block has no entry linear or more than one.
    """
    groups: dict[str, list[WEMoELinear]] = {}
    for m in module.modules():
        if isinstance(m, WEMoELinear):
            groups.setdefault(m.group, []).append(m)
    for name, layers in groups.items():
        if sum(m.entry for m in layers) != 1:
            raise MergeError(f"WEMoE block {name!r} must have exactly one entry linear")
        route = _Route()
        for m in layers:
            m.route = route


def _group_of(name: str, pattern: str) -> str:
    found = re.search(pattern, name)
    return found.group(1) if found and found.groups() else name


def _build(problem: MergeProblem, params: WEMoEParams) -> nn.Module:
    base_sd, tvs = task_vectors(problem)
    module = dense_copy(problem.base, task_arithmetic_state(base_sd, tvs, params.lambda_))
    seen: set[str] = set()
    for name in match_linears(module, params.targets):
        group = _group_of(name, params.group)
        linear = linear_at(problem.base, name)
        layer = WEMoELinear(
            linear.in_features,
            linear.out_features,
            len(tvs),
            linear.bias is not None,
            group,
            group not in seen,
            params.init_lambda,
        )
        seen.add(group)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            layer.tau_weight.copy_(torch.stack([tv[f"{name}.weight"] for tv in tvs]))
            if layer.bias is not None and layer.tau_bias is not None and linear.bias is not None:
                layer.bias.copy_(linear.bias)
                layer.tau_bias.copy_(torch.stack([tv[f"{name}.bias"] for tv in tvs]))
        replace_module(module, name, layer)
    link_groups(module)
    return module


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy of ``softmax(logits)`` over the batch: ``(b, k) -> ()``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def train_routers(module: nn.Module, problem: MergeProblem, params: WEMoEParams) -> list[float]:
    """Test-time adaptation: Adam on the routers, minimising the heads' entropy. Returns the step losses."""
    routers = [
        p
        for m in module.modules()
        if isinstance(m, WEMoELinear) and m.router is not None  # entry linears own the routers
        for p in m.router.parameters()
    ]
    for p in routers:
        p.requires_grad_(True)
    layers = [m for m in module.modules() if isinstance(m, WEMoELinear)]
    for m in layers:
        m.batch_reduce = True  # training batches come from one task: one mixture per batch
    heads = frozen_heads(problem)
    optim = torch.optim.Adam(routers, lr=params.lr)
    streams = [
        cycle_batches(t, problem.budget, params.batch_size, problem.seed, problem.device)
        for t in problem.tasks
    ]
    losses = []  # the module stays in eval mode: no dropout noise in the entropy objective
    for _ in range(params.steps):
        total = 0.0
        for task, stream in zip(problem.tasks, streams, strict=True):
            with autocast(problem.device, params.bf16):
                loss = entropy(heads[task.name](problem.features(module, next(stream))))
            backward(loss)  # accumulate over tasks (one graph in memory at a time)
            total += float(loss.detach())
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(total / len(streams))
    for p in routers:
        p.requires_grad_(False)
    for m in layers:
        m.batch_reduce = False  # inference: every example gets its own mixture
    return losses


@register_model_method(
    "wemoe",
    params=WEMoEParams,
    family="moe",
    needs_base=True,
    paper="https://arxiv.org/abs/2402.00433",
    data="unlabeled",
    grid={"lambda": (0.3,)},
)
def wemoe(problem: MergeProblem, params: WEMoEParams) -> MergedModel:
    """WEMoE: MLP weights mixed per example by routers trained to minimise prediction entropy."""
    with torch.random.fork_rng():  # seeds the routers' N(0, 0.01) initialisation only
        torch.manual_seed(problem.seed)
        module = _build(problem, params).to(problem.device)
    losses = train_routers(module, problem, params)
    record_method(module, "wemoe", params.model_dump(mode="json", by_alias=True))
    used = min(problem.budget, params.steps * params.batch_size)
    details = {
        "entropy_first_last": [round(losses[0], 4), round(losses[-1], 4)] if losses else [],
        "routing_mean_per_task": routing_summary(module, problem, params.batch_size),
    }
    return MergedModel(
        module=module, examples_used=used, labeled=False, params_total=count_params(module), details=details
    )


@torch.no_grad()
def routing_summary(module: nn.Module, problem: MergeProblem, batch_size: int) -> dict[str, list[float]]:
    """Task name -> routing weight per expert, averaged over blocks and one batch of that task's data."""
    entries = [m for m in module.modules() if isinstance(m, WEMoELinear) and m.entry]
    out = {}
    for task in problem.tasks:
        batch = next(cycle_batches(task, problem.budget, batch_size, problem.seed, problem.device))
        problem.features(module, batch)
        mean = torch.stack([_routed(m).float().mean(0) for m in entries]).mean(0)  # (n,)
        out[task.name] = [round(float(v), 3) for v in mean]
    return out


def _routed(entry: WEMoELinear) -> Tensor:
    """The routing weights ``(b, n)`` the entry linear ``entry`` computed in the last forward pass."""
    if entry.route.weights is None:
        raise MergeError(f"WEMoE block {entry.group!r}: the features pass did not run its entry linear")
    return entry.route.weights
