"""Weight matching and activation matching: permute one model's hidden units into another's basis.

Both follow Ainsworth et al., *Git Re-basin: Merging Models modulo Permutation Symmetries* (ICLR
2023, https://arxiv.org/abs/2209.04836). Weight matching (their Algorithm 1) maximises
``sum_l <W_ref_l, P_l W_l P_{l-1}^T>`` by coordinate descent: each step fixes every permutation but
one group's, whose best value is a linear assignment problem (``scipy.optimize.linear_sum_assignment``);
groups are visited in a random order drawn from ``seed`` each sweep, until no group improves.
Activation matching (their Sec. 3.1) assigns each group's units by the correlation of their
activations on data. A permutation ``perm`` means: unit ``i`` of the permuted model is unit
``perm[i]`` of the original.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from unimerge.align.derive import permutation_spec
from unimerge.align.spec import Axis, PermutationSpec
from unimerge.errors import AlignError, PlanError

__all__ = [
    "apply_permutation",
    "check_same_architecture",
    "linear_assignment",
    "match_weights",
    "permute_axis",
    "permuted_copy",
    "unit_rows",
    "weight_matching",
]

M = TypeVar("M", bound=nn.Module)


def unit_rows(t: Tensor, ax: Axis, size: int) -> Tensor:
    """``t`` as ``(size, -1)``: row ``i`` holds every entry of unit ``i`` on axis ``ax``."""
    x = t.movedim(ax.axis, 0)
    x = x.reshape(ax.segments, size, ax.block, *x.shape[1:]).transpose(0, 1)  # (size, seg, block, ...)
    return x.reshape(size, -1)


def permute_axis(t: Tensor, ax: Axis, size: int, perm: Tensor) -> Tensor:
    """``t`` with the units on axis ``ax`` reordered: unit ``i`` of the result is unit ``perm[i]``."""
    x = t.movedim(ax.axis, 0)
    shape = x.shape
    x = x.reshape(ax.segments, size, ax.block, *shape[1:]).index_select(1, perm.to(t.device))
    return x.reshape(shape).movedim(0, ax.axis)


def apply_permutation(
    spec: PermutationSpec, state: Mapping[str, Tensor], perms: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """A new state dict: ``state`` with every group's axes permuted by ``perms[group]``."""
    out = dict(state)
    for name, entries in spec.axes_of().items():
        t = state[name]
        for g, ax in entries:
            t = permute_axis(t, ax, spec.sizes[g], perms[g])
        out[name] = t
    return out


def linear_assignment(score: Tensor) -> Tensor:
    """The permutation ``perm`` maximising ``sum_i score[i, perm[i]]`` (scipy's Hungarian solver)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise AlignError(
            "Permutation alignment needs scipy for its linear assignments: pip install 'unimerge[align]'."
        ) from None
    matrix = np.nan_to_num(score.detach().to(torch.float64).cpu().numpy(), nan=-np.inf)
    _, cols = linear_sum_assignment(matrix, maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def _others_permuted(
    spec: PermutationSpec,
    entries: Sequence[tuple[str, Axis]],
    t: Tensor,
    skip: tuple[str, Axis],
    perms: Mapping[str, Tensor],
) -> Tensor:
    """``t`` permuted on all its axes (``entries``) but ``skip``'s."""
    for g, ax in entries:
        if (g, ax) != skip:
            t = permute_axis(t, ax, spec.sizes[g], perms[g])
    return t


def _score(
    spec: PermutationSpec,
    g: str,
    ref: Mapping[str, Tensor],
    other: Mapping[str, Tensor],
    perms: Mapping[str, Tensor],
    axes_of: Mapping[str, Sequence[tuple[str, Axis]]],
) -> Tensor:
    """``score[i, j]``: the inner product of the reference's unit ``i`` with the model's unit ``j``
    over every tensor of group ``g``, the model's other axes already permuted."""
    n = spec.sizes[g]
    score = torch.zeros(n, n, dtype=torch.float64)
    for ax in spec.groups[g]:
        a = unit_rows(ref[ax.name].to(torch.float64), ax, n)
        b = _others_permuted(spec, axes_of[ax.name], other[ax.name].to(torch.float64), (g, ax), perms)
        score += a @ unit_rows(b, ax, n).T
    return score


def match_weights(
    spec: PermutationSpec,
    reference: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    *,
    seed: int = 0,
    max_sweeps: int = 100,
    init: Mapping[str, Tensor] | None = None,
    groups: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """Weight matching: one permutation per group of ``spec`` taking ``state`` towards ``reference``.

    Args:
        spec: the groups (from :func:`~unimerge.align.derive.permutation_spec` or ``declare_spec``).
        reference: the state dict whose basis the result lives in.
        state: the state dict to permute.
        seed: seeds the random group order of each sweep.
        max_sweeps: stop after this many sweeps even if a group still improves.
        init: starting permutations (identity for groups not given).
        groups: optimise only these groups; the others keep their ``init`` permutation.

    Returns:
        Group -> ``perm`` (``LongTensor`` of the group's size) for :func:`apply_permutation`.
    """
    perms = {g: torch.arange(n) for g, n in spec.sizes.items()} | dict(init or {})
    todo = list(spec.groups if groups is None else groups)
    gen, axes_of = torch.Generator().manual_seed(seed), spec.axes_of()
    for _ in range(max_sweeps):
        improved = False
        for i in torch.randperm(len(todo), generator=gen).tolist():
            g = todo[i]
            score = _score(spec, g, reference, state, perms, axes_of)
            new = linear_assignment(score)
            rows = torch.arange(spec.sizes[g])
            old_value, new_value = score[rows, perms[g]].sum().item(), score[rows, new].sum().item()
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                perms[g], improved = new, True
        if not improved:
            break
    return perms


def check_same_architecture(reference: nn.Module, model: nn.Module) -> None:
    """Raise :class:`PlanError` naming the first module or tensor where the two models differ."""
    mods_a, mods_b = list(reference.named_modules()), list(model.named_modules())
    for (na, ma), (nb, mb) in zip(mods_a, mods_b, strict=False):
        if na != nb or type(ma) is not type(mb):
            raise PlanError(
                f"Cannot align models of different architectures: the reference has module {na or '(root)'!r} "
                f"({type(ma).__name__}) where the model has {nb or '(root)'!r} ({type(mb).__name__})."
            )
    sa, sb = reference.state_dict(), model.state_dict()
    for (ka, ta), (kb, tb) in zip(sa.items(), sb.items(), strict=False):
        if ka != kb or ta.shape != tb.shape:
            raise PlanError(
                f"Cannot align models of different architectures: first mismatch at module "
                f"{ka.rpartition('.')[0] or '(root)'!r}: the reference's {ka!r} has shape {list(ta.shape)}, "
                f"the model's {kb!r} has shape {list(tb.shape)}."
            )
    if len(mods_a) != len(mods_b) or len(sa) != len(sb):
        raise PlanError(
            f"Cannot align models of different architectures: the reference has {len(mods_a)} modules and "
            f"{len(sa)} tensors, the model {len(mods_b)} modules and {len(sb)} tensors."
        )


def permuted_copy(model: M, spec: PermutationSpec, perms: Mapping[str, Tensor]) -> M:
    """A deep copy of ``model`` with its state dict permuted by ``perms``."""
    out = copy.deepcopy(model)
    out.load_state_dict(apply_permutation(spec, model.state_dict(), perms))
    return out


def weight_matching(
    reference: nn.Module,
    model: M,
    example_inputs: Iterable[object],
    *,
    seed: int = 0,
    spec: PermutationSpec | None = None,
    max_sweeps: int = 100,
) -> M:
    """A copy of ``model`` permuted into ``reference``'s basis by weight matching.

    The copy computes exactly the same function as ``model`` (up to float rounding). ``spec`` is
    derived from ``reference`` traced on ``example_inputs`` unless given.

    Raises:
        PlanError: the two models have different architectures (names the first mismatch).
        AlignError: the model cannot be traced; pass ``spec=declare_spec(...)``.
    """
    check_same_architecture(reference, model)
    spec = spec if spec is not None else permutation_spec(reference, example_inputs)
    spec.check(model.state_dict())
    perms = match_weights(spec, reference.state_dict(), model.state_dict(), seed=seed, max_sweeps=max_sweeps)
    return permuted_copy(model, spec, perms)
