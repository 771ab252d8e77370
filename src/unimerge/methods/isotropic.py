"""Isotropic merging: Iso-C and Iso-CTS.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025, https://arxiv.org/abs/2502.04959 (code: github.com/danielm1405/iso-merging;
also FusionBench ``fusion_bench/method/isotropic_merging/iso_utils.py``).

- **Iso-C**: sum the task matrices, take the SVD and replace every singular value by their mean
  (a flat, isotropic spectrum), then scale by ``alpha``.
- **Iso-CTS**: the top ``common_space_fraction`` singular directions of the summed matrix (the
  common subspace) are completed by each task's own top directions after projecting the common
  left subspace out of it; the concatenated bases are orthogonalised (polar factor) and given the
  mean singular value, then scaled by ``alpha``.

Tensors that are not 2-D per model get ``alpha`` times the mean task vector, as in the reference.
A per-model ``weight`` scales that model's task vector first (default 1.0: the paper's method).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from unimerge.methods.registry import register_method
from unimerge.methods.subspace import is_matrix_stack, polar_factor, thin_svd, weighted

__all__ = ["IsoCParams", "IsoCtsParams", "iso_c", "iso_cts", "iso_cts_split"]

_ALPHA_GRID = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


class IsoCParams(BaseModel):
    """Iso-C parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    alpha: float = Field(default=1.0, ge=0.0, le=10.0, description="scale of the merged task vector")


class IsoCtsParams(BaseModel):
    """Iso-CTS parameters (``common_space_fraction=0.8`` is the paper's setting)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    alpha: float = Field(default=1.0, ge=0.0, le=10.0, description="scale of the merged task vector")
    common_space_fraction: float = Field(
        default=0.8, ge=0.0, le=1.0, description="fraction of min(m, k) given to the common subspace"
    )


@register_method(
    "iso_c",
    params=IsoCParams,
    family="subspace",
    needs_base=True,
    paper="https://arxiv.org/abs/2502.04959",
    grid={"alpha": _ALPHA_GRID},
)
def iso_c(
    x: Tensor,
    params: IsoCParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Iso-C: task-arithmetic sum with its singular values flattened to their mean."""
    x = weighted(x, per_model)  # (n, *shape)
    if not is_matrix_stack(x):
        return params.alpha * x.mean(dim=0)
    u, s, vh = thin_svd(x.sum(dim=0))  # (m, q), (q,), (q, k)
    return (params.alpha * s.mean()) * (u @ vh)


def iso_cts_split(q: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common dims, dims per task) for a matrix with ``q = min(m, k)``, as the reference splits it.

    The task-specific part is rounded (Python ``round``) to a multiple of ``n_tasks`` and the common
    part takes the rest. For matrices too small to give every task a dimension (where the reference
    indexes out of range) all ``q`` dimensions are common, which is Iso-C.
    """
    common = int(q * common_space_fraction)
    specific_total = round((q - common) / n_tasks) * n_tasks
    per_task = specific_total // n_tasks
    if per_task == 0 or specific_total > q:
        return q, 0
    return q - specific_total, per_task


@register_method(
    "iso_cts",
    params=IsoCtsParams,
    family="subspace",
    needs_base=True,
    paper="https://arxiv.org/abs/2502.04959",
    grid={"alpha": _ALPHA_GRID},
)
def iso_cts(
    x: Tensor,
    params: IsoCtsParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Iso-CTS: common + task-specific subspaces, orthogonalised, isotropic spectrum."""
    x = weighted(x, per_model)  # (n, *shape)
    if not is_matrix_stack(x):
        return params.alpha * x.mean(dim=0)
    n, m, k = x.shape
    common, per_task = iso_cts_split(min(m, k), n, params.common_space_fraction)
    u, s, vh = thin_svd(x.sum(dim=0))  # (m, q), (q,), (q, k)
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]  # common subspace
    residual = x - u_c @ (u_c.mT @ x)  # (n, m, k): each task with the common left subspace removed
    u_t, s_t, vh_t = thin_svd(residual)  # (n, m, q), (n, q), (n, q, k)
    u_t, s_t, vh_t = u_t[..., :per_task], s_t[:, :per_task], vh_t[:, :per_task]
    u_all = torch.cat([u_t.permute(1, 0, 2).reshape(m, n * per_task), u_c], dim=1)  # (m, n p + c)
    vh_all = torch.cat([vh_t.reshape(n * per_task, k), vh_c], dim=0)  # (n p + c, k)
    s_mean = torch.cat([s_t.reshape(-1), s_c]).mean()
    return (params.alpha * s_mean) * (polar_factor(u_all) @ polar_factor(vh_all))
