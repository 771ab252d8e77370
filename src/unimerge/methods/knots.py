"""KnOTS: merge task updates in the shared basis of their concatenation's SVD.

Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025, https://arxiv.org/abs/2410.19735
(code: github.com/gstoica27/KnOTS, ``task_merger.py``: ``SVDMerger.apply_svd`` and ``SVDMerger.merge``;
``masking_ops.py``: ``ties_masking``, ``masked_merge``).

For one weight matrix with task updates ``dW_i`` ``(m, k)`` (weighted by each model's ``weight``):

1. ``[dW_1 ... dW_n] = U diag(s) V^T`` (``(m, n k)``, SVD in float64), keeping the singular values
   above ``tol`` (the reference code's ``1e-5``), at most ``rank`` of them (``r`` in all);
2. each task's coefficients ``C_i = diag(s) V_i^T`` ``(r, k)``, ``V_i^T`` the ``i``-th block of ``k``
   columns of ``V^T`` (equivalently ``C_i = U^T dW_i``); ``dW_i = U C_i`` exactly when nothing is
   dropped;
3. the ``C_i`` are merged with the ``inner`` method into ``C``, and the merged update is
   ``lambda * U C``.

``inner`` (``density`` is per model, as in :mod:`.sparsify`; the names are mergekit's):

==================  ==============================================  ==================================
inner               sparsify each ``C_i``                           combine
==================  ==============================================  ==================================
``task_arithmetic`` none                                            ``sum_i w_i C_i``
``ties``            keep the top ``density`` by magnitude           elect sign (sum), disjoint mean
``dare_ties``       keep at random with prob. ``density``, rescale  elect sign (sum), disjoint mean
``dare_linear``     keep at random with prob. ``density``, rescale  ``sum_i w_i C_i``
==================  ==============================================  ==================================

The disjoint mean divides by the number of agreeing tasks, as the reference's ``masked_merge(...,
"mean")``; DARE rescales by ``1 / density`` (reference ``apply_dare``). KnOTS-TIES is the paper's
``ties`` row, KnOTS-DARE-TIES its ``dare_ties`` row (the reference runs DARE, then TIES with
``topK=100``, i.e. no trim). With ``task_arithmetic`` and nothing dropped by ``tol``/``rank`` the
result is task arithmetic exactly (``U sum_i w_i C_i = sum_i w_i dW_i``).

Cost: one float64 SVD of an ``(m, n k)`` matrix per weight tensor (the reference's, too).

Tensors with more than two dims per model (conv kernels) are flattened to ``(m, -1)``, as the
reference's ``directions_to_matrices`` does. 1-D and 0-D tensors (biases, norms) have no basis to
share: the ``inner`` method runs on the plain task vectors (the reference appends biases to their
weight matrix as an extra column, which a per-tensor method cannot do, and leaves norms unmerged).

Differences from the reference code: the TIES trim is per tensor (the reference trims each task's
coefficients over the whole model at once) and keeps ``max(1, int(density * numel))`` entries like
every trim here (the reference keeps one more); a zero sum elects ``+`` (the reference: the majority
sign of the whole vector); per-model weights scale the coefficients before the sign election (the
reference has one weight, ``scaling_coeffs``, which is ``lambda`` here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from unimerge.methods.primitives import consensus_sums, expand_like, sparsify_magnitude, sparsify_random
from unimerge.methods.registry import register_method
from unimerge.methods.sparsify import DensityWeight

__all__ = ["KnotsParams", "knots", "knots_basis", "merge_coefficients"]

Inner = Literal["task_arithmetic", "ties", "dare_ties", "dare_linear"]


class KnotsParams(BaseModel):
    """KnOTS parameters (``density`` is per model)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    inner: Inner = Field(
        default="ties", description="Method merging the per-task coefficients in the shared basis."
    )
    lambda_: float = Field(default=1.0, alias="lambda", ge=-100.0, le=100.0, description="Final scale.")
    rank: int | None = Field(
        default=None,
        ge=1,
        le=1 << 20,
        description="Most singular vectors kept in the shared basis; None: all.",
    )
    tol: float = Field(
        default=1e-5,
        ge=0.0,
        le=1.0,
        description="Singular values at or below this are dropped (reference: 1e-5).",
    )


def knots_basis(x: Tensor, tol: float = 1e-5, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """The shared basis of task matrices and each task's coefficients in it.

    Args:
        x: task matrices ``(n, m, k)``.
        tol: singular values ``<= tol`` are dropped.
        rank: keep at most this many singular vectors (the largest).

    Returns:
        ``U`` ``(m, r)`` and ``C`` ``(n, r, k)`` with ``C_i = diag(s) V_i^T``, in ``x``'s dtype
        (computed in float64).
    """
    n, m, k = x.shape
    cat = x.permute(1, 0, 2).reshape(m, n * k).double()  # (m, n k) = [dW_1 ... dW_n]
    u, s, vh = cast("tuple[Tensor, Tensor, Tensor]", torch.linalg.svd(cat, full_matrices=False))
    r = int(torch.count_nonzero(s > tol))  # s is descending
    r = r if rank is None else min(r, rank)
    coeffs = (s[:r, None] * vh[:r]).reshape(r, n, k).permute(1, 0, 2)  # (n, r, k)
    return u[:, :r].to(x.dtype), coeffs.to(x.dtype).contiguous()


def merge_coefficients(
    c: Tensor,
    weights: Tensor,
    density: Tensor,
    inner: Inner,
    generator: torch.Generator | None,
) -> Tensor:
    """Merge per-task tensors ``c`` ``(n, *shape)`` (overwritten) with ``inner``: ``(*shape)``."""
    if inner == "ties":
        c = sparsify_magnitude(c, density, inplace=True)
    elif inner in ("dare_ties", "dare_linear"):
        c = sparsify_random(c, density, rescale=True, generator=generator, norm="density", inplace=True)
    c = c.mul_(expand_like(weights, c))  # (n, *shape)
    if inner in ("ties", "dare_ties"):
        merged, _ = consensus_sums(c, None, "sum", normalize=True)  # divided by the agreeing count
        return merged
    return c.sum(dim=0)


@register_method(
    "knots",
    params=KnotsParams,
    model_params=DensityWeight,
    family="subspace",
    needs_base=True,
    paper="https://arxiv.org/abs/2410.19735",
    random=True,
    grid={"inner": ("dare_ties", "ties"), "density": (0.2, 0.5, 0.9), "lambda": (0.6, 1.0)},
)
def knots(
    x: Tensor,
    params: KnotsParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """KnOTS: SVD of the concatenated task updates, merge the per-task coefficients, reconstruct."""
    w, density = per_model["weight"], per_model["density"]  # (n,) each
    if x.dim() < 3:  # 0-D / 1-D per model: the inner method on the plain task vectors
        return merge_coefficients(x, w, density, params.inner, generator).mul_(params.lambda_)
    shape = x.shape[1:]
    u, c = knots_basis(x.reshape(x.shape[0], x.shape[1], -1), params.tol, params.rank)  # (m, r), (n, r, k)
    merged = merge_coefficients(c, w, density, params.inner, generator)  # (r, k)
    return (u @ merged).mul_(params.lambda_).reshape(shape)
