"""Subspace merges of task vectors: TSV-M / TSV-C, CART and STAR.

Each method works on the singular value decomposition of every 2-D task vector (a weight matrix);
tensors that are not 2-D per model (biases, norms, conv kernels) are averaged, as in the reference
code of all three papers. A per-model ``weight`` scales that model's task vector before merging
(``weight=-1`` negates a task); the default 1.0 leaves the papers' algorithms unchanged.

- **TSV-M**, Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
  CVPR 2025, https://arxiv.org/abs/2412.00081 (code: github.com/AntoAndGar/task_singular_vectors,
  ``compute_and_sum_svd_mem_reduction``). Each task keeps its top ``1/T`` singular triplets; the
  concatenated left and right singular vectors are orthogonalised (the orthogonal polar factor
  ``P Q^T`` of their SVD) and recombined with the kept singular values, scaled by ``alpha``.
  **TSV-C** (:func:`tsv_compress`, :func:`tsv_reconstruct`) stores those low-rank factors per task.
- **CART**, Choi et al., "Revisiting Weight Averaging for Model Merging", arXiv 2412.12153 (code:
  github.com/JH-GEECS/CART, ``StaticMergeModule._merge_weights``): the average of the task vectors
  plus ``lambda`` times the sum of the rank-``k`` approximations of the centred task vectors.
- **STAR**, Lee et al., "STAR: Spectral Truncation and Rescale for Model Merging", NAACL 2025,
  https://arxiv.org/abs/2502.10339 (code: github.com/IBM/STAR, ``merger/STAR.py``): each task matrix
  keeps the fewest singular values whose sum reaches ``eta`` of its nuclear norm, rescaled so the
  nuclear norm is unchanged; the results are averaged.

Name-based routing is left to the engine: the reference code of TSV excludes CLIP's
``text_projection`` from the SVD and CART only decomposes attention/MLP weights (embeddings are then
averaged); here every 2-D tensor is treated as a matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from unimerge.methods.primitives import expand_like
from unimerge.methods.registry import register_method

__all__ = [
    "CartParams",
    "StarParams",
    "TSVFactors",
    "TsvParams",
    "cart",
    "polar_factor",
    "star",
    "star_truncate",
    "thin_svd",
    "tsv_compress",
    "tsv_m",
    "tsv_reconstruct",
]


# ----------------------------------------------------------------------------- shared helpers


def weighted(x: Tensor, per_model: Mapping[str, Tensor]) -> Tensor:
    """Scale each model's task vector by its ``weight``: ``(n, *shape) -> (n, *shape)``."""
    return x * expand_like(per_model["weight"], x)


def is_matrix_stack(x: Tensor) -> bool:
    """True when ``x`` ``(n, *shape)`` stacks 2-D tensors, the ones these methods decompose."""
    return x.dim() == 3


def thin_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD ``a = U diag(S) Vh`` of the last two dims: ``(*, m, k) -> (*, m, q), (*, q), (*, q, k)``.

    ``q = min(m, k)``; this is ``torch.linalg.svd(a, full_matrices=False)``, typed.
    """
    return cast("tuple[Tensor, Tensor, Tensor]", torch.linalg.svd(a, full_matrices=False))


def polar_factor(a: Tensor) -> Tensor:
    """The orthogonal polar factor ``P Q^T`` of ``a = P diag(s) Q^T`` (``(m, k) -> (m, k)``).

    It is the matrix with orthonormal columns (or rows, when ``k > m``) nearest to ``a``: TSV's and
    Iso-CTS's orthogonalisation. Singular values below the usual pseudo-inverse tolerance
    (``max(s) * max(m, k) * eps``) are dropped, so a rank-deficient ``a`` (two tasks sharing a
    singular vector, e.g. identical experts) has a well-defined factor instead of arbitrary
    null-space directions; for full-rank ``a`` this is exactly ``P Q^T``.
    """
    p, s, qh = thin_svd(a)  # (m, r), (r,), (r, k)
    if s.numel() == 0:
        return torch.zeros_like(a)
    tol = s.max() * max(a.shape) * torch.finfo(a.dtype).eps
    keep = (s > tol).to(a.dtype)  # (r,)
    return (p * keep) @ qh


def _rank(shape: torch.Size, fraction: float) -> int:
    """Number of singular triplets kept: ``int(min(m, k) * fraction)``, at least one."""
    return max(1, int(min(shape[-2], shape[-1]) * fraction))


# ----------------------------------------------------------------------------- TSV-M / TSV-C


class TsvParams(BaseModel):
    """TSV-M parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    alpha: float = Field(default=1.0, ge=0.0, le=10.0, description="scale of the merged task vector")
    rank_fraction: float | None = Field(
        default=None, gt=0.0, le=1.0, description="fraction of singular triplets kept per task; None: 1/T"
    )


def _tsv_low_rank(x: Tensor, rank_fraction: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """Top singular triplets of each task matrix: ``(n, m, k) -> (n, m, r), (n, r), (n, r, k)``."""
    frac = 1.0 / x.shape[0] if rank_fraction is None else rank_fraction
    r = _rank(x.shape, frac)
    u, s, vh = thin_svd(x)  # (n, m, q), (n, q), (n, q, k)
    return u[..., :r], s[..., :r], vh[..., :r, :]


@register_method(
    "tsv_m",
    params=TsvParams,
    family="subspace",
    needs_base=True,
    paper="https://arxiv.org/abs/2412.00081",
    grid={"alpha": (0.6, 0.8, 1.0, 1.2, 1.5)},
)
def tsv_m(
    x: Tensor,
    params: TsvParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """TSV-M: per-task top-1/T singular vectors, orthogonalised across tasks, scaled by ``alpha``."""
    x = weighted(x, per_model)  # (n, *shape)
    if not is_matrix_stack(x):
        return params.alpha * x.mean(dim=0)
    n, m, k = x.shape
    u, s, vh = _tsv_low_rank(x, params.rank_fraction)  # (n, m, r), (n, r), (n, r, k)
    r = s.shape[-1]
    u_cat = u.permute(1, 0, 2).reshape(m, n * r)  # (m, n r): task blocks side by side
    vh_cat = vh.reshape(n * r, k)  # (n r, k)
    u_orth, vh_orth = polar_factor(u_cat), polar_factor(vh_cat)
    return params.alpha * ((u_orth * s.reshape(-1)) @ vh_orth)


@dataclass(frozen=True)
class TSVFactors:
    """TSV-C: each task's low-rank factors of one tensor (or the dense task vectors if not 2-D).

    ``u`` ``(n, m, r)``, ``s`` ``(n, r)``, ``vh`` ``(n, r, k)`` for matrices; ``dense`` ``(n, *shape)``
    otherwise (then the factor fields are ``None``).
    """

    shape: tuple[int, ...]
    u: Tensor | None = None
    s: Tensor | None = None
    vh: Tensor | None = None
    dense: Tensor | None = None

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(u, s, vh)`` of a factored (2-D) tensor."""
        if self.u is None or self.s is None or self.vh is None:
            raise ValueError("this tensor is stored dense (it is not 2-D): it has no factors")
        return self.u, self.s, self.vh

    @property
    def n_tasks(self) -> int:
        return int(self.dense.shape[0] if self.dense is not None else self.factors()[1].shape[0])

    @property
    def stored_numbers(self) -> int:
        """Numbers stored for all tasks (``r (m + k + 1)`` per task for a matrix)."""
        if self.dense is not None:
            return self.dense.numel()
        return sum(t.numel() for t in self.factors())

    @property
    def storage_ratio(self) -> float:
        """Stored numbers over the numbers of the ``n`` dense task vectors."""
        dense = self.n_tasks * int(torch.Size(self.shape).numel())
        return self.stored_numbers / dense


def tsv_compress(deltas: Tensor, rank_fraction: float | None = None) -> TSVFactors:
    """TSV-C: keep each task's top ``rank_fraction`` singular triplets (default ``1/T``).

    Args:
        deltas: task vectors ``(n, *shape)``; 2-D tensors are factored, others stored dense.
        rank_fraction: fraction of ``min(m, k)`` kept per task (at least one triplet), in ``(0, 1]``.

    Returns:
        The factors; ``tsv_reconstruct(factors, i)`` rebuilds task ``i``'s compressed task vector.
    """
    if rank_fraction is not None and not 0.0 < rank_fraction <= 1.0:
        raise ValueError(f"rank_fraction must be in (0, 1], got {rank_fraction}")
    shape = tuple(deltas.shape[1:])
    if not is_matrix_stack(deltas):
        return TSVFactors(shape=shape, dense=deltas.clone())
    u, s, vh = _tsv_low_rank(deltas, rank_fraction)
    return TSVFactors(shape=shape, u=u.contiguous(), s=s.contiguous(), vh=vh.contiguous())


def tsv_reconstruct(factors: TSVFactors, task: int) -> Tensor:
    """Task ``task``'s task vector from its TSV-C factors: ``U_r diag(s_r) V_r^T`` ``(m, k)``."""
    if not 0 <= task < factors.n_tasks:
        raise ValueError(f"task index {task} out of range for {factors.n_tasks} compressed tasks")
    if factors.dense is not None:
        return factors.dense[task].clone()
    u, s, vh = factors.factors()
    return (u[task] * s[task]) @ vh[task]


# ----------------------------------------------------------------------------- CART


class CartParams(BaseModel):
    """CART parameters (defaults: the paper's 8-task ViT-B/32 configuration)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)
    rank_fraction: float = Field(
        default=0.12, gt=0.0, le=1.0, description="fraction of min(m, k) kept of each centred task matrix"
    )
    lambda_: float = Field(
        default=2.0, alias="lambda", ge=0.0, le=10.0, description="scale of the summed low-rank residuals"
    )


@register_method(
    "cart",
    params=CartParams,
    family="subspace",
    needs_base=True,
    paper="https://arxiv.org/abs/2412.12153",
    grid={"rank_fraction": (0.08, 0.12, 0.16), "lambda": (1.0, 2.0, 4.0, 6.0, 8.0, 10.0)},
)
def cart(
    x: Tensor,
    params: CartParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """CART: mean task vector + lambda * sum of low-rank centred task vectors."""
    x = weighted(x, per_model)  # (n, *shape)
    mean = x.mean(dim=0)  # (*shape)
    if not is_matrix_stack(x):
        return mean  # the centred residuals sum to zero: the average, as in the reference
    r = _rank(x.shape, params.rank_fraction)
    u, s, vh = thin_svd(x - mean)  # (n, m, q), (n, q), (n, q, k)
    low_rank = (u[..., :r] * s[:, None, :r]) @ vh[..., :r, :]  # (n, m, k)
    return mean + params.lambda_ * low_rank.sum(dim=0)


# ----------------------------------------------------------------------------- STAR


class StarParams(BaseModel):
    """STAR parameters; ``eta=0.4`` is the paper's 40% of the nuclear norm."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    eta: float = Field(default=0.4, gt=0.0, le=1.0, description="fraction of the nuclear norm kept")


def star_truncate(x: Tensor, eta: float) -> Tensor:
    """STAR's spectral truncation and rescale of each task matrix: ``(n, m, k) -> (n, m, k)``.

    Keeps the fewest leading singular values whose cumulative sum reaches ``eta`` times the nuclear
    norm, then multiplies them by ``nuclear / kept`` so the nuclear norm is unchanged. A zero matrix
    stays zero.
    """
    u, s, vh = thin_svd(x)  # (n, m, q), (n, q), (n, q, k)
    total = s.sum(dim=-1, keepdim=True)  # (n, 1)
    rank = torch.searchsorted(s.cumsum(dim=-1).contiguous(), (total * eta).contiguous()) + 1  # (n, 1)
    keep = torch.arange(s.shape[-1], device=s.device) < rank  # (n, q)
    kept = (s * keep).sum(dim=-1, keepdim=True)  # (n, 1)
    scale = torch.where(kept > 0, total / torch.where(kept > 0, kept, torch.ones_like(kept)), 0.0)
    s_new = s * keep * scale  # (n, q)
    return (u * s_new[:, None, :]) @ vh


@register_method(
    "star",
    params=StarParams,
    family="subspace",
    needs_base=True,
    paper="https://arxiv.org/abs/2502.10339",
    grid={"eta": (0.2, 0.4, 0.6, 0.8)},
)
def star(
    x: Tensor,
    params: StarParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """STAR: truncate each task matrix to eta of its nuclear norm, rescale, average."""
    x = weighted(x, per_model)  # (n, *shape)
    if not is_matrix_stack(x):
        return x.mean(dim=0)
    return star_truncate(x, params.eta).mean(dim=0)
