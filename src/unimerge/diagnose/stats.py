"""Diagnostics of task vectors, as pure functions of tensors: one tensor's statistics, and their sums.

Three causes of failed merges are measured (survey: "Model Merging in LLMs, MLLMs, and Beyond",
arXiv 2408.07666, and the papers each metric follows):

- **Directional conflict.** The Gram matrix ``G_ij = tau_i . tau_j`` gives pairwise cosines; sign
  conflicts are counted among entries where both task vectors are non-zero (optionally only each
  one's top-``k`` fraction by magnitude, as TIES trims: Yadav et al. 2023, arXiv 2306.01708); and the
  rate TIES's sign election faces: among entries where some (trimmed) task vector is non-zero, the
  fraction where one of them disagrees with the elected sign ``sign(sum_i tau_i)`` (``+`` on a tie).
- **Scale mismatch.** Norms ``sqrt(G_ii)``, their max/min ratio, the relative update
  ``||tau_i|| / ||theta_0||``, and normalisation sensitivity ``||TA(tau) - TA(tau')|| / ||TA(tau)||``,
  where ``TA`` sums task vectors and ``tau'_i = (c / ||tau_i||) tau_i`` rescales each to the mean norm
  ``c``; with ``d_i = 1 - c / ||tau_i||`` it is ``sqrt(d^T G d / 1^T G 1)``, so it needs only ``G``.
- **Task entanglement** (2-D tensors). Each task matrix keeps its top ``k_i`` singular vectors, ``k_i``
  the fewest whose squared singular values hold ``energy`` of ``||tau_i||_F^2`` (at most ``max_rank``).
  Overlap of two tasks is the mean over the left (U) and right (V) sides of
  ``||U_i^T U_j||_F^2 / min(k_i, k_j)``: 1 when one subspace contains the other, 0 when they are
  orthogonal, ``max(k_i, k_j) (1/m + 1/k) / 2`` expected for random subspaces of an ``(m, k)`` matrix
  (reported beside it, as ``subspace_overlap_chance``; TSV-M measures interference on the
  same singular vectors: Gargiulo et al. 2025, arXiv 2412.00081). Effective rank is Roy & Vetterli's
  ``exp(H(p))`` with ``p = sigma / sum(sigma)`` (EUSIPCO 2007).

Matrices with both sides above ``exact_max_dim`` are decomposed by a randomized SVD (Halko et al.
2011, arXiv 0909.4061) seeded by the caller's generator, so results are deterministic. Their
effective rank is an estimate: it sees the top ``max_rank + oversample`` singular values, and the
rest of the energy (known exactly: ``||tau_i||_F^2``) is laid out as a power-law tail
(:func:`power_tail`). Measured on 1408 x 512 matrices (default settings) against the exact value:
low rank plus flat noise 1.00x, Gaussian 1.05x, power laws ``i^-a`` 1.03x (a = 0.3), 1.06x (0.5),
1.28x (1), 1.12x (2), exponential decay ``exp(-i/30)`` 3.2x: an upper estimate, best compared
between tasks of the same tensor rather than read as an absolute rank.

Every field of :class:`Stats` adds over tensors, so ``sum(stats)`` gives the statistics of the
concatenated model: cosines are those of the concatenated vectors, rates are pooled counts, and the
subspace quantities are averages weighted by parameter count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unimerge.methods.primitives import topk_mask, trim_count

__all__ = [
    "Stats",
    "SubspaceSettings",
    "effective_rank",
    "elected_sign_conflicts",
    "chance_overlap",
    "energy_rank",
    "gram",
    "normalization_sensitivity",
    "pair_sign_conflicts",
    "power_tail",
    "subspace_overlap",
    "summarize",
    "tensor_stats",
    "top_fraction",
    "top_singular",
]

_ROUNDING = 16  # missing energy below this many machine epsilons (relative) is rounding, not a tail
_CHUNK = 1 << 22  # entries per slice for counting (float32 holds integers exactly only up to 2**24)


@dataclass(frozen=True)
class SubspaceSettings:
    """How task matrices are decomposed (see the module docstring)."""

    energy: float = 0.8
    max_rank: int = 16
    exact_max_dim: int = 256
    oversample: int = 8
    power_iterations: int = 1


@dataclass(frozen=True)
class Stats:
    """Additive statistics of ``n`` task vectors over some tensors (one tensor, a layer, a model).

    ``conflict``/``both`` count the top-``k`` entries, ``conflict_all``/``both_all`` all non-zero ones;
    ``overlap_sum``, ``chance_sum``, ``erank_sum`` and ``erank_frac_sum`` are sums of ``numel * value``
    over 2-D tensors, whose parameters ``matrix_numel`` counts.
    """

    numel: int
    gram: np.ndarray  # (n, n) float64
    base_sq: float
    conflict: np.ndarray  # (n, n) int64
    both: np.ndarray
    conflict_all: np.ndarray
    both_all: np.ndarray
    elect_conflict: int = 0
    elect_decided: int = 0
    matrix_numel: int = 0
    overlap_sum: np.ndarray | None = None  # (n, n)
    chance_sum: np.ndarray | None = None  # (n, n): the overlap random subspaces of the same ranks expect
    erank_sum: np.ndarray | None = None  # (n,)
    erank_frac_sum: np.ndarray | None = None  # (n,)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # per-tensor only (not added)

    @property
    def n(self) -> int:
        return int(self.gram.shape[0])

    def __add__(self, other: Stats) -> Stats:
        def add(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            return b if a is None else a if b is None else a + b

        return Stats(
            self.numel + other.numel,
            self.gram + other.gram,
            self.base_sq + other.base_sq,
            self.conflict + other.conflict,
            self.both + other.both,
            self.conflict_all + other.conflict_all,
            self.both_all + other.both_all,
            self.elect_conflict + other.elect_conflict,
            self.elect_decided + other.elect_decided,
            self.matrix_numel + other.matrix_numel,
            add(self.overlap_sum, other.overlap_sum),
            add(self.chance_sum, other.chance_sum),
            add(self.erank_sum, other.erank_sum),
            add(self.erank_frac_sum, other.erank_frac_sum),
        )


# ----------------------------------------------------------------------------- direction and scale


def gram(tau: Tensor) -> np.ndarray:
    """``G_ij = tau_i . tau_j`` of ``tau`` ``(n, N)``: ``(n, n)``, slices summed in float64."""
    out = np.zeros((tau.shape[0],) * 2)
    for c in range(0, tau.shape[1], _CHUNK):
        part = tau[:, c : c + _CHUNK]
        out += (part @ part.T).double().cpu().numpy()
    return out


def _count(a: Tensor, b: Tensor) -> np.ndarray:
    """``a @ b.T`` of small-integer-valued float slices, as exact int64 counts."""
    return (a @ b.T).round().long().cpu().numpy()


def pair_sign_conflicts(tau: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(opposite, both)``: per pair, entries of ``tau`` ``(n, N)`` where both are non-zero with
    opposite signs, and where both are non-zero; ``(n, n)`` int64 each.

    With ``s = sign(tau)``: ``s_i . s_j`` is (same signs - opposite signs) and ``|s_i| . |s_j|`` is
    (same + opposite), so two matrix products count both.
    """
    n = tau.shape[0]
    agree, both = np.zeros((n, n), np.int64), np.zeros((n, n), np.int64)
    for c in range(0, tau.shape[1], _CHUNK):
        sign = torch.sign(tau[:, c : c + _CHUNK])  # (n, c)
        agree += _count(sign, sign)
        nz = sign.abs_()
        both += _count(nz, nz)
    return (both - agree) // 2, both


def elected_sign_conflicts(tau: Tensor) -> tuple[int, int]:
    """``(conflicting, decided)``: entries of ``tau`` ``(n, N)`` where some non-zero entry disagrees
    with the elected sign ``sign(sum_i tau_i)`` (``+`` on a tie, as TIES), and where some is non-zero."""
    conflicting = decided = 0
    for c in range(0, tau.shape[1], _CHUNK):
        part = tau[:, c : c + _CHUNK]
        positive = part.sum(dim=0) >= 0  # (c,) the elected sign
        some_pos, some_neg = (part > 0).any(dim=0), (part < 0).any(dim=0)  # (c,) each
        conflicting += int(torch.count_nonzero(torch.where(positive, some_neg, some_pos)))
        decided += int(torch.count_nonzero(some_pos.logical_or_(some_neg)))
    return conflicting, decided


def top_fraction(tau: Tensor, fraction: float) -> Tensor:
    """Zero all but each row's top ``fraction`` entries by magnitude, in place (TIES's trim,
    :func:`~unimerge.methods.primitives.trim_count` entries kept); ``fraction >= 1`` keeps all."""
    if fraction >= 1.0:
        return tau
    scores = torch.empty_like(tau[0])
    for row in tau:
        keep = topk_mask(torch.abs(row, out=scores), trim_count(fraction, row.numel()))
        row.masked_fill_(~keep, 0.0)
    return tau


def normalization_sensitivity(g: np.ndarray) -> float | None:
    """``||TA(tau) - TA(tau rescaled to the mean norm)|| / ||TA(tau)||`` from the Gram matrix ``g``;
    zero task vectors are left as they are; ``None`` when the task-arithmetic sum is zero."""
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    nonzero = norms > 0
    if not nonzero.any():
        return None
    c = norms[nonzero].mean()
    d = np.where(nonzero, 1.0 - c / np.where(nonzero, norms, 1.0), 0.0)
    total = float(g.sum())
    if total <= 0:
        return None
    return math.sqrt(max(float(d @ g @ d), 0.0) / total)


# ----------------------------------------------------------------------------- entanglement


def top_singular(
    a: Tensor, rank: int, settings: SubspaceSettings, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, S, V)`` with the top singular triplets of ``a`` ``(m, k)``: all of them (exact) when a
    side is at most ``exact_max_dim`` or no ``generator`` is given, else ``rank + oversample`` from a
    randomized SVD (Halko et al., one draw of ``generator``, ``power_iterations`` steps of subspace
    iteration)."""
    m, k = a.shape
    if min(m, k) <= settings.exact_max_dim or generator is None:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u, s, vh.mT
    q = min(rank + settings.oversample, m, k)
    omega = torch.randn(k, q, generator=generator, device=generator.device).to(a.device, a.dtype)
    y = a @ omega  # (m, q)
    for _ in range(settings.power_iterations):
        y = a @ (a.mT @ torch.linalg.qr(y).Q)
    basis = torch.linalg.qr(y).Q  # (m, q)
    ub, s, vh = torch.linalg.svd(basis.mT @ a, full_matrices=False)
    return basis @ ub, s, vh.mT


def energy_rank(s: Tensor, energy_total: float, fraction: float, max_rank: int) -> int:
    """The fewest leading singular values ``s`` whose squares reach ``fraction`` of ``energy_total``
    (at least 1, at most ``max_rank`` and ``len(s)``)."""
    cum = torch.cumsum(s.double() ** 2, 0)
    reached = int(torch.count_nonzero(cum < fraction * energy_total)) + 1
    return max(1, min(reached, max_rank, s.numel()))


def power_tail(last: float, kept: int, dim: int, energy: float) -> Tensor:
    """The ``dim - kept`` singular values after ``kept`` computed ones, the last being ``last``, that
    hold ``energy`` in total: a power law ``last * (i / kept) ** -alpha`` (``alpha >= 0`` by bisection),
    or a flat tail when even a flat one at ``last`` holds less (the computed values are then low)."""
    i = torch.arange(kept + 1, dim + 1, dtype=torch.float64) / kept
    if energy >= (dim - kept) * last**2 or last <= 0:
        return torch.full((dim - kept,), math.sqrt(energy / (dim - kept)), dtype=torch.float64)
    lo, hi = 0.0, 64.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float((last**2 * i ** (-2 * mid)).sum()) > energy else (lo, mid)
    return last * i ** (-lo)


def effective_rank(s: Tensor, dim: int | None = None, energy_total: float | None = None) -> float:
    """Roy & Vetterli's effective rank ``exp(H(s / sum(s)))`` of singular values ``s``.

    With ``dim`` and ``energy_total`` (``||A||_F^2``) for a truncated spectrum, the energy missing
    from ``s`` fills the ``dim - len(s)`` values not computed as a power-law tail (:func:`power_tail`;
    none when it is within rounding error of ``s``'s dtype). That is exact for power-law spectra and
    low rank plus flat noise, and overestimates faster (e.g. exponential) decay.
    """
    eps = torch.finfo(s.dtype).eps
    s = s.double().clamp_min(0.0)
    if dim is not None and energy_total is not None and dim > s.numel() > 0:
        rest = energy_total - float((s**2).sum())
        if rest > _ROUNDING * eps * energy_total:  # below rounding: no tail
            s = torch.cat([s, power_tail(float(s[-1]), s.numel(), dim, rest)])
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def subspace_overlap(a: Tensor, b: Tensor) -> float:
    """``||a^T b||_F^2 / min(k_a, k_b)`` for orthonormal columns ``a`` ``(m, k_a)``, ``b`` ``(m, k_b)``."""
    return float((a.mT @ b).square().sum()) / min(a.shape[1], b.shape[1])


def chance_overlap(k_a: int, k_b: int, m: int, k: int) -> float:
    """The expected :func:`subspace_overlap` (mean of both sides) of uniformly random subspaces of
    ranks ``k_a`` and ``k_b`` of an ``(m, k)`` matrix: ``E||A^T B||_F^2 = k_a k_b / m`` per side."""
    if min(k_a, k_b) == 0:
        return 0.0
    return 0.5 * max(k_a, k_b) * (1.0 / m + 1.0 / k)


def _subspaces(
    tau: Tensor, energies: np.ndarray, settings: SubspaceSettings, generator: torch.Generator | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Overlap ``(n, n)``, its chance level ``(n, n)``, effective rank ``(n,)`` and its fraction of
    ``min(m, k)``, and each ``k_i`` for task matrices ``tau`` ``(n, m, k)`` of squared norms ``energies``."""
    n, dim = tau.shape[0], min(tau.shape[1:])
    bases: list[tuple[Tensor, Tensor] | None] = []
    erank, ranks = np.zeros(n), []
    for i in range(n):
        energy = float(energies[i])
        if energy == 0.0:
            bases.append(None)
            ranks.append(0)
            continue
        u, s, v = top_singular(tau[i], settings.max_rank, settings, generator)
        k = energy_rank(s, energy, settings.energy, settings.max_rank)
        bases.append((u[:, :k], v[:, :k]))
        ranks.append(k)
        erank[i] = effective_rank(s, dim, energy)
    overlap, chance = np.eye(n), np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            bi, bj = bases[i], bases[j]
            value = 0.0 if bi is None or bj is None else _mean_overlap(bi, bj)
            overlap[i, j] = overlap[j, i] = value
            chance[i, j] = chance[j, i] = chance_overlap(ranks[i], ranks[j], *tau.shape[1:])
    return overlap, chance, erank, erank / dim, ranks


def _mean_overlap(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> float:
    return 0.5 * (subspace_overlap(a[0], b[0]) + subspace_overlap(a[1], b[1]))


# ----------------------------------------------------------------------------- one tensor


def tensor_stats(
    tau: Tensor,
    base: Tensor,
    *,
    top_k: float,
    settings: SubspaceSettings = SubspaceSettings(),
    generator: torch.Generator | None = None,
) -> Stats:
    """All statistics of one tensor from its task vectors ``tau`` ``(n, *shape)`` (float; trimmed in
    place, so pass a buffer you own) and the base tensor ``base`` ``(*shape)``.

    ``top_k`` is the fraction of entries per task vector the top-``k`` sign conflicts and the sign
    election keep (``1.0``: all).
    """
    n, shape = tau.shape[0], tuple(tau.shape[1:])
    numel = math.prod(shape)
    flat = tau.reshape(n, numel)
    g = gram(flat)
    conflict_all, both_all = pair_sign_conflicts(flat)
    sub: dict[str, Any] = {}
    if len(shape) == 2 and numel > 0:
        overlap, chance, erank, frac, ranks = _subspaces(tau, np.diag(g), settings, generator)
        sub = {"overlap_sum": overlap * numel, "chance_sum": chance * numel, "erank_sum": erank * numel,
               "erank_frac_sum": frac * numel}  # fmt: skip
        sub["extra"] = {"subspace_rank": ranks}
    top_fraction(flat, top_k)
    conflict, both = pair_sign_conflicts(flat) if top_k < 1.0 else (conflict_all, both_all)
    elect = elected_sign_conflicts(flat)
    base_sq = (
        float(
            torch.linalg.vector_norm(
                base, dtype=torch.float64 if base.dtype == torch.float64 else torch.float32
            )
        )
        ** 2
    )
    return Stats(numel, g, base_sq, conflict, both, conflict_all, both_all, *elect,
                 matrix_numel=numel if sub else 0, **sub)  # fmt: skip


# ----------------------------------------------------------------------------- derived numbers


def _rate(count: np.ndarray, total: np.ndarray) -> list[list[float | None]]:
    out = np.where(total > 0, count / np.maximum(total, 1), np.nan)
    np.fill_diagonal(out, 0.0)
    rates: list[list[float | None]] = _plain(out)
    return rates


def _plain(a: np.ndarray) -> Any:
    """A JSON-ready list (``None`` for NaN or infinity)."""
    return [_plain(x) for x in a] if a.ndim else (float(a) if np.isfinite(a) else None)


def summarize(stats: Stats) -> dict[str, Any]:
    """The reported numbers of ``stats`` (one tensor, a layer or the whole model), JSON-ready.

    Keys: ``cosine``, ``sign_conflict`` (top-``k`` entries), ``sign_conflict_all``,
    ``sign_conflict_rate`` (the sign election's), ``norms``, ``base_norm``, ``relative_update``,
    ``norm_ratio``, ``normalization_sensitivity``, and for 2-D tensors ``subspace_overlap`` and
    ``effective_rank`` (and ``subspace_overlap_chance``: the overlap random subspaces of the same
    ranks would have; ``effective_rank_fraction``: the effective rank over the smaller side).
    """
    g = stats.gram
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    outer = np.outer(norms, norms)
    cosine = np.where(outer > 0, g / np.where(outer > 0, outer, 1.0), np.nan)
    np.fill_diagonal(cosine, np.where(norms > 0, 1.0, np.nan))
    base_norm = math.sqrt(stats.base_sq)
    out: dict[str, Any] = {
        "cosine": _plain(cosine),
        "sign_conflict": _rate(stats.conflict, stats.both),
        "sign_conflict_all": _rate(stats.conflict_all, stats.both_all),
        "sign_conflict_rate": stats.elect_conflict / stats.elect_decided if stats.elect_decided else None,
        "norms": _plain(norms),
        "base_norm": base_norm,
        "relative_update": _plain(norms / base_norm) if base_norm > 0 else [None] * stats.n,
        "norm_ratio": float(norms.max() / norms.min()) if norms.min() > 0 else None,
        "normalization_sensitivity": normalization_sensitivity(g),
    }
    if stats.matrix_numel and stats.overlap_sum is not None:
        w = stats.matrix_numel
        out["subspace_overlap"] = _plain(stats.overlap_sum / w)
        out["subspace_overlap_chance"] = _plain(np.asarray(stats.chance_sum) / w)
        out["effective_rank"] = _plain(np.asarray(stats.erank_sum) / w)
        out["effective_rank_fraction"] = _plain(np.asarray(stats.erank_frac_sum) / w)
    return out
