"""Shared building blocks of merge methods, written once.

TIES, DARE, DELLA and Breadcrumbs are compositions of these (see ``sparsify.py``).
Every function is pure (inputs are never modified); ``x`` is always stacked over models:
``(n_models, *shape)``, and per-model parameters are ``(n_models,)`` tensors.

Sparsifiers follow mergekit 0.1.5's ``mergekit/sparsify.py`` semantics (``density >= 1`` returns the input
unchanged; the magnitude trim keeps ``k = max(1, int(density * numel))`` entries, so a small tensor keeps
its largest entry; Breadcrumbs keeps ``int(density * numel)``, possibly none, as mergekit's
``magnitude_outliers`` does), with two choices of rescaling: ``norm="density"``
divides the kept entries by ``density`` (the DARE paper), ``norm="l1"``/``"l2"``/``"linf"`` scales
them so the tensor keeps its norm (mergekit's ``rescale``, which uses ``l1``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Literal, cast

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RescaleNorm",
    "SignMethod",
    "breadcrumbs_mask",
    "consensus_sums",
    "disjoint_mean",
    "elect_sign",
    "expand_like",
    "fraction",
    "generator_for",
    "kth_largest",
    "masked_sums",
    "rank_magnitude_probs",
    "rescale_to_norm",
    "sparsify_breadcrumbs",
    "sparsify_magnitude",
    "sparsify_random",
    "sparsify_rank_magnitude",
    "sparsify_threshold",
    "topk_mask",
    "trim_count",
    "uniform_",
    "variance_over_models",
    "weighted_sum",
]

SignMethod = Literal["sum", "count"]
RescaleNorm = Literal["density", "l1", "l2", "linf"]

_SAMPLE_MIN, _SAMPLE_MAX = 1 << 12, 1 << 16  # sample sizes that bracket the k-th value (numel / 256, clamped)
_EPS = 1e-7  # mergekit's tolerance for norm rescaling
# Entries per slice in chunked loops: at most torch's intra-op grain size (32768), so each op runs
# on the calling thread (the engine parallelises across tensors) and the buffers stay in cache.
_CHUNK = 1 << 15


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-model vector ``(n,)`` so it broadcasts against ``x`` ``(n, *shape)``."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def weighted_sum(x: Tensor, weights: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``sum_i w_i x_i``: ``(n, *shape), (n,) -> (*shape)``, into ``out`` when given (``x[0]`` may be it).

    A loop of in-place ``add_`` rather than ``tensordot``: BLAS packs a copy of ``x`` for the
    ``(1, n) @ (n, m)`` product (measured: ``+ n x`` the tensor's bytes at peak), the loop needs only the result.
    A method that owns ``x`` passes ``out=x[0]``: no fresh output to allocate and first-touch.
    """
    w = [float(v) for v in weights]
    out = torch.mul(x[0], w[0], out=out)
    for i in range(1, x.shape[0]):
        out.add_(x[i], alpha=w[i])
    return out


def fraction(v: Tensor | float) -> float:
    """A per-model fraction (density, gamma) as the decimal written in the config.

    Per-model parameters travel as float32, and ``int(0.7 * 10)`` would become ``int(6.99999988)``;
    the shortest decimal that round-trips the float32 value restores ``0.7``, so counts
    ``int(fraction * numel)`` match mergekit's (float64) arithmetic.
    """
    if isinstance(v, Tensor) and v.dtype == torch.float32:
        return float(str(np.float32(v.item())))
    return float(v)


def _selectable(x: Tensor) -> Tensor:
    """``x`` flattened, in a dtype every device can select on (CPU has no half ``kthvalue``)."""
    flat = x.reshape(-1)
    if flat.device.type == "cpu" and flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return flat


def _bracketed_select(flat: Tensor, k: int) -> tuple[Tensor, int, Tensor] | None:
    """Select the k-th largest entry inside a narrow value band estimated from a sample.

    A fixed-seed random sample brackets the k-th value; one pass counts the entries above the
    bracket and an exact ``kthvalue`` runs on the (small) band. ``None`` if the bracket missed.

    Returns:
        ``(threshold, number of entries >= threshold, ascending flat indices equal to it)``.
    """
    n = flat.numel()
    g = torch.Generator(device=flat.device).manual_seed(0)
    size = min(max(n >> 8, _SAMPLE_MIN), _SAMPLE_MAX)
    sample = flat[torch.randint(n, (size,), generator=g, device=flat.device)].sort().values
    q = k / n
    pos = size * (1.0 - q)  # where the k-th largest sits in the ascending sample
    margin = 6.0 * math.sqrt(size * q * (1.0 - q)) + 16.0
    lo = sample[max(int(pos - margin), 0)]
    hi = sample[min(int(pos + margin), size - 1)]
    above = int(torch.count_nonzero(flat > hi))
    if above >= k:
        return None
    where = torch.nonzero((flat >= lo) & (flat <= hi)).reshape(-1)  # (m,), m << n, ascending
    band = flat[where]
    rest = k - above
    if rest > band.numel():
        return None
    thresh = torch.kthvalue(band, band.numel() - rest + 1).values
    n_ge = above + int(torch.count_nonzero(band >= thresh))
    return thresh, n_ge, where[band == thresh]


def _select(flat: Tensor, k: int) -> tuple[Tensor, int | None, Tensor | None]:
    """``(k-th largest value, count >= it, indices equal to it)``; the last two may be unknown."""
    if flat.numel() > 16 * _SAMPLE_MIN:
        found = _bracketed_select(flat, k)
        if found is not None:
            return found
    return torch.kthvalue(flat, flat.numel() - k + 1).values, None, None


def kth_largest(flat: Tensor, k: int) -> Tensor:
    """Exact k-th largest value of a 1-D tensor (``1 <= k <= numel``), by selection, no full sort.

    Large tensors use a sampled bracket plus ``kthvalue`` on the band (about 3x faster than
    ``kthvalue`` on the whole tensor); the result is exact either way.
    """
    return _select(flat, k)[0]


def topk_mask(scores: Tensor, k: int, *, out: Tensor | None = None) -> Tensor:
    """Mask of the ``k`` largest entries of ``scores`` (any shape), by selection (no sort).

    Among entries equal to the threshold the lowest (flat) indices are kept, so exactly ``k``
    entries are selected and the result is deterministic. Returns a bool mask, or writes a 0/1
    mask into ``out`` (a contiguous float tensor shaped like ``scores``, not ``scores`` itself).
    """
    n = scores.numel()
    if k >= n or k <= 0:
        fill = k >= n
        return torch.full_like(scores, fill, dtype=torch.bool) if out is None else out.fill_(float(fill))
    flat = _selectable(scores)
    thresh, n_ge, ties = _select(flat, k)
    mask = flat >= thresh if out is None else torch.ge(flat, thresh, out=out.view(-1))
    extra = (int(torch.count_nonzero(mask)) if n_ge is None else n_ge) - k
    if extra > 0:  # ties at the threshold: keep the lowest indices
        ties = torch.nonzero(flat == thresh).reshape(-1) if ties is None else ties
        mask[ties[ties.numel() - extra :]] = 0
    return mask.reshape(scores.shape)


def rescale_to_norm(masked: Tensor, original: Tensor, norm: RescaleNorm, density: float) -> Tensor:
    """Rescale ``masked`` (in place, and returned) after sparsifying ``original``.

    ``density`` divides by the keep probability (DARE paper); ``l1``/``l2``/``linf`` multiply by
    ``||original|| / ||masked||`` (mergekit), skipped when either norm is below 1e-7.
    """
    before = None if norm == "density" else _norm(original, norm)
    return _rescale(masked, before, norm, density)


def _norm(t: Tensor, norm: RescaleNorm) -> Tensor:
    return cast(Tensor, torch.linalg.vector_norm(t, ord={"l1": 1.0, "l2": 2.0, "linf": math.inf}[norm]))


def _rescale(masked: Tensor, before: Tensor | None, norm: RescaleNorm, density: float) -> Tensor:
    """:func:`rescale_to_norm` given the original's norm ``before`` (unused for ``density``)."""
    if before is None:  # norm == "density"
        return masked.div_(density)
    after = _norm(masked, norm)
    if before < _EPS or after < _EPS:
        return masked
    return masked.mul_(before / after)


# masker(i, x[i], scratch) -> keep mask of x[i] (bool, or float 0/1 possibly written into scratch)
Masker = Callable[[int, Tensor, Tensor], Tensor]


def _sparsify(
    x: Tensor, density: Tensor, masker: Masker, *, rescale: bool, norm: RescaleNorm, inplace: bool = False
) -> Tensor:
    """Apply each model's keep mask to ``x`` (a copy, or ``x`` itself with ``inplace``), rescaling if
    asked: ``(n, *shape)``.

    Masks are applied as float multiplications into preallocated buffers (``torch.where`` and
    bool-float arithmetic are several times slower on CPU).
    """
    out = x if inplace else torch.empty_like(x)
    scratch = torch.empty_like(x[0])  # (*shape)
    for i in range(x.shape[0]):
        d = fraction(density[i])
        if d >= 1.0:
            if not inplace:
                out[i].copy_(x[i])
            continue
        keep = masker(i, x[i], scratch)
        if keep.dtype != x.dtype:
            keep = scratch.copy_(keep)
        before = _norm(x[i], norm) if rescale and norm != "density" else None
        torch.mul(x[i], keep, out=out[i])
        if rescale:
            _rescale(out[i], before, norm, d)
    return out


def trim_count(density: float, numel: int) -> int:
    """Entries the magnitude trim keeps: ``max(1, int(density * numel))`` (mergekit 0.1.5), all if
    ``density >= 1``, none if ``density <= 0`` or the tensor is empty (16 entries at 0.05 keep 1)."""
    if density >= 1.0 or density <= 0.0 or numel == 0:
        return numel if density >= 1.0 else 0
    return max(1, int(density * numel))


def sparsify_magnitude(
    x: Tensor, density: Tensor, *, rescale: bool = False, norm: RescaleNorm = "l1", inplace: bool = False
) -> Tensor:
    """Keep the top ``density[i]`` fraction of entries of each ``x[i]`` by magnitude (TIES trim).

    ``k = trim_count(density, numel)``: at least one entry, as mergekit 0.1.5's ``sparsify.magnitude``
    (a tensor under ``1 / density`` entries keeps its largest entry rather than losing its task vector).
    Among equal magnitudes at the boundary the lowest indices are kept (mergekit: torch's unstable sort).
    """
    scores = torch.empty_like(x[0])  # (*shape), reused across models

    def masker(i: int, xi: Tensor, scratch: Tensor) -> Tensor:
        k = trim_count(fraction(density[i]), xi.numel())
        return topk_mask(torch.abs(xi, out=scores), k, out=scratch)

    return _sparsify(x, density, masker, rescale=rescale, norm=norm, inplace=inplace)


def sparsify_threshold(
    x: Tensor,
    density: Tensor,
    threshold: Tensor,
    *,
    rescale: bool = False,
    norm: RescaleNorm = "l1",
    inplace: bool = False,
) -> Tensor:
    """Keep the entries of each ``x[i]`` with ``|x| >= threshold[i]`` (TIES trim with a whole-model
    threshold from :func:`unimerge.methods._global.global_magnitude_threshold`)."""

    def masker(i: int, xi: Tensor, scratch: Tensor) -> Tensor:
        return torch.ge(xi.abs(), threshold[i].to(xi.dtype), out=torch.empty_like(xi, dtype=torch.bool))

    return _sparsify(x, density, masker, rescale=rescale, norm=norm, inplace=inplace)


def breadcrumbs_mask(x: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs mask of one tensor: drop the largest ``gamma`` fraction by magnitude,
    then the smallest, keeping ``int(density * numel)`` entries (mergekit's ``magnitude_outliers``).

    ``n_top = int(gamma * numel)`` largest are dropped; if that leaves fewer than the target, fewer
    large ones are dropped so the target is always kept. Unlike the TIES trim's, the target is not
    raised to 1: a tensor under ``1 / density`` entries keeps nothing, as in mergekit 0.1.5's
    ``magnitude_outliers`` (kept band ``sorted[n_bot : n_bot + target]``; ``gamma: 0``: the top ``target``).
    """
    n = x.numel()
    target = int(density * n)
    n_top = min(int(gamma * n), n - target)
    scores = x.abs()
    keep = topk_mask(scores, n_top + target)
    if n_top > 0:
        keep &= ~topk_mask(scores, n_top)
    return keep


def sparsify_breadcrumbs(
    x: Tensor,
    density: Tensor,
    gamma: Tensor,
    *,
    rescale: bool = False,
    norm: RescaleNorm = "l1",
    inplace: bool = False,
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024) on each model: ``(n, *shape)``."""

    def masker(i: int, xi: Tensor, scratch: Tensor) -> Tensor:
        return breadcrumbs_mask(xi, fraction(density[i]), fraction(gamma[i]))

    return _sparsify(x, density, masker, rescale=rescale, norm=norm, inplace=inplace)


def sparsify_random(
    x: Tensor,
    density: Tensor,
    *,
    rescale: bool,
    generator: torch.Generator | None,
    norm: RescaleNorm = "density",
    inplace: bool = False,
) -> Tensor:
    """DARE: drop each entry with probability ``1 - density[i]``; optionally rescale (see module doc)."""

    def masker(i: int, xi: Tensor, scratch: Tensor) -> Tensor:
        return uniform_(scratch, generator).lt_(fraction(density[i]))

    return _sparsify(x, density, masker, rescale=rescale, norm=norm, inplace=inplace)


def rank_magnitude_probs(x: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA keep probabilities of one tensor, from magnitude ranks along dim 1 (mergekit).

    1-D tensors are one row. Within each row the smallest magnitude gets ``density - epsilon``, the
    largest ``density + epsilon``, linear in rank between; a row of length 1 gets ``density``.
    """
    t = x.reshape(1, -1) if x.dim() < 2 else x
    m = t.shape[1]
    if m < 2:
        return torch.full_like(x, density)
    order = t.abs().argsort(dim=1, stable=True)  # (rows, m, ...)
    view = [1, m] + [1] * (t.dim() - 2)
    ranks = torch.arange(m, device=t.device, dtype=x.dtype).reshape(view).expand(order.shape)
    rank = torch.empty(order.shape, device=t.device, dtype=x.dtype).scatter_(1, order, ranks)
    probs = rank.div_(m - 1).mul_(2.0 * epsilon).add_(density - epsilon)
    return probs.reshape(x.shape)


def sparsify_rank_magnitude(
    x: Tensor,
    density: Tensor,
    epsilon: Tensor,
    *,
    rescale: bool,
    generator: torch.Generator | None,
    norm: RescaleNorm = "l1",
    inplace: bool = False,
) -> Tensor:
    """DELLA MagPrune (Deep et al. 2024): drop entries at random, larger magnitudes kept more often."""

    def masker(i: int, xi: Tensor, scratch: Tensor) -> Tensor:
        probs = rank_magnitude_probs(xi, fraction(density[i]), fraction(epsilon[i]))
        return uniform_(scratch, generator).lt_(probs)

    return _sparsify(x, density, masker, rescale=rescale, norm=norm, inplace=inplace)


def elect_sign(x: Tensor, method: SignMethod = "sum") -> Tensor:
    """TIES sign election: mask ``(n, *shape)`` of entries whose sign agrees with the elected sign.

    ``sum`` elects the sign of the summed (weighted) values, ``count`` the majority sign by vote;
    a tie elects ``+``. Zero entries never agree.
    """
    if method == "sum":
        positive = x.sum(dim=0) >= 0  # (*shape)
    else:
        positive = torch.count_nonzero(x > 0, dim=0) >= torch.count_nonzero(x < 0, dim=0)
    return torch.where(positive, x > 0, x < 0)


def _consensus_chunk(
    x: Tensor, w: list[float], method: SignMethod, scales: list[float] | None
) -> tuple[Tensor, Tensor]:
    """:func:`consensus_sums` of a slice ``(n, c)`` (small, so its buffers stay in cache)."""
    if method == "sum" and scales is None:
        return _sum_consensus_chunk(x, w)
    pos, neg, pos_w, neg_w, scratch = (torch.zeros_like(x[0]) for _ in range(5))  # (c,) each
    votes = torch.zeros_like(x[0]) if method == "count" or scales is not None else None
    for i in range(x.shape[0]):
        s = 1.0 if scales is None else scales[i]
        pos.add_(torch.clamp(x[i], min=0, out=scratch), alpha=s)
        neg.add_(torch.clamp(x[i], max=0, out=scratch), alpha=s)
        if votes is not None and method == "sum":
            votes.add_(x[i])
        pos_w.add_(torch.gt(x[i], 0, out=scratch), alpha=w[i])
        if votes is not None and method == "count":
            votes.add_(scratch)
        neg_w.add_(torch.lt(x[i], 0, out=scratch), alpha=w[i])
        if votes is not None and method == "count":
            votes.sub_(scratch)
    elected = torch.add(pos, neg, out=scratch) if votes is None else votes  # its sign decides
    positive = elected.ge_(0)  # 1.0 where + is elected (ties elect +), else 0.0
    return neg.lerp_(pos, positive), neg_w.lerp_(pos_w, positive)  # lerp by 0/1 selects exactly


def _sum_consensus_chunk(x: Tensor, w: list[float]) -> tuple[Tensor, Tensor]:
    """The ``sum`` election in fewer passes: the elected sign ``s`` is ``+1`` where ``sum_i x_i >= 0``,
    else ``-1``, and ``x_i`` agrees where ``x_i * s > 0`` (4 passes per model instead of 8)."""
    sign = x.sum(dim=0).ge_(0).mul_(2.0).sub_(1.0)  # (c,) +1 / -1
    num, den, agree = torch.zeros_like(sign), torch.zeros_like(sign), torch.empty_like(sign)
    for i in range(x.shape[0]):
        torch.mul(x[i], sign, out=agree).gt_(0)  # 1.0 where x_i has the elected sign
        num.addcmul_(x[i], agree)
        den.add_(agree, alpha=w[i])
    return num, den


def consensus_sums(
    x: Tensor,
    weights: Tensor | None = None,
    method: SignMethod = "sum",
    *,
    normalize: bool = False,
    scales: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """TIES elect-and-sum: ``masked_sums(x * scales, elect_sign(x, method), weights)`` without masks.

    Accumulates the positive and negative parts of ``x`` and their models' weights (counts without
    ``weights``) and picks the elected side per entry, in chunks of ``x``'s flattened entries, so
    only the two results are full-size. ``scales`` (``(n,)``, non-negative) multiply each model's
    entries in the sum but not in the election (SCE). With ``normalize`` the first result is divided
    by the second (a zero divisor counts as 1), as mergekit does.

    Returns:
        ``(sum of the entries agreeing with the elected sign, sum of their models' weights)``, each
        ``(*shape)``.
    """
    n = x.shape[0]
    w = [1.0] * n if weights is None else [float(v) for v in weights]
    sc = None if scales is None else [float(v) for v in scales]
    flat = x.reshape(n, -1)  # (n, m)
    num, den = torch.empty_like(flat[0]), torch.empty_like(flat[0])  # (m,) each
    for start in range(0, flat.shape[1], _CHUNK):
        stop = start + _CHUNK
        part_num, part_den = _consensus_chunk(flat[:, start:stop], w, method, sc)
        if normalize:
            part_num.div_(part_den.masked_fill_(part_den == 0, 1.0))
        num[start:stop], den[start:stop] = part_num, part_den
    return num.reshape(x.shape[1:]), den.reshape(x.shape[1:])


def masked_sums(x: Tensor, mask: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(sum_i mask_i * x_i, sum_i mask_i * w_i)`` over models, each ``(*shape)``.

    Loops over models so no ``(n, *shape)`` temporary is made; without ``weights`` the second
    term counts the kept models.
    """
    num, den, keep = (torch.zeros_like(x[0]) for _ in range(3))
    for i in range(x.shape[0]):
        keep.copy_(mask[i])
        num.addcmul_(x[i], keep)
        den.add_(keep, alpha=1.0 if weights is None else float(weights[i]))
    return num, den


def disjoint_mean(x: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean of the masked entries of ``x`` over models (0 where none is kept).

    With ``weights`` the divisor is the sum of the kept models' weights (mergekit's normalisation);
    a zero divisor counts as 1.
    """
    num, den = masked_sums(x, mask, weights)
    return num.div_(den.masked_fill_(den == 0, 1.0))


def variance_over_models(x: Tensor) -> Tensor:
    """Population variance across models, ``(n, *shape) -> (*shape)``, in two passes.

    Same values as ``x.var(dim=0, unbiased=False)`` (to rounding), which is ~10x slower on CPU.
    """
    mean = x.mean(dim=0)  # (*shape)
    acc, scratch = torch.zeros_like(mean), torch.empty_like(mean)
    for i in range(x.shape[0]):
        torch.sub(x[i], mean, out=scratch)
        acc.addcmul_(scratch, scratch)
    return acc.div_(x.shape[0])


def uniform_(out: Tensor, generator: torch.Generator | None) -> Tensor:
    """Fill ``out`` with uniform ``[0, 1)`` samples (in place) and return it.

    On the CPU a float32 buffer is filled by NumPy's PCG64, seeded by one draw from ``generator``
    (1.6x faster than ``torch.rand``'s Mersenne twister, and DARE draws one number per parameter);
    elsewhere ``torch.rand``. Either way the samples depend only on ``generator``'s state.
    """
    if generator is None or out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous():
        return torch.rand(out.shape, generator=generator, out=out, device=out.device, dtype=out.dtype)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    np.random.Generator(np.random.PCG64(seed)).random(out=out.numpy().reshape(-1), dtype=np.float32)
    return out


def generator_for(seed: int, tensor_name: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, tensor_name)``: output does not depend on thread order."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g
