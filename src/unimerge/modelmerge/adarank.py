"""AdaRank: learn which singular components of each task vector to merge, by test-time entropy minimisation.

Lee et al., "AdaRank: Adaptive Rank Pruning for Enhanced Model Merging", arXiv 2503.22178 (ICLR 2026).
Only the abstract of the paper was reachable here; the algorithm follows the authors' code,
github.com/david3684/AdaRank: ``vision/src/models/merge_vit/adaptive.py`` (``AdaMergingModule``:
``_svd_vanilla``, ``_mask_init``, ``straight_through_mask``, ``_merge_weights``), ``vision/runner.py``
(``load_model``, ``adaptive_merge_and_eval``) and ``vision/configs/adarank_B_T8/*.yaml``.

Every 2-D task matrix is decomposed, ``tau_i = U_i diag(s_i) V_i^T``; task ``i``'s component ``j`` is
kept when its mask ``B_ij = [sigmoid(b_ij / T) > 0.5]`` is one, and the merged tensor is::

    theta = theta_origin + sum_i lambda_i * U_i diag(B_i * s_i) V_i^T      (matrices)
    theta = theta_origin + sum_i lambda_i * tau_i                          (other tensors)

with one coefficient ``lambda_i`` per task and tensor (layer-wise, as layer-wise AdaMerging). The mask
logits ``b`` and the coefficients are trained together with Adam to minimise the summed mean entropy
of every task head's predictions on that task's unlabelled batches; the binary mask passes gradients
straight through its sigmoid relaxation (``mask * s`` forward-replaced by ``B * s``). Logits start
at ``+0.1`` for each matrix's top ``rank_fraction`` components and ``-0.1`` for the rest.

Base merges (``base_merge``): ``task_arithmetic`` (origin: the pretrained model, task vectors
``theta_i - theta_0``; the reference's prior 0.3, all components kept at the start) and ``cart``
(origin: the average of the experts, task vectors centred on it; prior 2.3, top 16% kept), as in the
reference configs. With ``steps=0`` the result is task arithmetic with ``lambda=init`` (all components
kept) or CART with ``lambda=init`` and ``rank_fraction``, exactly.

Differences from the reference: every 2-D tensor some expert changed is a matrix (the reference
decomposes the attention and MLP weights of CLIP's blocks by name and merges the rest without a mask);
at least one component is kept at the start (the reference keeps ``int(q * rank_fraction)``); the
defaults are a short CPU budget (100 steps of 8 examples per task, lr 5e-3) where the reference runs
10,000 steps of 16 at lr 1e-3, as :mod:`unimerge.modelmerge.adamerging` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from unimerge.methods import MergedModel, MergeProblem, register_model_method
from unimerge.methods.subspace import thin_svd
from unimerge.modelmerge.adamerging import entropy_step
from unimerge.modelmerge.stats import check_experts, count, draw, finish, work_module

__all__ = [
    "LOGIT",
    "AdaRankParams",
    "AdaRankResult",
    "BaseMerge",
    "Spectra",
    "adarank",
    "adarank_merge",
    "decompose",
    "initial_logits",
    "merge",
]

BaseMerge = Literal["task_arithmetic", "cart"]
_PRIOR: dict[str, float] = {"task_arithmetic": 0.3, "cart": 2.3}  # the reference's `prior` per base merge
_RANK: dict[str, float] = {"task_arithmetic": 1.0, "cart": 0.16}  # its `initial_rank_ratio`
LOGIT = 0.1  # the reference's initial mask logit: +LOGIT kept, -LOGIT pruned


class AdaRankParams(BaseModel):
    """AdaRank's hyperparameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    base_merge: BaseMerge = Field(
        default="task_arithmetic", description="the merge whose components are masked"
    )
    init: float | None = Field(
        default=None,
        ge=-1.0,
        le=10.0,
        description="initial coefficient of every task and tensor; None: 0.3 (task_arithmetic) or 2.3 (cart)",
    )
    rank_fraction: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="fraction of each matrix's components kept at the start; None: 1.0 or 0.16 (cart)",
    )
    temperature: float = Field(
        default=10.0, gt=0.0, le=1000.0, description="mask = sigmoid(logit / temperature)"
    )
    steps: int = Field(default=100, ge=0, le=10_000, description="Adam steps")
    lr: float = Field(default=5e-3, gt=0.0, le=1.0, description="Adam learning rate")
    batch_size: int = Field(default=8, ge=1, le=1024, description="unlabelled examples per task per step")
    bf16: bool = Field(default=True, description="bf16 autocast for forward passes")

    @property
    def prior(self) -> float:
        """The initial coefficient."""
        return _PRIOR[self.base_merge] if self.init is None else self.init

    @property
    def start_fraction(self) -> float:
        """The fraction of components kept at the start."""
        return _RANK[self.base_merge] if self.rank_fraction is None else self.rank_fraction


@dataclass(frozen=True)
class Spectra:
    """What AdaRank masks: the origin, and per changed tensor the SVD of the task matrices or the task vectors.

    Attributes:
        origin: every tensor of the origin model (the pretrained one, or the experts' average for CART).
        names: the changed floating tensors, in coefficient-column order.
        svd: name -> ``U (n, m, q)``, ``s (n, q)``, ``Vh (n, q, k)`` of the (centred) task matrices.
        dense: name -> task vectors ``(n, *shape)`` of the tensors that are not matrices.
    """

    origin: dict[str, Tensor]
    names: list[str]
    svd: dict[str, tuple[Tensor, Tensor, Tensor]]
    dense: dict[str, Tensor]


def decompose(
    base: Mapping[str, Tensor], experts: list[Mapping[str, Tensor]], base_merge: BaseMerge
) -> Spectra:
    """The :class:`Spectra` of ``experts`` against ``base`` (float32, on ``base``'s devices)."""
    origin = dict(base)
    names = [
        k
        for k, v in base.items()
        if v.is_floating_point() and any(not torch.equal(e[k].to(v.device), v) for e in experts)
    ]
    svd: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    dense: dict[str, Tensor] = {}
    for name in names:
        b = base[name].float()
        taus = torch.stack([e[name].to(b.device).float() - b for e in experts])  # (n, *shape)
        if base_merge == "cart":
            mean = taus.mean(dim=0)  # (*shape)
            origin[name] = (b + mean).to(base[name].dtype)
            taus = taus - mean
        if taus.dim() == 3:
            svd[name] = thin_svd(taus)
        else:
            dense[name] = taus
    return Spectra(origin, names, svd, dense)


def initial_logits(spectra: Spectra, fraction: float) -> dict[str, Tensor]:
    """Mask logits per matrix ``(n, q)``: ``+LOGIT`` for the top ``max(1, int(q * fraction))``, else ``-LOGIT``."""
    out = {}
    for name, (_, s, _) in spectra.svd.items():
        keep = max(1, int(s.shape[-1] * fraction))
        logits = torch.full_like(s, -LOGIT)
        logits[:, :keep] = LOGIT
        out[name] = logits
    return out


def _mask(logits: Tensor, temperature: float, hard: bool) -> Tensor:
    """The binary mask ``[sigmoid(b / T) > 0.5]``; unless ``hard``, with the sigmoid's gradient (straight through)."""
    binary = (logits > 0).to(logits.dtype)
    if hard:
        return binary
    soft = torch.sigmoid(logits / temperature)
    return soft + (binary - soft).detach()


def _low_rank_sum(u: Tensor, coef: Tensor, vh: Tensor) -> Tensor:
    """``sum_i U_i diag(coef_i) V_i^T``: ``(n, m, q), (n, q), (n, q, k) -> (m, k)`` in one product."""
    n, m, q = u.shape
    u_cat = u.permute(1, 0, 2).reshape(m, n * q)  # (m, n q): task blocks side by side
    return (u_cat * coef.reshape(-1)) @ vh.reshape(n * q, -1)


def merge(
    spectra: Spectra, lam: Tensor, logits: Mapping[str, Tensor], temperature: float, hard: bool
) -> dict[str, Tensor]:
    """The changed tensors of the merged model (module docstring); ``lam`` is ``(n, names)``."""
    out = {}
    for j, name in enumerate(spectra.names):
        origin = spectra.origin[name]
        col = lam[:, j]  # (n,)
        if name in spectra.dense:
            delta = torch.tensordot(col, spectra.dense[name], dims=1)  # (*shape)
        else:
            u, s, vh = spectra.svd[name]
            coef = col[:, None] * s * _mask(logits[name], temperature, hard)  # (n, q)
            delta = _low_rank_sum(u, coef, vh)
        out[name] = (origin.float() + delta).to(origin.dtype)
    return out


@dataclass(frozen=True)
class AdaRankResult:
    """What :func:`adarank` learned: the merged state, coefficients ``(n, names)``, mask logits, entropies."""

    state: dict[str, Tensor]
    names: list[str]
    coefficients: Tensor
    logits: dict[str, Tensor]
    history: list[float]
    examples: int


def adarank(problem: MergeProblem, params: AdaRankParams) -> AdaRankResult:
    """Learn AdaRank's masks and coefficients on ``problem`` (module docstring); returns the merged state."""
    check_experts(problem, paired=False)
    module = work_module(problem)
    base = {k: v.to(problem.device) for k, v in module.state_dict().items()}
    spectra = decompose(base, list(problem.experts), params.base_merge)
    lam = torch.full((len(problem.experts), len(spectra.names)), params.prior, device=problem.device)
    logits = initial_logits(spectra, params.start_fraction)
    trained = [lam, *logits.values()]
    for p in trained:
        p.requires_grad_()
    opt = torch.optim.Adam(trained, lr=params.lr)
    data = [draw(problem, t, labeled=False, batch_size=params.batch_size) for t in range(len(problem.tasks))]
    history = []
    for step in range(params.steps if spectra.names else 0):
        opt.zero_grad(set_to_none=True)
        merged = merge(spectra, lam, logits, params.temperature, hard=False)
        history.append(entropy_step(problem, module, merged, data, step, params.bf16))
        opt.step()
    with torch.no_grad():
        final = merge(spectra, lam, logits, params.temperature, hard=True)
    return AdaRankResult(
        state={k: v.cpu() for k, v in {**spectra.origin, **final}.items()},
        names=spectra.names,
        coefficients=lam.detach().cpu(),
        logits={k: v.detach().cpu() for k, v in logits.items()},
        history=history,
        examples=max(count(d) for d in data),
    )


def _details(res: AdaRankResult) -> dict[str, Any]:
    """For reports: the fraction of components each task keeps, the coefficients, the entropy path."""
    kept = torch.stack([(b > 0).float().mean(dim=-1) for b in res.logits.values()]) if res.logits else None
    lam = res.coefficients
    return {
        "kept_fraction_per_task": [] if kept is None else [round(float(v), 4) for v in kept.mean(dim=0)],
        "coefficients_range": [round(float(lam.min()), 4), round(float(lam.max()), 4)] if lam.numel() else [],
        "entropy_first_last": [round(res.history[0], 4), round(res.history[-1], 4)] if res.history else [],
    }


@register_model_method(
    "adarank",
    params=AdaRankParams,
    family="subspace",
    needs_base=True,
    paper="https://arxiv.org/abs/2503.22178",
    data="unlabeled",
)
def adarank_merge(problem: MergeProblem, params: AdaRankParams) -> MergedModel:
    """AdaRank: test-time binary masks over each task's singular components (and coefficients), by entropy."""
    res = adarank(problem, params)
    merged = finish(problem, res.state, res.examples, labeled=False)
    merged.details = _details(res)
    return merged
