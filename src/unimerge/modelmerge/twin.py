"""Twin-Merging: shared knowledge merged, exclusive knowledge compressed and routed (Lu et al., NeurIPS 2024).

"Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging",
https://arxiv.org/abs/2406.15479 (official code: ``LZY-the-boys/Twin-Merging``).

- Shared expert: task arithmetic ``theta* = theta_0 + lambda sum_i tau_i``.
- Exclusive knowledge of task ``i``: ``theta_i - theta*`` on every target ``nn.Linear``, compressed to
  rank ``rank`` by SVD (0: exact); bias differences are kept exactly. Other tensors (embeddings,
  layer norms) stay shared.
- Router: as in the official code, an MLP on the mean of the shared model's last hidden states (over
  real tokens) predicts which task an input comes from; it is trained with cross-entropy on task
  identities of a few unlabeled examples per task (no class labels).
- Inference: one pass of the shared model gives the router's features; ``w = softmax(router)``; a
  second pass runs ``theta* + sum_i w_i (theta_i - theta*)`` per example (the low-rank parts are added
  to each target layer's output, so nothing is materialised per example).
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from unimerge.errors import MergeError
from unimerge.methods import MergedModel, MergeProblem, register_model_method
from unimerge.modelmerge._moe import (
    ALL_LINEARS,
    LowRankExperts,
    backward,
    count_params,
    dense_copy,
    linear_at,
    match_linears,
    record_method,
    replace_module,
    task_arithmetic_state,
    task_vectors,
    to_device,
)
from unimerge.modelmerge.stats import autocast

__all__ = ["Standardize", "TwinLinear", "TwinModel", "TwinParams", "pooled_output", "twin_merging"]


class TwinParams(BaseModel):
    """Twin-Merging's hyperparameters."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)
    lambda_: float = Field(default=0.3, alias="lambda", ge=0.0, le=10.0, description="shared-expert scaling")
    rank: int = Field(default=32, ge=0, le=16384, description="rank of each exclusive part (0: exact)")
    targets: tuple[str, ...] = Field(
        default=ALL_LINEARS,
        min_length=1,
        max_length=32,
        description="regexes of the nn.Linear names with exclusive parts",
    )
    router_hidden: int = Field(default=256, ge=1, le=65536, description="router MLP width")
    router_steps: int = Field(default=300, ge=0, le=100000, description="router training steps (full batch)")
    router_lr: float = Field(default=1e-3, gt=0.0, le=1.0, description="router Adam learning rate")
    batch_size: int = Field(default=32, ge=1, le=4096, description="batch size of the feature pass")
    bf16: bool = Field(default=True, description="bf16 autocast for the feature pass")


class TwinLinear(nn.Module):
    """The shared linear layer plus exclusive low-rank parts, mixed with the weights in ``route``."""

    kind: ClassVar[str] = "twin_linear"

    def __init__(self, in_features: int, out_features: int, n: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.n, self.rank = in_features, out_features, n, rank
        self.weight = nn.Parameter(torch.zeros(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.experts = LowRankExperts(n, rank, in_features, out_features, bias)
        self.route: Tensor | None = None  # (b, n) during a routed pass, else None (shared model only)

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "n": self.n,
            "rank": self.rank,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> TwinLinear:
        return cls(**cfg)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.route is None:
            return out
        w = self.route.reshape(x.shape[0], *([1] * (x.dim() - 2)), self.n)  # (b, 1.., n)
        return out + cast(Tensor, self.experts(x, w)).to(out.dtype)


def pooled_output(out: Any, attention_mask: Tensor | None) -> Tensor:
    """The router's features: the (masked) token mean of a model's last hidden states, ``(b, d)``."""
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    h = h[0] if isinstance(h, tuple) else h
    if not isinstance(h, Tensor):
        raise TypeError(f"the router cannot find the hidden states in a {type(out).__name__} output")
    if h.dim() == 2:
        return h
    if attention_mask is not None and h.dim() == 3:
        mask = attention_mask.unsqueeze(-1).to(h.dtype)  # (b, t, 1)
        return (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return h.mean(dim=tuple(range(1, h.dim() - 1)))


class Standardize(nn.Module):
    """``(x - mean) / std`` with statistics fitted once on the router's training features."""

    mean: Tensor  # (d,) buffer
    std: Tensor  # (d,) buffer

    def __init__(self, d: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        self.mean.copy_(x.mean(0))
        self.std.copy_(
            x.std(0, unbiased=False).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones_like(self.std)
        )

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class TwinModel(nn.Module):
    """The shared model with exclusive parts and a task router (see the module docstring)."""

    kind: ClassVar[str] = "twin"

    def __init__(self, model: nn.Module, d: int, n: int, hidden: int) -> None:
        super().__init__()
        self.model, self.d, self.n, self.hidden = model, d, n, hidden
        self.router = nn.Sequential(Standardize(d), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, n))
        self.config = getattr(model, "config", None)
        self.capture: list[Tensor] | None = (
            None  # when a list: forward records features, returns shared output
        )

    def wrapper_config(self) -> dict[str, Any]:
        return {"d": self.d, "n": self.n, "hidden": self.hidden}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            shared = self.model(*args, **kwargs)
            feats = pooled_output(shared, kwargs.get("attention_mask")).float()  # (b, d)
        if self.capture is not None:
            self.capture.append(feats)
            return shared
        return self.forward_with_weights(torch.softmax(self.router(feats), dim=-1), *args, **kwargs)

    def forward_with_weights(self, weights: Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run ``theta* + sum_i weights[:, i] (theta_i - theta*)`` per example; ``weights`` is ``(b, n)``."""
        layers = [m for m in self.model.modules() if isinstance(m, TwinLinear)]
        for m in layers:
            m.route = weights
        try:
            return self.model(*args, **kwargs)
        finally:
            for m in layers:
                m.route = None


def _build(problem: MergeProblem, params: TwinParams) -> nn.Module:
    base_sd, tvs = task_vectors(problem)
    shared_sd = task_arithmetic_state(base_sd, tvs, params.lambda_)
    module = dense_copy(problem.base, shared_sd)
    for name in match_linears(module, params.targets):
        linear = linear_at(module, name)
        shared_w = shared_sd[f"{name}.weight"].float()
        dw = torch.stack([base_sd[f"{name}.weight"].float() + tv[f"{name}.weight"] - shared_w for tv in tvs])
        db = None
        if linear.bias is not None:
            shared_b = shared_sd[f"{name}.bias"].float()
            db = torch.stack([base_sd[f"{name}.bias"].float() + tv[f"{name}.bias"] - shared_b for tv in tvs])
        experts = LowRankExperts.from_deltas(dw, db, params.rank)
        layer = TwinLinear(
            linear.in_features, linear.out_features, len(tvs), experts.down.shape[1], db is not None
        )
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if layer.bias is not None and linear.bias is not None:  # both present exactly when db is
                layer.bias.copy_(linear.bias)
        layer.experts = experts
        replace_module(module, name, layer)
    return module


def router_data(twin: TwinModel, problem: MergeProblem, params: TwinParams) -> tuple[Tensor, Tensor]:
    """Shared-model features ``(m, d)`` and task ids ``(m,)`` of up to ``budget`` unlabeled examples per task."""
    feats, ids = [], []
    twin.capture = []
    try:
        for i, task in enumerate(problem.tasks):
            for batch in task.unlabeled(problem.budget, batch_size=params.batch_size, seed=problem.seed):
                with torch.no_grad(), autocast(problem.device, params.bf16):
                    problem.features(twin, to_device(batch, problem.device))
                got = twin.capture.pop()
                feats.append(got)
                ids.append(torch.full((got.shape[0],), i, dtype=torch.long, device=got.device))
    finally:
        twin.capture = None
    return torch.cat(feats), torch.cat(ids)


def train_router(router: nn.Sequential, feats: Tensor, ids: Tensor, params: TwinParams) -> list[float]:
    """Full-batch Adam on cross-entropy of task ids (after fitting the input standardisation). Returns losses.

    Raises:
        MergeError: ``router`` does not start with a :class:`Standardize` layer.
    """
    standardize = router[0]
    if not isinstance(standardize, Standardize):
        raise MergeError(
            f"the Twin-Merging router must start with Standardize, not {type(standardize).__name__}"
        )
    standardize.fit(feats)
    router.requires_grad_(True)
    optim = torch.optim.Adam(router.parameters(), lr=params.router_lr)
    losses = []
    for _ in range(params.router_steps):
        loss = F.cross_entropy(router(feats), ids)
        backward(loss)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    router.requires_grad_(False)
    return losses


@register_model_method(
    "twin_merging",
    params=TwinParams,
    family="moe",
    needs_base=True,
    paper="https://arxiv.org/abs/2406.15479",
    data="unlabeled",
    grid={"rank": (16, 64)},
)
def twin_merging(problem: MergeProblem, params: TwinParams) -> MergedModel:
    """Twin-Merging: task arithmetic plus SVD-compressed exclusive parts mixed by a task router."""
    module = _build(problem, params).to(problem.device)
    with torch.random.fork_rng():  # seeds the routers' initialisation; the caller's RNG is left alone
        torch.manual_seed(problem.seed)
        feats, ids = router_data(TwinModel(module, 1, len(problem.tasks), 1), problem, params)  # (m, d), (m,)
        twin = TwinModel(module, feats.shape[1], len(problem.tasks), params.router_hidden).to(problem.device)
    train_router(twin.router, feats, ids, params)
    record_method(twin, "twin_merging", params.model_dump(mode="json", by_alias=True))
    used = min(problem.budget, max((int((ids == i).sum()) for i in range(len(problem.tasks))), default=0))
    return MergedModel(module=twin, examples_used=used, labeled=False, params_total=count_params(twin))
