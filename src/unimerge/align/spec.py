"""Permutation specs: which state-dict axes a hidden-unit permutation acts on, derived from the model.

A network computes the same function after its hidden units are reordered, as long as every tensor
that reads or writes those units is reordered the same way (Ainsworth et al., Git Re-basin, ICLR
2023, Sec. 2). A :class:`PermutationSpec` lists these tensors per *group*: one group per layer of an
MLP, one per conv channel set (with its BatchNorm), one residual stream shared by every block that
adds into it, one set of attention heads per ``nn.MultiheadAttention``.

:func:`unimerge.align.derive.permutation_spec` derives the spec by tracing the model with
``torch.fx``; :func:`declare_spec` builds one from a hand-written table for models that cannot be
traced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from unimerge.errors import AlignError

__all__ = ["Axis", "PermutationSpec", "declare_spec"]


@dataclass(frozen=True)
class Axis:
    """One axis of one state-dict tensor that a permutation group reorders.

    The axis has length ``segments * size * block``: ``segments`` consecutive copies (the q, k, v
    blocks of a fused attention projection) of ``size`` units of ``block`` entries each (one
    attention head, or one conv channel's ``H*W`` inputs after a flatten). The permutation reorders
    the ``size`` units inside every segment and keeps the entries inside a unit in order.
    """

    name: str
    axis: int
    block: int = 1
    segments: int = 1


@dataclass(frozen=True)
class PermutationSpec:
    """Groups of axes permuted together: ``groups[g]`` lists the axes, ``sizes[g]`` the unit count."""

    groups: Mapping[str, tuple[Axis, ...]]
    sizes: Mapping[str, int]

    def axes_of(self) -> dict[str, list[tuple[str, Axis]]]:
        """State-dict name -> the ``(group, axis)`` pairs that reorder it."""
        out: dict[str, list[tuple[str, Axis]]] = {}
        for g, axes in self.groups.items():
            for ax in axes:
                out.setdefault(ax.name, []).append((g, ax))
        return out

    def check(self, state: Mapping[str, Tensor]) -> None:
        """Raise :class:`AlignError` if an axis names a missing tensor or has the wrong length."""
        for g, axes in self.groups.items():
            for ax in axes:
                if ax.name not in state:
                    raise AlignError(
                        f"Permutation group {g!r} names {ax.name!r}, which is not in the model's "
                        "state dict; check the spec's tensor names against model.state_dict()."
                    )
                shape = tuple(state[ax.name].shape)
                want = ax.segments * self.sizes[g] * ax.block
                if ax.axis >= len(shape) or shape[ax.axis] != want:
                    raise AlignError(
                        f"Permutation group {g!r} ({self.sizes[g]} units) expects axis {ax.axis} of "
                        f"{ax.name!r} to have length {want}, but the tensor's shape is {list(shape)}."
                    )


AxisLike = Axis | tuple[str, int]


def declare_spec(groups: Mapping[str, Sequence[AxisLike]], state: Mapping[str, Tensor]) -> PermutationSpec:
    """A spec written by hand: ``{group: [(tensor name, axis), ...]}``, checked against ``state``.

    Use it for models ``torch.fx`` cannot trace. Each group lists every tensor axis that reads or
    writes its units (``fc1.weight`` axis 0, ``fc1.bias`` axis 0, ``fc2.weight`` axis 1, ...);
    an :class:`Axis` entry also gives ``block`` and ``segments`` for heads and flattened channels.

    Example:
        >>> spec = declare_spec({"h1": [("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)]},
        ...                     model.state_dict())
    """
    parsed = {
        g: tuple(a if isinstance(a, Axis) else Axis(a[0], a[1]) for a in axes) for g, axes in groups.items()
    }
    sizes: dict[str, int] = {}
    for g, axes in parsed.items():
        if not axes:
            raise AlignError(f"Permutation group {g!r} lists no tensor axes.")
        first = axes[0]
        if first.name not in state:
            raise AlignError(f"Permutation group {g!r} names {first.name!r}, which is not in the state dict.")
        sizes[g] = state[first.name].shape[first.axis] // (first.segments * first.block)
    spec = PermutationSpec(parsed, sizes)
    spec.check(state)
    return spec
