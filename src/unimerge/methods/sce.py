"""SCE, the merge of FuseChat (Wan et al. 2024, https://arxiv.org/abs/2408.07990): select, calculate, erase.

Follows mergekit's ``mergekit/merge_methods/sce.py``: keep the entries whose values vary most across
models, weight each model by the mean square of its task vector, erase the entries that disagree with
the elected sign, and take the weight-normalised sum.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from unimerge.methods.primitives import consensus_sums, topk_mask, variance_over_models
from unimerge.methods.registry import register_method

__all__ = ["SCEParams", "sce"]


class SCEParams(BaseModel):
    """SCE's global parameters (mergekit's ``sce``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    select_topk: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Fraction of highest-variance entries kept."
    )
    int8_mask: bool = Field(default=False, description="Accepted for mergekit configs; no effect in float32.")


def _sce_weights(x: Tensor) -> Tensor:
    """Matrix-level weights: mean square of each task vector, normalised to sum 1 (uniform if ~0)."""
    flat = x.reshape(x.shape[0], -1)  # (n, m)
    w = torch.stack([torch.dot(row, row) for row in flat]) / flat.shape[1]  # (n,) mean squares
    total = float(w.sum())
    return torch.full_like(w, 1.0 / w.numel()) if abs(total) < 1e-6 else w / total


@register_method(
    "sce",
    params=SCEParams,
    family="sparsify",
    needs_base=True,
    paper="https://arxiv.org/abs/2408.07990",
    grid={"select_topk": (0.1, 0.3, 0.5, 1.0)},
)
def sce(
    x: Tensor,
    params: SCEParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """SCE: select high-variance entries, weight models by mean square, erase minority signs.

    Follows mergekit's ``sce.py``: the top ``select_topk`` fraction of the entries with non-zero
    variance across models is kept in every task vector; each model's weight is the mean square of
    its (selected) task vector over the sum of them; entries disagreeing with the elected sign
    (``sum``) are erased; the result is the weight-normalised sum. The per-model ``weight`` is not
    used (SCE computes its own weights, and mergekit's ``sce`` takes none).
    """
    if params.select_topk < 1.0:
        var = variance_over_models(x)  # (*shape)
        keep = topk_mask(var, int(torch.count_nonzero(var) * params.select_topk))  # mergekit's k
        x = x * keep.to(x.dtype)  # (n, *shape)
    w = _sce_weights(x)  # (n,)
    mixed, den = consensus_sums(x, w, "sum", scales=w)  # elect on x, sum w_i x_i: (*shape) each
    return mixed.div_(den.clamp_(min=1e-6))
