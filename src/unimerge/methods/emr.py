"""EMR-Merging: Elect, Mask & Rescale.

Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024,
https://arxiv.org/abs/2405.17461, code ``harveyhuang18/EMR_Merging`` (``emr_merge``).

EMR elects one unified task vector ``tau_uni`` (per entry: the sign of the summed task vectors, and
the largest magnitude among the tasks that agree with it), and keeps per task a binary mask
``M_t = 1[tau_t * tau_uni > 0]`` and a scalar rescaler ``lambda_t``, so that task ``t`` is rebuilt as
``W_t = W_base + lambda_t * M_t * tau_uni`` (see :mod:`unimerge.taskmodels.masks`, which stores them).

As a merge method (no task given) ``emr`` returns ``W_base + lambda * tau_uni``: the unified model
without task-specific modulators. ``lambda`` is our addition (1.0 = the paper's unified vector).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from unimerge.methods.primitives import expand_like
from unimerge.methods.registry import register_method

__all__ = ["EmrParams", "emr", "emr_elect", "emr_rescalers"]


class EmrParams(BaseModel):
    """Scaling of the unified task vector (1.0 reproduces the paper's unified vector)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)
    lambda_: float = Field(default=1.0, alias="lambda", ge=0.0, le=10.0, description="scaling")


def emr_elect(x: Tensor) -> tuple[Tensor, Tensor]:
    """Elect the unified task vector and the per-task masks.

    The elected sign is ``+1`` where ``sum_t tau_t > 0`` and ``-1`` otherwise (the reference code's
    ``(sum > 0) * 2 - 1``); a task agrees where ``tau_t * sign > 0`` (zeros never agree).

    Args:
        x: task vectors ``(n, *shape)``.

    Returns:
        ``(tau_uni, masks)``: ``(*shape)`` and boolean ``(n, *shape)``.
    """
    flag = torch.where(x.sum(dim=0) > 0, 1.0, -1.0).to(x.dtype)  # (*shape)
    masks = x * flag > 0  # (n, *shape)
    tau_uni = (x.abs() * masks).amax(dim=0) * flag
    return tau_uni, masks


def emr_rescalers(pairs: Iterable[tuple[Tensor, Tensor, Tensor]], n_tasks: int) -> Tensor:
    """Rescalers ``lambda_t`` over a whole model, as the reference code computes them.

    ``lambda_t = sum_p mean|tau_t[p]| / sum_p mean|M_t[p] * tau_uni[p]|`` over tensors ``p`` (the paper
    writes sums over all entries; the reference code sums per-tensor means, which we follow). A task whose
    masked unified vector is zero everywhere gets ``1.0`` (it is rebuilt as the base either way).

    Args:
        pairs: per tensor, ``(x, tau_uni, masks)`` with shapes ``(n, *s)``, ``(*s)``, ``(n, *s)``.
        n_tasks: number of tasks ``n``.

    Returns:
        ``(n,)`` float32 rescalers.
    """
    num = torch.zeros(n_tasks, dtype=torch.float64)
    den = torch.zeros(n_tasks, dtype=torch.float64)
    for x, tau_uni, masks in pairs:
        flat = x.reshape(n_tasks, -1)
        num += flat.abs().mean(dim=1).double().cpu()
        den += (masks.reshape(n_tasks, -1) * tau_uni.reshape(1, -1)).abs().mean(dim=1).double().cpu()
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 1.0).float()


@register_method(
    "emr",
    params=EmrParams,
    family="mask",
    needs_base=True,
    paper="https://arxiv.org/abs/2405.17461",
    grid={"lambda": (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)},
)
def emr(
    x: Tensor,
    params: EmrParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """EMR-Merging's unified task vector (no task modulators): ``lambda * tau_uni`` of ``w_i * tau_i``.

    For a task-specific model use :func:`unimerge.taskmodels.compute_task_masks` with ``method="emr"``.
    """
    tau_uni, _ = emr_elect(x * expand_like(per_model["weight"], x))
    return params.lambda_ * tau_uni
