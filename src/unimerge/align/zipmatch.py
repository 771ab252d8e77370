"""ZipIt!'s greedy feature matching for ``N >= 2`` models: merge and unmerge matrices per group.

Stoica et al., *ZipIt! Merging Models from Different Tasks without Training* (ICLR 2024,
https://arxiv.org/abs/2305.03053), Sec. 4 and the official ``match_tensors_zipit``
(github.com/gstoica27/ZipIt, ``matching_functions.py``). The ``N * C`` features of all models are
correlated together (``NC x NC``) and the two most correlated features (clusters) are merged, again
and again, until ``C`` are left. The result is a merge matrix ``M`` (``C x NC``, each merged feature
the mean of its members) and an unmerge matrix ``U`` (``NC x C``, each original feature read back
from its merged feature); model ``m``'s features are rows ``m*C .. (m+1)*C`` of ``U``.

A merged cluster's correlation to any other is the minimum of its members'. ``alpha > 0`` multiplies
it by ``alpha`` at each merge (the paper's Sec. 4.3). ``alpha = 0`` follows the official code's
rule that a merged feature takes no second feature of a model it already holds, with a cap of
``N`` members: for two models every feature is merged exactly once; for ``N`` models a merged
feature ends up as one feature of each model, or a same-model pair plus features of other models.
If no allowed pair is left (possible for ``N > 2``), the pair with the highest correlation is merged
regardless. ``beta``: each model may take part in at most ``floor(floor((N - 1) C / N) * beta)``
same-model merges (the official budget; ``floor(beta * C / 2)`` for two models); once used up, its
same-model pairs are taken only when nothing else is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from unimerge.errors import ConfigError

__all__ = ["ZipMatrices", "permutation_zip", "zip_matrices"]

BLOCKED = -1e30  # a same-model pair over budget: chosen only when nothing else is left


@dataclass(frozen=True)
class ZipMatrices:
    """``merge`` (``C x NC``) maps all models' features to the merged ones; ``unmerge`` (``NC x C``)
    maps a merged feature back to every original feature it stands for. Model 0's features come first."""

    merge: Tensor
    unmerge: Tensor


def _check(corr: Tensor, models: int, alpha: float, beta: float) -> int:
    n_c = corr.shape[0]
    if models < 2:
        raise ConfigError(f"ZipIt! merges at least 2 models, got models={models}.")
    if corr.shape != (n_c, n_c) or n_c % models:
        raise ConfigError(
            f"ZipIt! needs a square correlation of size N*C for N={models} models, got {list(corr.shape)}"
            + (" (even size 2C for two models)." if models == 2 else ".")
        )
    if not 0.0 <= beta <= 1.0 or alpha < 0.0:
        raise ConfigError(f"ZipIt! needs alpha >= 0 and 0 <= beta <= 1, got alpha={alpha}, beta={beta}.")
    return n_c // models


class _Greedy:
    """The state of the greedy matching: cluster correlations, members, origins, budgets."""

    def __init__(self, corr: Tensor, models: int, c: int, alpha: float, beta: float) -> None:
        n_c = corr.shape[0]
        self.n, self.alpha = models, alpha
        self.sims = torch.nan_to_num(corr.detach().to(torch.float64).clone(), nan=0.0)
        self.sims.fill_diagonal_(-torch.inf)
        self.origin = torch.arange(n_c) // c  # the model of each cluster's first member
        self.members = torch.eye(n_c, dtype=torch.float64)  # column k: the features in cluster k
        self.alive = torch.ones(n_c, dtype=torch.bool)
        self.budget = [int((models - 1) * c // models * beta)] * models
        self.held = torch.nn.functional.one_hot(self.origin, models).bool()  # (NC, N): models per cluster
        self.size = torch.ones(n_c, dtype=torch.long)
        # alpha = 0: sims with the pairs that may no longer merge at -inf (kept row by row)
        self.masked = self.sims.clone() if alpha == 0 else self.sims

    def pick(self) -> tuple[int, int]:
        """The pair to merge next: the best allowed pair, over-budget same-model pairs only when no
        other is left, and (alpha = 0) the best pair regardless when no allowed pair is left."""
        scores = self.masked
        if min(self.budget) <= 0:
            scores = scores.clone()
            for m in range(self.n):
                if self.budget[m] <= 0:
                    same = self.alive & (self.origin == m)
                    scores[same[:, None] & same[None, :] & torch.isfinite(scores)] = BLOCKED
        best = int(scores.reshape(-1).argmax())
        if scores.reshape(-1)[best] == -torch.inf:  # nothing allowed is left
            best = int(self.sims.reshape(-1).argmax())
        i, j = divmod(best, scores.shape[0])
        return (i, j) if i < j else (j, i)

    def step(self) -> None:
        i, j = self.pick()
        if int(self.origin[i]) == int(self.origin[j]):
            self.budget[int(self.origin[i])] -= 1
        self.members[:, i] += self.members[:, j]
        self.alive[j] = False
        self.held[i] |= self.held[j]
        self.size[i] += self.size[j]
        merged = torch.minimum(self.sims[i], self.sims[j]) * (self.alpha if self.alpha > 0 else 1.0)
        self.sims[i, :], self.sims[:, i] = merged, merged
        self.sims[j, :], self.sims[:, j] = -torch.inf, -torch.inf
        self.sims[i, i] = -torch.inf
        if self.alpha == 0:  # at most N members, no second feature of a model the cluster holds
            fits = (self.size[i] + self.size <= self.n) & ~(self.held[i] & self.held).any(1)
            row = merged.masked_fill(~fits, -torch.inf)
            self.masked[i, :], self.masked[:, i] = row, row
            self.masked[j, :], self.masked[:, j] = -torch.inf, -torch.inf
            self.masked[i, i] = -torch.inf


def zip_matrices(corr: Tensor, *, alpha: float = 0.0, beta: float = 1.0, models: int = 2) -> ZipMatrices:
    """ZipIt!'s greedy matching on the ``NC x NC`` correlation of the concatenated features.

    Repeatedly merges the two most correlated features (clusters) until ``C`` are left (see the
    module docstring for ``alpha``, ``beta`` and the ``N``-model rules). A cluster is indexed by its
    first member; ties go to the lowest index.

    Args:
        corr: the correlation of all models' features, model 0's first (``NC x NC``).
        alpha: correlation decay of a merged feature (``0``: see the module docstring).
        beta: the fraction of same-model merges allowed per model (``1``: no limit).
        models: ``N``, the number of models whose features ``corr`` concatenates.

    Raises:
        ConfigError: ``corr`` is not square of a size divisible by ``models``, or a parameter is
            out of range.
    """
    c = _check(corr, models, alpha, beta)
    state = _Greedy(corr, models, c, alpha, beta)
    for _ in range((models - 1) * c):
        state.step()
    unmerge = state.members[:, state.alive]  # (NC, C)
    return ZipMatrices(merge=(unmerge / unmerge.sum(0, keepdim=True)).T, unmerge=unmerge)


def permutation_zip(perms: Sequence[Tensor]) -> ZipMatrices:
    """The matrices that average unit ``i`` of model 0 with unit ``perms[k][i]`` of model ``k + 1``."""
    c = len(perms[0])
    unmerge = torch.zeros((len(perms) + 1) * c, c, dtype=torch.float64)
    unmerge[torch.arange(c), torch.arange(c)] = 1.0
    for k, perm in enumerate(perms, start=1):
        unmerge[k * c + perm, torch.arange(c)] = 1.0
    return ZipMatrices(merge=unmerge.T / (len(perms) + 1), unmerge=unmerge)
