"""FR-Merging: high-pass filtering of task vectors in the Fourier domain (and FREE-Merging's experts).

Zheng & Wang, "FREE-Merging: Fourier Transform for Efficient Model Merging", ICCV 2025,
https://arxiv.org/abs/2411.16815, code ``Zhengsh123/FREE-Merging``. The formulas below are the paper's
equations as two secondary sources reproduce them identically (Yang, "Model Merging Overview",
section FREE-Merging; and an ICCV 2025 paper note); the authors' code was not available to read, so
every choice the paper leaves open is listed at the end with the resolution taken here.

**FR-Merging** (the data-free backbone, registered as ``fr_merging``). For each task vector
``v_i = theta_i - theta_pre`` seen as a 2-D signal ``v(x, y)``::

    G_i = F^-1{ H . F{v_i} },    H(eta, gamma) = 1 if sqrt(eta^2 + gamma^2) >= D0 else 0   (ideal high-pass)
    lambda_i = E(v_i) / sum_j E(v_j)
    theta_m = theta_pre + lambda * sum_i w_i * lambda_i * G_i

``F`` is the 2-D DFT, ``(eta, gamma)`` the signed integer frequency indices (DC at 0, as after
``fftshift``), so the filter removes a disk of radius ``D0`` around DC: the *low* frequencies, which
the paper finds carry the task-specific information that interferes between tasks.

**FREE-Merging's lightweight experts** (:func:`free_experts`; stored and applied per task by
:mod:`unimerge.taskmodels.experts`, ``unimerge masks --kind free_merging`` / ``unimerge task``)::

    e_i = mu_i * M(v_i, d),    mu_i = -E(M(v_i, d)) * log(d) / (lambda_i * E(v_i))
    theta_t = theta_m + e_t

``M(v, d)`` keeps the top ``d`` fraction of ``v``'s entries by magnitude (zeros elsewhere); the paper
routes each input to one expert with a trained MLP router (``w = argmax R(x)``, one-hot); here the task
is named instead, as for EMR's task modulators.

Ambiguities, and how they are resolved here:

- ``D0`` has no scale in the paper. We take ``D0 = cutoff * min(rows, cols)`` in frequency-index units
  (the convention of the public re-implementations we found, which parametrise a ratio of
  ``min(h, w)``), so ``cutoff`` is shape-free: ``0`` keeps everything (task arithmetic with the
  weights below), about ``0.71`` removes everything. Default ``0.1``.
- Which band is removed: the paper's equation (kept: ``sqrt(eta^2 + gamma^2) >= D0``, DC at the origin).
  Two public re-implementations we read differ (one masks around the array centre of an unshifted
  spectrum, which removes the *highest* frequencies; one keeps the centre and drops an outer ring);
  without the authors' code we follow the equation.
- Tensors: a ``(rows, cols)`` matrix is filtered as is; a tensor with more dims (a conv kernel) as the
  matrix ``(shape[0], prod(shape[1:]))``; 1-D and 0-d tensors (biases, norms) are not filtered (the
  paper's filter is defined on 2-D signals).
- ``E(.)`` is "the average". A signed mean of a task vector is near zero and of either sign, which makes
  ``lambda_i`` and ``mu_i`` meaningless, so ``E`` is the mean *absolute* value (as EMR's rescalers,
  which FREE-Merging compares itself with). ``E(M(v, d))`` averages over all entries (zeros included),
  so ``E(M) / E(v)`` is the share of ``|v|`` mass in the top ``d``; ``log`` is natural and ``d`` a
  fraction in ``(0, 1)`` (``-log d > 0``).
- Scope: every statistic (``E``, top-``d``, hence ``lambda_i`` and ``mu_i``) is taken per tensor.
- ``lambda_i`` sum to 1, so the paper's formula alone is a weighted *mean* of filtered vectors; the
  global ``lambda`` (our addition, default 1.0 = the formula as written) scales it, like task
  arithmetic's scaling, and the per-model ``weight`` multiplies ``lambda_i``. Experts use the paper's
  ``lambda_i`` (no ``weight``, no ``lambda``).

The FFT is a real FFT (``rfft2``/``irfft2``): the mask depends on ``|eta|`` and ``|gamma|`` only, so it is
Hermitian-symmetric and the filtered signal is exactly real.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from unimerge.methods.primitives import topk_mask
from unimerge.methods.registry import register_method

__all__ = [
    "FrParams",
    "fr_coefficients",
    "fr_merging",
    "free_expert",
    "free_experts",
    "high_pass",
    "high_pass_mask",
]


class FrParams(BaseModel):
    """FR-Merging parameters: the high-pass cut-off and the scaling of the merged vector."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)
    cutoff: float = Field(
        default=0.1, ge=0.0, le=1.0, description="D0 as a fraction of min(rows, cols) (frequency-index units)"
    )
    lambda_: float = Field(default=1.0, alias="lambda", ge=0.0, le=100.0, description="scaling")


def _as_matrix(v: Tensor) -> Tensor:
    """``v`` (``ndim >= 2``) as the 2-D signal the filter sees: ``(shape[0], prod(shape[1:]))``."""
    return v.reshape(v.shape[0], -1)


def high_pass_mask(rows: int, cols: int, d0: float, device: torch.device | str = "cpu") -> Tensor:
    """Ideal high-pass mask on the ``rfft2`` half-spectrum: ``(rows, cols // 2 + 1)`` bool.

    Entry ``(a, b)`` is frequency ``(eta, gamma)`` with ``eta`` the signed index of row ``a``
    (``0, 1, ..., -1``) and ``gamma = b``; it is kept iff ``eta^2 + gamma^2 >= d0^2``.
    """
    # (rows,) signed ints
    eta: Tensor = torch.fft.fftfreq(rows, d=1.0 / rows, device=device, dtype=torch.float64)
    gamma = torch.arange(cols // 2 + 1, device=device, dtype=torch.float64)  # (cols // 2 + 1,)
    return eta[:, None] ** 2 + gamma[None, :] ** 2 >= d0 * d0


def high_pass(v: Tensor, cutoff: float) -> Tensor:
    """``F^-1{H . F{v}}`` for one task vector ``v`` ``(*shape)``; 1-D and 0-d tensors come back as is.

    ``D0 = cutoff * min(rows, cols)`` of the matrix view (see the module docstring).
    """
    if v.dim() < 2 or v.numel() == 0:
        return v
    m = _as_matrix(v)  # (rows, cols)
    rows, cols = m.shape
    spec: Tensor = torch.fft.rfft2(m)  # (rows, cols // 2 + 1) complex
    spec.mul_(high_pass_mask(rows, cols, cutoff * min(rows, cols), device=m.device))
    filtered: Tensor = torch.fft.irfft2(spec, s=(rows, cols))  # (rows, cols)
    return filtered.to(v.dtype).reshape(v.shape)


def _mean_abs(x: Tensor) -> Tensor:
    """``E|x_i|`` per model: ``(n, *shape) -> (n,)`` (float64)."""
    return x.reshape(x.shape[0], -1).abs().double().mean(dim=1)


def fr_coefficients(x: Tensor) -> Tensor:
    """``lambda_i = E|v_i| / sum_j E|v_j|`` for task vectors ``x`` ``(n, *shape)`` -> ``(n,)`` float64.

    All zeros when every task vector is zero (nothing to merge).
    """
    e = _mean_abs(x) if x[0].numel() else torch.zeros(x.shape[0], dtype=torch.float64)
    total = e.sum()
    return e / total if total > 0 else torch.zeros_like(e)


@register_method(
    "fr_merging",
    params=FrParams,
    family="task_arithmetic",
    needs_base=True,
    paper="https://arxiv.org/abs/2411.16815",
    grid={"cutoff": (0.05, 0.1, 0.2), "lambda": (1.0, 2.0, 3.0, 4.0)},
)
def fr_merging(
    x: Tensor,
    params: FrParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """FR-Merging: high-pass filter each task vector in the 2-D Fourier domain, then a weighted sum.

    ``merged = lambda * sum_i w_i * lambda_i * highpass(tau_i)``, ``lambda_i = E|tau_i| / sum_j E|tau_j|``.
    """
    coef = fr_coefficients(x) * per_model["weight"].double().cpu()  # (n,)
    out = torch.zeros_like(x[0])  # (*shape)
    for i in range(x.shape[0]):
        if coef[i] != 0:
            out.add_(high_pass(x[i], params.cutoff), alpha=float(coef[i]))
    return out.mul_(params.lambda_)


def free_expert(v: Tensor, lam: float, density: float) -> tuple[Tensor, Tensor]:
    """One task's lightweight expert ``e = mu * M(v, d)`` on one tensor, as sparse ``(indices, values)``.

    ``k = int(density * numel)`` entries of largest ``|v|`` (ties: lowest indices) are kept;
    ``mu = -log(d) * E|M(v, d)| / (lam * E|v|)`` with both means over all ``numel`` entries. A zero ``v``
    or ``lam``, or ``k = 0``, gives an empty expert.

    Args:
        v: the task vector ``(*shape)``.
        lam: the task's ``lambda_i`` on this tensor (:func:`fr_coefficients`).
        density: ``d`` in ``(0, 1)``.

    Returns:
        Flat indices ``(k,)`` int64 (ascending) and values ``(k,)`` in ``v``'s dtype.
    """
    if not 0.0 < density < 1.0:
        raise ValueError(f"density must be in (0, 1), got {density}")
    flat = v.reshape(-1)
    k = int(density * flat.numel())
    empty = (flat.new_zeros(0, dtype=torch.int64), flat.new_zeros(0))
    mass = float(flat.abs().double().sum())
    if k == 0 or lam <= 0 or mass == 0:
        return empty
    idx = torch.nonzero(topk_mask(flat.abs(), k)).reshape(-1)  # (k,)
    kept = flat[idx]
    # mu = -log d * (sum|M| / N) / (lam * sum|v| / N)
    mu = -math.log(density) * float(kept.abs().double().sum()) / (lam * mass)
    return idx, kept * mu


def free_experts(x: Tensor, density: float) -> list[tuple[Tensor, Tensor]]:
    """:func:`free_expert` of every task vector in ``x`` ``(n, *shape)``, with the paper's ``lambda_i``."""
    lam = fr_coefficients(x)
    return [free_expert(x[i], float(lam[i]), density) for i in range(x.shape[0])]
