"""PEFT's ``add_weighted_adapter`` combination types, on one module's plain tensors.

Reproduces ``peft.tuners.lora.LoraModel.add_weighted_adapter`` (peft 0.21.2:
``tuners/lora/model.py``, ``_generalized_task_arithmetic_weighted_adapter`` and
``_svd_generalized_task_arithmetic_weighted_adapter``; ``utils/merge_utils.py``) for one module whose
adapters are ``(A_i (r_i, in), B_i (out, r_i), scale_i)`` with weights ``w_i``:

- ``cat``: ``A = [w_1 s_1 A_1; ...; w_n s_n A_n]`` (rows), ``B = [B_1 ... B_n]`` (columns), so
  ``B A = sum_i w_i s_i B_i A_i`` exactly; rank ``sum_i r_i``.
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (all ``r_i`` equal): the
  ``A_i`` and the ``B_i`` are merged *separately* by that method, ``A_i`` with weight
  ``sign(w_i s_i) sqrt(|w_i s_i|)`` and ``B_i`` with ``sqrt(|w_i s_i|)`` (so ``B A`` is not the
  merge of the updates: cross terms ``B_i A_j`` remain); rank ``r``.
- ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the updates
  ``dW_i = s_i B_i A_i`` are merged with task arithmetic / TIES / DARE / magnitude pruning (weights
  ``w_i``), then ``dW = U S V^T`` is truncated to rank ``svd_rank`` (default ``max r_i``):
  ``B = U S``, ``A = V^T``; with ``svd_clamp`` both are clamped to ``[-q, q]``, ``q`` the
  ``svd_clamp`` quantile of their entries together.

PEFT's sparsifiers, which differ from :mod:`unimerge.methods.primitives`' (mergekit's) in small ways,
are kept: the magnitude trim keeps ``int(density * numel)`` entries (possibly none); TIES elects the
sign on the pruned, *unweighted* tensors (``total``: sign of the sum, ``frequency``: of the sign
votes; a tie is ``+``) and divides the weighted agreeing entries by their *count*; DARE keeps each
entry with ``torch.bernoulli(density)`` and divides by ``density``; ``density >= 1`` prunes nothing.
DARE draws from ``generator`` (the global RNG when ``None``, as PEFT does) in PEFT's order: per
module, the ``A_i`` then the ``B_i`` (non-SVD types) or the ``dW_i`` (SVD types), in adapter order,
so the same RNG state before each module gives PEFT's masks.

The new adapter has ``r`` = the rank above and ``lora_alpha = r`` (scale 1), as PEFT sets them (with
``use_rslora`` PEFT's new adapter would scale by ``sqrt(r)``). With one adapter PEFT always uses
``linear``. Layouts: ``A``/``B`` as PEFT stores them (``lora_A.weight``, ``lora_B.weight``; for
embeddings ``lora_embedding_A``/``B``; conv ``A`` flattened to ``(r, -1)``): everything here works
on ``B @ A``, which is what PEFT's SVD path decomposes after undoing its transposes. PEFT takes the
ranks from the adapter configs (``max(r, *rank_pattern)``); here from the factors' shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, cast

import torch
from torch import Tensor

from unimerge.errors import ConfigError
from unimerge.methods.primitives import disjoint_mean, elect_sign, topk_mask

__all__ = [
    "COMBINATION_TYPES",
    "CombinedLora",
    "FactorsLike",
    "SignMethod",
    "check_combination",
    "combine_lora",
    "dare_prune",
    "magnitude_prune_peft",
    "merge_task_tensors",
]

SignMethod = Literal["total", "frequency"]
_FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES: tuple[str, ...] = ("cat", *_FACTOR_TYPES, *_SVD_TYPES)
_NEEDS_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}


class FactorsLike(Protocol):
    """One adapter's factors of one module (e.g. :class:`unimerge.lora.adapter.LoraFactors`)."""

    @property
    def a(self) -> Tensor: ...  # (r, in)
    @property
    def b(self) -> Tensor: ...  # (out, r)
    @property
    def scale(self) -> float: ...


Factors = tuple[Tensor, Tensor, float] | FactorsLike


@dataclass(frozen=True)
class CombinedLora:
    """The new adapter's factors of one module and its ``r`` / ``lora_alpha`` (PEFT: ``alpha = r``)."""

    a: Tensor  # (r, in)
    b: Tensor  # (out, r)
    r: int
    alpha: float

    @property
    def scale(self) -> float:
        """``lora_alpha / r``, PEFT's scaling without rsLoRA."""
        return self.alpha / self.r

    def delta(self) -> Tensor:
        """The module's update ``scale * B @ A`` ``(out, in)``."""
        return self.scale * (self.b @ self.a)


def _unpack(f: Factors) -> tuple[Tensor, Tensor, float]:
    if isinstance(f, tuple):
        return f
    return f.a, f.b, float(f.scale)


def magnitude_prune_peft(t: Tensor, density: float) -> Tensor:
    """Keep the ``int(density * numel)`` largest magnitudes of ``t`` (PEFT's ``magnitude_based_pruning``)."""
    if density >= 1:
        return t
    return t * topk_mask(t.abs(), int(density * t.numel()))


def dare_prune(t: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """Keep each entry with probability ``density`` (``torch.bernoulli``, as PEFT), divided by ``density``."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def merge_task_tensors(
    method: str,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    density: float,
    sign_method: SignMethod,
    generator: torch.Generator | None,
) -> Tensor:
    """PEFT's ``merge_utils`` method ``method`` (``linear``/``svd`` is task arithmetic) on ``tensors``."""
    if method in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune_peft(t, density) for t in tensors]
    elif method in ("dare_ties", "dare_linear"):
        tensors = [dare_prune(t, density, generator) for t in tensors]
    x = torch.stack(list(tensors))  # (n, *shape)
    w = torch.tensor(list(weights), dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
    if method in ("ties", "dare_ties"):
        mask = elect_sign(x, "sum" if sign_method == "total" else "count")  # on the unweighted tensors
        return disjoint_mean(x * w, mask)  # divided by the number of agreeing tensors
    return (x * w).sum(dim=0)


def _cat(factors: Sequence[tuple[Tensor, Tensor, float]], weights: Sequence[float]) -> CombinedLora:
    a = torch.cat([fa * w * s for (fa, _, s), w in zip(factors, weights, strict=True)], dim=0)
    b = torch.cat([fb for _, fb, _ in factors], dim=1)
    return CombinedLora(a, b, a.shape[0], float(a.shape[0]))


def _factorwise(
    kind: str,
    factors: Sequence[tuple[Tensor, Tensor, float]],
    weights: Sequence[float],
    density: float,
    sign_method: SignMethod,
    generator: torch.Generator | None,
) -> CombinedLora:
    ranks = {fa.shape[0] for fa, _, _ in factors}
    if len(ranks) != 1:
        raise ConfigError(
            f"combination_type {kind!r} needs adapters of one rank, got ranks {sorted(ranks)}; use 'cat' or an "
            "'*_svd' type to combine adapters of different ranks"
        )
    ws = [w * s for (_, _, s), w in zip(factors, weights, strict=True)]
    w_a = [math.sqrt(abs(v)) * (1.0 if v >= 0 else -1.0) for v in ws]  # the sign on A only
    w_b = [math.sqrt(abs(v)) for v in ws]
    a = merge_task_tensors(kind, [fa for fa, _, _ in factors], w_a, density, sign_method, generator)
    b = merge_task_tensors(kind, [fb for _, fb, _ in factors], w_b, density, sign_method, generator)
    r = int(ranks.pop())
    return CombinedLora(a, b, r, float(r))


def _svd_combine(
    kind: str,
    factors: Sequence[tuple[Tensor, Tensor, float]],
    weights: Sequence[float],
    opts: _SvdOptions,
) -> CombinedLora:
    # PEFT's get_delta_weight: in the base weight's layout, a transposed view for (in, out) weights
    deltas = [(fb @ fa).T * s if opts.transposed else (fb @ fa) * s for fa, fb, s in factors]
    method = "linear" if kind == "svd" else kind.removesuffix("_svd")
    delta = merge_task_tensors(method, deltas, weights, opts.density, opts.sign_method, opts.generator)
    delta = delta.T if opts.transposed else delta  # (out, in), the B @ A layout
    dtype = delta.dtype
    work = delta if dtype in (torch.float32, torch.float64) else delta.float()
    u, s, vh = cast(
        "tuple[Tensor, Tensor, Tensor]",
        torch.linalg.svd(work, full_matrices=opts.full_matrices, driver=opts.driver),
    )
    rank = opts.svd_rank or max(fa.shape[0] for fa, _, _ in factors)
    b = u[:, :rank] @ torch.diag(s[:rank])
    a = vh[:rank, :]
    if opts.clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), opts.clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return CombinedLora(a.to(dtype), b.to(dtype), rank, float(rank))


@dataclass(frozen=True)
class _SvdOptions:
    svd_rank: int | None
    clamp: float | None
    full_matrices: bool
    driver: str | None
    density: float
    sign_method: SignMethod
    generator: torch.Generator | None
    transposed: bool


def check_combination(combination_type: str, n: int, n_weights: int, density: float | None) -> None:
    """Refuse what PEFT refuses (an unknown type, a missing density) before any factor is read.

    Raises:
        ConfigError: naming the valid types, or the missing value.
    """
    if combination_type not in COMBINATION_TYPES:
        raise ConfigError(
            f"Unknown combination_type {combination_type!r}; PEFT's add_weighted_adapter types are: "
            + ", ".join(COMBINATION_TYPES)
        )
    if not n or n != n_weights:
        raise ConfigError(
            f"PEFT's combination needs one weight per adapter and at least one adapter, got {n} adapters "
            f"and {n_weights} weights"
        )
    if combination_type.removesuffix("_svd") in _NEEDS_DENSITY and density is None:
        raise ConfigError(f"combination_type {combination_type!r} needs a density in [0, 1] (fraction kept)")
    if density is not None and density < 0:
        raise ConfigError(f"density must be >= 0 (fraction of entries kept), got {density}")


def combine_lora(
    combination_type: str,
    factors: Sequence[Factors],
    weights: Sequence[float],
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: SignMethod = "total",
    generator: torch.Generator | None = None,
    transposed: bool = False,
    one_is_linear: bool = True,
) -> CombinedLora:
    """PEFT's ``add_weighted_adapter(adapters, weights, ..., combination_type, ...)`` for one module.

    Args:
        combination_type: one of :data:`COMBINATION_TYPES` (see the module docstring).
        factors: per adapter ``(A (r_i, in), B (out, r_i), scale_i)`` or an object with ``a``, ``b``,
            ``scale`` (e.g. :class:`unimerge.lora.adapter.LoraFactors`).
        weights: one weight per adapter (negative subtracts it).
        svd_rank: rank of the ``*svd`` types' result (default: the largest ``r_i``).
        svd_clamp: quantile in ``[0, 1]`` at which the ``*svd`` types clamp both factors.
        svd_full_matrices: ``full_matrices`` of the SVD (PEFT's default ``True``).
        svd_driver: ``torch.linalg.svd``'s ``driver`` (CUDA only).
        density: fraction kept by the pruning types (required by them).
        majority_sign_method: TIES' sign election, ``total`` or ``frequency``.
        generator: random source of the DARE types (``None``: torch's global RNG, as PEFT).
        transposed: the module's base weight is stored ``(in, out)`` (embeddings, ``fan_in_fan_out``
            layers: ``LoraFactors.transpose``); the ``*svd`` types then prune ``dW_i`` in that layout,
            as PEFT does, so DARE's masks land on the same entries.
        one_is_linear: a single adapter is combined with ``linear`` (PEFT's rule for a request of one
            adapter); ``False`` when the caller applied that rule to the whole request and only this
            module has one adapter (PEFT then runs the asked type on that one).

    Returns:
        The new adapter's ``A``, ``B``, ``r`` and ``lora_alpha`` for this module.

    Raises:
        ConfigError: an unknown type (the valid ones are listed), a missing density, unequal ranks
            for a type that needs one rank, or a weight count that does not match.
    """
    check_combination(combination_type, len(factors), len(weights), density)
    fs = [_unpack(f) for f in factors]
    kind = "linear" if len(fs) == 1 and one_is_linear else combination_type  # PEFT: one adapter is linear
    d = 1.0 if density is None else density
    if kind == "cat":
        return _cat(fs, weights)
    if kind in _FACTOR_TYPES:
        return _factorwise(kind, fs, weights, d, majority_sign_method, generator)
    opts = _SvdOptions(
        svd_rank, svd_clamp, svd_full_matrices, svd_driver, d, majority_sign_method, generator, transposed
    )
    return _svd_combine(kind, fs, weights, opts)
