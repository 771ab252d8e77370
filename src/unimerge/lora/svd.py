"""Truncated SVD of one update into LoRA factors, by rank or by energy (Eckart-Young: the best rank-k
approximation in Frobenius norm keeps the k largest singular values, and its relative error is
``sqrt(sum of the dropped sigma^2 / sum of all sigma^2)``)."""

from __future__ import annotations

import torch
from torch import Tensor

from unimerge.errors import ConfigError
from unimerge.lora.adapter import LoraFactors

__all__ = ["check_rank", "energy_rank", "truncate"]


def check_rank(rank: int, module: str, shape: tuple[int, ...]) -> None:
    """Refuse a rank above ``min(shape)`` (no matrix of that shape has it).

    Raises:
        ConfigError: naming the module, its shape and the largest rank it allows.
    """
    if rank > min(shape):
        raise ConfigError(
            f"Rank {rank} is larger than module {module!r} allows: its update is {list(shape)}, so its rank is "
            f"at most {min(shape)}. Ask for a rank of at most {min(shape)}, or an energy fraction instead."
        )


def energy_rank(s: Tensor, energy: float) -> int:
    """The fewest leading singular values ``s`` (descending) whose squares hold ``energy`` of the total (>= 1)."""
    sq = s.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    k = int(torch.searchsorted(torch.cumsum(sq, 0), torch.tensor(energy * total, dtype=sq.dtype))) + 1
    return min(k, len(s))


def truncate(
    delta: Tensor,
    rank: int | None,
    energy: float | None,
    *,
    transpose: bool = False,
    embedding: bool = False,
) -> tuple[LoraFactors, float]:
    """Factors of the best rank-``rank`` (or ``energy``) approximation of ``delta``, and its relative error.

    ``delta`` is in the base weight's layout (``(in, out)`` when ``transpose``). The singular values
    are split evenly, ``B = U sqrt(S)``, ``A = sqrt(S) V^T``, scale 1; neither given keeps every
    nonzero singular value (numerically exact). The error is measured:
    ``|delta - scale * B A|_F / |delta|_F`` (0 for a zero update).
    """
    m = (delta.T if transpose else delta).float()  # (out, in), as B @ A
    u, s, vh = torch.linalg.svd(m, full_matrices=False)  # (out, k) (k,) (k, in)
    if rank is not None:
        k = min(rank, len(s))
    elif energy is not None:
        k = energy_rank(s, energy)
    else:
        k = max(1, int((s > s[0] * len(s) * torch.finfo(s.dtype).eps).sum())) if len(s) else 1
    root = s[:k].sqrt()
    f = LoraFactors(root[:, None] * vh[:k], u[:, :k] * root, 1.0, transpose, embedding)
    norm = float(m.norm())
    err = float((m - f.b @ f.a).norm()) / norm if norm > 0 else 0.0
    return f, err
