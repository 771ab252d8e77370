"""Representation Surgery (Yang et al., ICML 2024).

"Representation Surgery for Multi-Task Model Merging", https://arxiv.org/abs/2402.02705
(official code: ``EnnengYang/RepresentationSurgery``; also FusionBench).

The merged model (task arithmetic, ``lambda``) is shared; each task gets a light module on its
representation, ``z -> z - W_up ReLU(W_down z)`` (rank ``rank``; ``W_up`` starts at zero, so training
starts from the merged model), trained with Adam to minimise the L1 distance between the merged
model's surgered features and the task expert's features on a few unlabeled examples. The module acts
on every token of the model's last hidden state (or on its output tensor), before the features are
read, so it works with any ``features`` function that reads that output.

Training is cheap: the frozen merged model's outputs and the experts' features are computed once per
batch; only the small surgery modules see gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from unimerge.errors import MergeError
from unimerge.methods import Batch, MergedModel, MergeProblem, register_model_method
from unimerge.modelmerge._moe import (
    backward,
    count_params,
    dense_copy,
    record_method,
    task_arithmetic_state,
    task_vectors,
    to_device,
)
from unimerge.modelmerge.stats import autocast

__all__ = [
    "SurgeryAdapter",
    "SurgeryModule",
    "SurgeryParams",
    "feature_distance",
    "replace_hidden",
    "surgery",
    "train_adapter",
]

Row = tuple[Batch, Any, Tensor]  # (batch, the merged model's output on it, the expert's features (b, d))


class SurgeryParams(BaseModel):
    """Representation Surgery's hyperparameters."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)
    lambda_: float = Field(
        default=0.3, alias="lambda", ge=0.0, le=10.0, description="task-arithmetic scaling"
    )
    rank: int = Field(default=16, ge=1, le=4096, description="rank of each surgery module")
    steps: int = Field(default=200, ge=0, le=100000, description="Adam steps per task")
    lr: float = Field(default=1e-3, gt=0.0, le=1.0, description="Adam learning rate")
    batch_size: int = Field(default=16, ge=1, le=4096, description="examples per step")
    bf16: bool = Field(default=True, description="bf16 autocast for the feature passes")


class SurgeryAdapter(nn.Module):
    """``z -> z - up(relu(down(z)))`` on the last dimension."""

    def __init__(self, d: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(d, rank, bias=False)
        self.up = nn.Linear(rank, d, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, z: Tensor) -> Tensor:
        return z - cast(Tensor, self.up(F.relu(self.down(z))))


def replace_hidden(out: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``out`` with its last hidden state (``last_hidden_state``, first tuple item or the tensor) mapped by ``fn``."""
    if isinstance(out, Tensor):
        return fn(out)
    if hasattr(out, "last_hidden_state"):
        return type(out)(**{**out, "last_hidden_state": fn(out.last_hidden_state)})
    if isinstance(out, tuple):
        return (fn(out[0]), *out[1:])
    raise TypeError(f"representation surgery cannot find the hidden states in a {type(out).__name__} output")


class SurgeryModule(nn.Module):
    """The shared merged ``model`` followed by one task's :class:`SurgeryAdapter` on its output."""

    kind: ClassVar[str] = "surgery"

    def __init__(self, model: nn.Module, d: int, rank: int) -> None:
        super().__init__()
        self.model, self.d, self.rank = model, d, rank
        self.adapter = SurgeryAdapter(d, rank)
        self.config = getattr(model, "config", None)

    def wrapper_config(self) -> dict[str, Any]:
        return {"d": self.d, "rank": self.rank}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return replace_hidden(self.model(*args, **kwargs), lambda h: self.adapter(h.float()))  # float32 out


class _Replay(nn.Module):
    """Returns a stored output whatever it is called with (the frozen merged model, computed once)."""

    def __init__(self) -> None:
        super().__init__()
        self.output: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def _hidden_dim(out: Any) -> int:
    dims: list[int] = []

    def record(h: Tensor) -> Tensor:
        dims.append(h.shape[-1])
        return h

    replace_hidden(out, record)
    return dims[0]


@torch.no_grad()
def _targets(problem: MergeProblem, merged: nn.Module, task: int, params: SurgeryParams) -> list[Row]:
    """(batch, merged output, expert features) for the task's unlabeled batches."""
    state = {**problem.base.state_dict(), **problem.experts[task]}
    expert = dense_copy(problem.base, state).to(problem.device)
    grab: list[Any] = []
    hook = merged.register_forward_hook(lambda _m, _a, out: grab.append(out))
    rows: list[Row] = []
    try:
        for batch in problem.tasks[task].unlabeled(
            problem.budget, batch_size=params.batch_size, seed=problem.seed
        ):
            batch = to_device(batch, problem.device)
            with autocast(problem.device, params.bf16):
                problem.features(merged, batch)
                target = problem.features(expert, batch).float()
            rows.append((batch, grab.pop(), target))
    finally:
        hook.remove()
    if not rows:
        raise MergeError(
            f"task {problem.tasks[task].name!r} yielded no unlabeled examples (budget {problem.budget})"
        )
    return rows


def train_adapter(
    problem: MergeProblem, rows: list[Row], module: SurgeryModule, params: SurgeryParams
) -> list[float]:
    """Adam on ``module.adapter``: L1 between surgered merged features and expert features. Returns losses."""
    replay = _Replay()
    stand_in = SurgeryModule(replay, module.d, module.rank)
    stand_in.adapter = module.adapter
    module.adapter.requires_grad_(True)
    optim = torch.optim.Adam(module.adapter.parameters(), lr=params.lr)
    losses = []
    for step in range(params.steps):
        batch, out, target = rows[step % len(rows)]
        replay.output = out
        loss = F.l1_loss(problem.features(stand_in, batch).float(), target)
        backward(loss)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    module.adapter.requires_grad_(False)
    return losses


def feature_distance(problem: MergeProblem, rows: list[Row], adapter: SurgeryAdapter) -> float:
    """Mean L1 distance between the surgered merged features (``adapter``) and the expert's, over ``rows``."""
    replay = _Replay()
    stand_in = SurgeryModule(replay, adapter.up.out_features, adapter.down.out_features)
    stand_in.adapter = adapter
    total = 0.0
    with torch.no_grad():
        for batch, out, target in rows:
            replay.output = out
            total += float(F.l1_loss(problem.features(stand_in, batch).float(), target))
    return total / max(len(rows), 1)


@register_model_method(
    "surgery",
    params=SurgeryParams,
    family="data",
    needs_base=True,
    paper="https://arxiv.org/abs/2402.02705",
    data="unlabeled",
    grid={"lambda": (0.3,)},
)
def surgery(problem: MergeProblem, params: SurgeryParams) -> MergedModel:
    """Representation Surgery: task arithmetic plus a per-task low-rank fix of the features."""
    base_sd, tvs = task_vectors(problem)
    merged = dense_copy(problem.base, task_arithmetic_state(base_sd, tvs, params.lambda_)).to(problem.device)
    modules: dict[str, nn.Module] = {}
    used = 0
    with torch.random.fork_rng():  # seeds the adapters' initialisation only
        torch.manual_seed(problem.seed)
        for i, task in enumerate(problem.tasks):
            rows = _targets(problem, merged, i, params)
            used = max(used, sum(int(next(iter(b.values())).shape[0]) for b, _, _ in rows))
            module = SurgeryModule(merged, _hidden_dim(rows[0][1]), params.rank).to(problem.device)
            train_adapter(problem, rows, module, params)
            modules[task.name] = module
    record_method(merged, "surgery", params.model_dump(mode="json", by_alias=True))
    total = count_params(merged, *modules.values())
    return MergedModel(
        module=merged, examples_used=used, labeled=False, task_modules=modules, params_total=total
    )
