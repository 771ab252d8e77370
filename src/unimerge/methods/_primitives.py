"""Shared building blocks of merge methods, written once.

TIES, DARE, DELLA and Breadcrumbs are compositions of these (see ``sparsify.py``).
Every function is pure; ``x`` is always stacked over models: ``(n_models, *shape)``.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "disjoint_mean",
    "elect_sign",
    "expand_like",
    "generator_for",
    "sparsify_magnitude",
    "sparsify_random",
    "topk_mask",
    "weighted_sum",
]

SignMethod = Literal["sum", "count"]


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-model vector ``(n,)`` so it broadcasts against ``x`` ``(n, *shape)``."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def weighted_sum(x: Tensor, weights: Tensor) -> Tensor:
    """``sum_i w_i x_i``: ``(n, *shape), (n,) -> (*shape)``."""
    return torch.tensordot(weights.to(device=x.device, dtype=x.dtype), x, dims=1)


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest entries of a flat tensor, by selection (no full sort).

    Uses ``kthvalue`` (quickselect) for the threshold; among entries equal to the threshold the
    lowest indices are kept, so exactly ``k`` entries are selected and the result is deterministic.
    """
    n = scores.numel()
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    flat = scores.reshape(-1)
    work = flat if flat.device.type != "cpu" or flat.dtype != torch.bfloat16 else flat.float()
    thresh = torch.kthvalue(work, n - k + 1).values
    mask = work > thresh
    missing = k - int(mask.sum())
    if missing > 0:
        ties = torch.nonzero(work == thresh).reshape(-1)[:missing]
        mask[ties] = True
    return mask.reshape(scores.shape)


def sparsify_magnitude(x: Tensor, density: Tensor) -> Tensor:
    """Keep the top ``density[i]`` fraction of entries of each ``x[i]`` by magnitude (TIES trim).

    ``k = int(density * numel)`` as in the TIES reference code and mergekit; ``density >= 1`` keeps all.
    """
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        d = float(density[i])
        if d >= 1.0:
            out[i] = x[i]
            continue
        k = int(d * x[i].numel())
        out[i] = x[i] * topk_mask(x[i].abs(), k)
    return out


def sparsify_random(x: Tensor, density: Tensor, *, rescale: bool, generator: torch.Generator | None) -> Tensor:
    """DARE: drop each entry with probability ``1 - density[i]``; optionally rescale by ``1/density``."""
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        d = float(density[i])
        if d >= 1.0:
            out[i] = x[i]
            continue
        keep = torch.rand(x[i].shape, generator=generator, device=x.device, dtype=torch.float32) < d
        out[i] = x[i] * keep / d if rescale else x[i] * keep
    return out


def elect_sign(x: Tensor, method: SignMethod = "sum") -> Tensor:
    """TIES sign election: mask ``(n, *shape)`` of entries whose sign agrees with the elected sign.

    ``sum`` elects the sign of the summed (weighted) values, ``count`` the majority sign by vote;
    a tie elects ``+``. Zero entries never agree.
    """
    sign = x.sign()
    total = x.sum(dim=0) if method == "sum" else sign.sum(dim=0)
    elected = torch.where(total >= 0, 1.0, -1.0).to(x.dtype)
    return sign == elected


def disjoint_mean(x: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean of the masked entries of ``x`` over models (0 where none is kept).

    With ``weights`` the divisor is the sum of the kept models' weights (mergekit's normalisation).
    """
    m = mask.to(x.dtype)
    num = (x * m).sum(dim=0)
    den = m.sum(dim=0) if weights is None else (expand_like(weights, x) * m).sum(dim=0)
    den = torch.where(den == 0, torch.ones_like(den), den)
    return num / den


def generator_for(seed: int, tensor_name: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, tensor_name)``: output does not depend on thread order."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g
