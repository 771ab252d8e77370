"""Derive a :class:`~unimerge.align.spec.PermutationSpec` by walking a ``torch.fx`` graph.

Every tensor in the graph carries a :class:`Feat`: the permutation group of its channel axis (a
union-find id; ``None`` where the channels are the model's own input features), which axis that is,
and how many entries each unit spans (``block``: a conv channel flattened over ``H*W``). A Linear or
Conv starts a new group on its output; its weight's input axis joins its input's group. An add or
multiply joins the groups of its inputs (a residual stream becomes one group). Anything that reaches
the output or an operation not understood is joined to ``FIXED`` and never permuted.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from unimerge.align.spec import Axis, PermutationSpec
from unimerge.errors import AlignError

__all__ = [
    "ELEMENTWISE_FUNCS",
    "ELEMENTWISE_METHODS",
    "FIXED",
    "JOINING",
    "JOINING_METHODS",
    "Feat",
    "TracedGroups",
    "arg_feats",
    "flatten_feat",
    "get_attr_feat",
    "node_shape",
    "trace_graph",
]

FIXED = 0


@dataclass(frozen=True)
class Feat:
    """The channel axis of one traced tensor: its group (``None``: input features), axis and block."""

    group: int | None
    axis: int
    block: int = 1


@dataclass
class TracedGroups:
    """Union-find over group ids (0 is ``FIXED``), the axes each id owns, and every node's feature."""

    parent: list[int] = field(default_factory=lambda: [FIXED])
    axes: dict[int, list[Axis]] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    feats: dict[str, Any] = field(default_factory=dict)  # node name -> Feat | tuple | None
    layers: list[str] = field(default_factory=list)  # Linear / Conv module names, in execution order
    read: list[str] = field(default_factory=list)  # node names a weight layer reads, in execution order

    def new(self, size: int, axes: Sequence[Axis] = ()) -> int:
        self.parent.append(len(self.parent))
        gid = len(self.parent) - 1
        self.axes[gid], self.sizes[gid] = list(axes), size
        return gid

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int | None, b: int | None) -> None:
        ra, rb = self.find(FIXED if a is None else a), self.find(FIXED if b is None else b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)  # FIXED (0) always stays the root
            self.parent[hi] = lo

    def add_axis(self, g: int | None, ax: Axis) -> None:
        if g is not None:
            self.axes.setdefault(g, []).append(ax)

    def fix(self, value: Any) -> None:
        """Join every group reachable in ``value`` (a Feat or a nested tuple of them) to FIXED."""
        if isinstance(value, Feat):
            self.union(FIXED, value.group)
        elif isinstance(value, (tuple, list)):
            for v in value:
                self.fix(v)

    def merged(self) -> dict[int, list[Axis]]:
        """Root id -> the axes of every group joined into it (FIXED and empty groups left out)."""
        out: dict[int, list[Axis]] = {}
        for gid, axes in self.axes.items():
            root = self.find(gid)
            if root != FIXED and axes:
                out.setdefault(root, []).extend(axes)
        return out

    def names(self) -> dict[int, str]:
        """Root id -> the group's name in the spec: its first axis, ``"fc1.weight:0"``."""
        return {root: f"{axes[0].name}:{axes[0].axis}" for root, axes in self.merged().items()}

    def spec(self) -> PermutationSpec:
        merged, names = self.merged(), self.names()
        groups = {names[root]: tuple(axes) for root, axes in merged.items()}
        return PermutationSpec(groups, {names[root]: self.sizes[root] for root in merged})


def trace_graph(model: nn.Module, example_inputs: tuple[object, ...]) -> fx.GraphModule:
    """``model`` traced by ``torch.fx`` with every node's output shape recorded from ``example_inputs``.

    Raises:
        AlignError: the model cannot be traced (data-dependent control flow, ...).
    """
    try:
        gm = fx.symbolic_trace(model)
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as err:  # fx raises many types (TraceError, TypeError, RuntimeError)
        raise AlignError(
            f"Cannot trace {type(model).__name__} with torch.fx to find its permutation groups "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no message'}). Declare the "
            "spec by hand: spec = unimerge.align.declare_spec({'group': [('fc1.weight', 0), ('fc1.bias', 0), "
            "('fc2.weight', 1)], ...}, model.state_dict()) and pass spec=spec."
        ) from None
    return gm


def get_attr_feat(tg: TracedGroups, node: fx.Node, params: dict[str, torch.Tensor]) -> Feat | None:
    t = params.get(str(node.target))
    if t is None or t.ndim == 0:
        return None
    axis = max((d for d in range(t.ndim) if t.shape[d] != 1), default=t.ndim - 1)  # (C, 1, 1): axis 0
    return Feat(tg.new(t.shape[axis], [Axis(str(node.target), axis)]), axis)


def arg_feats(tg: TracedGroups, value: Any) -> Any:
    """``value`` (node args) with every ``fx.Node`` replaced by its traced feature."""
    if isinstance(value, fx.Node):
        return tg.feats.get(value.name)
    if isinstance(value, (tuple, list)):
        return tuple(arg_feats(tg, v) for v in value)
    if isinstance(value, dict):
        return tuple(arg_feats(tg, v) for v in value.values())
    return None


def node_shape(node: Any) -> tuple[int, ...] | None:
    """The recorded output shape of ``node`` (``None`` for non-tensors and non-nodes)."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def flatten_feat(x: Feat, in_shape: tuple[int, ...], start: int, end: int) -> Feat | None:
    """``x`` after flattening dims ``start..end`` (inclusive, non-negative) of a tensor of ``in_shape``;
    ``None`` when the channel axis cannot stay a block-structured axis (the caller fixes it)."""
    if x.axis < start:
        return x
    if x.axis > end:
        return replace(x, axis=x.axis - (end - start))
    if any(in_shape[d] != 1 for d in range(start, x.axis)):
        return None  # channel is not the slowest-varying flattened dim
    inner = math.prod(in_shape[x.axis + 1 : end + 1])
    return Feat(x.group, start, x.block * inner)


ELEMENTWISE_FUNCS: set[Callable[..., Any]] = {
    F.relu,
    torch.relu,
    F.gelu,
    F.silu,
    F.elu,
    F.leaky_relu,
    F.softplus,
    F.mish,
    F.hardswish,
    torch.tanh,
    torch.sigmoid,
    F.dropout,
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    operator.neg,
    torch.neg,
}
ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "detach", "float", "to", "neg"}
JOINING = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, operator.truediv}
JOINING |= {torch.add, torch.sub, torch.mul}
JOINING_METHODS = {"add", "add_", "sub", "mul", "mul_"}
