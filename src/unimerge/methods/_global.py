"""Whole-model statistics computed by streaming, for ``scope="model"`` methods.

:func:`global_magnitude_threshold` finds, for each model, the exact magnitude of its k-th largest
task-vector entry over *all* tensors (TIES' reference code trims the flattened model this way), in two
streaming passes and O(65536 x n_models) memory: the bit pattern of a non-negative float32 orders like
the value, so a histogram of the top 16 bits finds the bin that holds the k-th value and a second
histogram of the low 16 bits inside that bin finds the value itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["global_magnitude_threshold"]

_BINS = 1 << 16


def _bits(x: Tensor) -> Tensor:
    """int64 bit patterns of ``|x|`` as float32, one row per model: ``(n, numel)``."""
    a = x.detach().abs().to(torch.float32).reshape(x.shape[0], -1).contiguous()
    return a.view(torch.int32).to(torch.int64)


def _select(hist: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: the bin holding the k-th largest entry, and how many entries lie strictly above it."""
    above = hist.flip(1).cumsum(1).flip(1) - hist  # (n, bins): entries in higher bins
    hit = (above < k[:, None]) & (above + hist >= k[:, None])  # (n, bins)
    b = torch.where(hit.any(1), hit.float().argmax(1), torch.zeros_like(k))  # (n,)
    return b, above.gather(1, b[:, None]).squeeze(1)


def global_magnitude_threshold(deltas: Callable[[], Iterator[tuple[str, Tensor]]], density: Tensor) -> Tensor:
    """Each model's ``k``-th largest magnitude over the whole model, ``k = max(1, int(density * numel))``.

    ``k`` is at least 1, as in the per-tensor trim (:func:`unimerge.methods.primitives.trim_count`): a
    model of fewer than ``1 / density`` entries keeps its largest entry (and its exact ties) rather than
    nothing.

    Args:
        deltas: yields ``(name, x)`` with ``x`` ``(n, *shape)`` for every tensor; called twice.
        density: ``(n,)`` fraction of each model's entries to keep, in ``(0, 1]``.

    Returns:
        ``(n,)`` thresholds: keeping ``|tau| >= threshold`` keeps the top ``k`` entries (plus exact ties);
        0 where ``density >= 1``; ``inf`` only for a model without entries.
    """
    n = density.numel()
    hi = torch.zeros(n, _BINS, dtype=torch.int64)
    total = 0
    for _, x in deltas():
        bits = _bits(x)  # (n, m)
        total += bits.shape[1]
        hi.scatter_add_(1, bits >> 16, torch.ones_like(bits))
    k = (density.double() * total).floor().to(torch.int64).clamp(min=min(total, 1), max=total)  # (n,)
    top, above = _select(hi, k)
    lo = torch.zeros(n, _BINS, dtype=torch.int64)
    for _, x in deltas():
        bits = _bits(x)
        inside = (bits >> 16) == top[:, None]  # (n, m)
        lo.scatter_add_(1, (bits & 0xFFFF) * inside, inside.to(torch.int64))
    low, _ = _select(lo, k - above)
    thresh = ((top << 16) | low).to(torch.int32).view(torch.float32).clone()
    thresh = torch.where(k <= 0, torch.full_like(thresh, float("inf")), thresh)
    return torch.where(density >= 1.0, torch.zeros_like(thresh), thresh)
