"""ZipIt!: merge two models of the same architecture by merging correlated features, within or across.

Stoica et al., *ZipIt! Merging Models from Different Tasks without Training* (ICLR 2024,
https://arxiv.org/abs/2305.03053). For each permutation group the ``2C`` features of both models
are correlated on data (``2C x 2C``) and the most correlated pair is merged greedily, again and
again, until ``C`` features are left; unlike Git Re-basin, a pair may come from the *same* model.
The result is a merge matrix ``M`` (``C x 2C``, each merged feature the mean of its members) and an
unmerge matrix ``U`` (``2C x C``, each original feature read back from its merged feature). A tensor
is merged as ``M_out [W_a 0; 0 W_b] U_in`` on its grouped axes: ``M`` on the axes that write a
group (a layer's outputs, its bias, a norm's parameters), ``U`` on the axes that read it (a dense
layer's inputs). A tensor whose outputs are not grouped (the head, the model's output, units the
spec keeps in place) averages the two models' outputs, as naive averaging does.

``alpha`` and ``beta`` are the paper's Sec. 4.3 parameters: after a merge, the merged feature's
correlations are multiplied by ``alpha`` (``0``: it is never merged again, every feature in exactly
one pair); each model may take part in at most ``floor(beta * C / 2)`` same-model merges (``1``: no
limit). Groups with no activations to read (attention heads) are paired across the models by
weight matching, the other groups fixed at their best one-to-one (activation-matching) pairing.
Merged BatchNorm statistics are only averages: reset them on data after
(:func:`unimerge.align.reset_batchnorm`). Partial zipping (separate heads after layer ``k``) is not
implemented.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from unimerge.align.activations import checked_batches, correlation_stats
from unimerge.align.derive import CONVS, TRANSPOSED
from unimerge.align.matching import linear_assignment, match_weights
from unimerge.align.spec import Axis, PermutationSpec
from unimerge.errors import ConfigError

__all__ = ["ZipMatrices", "apply_zip", "reading_axes", "zip_matrices", "zip_state", "zipit"]

M_ = TypeVar("M_", bound=nn.Module)
BLOCKED = -1e30  # a same-model pair over budget: chosen only when nothing else is left


@dataclass(frozen=True)
class ZipMatrices:
    """``merge`` (``C x 2C``) maps both models' features to the merged ones; ``unmerge`` (``2C x C``)
    maps a merged feature back to every original feature it stands for. Model A's features come first."""

    merge: Tensor
    unmerge: Tensor


def zip_matrices(corr: Tensor, *, alpha: float = 0.0, beta: float = 1.0) -> ZipMatrices:
    """ZipIt!'s greedy matching on the ``2C x 2C`` correlation of the concatenated features.

    Repeatedly merges the two most correlated features (clusters) until ``C`` are left; a merged
    cluster's correlation to any other is the minimum of its members', times ``alpha`` (``0``: it is
    not merged again). Once a model has used its ``floor(beta * C / 2)`` same-model merges, its
    same-model pairs are taken only when nothing else is left. A cluster is indexed by its first
    member; ties go to the lowest index.
    """
    two_c = corr.shape[0]
    if corr.shape != (two_c, two_c) or two_c % 2:
        raise ConfigError(f"ZipIt! needs a square correlation of even size 2C, got {list(corr.shape)}.")
    if not 0.0 <= beta <= 1.0 or alpha < 0.0:
        raise ConfigError(f"ZipIt! needs alpha >= 0 and 0 <= beta <= 1, got alpha={alpha}, beta={beta}.")
    c = two_c // 2
    sims = torch.nan_to_num(corr.detach().to(torch.float64).clone(), nan=0.0)
    sims.fill_diagonal_(-torch.inf)
    origin = torch.arange(two_c) >= c  # False: model A, True: model B
    members = torch.eye(two_c, dtype=torch.float64)  # column k: the features in cluster k
    alive = torch.ones(two_c, dtype=torch.bool)
    budget = [int(c // 2 * beta)] * 2
    for _ in range(c):
        scores = sims.clone() if min(budget) <= 0 else sims
        for m in (0, 1):
            if budget[m] <= 0:
                same = alive & (origin == bool(m))
                block = same[:, None] & same[None, :] & torch.isfinite(scores)
                scores[block] = BLOCKED
        i, j = sorted(divmod(int(scores.reshape(-1).argmax()), two_c))
        if bool(origin[i]) == bool(origin[j]):
            budget[int(origin[i])] -= 1
        members[:, i] += members[:, j]
        alive[j] = False
        merged = (
            torch.minimum(sims[i], sims[j]) * alpha if alpha > 0 else torch.full_like(sims[i], -torch.inf)
        )
        sims[i, :], sims[:, i] = merged, merged
        sims[j, :], sims[:, j] = -torch.inf, -torch.inf
        sims[i, i] = -torch.inf
    unmerge = members[:, alive]  # (2C, C)
    return ZipMatrices(merge=(unmerge / unmerge.sum(0, keepdim=True)).T, unmerge=unmerge)


def permutation_zip(perm: Tensor) -> ZipMatrices:
    """The matrices that average unit ``i`` of model A with unit ``perm[i]`` of model B."""
    c = len(perm)
    unmerge = torch.zeros(2 * c, c, dtype=torch.float64)
    unmerge[torch.arange(c), torch.arange(c)] = 1.0
    unmerge[c + perm, torch.arange(c)] = 1.0
    return ZipMatrices(merge=unmerge.T / 2, unmerge=unmerge)


def reading_axes(model: nn.Module, spec: PermutationSpec) -> set[tuple[str, int]]:
    """``(tensor, axis)`` pairs of ``spec`` that *read* their group: a Linear's, Conv's or attention
    input projection's input axis. Every other grouped axis writes (or scales) its group."""
    modules = dict(model.named_modules())
    out: set[tuple[str, int]] = set()
    for axes in spec.groups.values():
        for ax in axes:
            owner, _, param = ax.name.rpartition(".")
            m = modules.get(owner)
            dense = isinstance(m, nn.Linear) or (isinstance(m, CONVS) and m.groups == 1)
            reads = (
                (dense and param == "weight" and ax.axis == 1)
                or (isinstance(m, TRANSPOSED) and m.groups == 1 and param == "weight" and ax.axis == 0)
                or (isinstance(m, nn.MultiheadAttention) and param == "in_proj_weight" and ax.axis == 1)
            )
            if reads:
                out.add((ax.name, ax.axis))
    return out


def apply_zip(t: Tensor, ax: Axis, matrix: Tensor) -> Tensor:
    """``t`` with its units on axis ``ax`` mixed: unit ``k`` of the result is ``sum_i matrix[k, i] * unit i``."""
    size = matrix.shape[1]
    x = t.movedim(ax.axis, 0)
    shape = x.shape
    x = x.reshape(ax.segments, size, -1)  # (segments, units, block * rest)
    x = torch.einsum("ki,sir->skr", matrix.to(x.dtype), x)
    return x.reshape(ax.segments * matrix.shape[0] * ax.block, *shape[1:]).movedim(0, ax.axis)


def zip_state(
    spec: PermutationSpec,
    states: Sequence[Mapping[str, Tensor]],
    zips: Mapping[str, ZipMatrices],
    reads: set[tuple[str, int]],
) -> dict[str, Tensor]:
    """The zipped state dict of ``states = (A, B)``: each grouped axis mixed by its model's slice of
    ``merge`` (writing axes) or ``unmerge`` (reading axes), summed over the models; a tensor with no
    writing axis averages the models' (its outputs are shared)."""
    axes_of, out = spec.axes_of(), dict[str, Tensor]()
    for name, ref in states[0].items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
            continue
        entries = axes_of.get(name, [])
        writes = any((ax.name, ax.axis) not in reads for _, ax in entries)
        total = torch.zeros_like(ref, dtype=torch.float64)
        for m, state in enumerate(states):
            t = state[name].to(torch.float64)
            for g, ax in entries:
                n, z = spec.sizes[g], zips[g]
                if (ax.name, ax.axis) in reads:
                    t = apply_zip(t, ax, z.unmerge[m * n : (m + 1) * n].T)
                else:
                    t = apply_zip(t, ax, z.merge[:, m * n : (m + 1) * n])
            total += t if writes else t / 2
        out[name] = total.to(ref.dtype)
    return out


def zipit(
    model_a: M_,
    model_b: nn.Module,
    data: Iterable[object],
    spec: PermutationSpec | None = None,
    *,
    example_inputs: Sequence[object] | None = None,
    alpha: float = 0.0,
    beta: float = 1.0,
    seed: int = 0,
) -> M_:
    """One model of the original width computing (approximately) both ``model_a`` and ``model_b``.

    Args:
        model_a: the first model (the result is a copy of it with zipped weights).
        model_b: a model of the same architecture (trained on another task, or from another seed).
        data: batches of model inputs (a tensor, or a tuple of positional inputs, per batch) on which
            the features are correlated; ZipIt! uses inputs of both tasks.
        spec: the groups to zip (default: derived by tracing ``model_a``); its group names must be
            the derived ones for their activations to be found, others are paired by weight matching.
        example_inputs: inputs to trace the models with (default: the first batch).
        alpha: correlation decay of a merged feature (``0``: every feature is merged exactly once).
        beta: the fraction of same-model merges allowed per model (``1``: no limit).
        seed: seeds weight matching's group order for groups without activations.

    Raises:
        ConfigError: no data, or ``alpha`` / ``beta`` out of range.
        PlanError / AlignError: as :func:`~unimerge.align.matching.weight_matching`.
    """
    batches, example = checked_batches("ZipIt!", model_a, model_b, data, example_inputs)
    traced, stats = correlation_stats(model_a, model_b, batches, example, joint=True)
    spec = spec if spec is not None else traced
    states = (model_a.state_dict(), model_b.state_dict())
    for state in states:
        spec.check(state)
    zips, cross = dict[str, ZipMatrices](), dict[str, Tensor]()
    for g in spec.groups:
        found = stats.get(g, [])
        if found and found[0].units == 2 * spec.sizes[g]:
            corr = torch.stack([s.correlation() for s in found]).mean(0)
            zips[g] = zip_matrices(corr, alpha=alpha, beta=beta)
            cross[g] = linear_assignment(corr[: spec.sizes[g], spec.sizes[g] :])
    rest = [g for g in spec.groups if g not in zips]
    if rest:  # the zipped groups' best one-to-one pairing fixes the other axes of their tensors
        perms = match_weights(spec, states[0], states[1], seed=seed, init=cross, groups=rest)
        zips |= {g: permutation_zip(perms[g]) for g in rest}
    out = copy.deepcopy(model_a)
    out.load_state_dict(zip_state(spec, states, zips, reading_axes(model_a, spec)))
    return out
