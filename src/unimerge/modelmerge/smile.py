"""SMILE: zero-shot sparse mixture of low-rank experts (Tang et al., 2024).

"SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From Pre-Trained Foundation
Models", https://arxiv.org/abs/2408.10174 (reference code: FusionBench ``models/smile_moe``).

Every target ``nn.Linear`` becomes a :class:`SmileLinear`: the pretrained layer is kept, and each task's
weight difference ``W_i - W_0 = U_i S_i V_i^T`` becomes a rank-``k`` expert ``U_i[:, :k] S_i[:k] V_i[:, :k]^T``
(plus its bias difference). A token ``x`` is routed by the norms ``||V_i[:, :gate_k]^T x||`` (how much of
``x`` lies in the input subspace task ``i`` changed): softmax over tasks, top-``top_k``, weights
renormalised, ``y = W_0 x + b_0 + sum_{i in top} r_i expert_i(x)``. The remaining tensors are the
pretrained ones or the experts' average (``rest``). Nothing is trained and no example is drawn
(``examples_used`` is 0); it is registered with ``data="unlabeled"`` only because it needs the
module-level interface. The model card states the parameter count against the dense model.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from unimerge.methods import MergedModel, MergeProblem, register_model_method
from unimerge.modelmerge._moe import (
    MLP_TARGETS,
    LowRankExperts,
    count_params,
    dense_copy,
    linear_at,
    low_rank,
    match_linears,
    record_method,
    replace_module,
    task_arithmetic_state,
    task_vectors,
)

__all__ = ["SmileLinear", "SmileParams", "smile"]


class SmileParams(BaseModel):
    """SMILE's hyperparameters (the paper's ``k``, ``gate_k`` and top-k)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    k: int = Field(default=32, ge=0, le=16384, description="rank of each expert (0: full rank)")
    gate_k: int = Field(default=16, ge=1, le=16384, description="singular vectors per expert in the router")
    top_k: int = Field(default=1, ge=1, le=64, description="experts mixed per token")
    targets: tuple[str, ...] = Field(
        default=MLP_TARGETS,
        min_length=1,
        max_length=32,
        description="regexes of the nn.Linear names to upscale",
    )
    rest: Literal["average", "pretrained"] = Field(default="average", description="other tensors")


class SmileLinear(nn.Module):
    """A pretrained linear layer plus ``n`` routed low-rank experts (see the module docstring)."""

    kind: ClassVar[str] = "smile_linear"

    def __init__(
        self, in_features: int, out_features: int, n: int, k: int, gate_k: int, top_k: int, bias: bool
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.n, self.k, self.gate_k, self.top_k = n, k, gate_k, min(top_k, n)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.gate = nn.Parameter(
            torch.zeros(n, gate_k, in_features), requires_grad=False
        )  # V_i[:, :gate_k]^T
        self.experts = LowRankExperts(n, k, in_features, out_features, bias)

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "n": self.n,
            "k": self.k,
            "gate_k": self.gate_k,
            "top_k": self.top_k,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> SmileLinear:
        return cls(**cfg)

    @classmethod
    @torch.no_grad()
    def build(
        cls, linear: nn.Linear, dw: Tensor, db: Tensor | None, k: int, gate_k: int, top_k: int
    ) -> SmileLinear:
        """From the pretrained ``linear`` and the task differences ``dw (n, out, in)``, ``db (n, out)``."""
        factors = [low_rank(w, 0) for w in dw]  # one SVD per expert: (out, m) U S and (m, in) V^T
        r = factors[0][1].shape[0] if k <= 0 else min(k, factors[0][1].shape[0])
        g = min(gate_k, factors[0][1].shape[0])
        experts = LowRankExperts.from_factors(
            torch.stack([f[0][:, :r] for f in factors]), torch.stack([f[1][:r] for f in factors]), db
        )
        layer = cls(
            linear.in_features, linear.out_features, dw.shape[0], r, g, top_k, linear.bias is not None
        )
        layer.weight.copy_(linear.weight)
        if layer.bias is not None and linear.bias is not None:  # both present or both absent
            layer.bias.copy_(linear.bias)
        layer.gate.copy_(torch.stack([f[1][:g] for f in factors]))
        layer.experts = experts
        return layer

    def routing(self, x: Tensor) -> Tensor:
        """Dense routing weights ``(*lead, n)``: renormalised top-k of softmax(||V_i^T x||), zero elsewhere."""
        proj = torch.einsum("...i,ngi->...ng", x, self.gate.to(x.dtype))  # (*lead, n, gate_k)
        probs = torch.softmax(proj.float().norm(dim=-1), dim=-1)  # (*lead, n)
        top, idx = probs.topk(self.top_k, dim=-1)  # (*lead, top_k)
        top = top / top.sum(-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, idx, top)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return out + cast(Tensor, self.experts(x, self.routing(x))).to(out.dtype)


@register_model_method(
    "smile",
    params=SmileParams,
    family="moe",
    needs_base=True,
    paper="https://arxiv.org/abs/2408.10174",
    data="unlabeled",
    grid={"k": (32, 128), "top_k": (1, 2)},
)
def smile(problem: MergeProblem, params: SmileParams) -> MergedModel:
    """SMILE: pretrained layers plus SVD low-rank experts routed by projection norm (zero-shot)."""
    base_sd, tvs = task_vectors(problem)
    scale = 1.0 / len(tvs) if params.rest == "average" else 0.0
    module = dense_copy(problem.base, task_arithmetic_state(base_sd, tvs, scale))
    for name in match_linears(module, params.targets):
        dw = torch.stack([tv[f"{name}.weight"] for tv in tvs])  # (n, out, in)
        has_bias = f"{name}.bias" in base_sd
        db = torch.stack([tv[f"{name}.bias"] for tv in tvs]) if has_bias else None  # (n, out)
        if not dw.any() and (db is None or not db.any()):
            continue  # no expert changed this layer: keep the pretrained one
        linear = linear_at(problem.base, name)
        replace_module(module, name, SmileLinear.build(linear, dw, db, params.k, params.gate_k, params.top_k))
    record_method(module, "smile", params.model_dump(mode="json"))
    module = module.to(problem.device)
    return MergedModel(module=module, examples_used=0, labeled=False, params_total=count_params(module))
