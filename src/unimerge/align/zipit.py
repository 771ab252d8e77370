"""ZipIt!: merge models of the same architecture by merging correlated features, within or across.

Stoica et al., *ZipIt! Merging Models from Different Tasks without Training* (ICLR 2024,
https://arxiv.org/abs/2305.03053). For each permutation group the ``N * C`` features of the ``N``
models are correlated on data and greedily merged down to ``C`` (:mod:`unimerge.align.zipmatch`);
unlike Git Re-basin, a pair may come from the *same* model. The result is a merge matrix ``M``
(``C x NC``) and an unmerge matrix ``U`` (``NC x C``). A tensor is merged as
``M_out blockdiag(W_1, ..., W_N) U_in`` on its grouped axes: ``M`` on the axes that write a group
(a layer's outputs, its bias, a norm's parameters), ``U`` on the axes that read it (a dense layer's
inputs). A tensor whose outputs are not grouped (the head, the model's output, units the spec keeps
in place) averages the models' outputs, as naive averaging does.

Groups with no activations to read (attention heads) are paired across the models by weight
matching, the other groups fixed at their best one-to-one (activation-matching) pairing with model 0.
Merged BatchNorm statistics are only averages: reset them on data after
(:func:`unimerge.align.reset_batchnorm`). Partial zipping (one head per model after a cut) is
:func:`unimerge.align.partial.partial_zip`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
from torch import Tensor, nn

from unimerge.align.activations import checked_batches, joint_correlation_stats
from unimerge.align.derive import CONVS, TRANSPOSED
from unimerge.align.matching import linear_assignment, match_weights
from unimerge.align.spec import Axis, PermutationSpec
from unimerge.align.zipmatch import ZipMatrices, permutation_zip, zip_matrices
from unimerge.errors import ConfigError

__all__ = [
    "ZipMatrices",
    "Zipped",
    "apply_zip",
    "reading_axes",
    "zip_matrices",
    "zip_models",
    "zip_state",
    "zipit",
    "zipped_groups",
]

M_ = TypeVar("M_", bound=nn.Module)


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
    """The zipped state dict of ``states`` (one per model): each grouped axis mixed by its model's
    slice of ``merge`` (writing axes) or ``unmerge`` (reading axes), summed over the models; a tensor
    with no writing axis averages the models' (its outputs are shared)."""
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
            total += t if writes else t / len(states)
        out[name] = total.to(ref.dtype)
    return out


@dataclass(frozen=True)
class Zipped:
    """What zipping found: the spec, one :class:`ZipMatrices` per group, the batches and the inputs
    the models were traced with."""

    spec: PermutationSpec
    zips: dict[str, ZipMatrices]
    batches: list[object]
    example: tuple[object, ...]


def zipped_groups(
    models: Sequence[nn.Module],
    data: Iterable[object],
    spec: PermutationSpec | None = None,
    *,
    example_inputs: Sequence[object] | None = None,
    alpha: float = 0.0,
    beta: float = 1.0,
    seed: int = 0,
) -> Zipped:
    """The merge / unmerge matrices of every group of ``models`` (see :func:`zip_models`)."""
    if len(models) < 2:
        raise ConfigError(f"ZipIt! merges at least 2 models, got {len(models)}.")
    batches, example = checked_batches("ZipIt!", models[0], models[1], data, example_inputs)
    for m in models[2:]:
        checked_batches("ZipIt!", models[0], m, batches, example)
    traced, stats = joint_correlation_stats(models, batches, example)
    spec = spec if spec is not None else traced
    states = [m.state_dict() for m in models]
    for state in states:
        spec.check(state)
    n, zips, cross = len(models), dict[str, ZipMatrices](), dict[str, list[Tensor]]()
    for g, c in spec.sizes.items():
        found = stats.get(g, [])
        if found and found[0].units == n * c:
            corr = torch.stack([s.correlation() for s in found]).mean(0)
            zips[g] = zip_matrices(corr, alpha=alpha, beta=beta, models=n)
            cross[g] = [linear_assignment(corr[:c, k * c : (k + 1) * c]) for k in range(1, n)]
    rest = [g for g in spec.groups if g not in zips]
    if rest:  # the zipped groups' best one-to-one pairing fixes the other axes of their tensors
        perms = [
            match_weights(
                spec, states[0], s, seed=seed, init={g: p[k] for g, p in cross.items()}, groups=rest
            )
            for k, s in enumerate(states[1:])
        ]
        zips |= {g: permutation_zip([p[g] for p in perms]) for g in rest}
    return Zipped(spec, zips, batches, example)


def zip_models(
    models: Sequence[M_],
    data: Iterable[object],
    spec: PermutationSpec | None = None,
    *,
    example_inputs: Sequence[object] | None = None,
    alpha: float = 0.0,
    beta: float = 1.0,
    seed: int = 0,
) -> M_:
    """One model of the original width computing (approximately) all of ``models``.

    Args:
        models: ``N >= 2`` models of one architecture (the result is a copy of the first with
            zipped weights); trained on different tasks, or from different seeds.
        data: batches of model inputs (a tensor, or a tuple of positional inputs, per batch) on which
            the features are correlated; ZipIt! uses inputs of every task.
        spec: the groups to zip (default: derived by tracing ``models[0]``); its group names must be
            the derived ones for their activations to be found, others are paired by weight matching.
        example_inputs: inputs to trace the models with (default: the first batch).
        alpha: correlation decay of a merged feature (``0``: see :mod:`unimerge.align.zipmatch`).
        beta: the fraction of same-model merges allowed per model (``1``: no limit).
        seed: seeds weight matching's group order for groups without activations.

    Raises:
        ConfigError: fewer than two models, no data, or ``alpha`` / ``beta`` out of range.
        PlanError / AlignError: as :func:`~unimerge.align.matching.weight_matching`.
    """
    found = zipped_groups(
        models, data, spec, example_inputs=example_inputs, alpha=alpha, beta=beta, seed=seed
    )
    states = [m.state_dict() for m in models]
    out = copy.deepcopy(models[0])
    out.load_state_dict(zip_state(found.spec, states, found.zips, reading_axes(models[0], found.spec)))
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
    """Two models zipped into one of the original width: :func:`zip_models` of ``[model_a, model_b]``
    (``model_b`` of the same architecture; the result is a copy of ``model_a``)."""
    return zip_models(
        [model_a, cast(M_, model_b)],
        data,
        spec,
        example_inputs=example_inputs,
        alpha=alpha,
        beta=beta,
        seed=seed,
    )
