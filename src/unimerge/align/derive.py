"""The rules that turn a traced graph into permutation groups: one per layer kind and operation.

:func:`permutation_spec` walks the ``torch.fx`` graph of a model in execution order and applies a
rule to each node (see :mod:`unimerge.align.trace` for the bookkeeping). Rules follow the weight
layouts of Git Re-basin's hand-written specs (Ainsworth et al., ICLR 2023, Appendix A): a Linear
or Conv weight's axis 0 belongs to its output group and axis 1 to its input's group; BatchNorm and
LayerNorm parameters and running statistics belong to their input's group; an elementwise add
joins groups (the residual stream); ``nn.MultiheadAttention`` heads form one group whose units are
``head_dim`` rows of each of q, k, v and ``head_dim`` columns of the output projection.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, fx, nn

from unimerge.align.spec import Axis, PermutationSpec
from unimerge.align.trace import (
    ELEMENTWISE_FUNCS,
    ELEMENTWISE_METHODS,
    JOINING,
    JOINING_METHODS,
    Feat,
    TracedGroups,
    arg_feats,
    flatten_feat,
    get_attr_feat,
    node_shape,
    trace_graph,
)
from unimerge.errors import AlignError

__all__ = ["BATCH_NORMS", "call_function", "call_module", "permutation_spec", "trace_groups"]

PASS_MODULES = (
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Mish,
    nn.Hardswish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
NORMS = (*BATCH_NORMS, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def permutation_spec(model: nn.Module, example_inputs: Iterable[object]) -> PermutationSpec:
    """Derive ``model``'s permutation groups by tracing it with ``torch.fx`` on ``example_inputs``.

    Linear, Conv (plain and depthwise), BatchNorm, LayerNorm, GroupNorm, Embedding and
    ``nn.MultiheadAttention`` (self-attention; its heads permuted as units) are understood;
    activations, dropout, pooling, softmax, flatten, reshapes that keep the channel axis, means over
    other axes and transposes pass a group through; an elementwise add or multiply joins its inputs'
    groups (a residual stream is one group). Units that reach the model's output or inputs, or an
    operation not understood, stay in place, so the spec never changes the function computed.

    Raises:
        AlignError: the model cannot be traced (the message says how to declare the spec by hand),
            or it holds a module with weights that the rules do not know.
    """
    spec = trace_groups(model, tuple(example_inputs)).spec()
    spec.check(model.state_dict())
    return spec


def trace_groups(model: nn.Module, example_inputs: tuple[object, ...]) -> TracedGroups:
    """Walk the traced graph of ``model`` and return the union-find of its permutation groups."""
    gm = trace_graph(model, example_inputs)
    tg = TracedGroups()
    modules = dict(gm.named_modules())
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = node_shape(node)
            tg.feats[node.name] = Feat(None, len(shape) - 1) if shape else None
        elif node.op == "get_attr":
            tg.feats[node.name] = get_attr_feat(tg, node, tensors)
        elif node.op == "call_module":
            tg.feats[node.name] = call_module(tg, node, modules[str(node.target)])
        elif node.op in ("call_function", "call_method"):
            tg.feats[node.name] = call_function(tg, node)
        elif node.op == "output":
            tg.fix(arg_feats(tg, node.args))
    return tg


def _unknown(tg: TracedGroups, node: fx.Node) -> Feat | None:
    """An operation not understood: its inputs' units stay in place, its output is not permuted."""
    tg.fix(arg_feats(tg, (node.args, node.kwargs)))
    shape = node_shape(node)
    return Feat(None, len(shape) - 1) if shape else None


def _first(tg: TracedGroups, node: fx.Node) -> Feat | None:
    x = tg.feats.get(node.args[0].name) if node.args and isinstance(node.args[0], fx.Node) else None
    return x if isinstance(x, Feat) else None


def _names(prefix: str, module: nn.Module, *names: str) -> list[str]:
    own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
    return [f"{prefix}.{n}" for n in names if own.get(n) is not None and own[n].ndim > 0]


def _dense(
    tg: TracedGroups, node: fx.Node, m: nn.Module, x: Feat | None, in_axis: int, ch: int
) -> Feat | None:
    """Linear / Conv: axis ``1 - in_axis`` of the weight (and the bias) starts a new group of size
    ``out``; axis ``in_axis`` joins the input's group when the input's channel axis is ``ch``."""
    name, shape = str(node.target), node_shape(node)
    weight = m.weight
    assert isinstance(weight, Tensor)
    if x is not None and x.group is not None:
        if x.axis == ch and x.block * _units(tg, x) == weight.shape[in_axis]:
            tg.add_axis(x.group, Axis(f"{name}.weight", in_axis, block=x.block))
            tg.read.append(_node_name(node.args[0]))
        else:
            tg.fix(x)
    out = weight.shape[1 - in_axis]
    axes = [Axis(n, 1 - in_axis if n.endswith("weight") else 0) for n in _names(name, m, "weight", "bias")]
    tg.layers.append(name)
    return Feat(tg.new(out, axes), ch if shape is None or ch == 1 else len(shape) - 1)


def _units(tg: TracedGroups, x: Feat) -> int:
    return tg.sizes[x.group] if x.group is not None else 0


def _conv(tg: TracedGroups, node: fx.Node, m: nn.Module, x: Feat | None) -> Feat | None:
    assert isinstance(m, (*CONVS, *TRANSPOSED))
    if m.groups == 1:
        return _dense(tg, node, m, x, 0 if isinstance(m, TRANSPOSED) else 1, 1)
    if m.groups == m.in_channels == m.out_channels and x is not None and x.axis == 1 and x.block == 1:
        for n in _names(str(node.target), m, "weight", "bias"):
            tg.add_axis(x.group, Axis(n, 0))
        return x  # depthwise: each channel maps to itself
    return _unknown(tg, node)


def _norm(tg: TracedGroups, node: fx.Node, m: nn.Module, x: Feat | None, ndim: int) -> Feat | None:
    """BatchNorm / InstanceNorm / GroupNorm (channel axis 1) and LayerNorm (last axis): per-unit
    parameters and statistics join the input's group."""
    if x is None:
        return _unknown(tg, node)
    per_unit = isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 and x.axis == ndim - 1
    if isinstance(m, nn.GroupNorm):
        per_unit = m.num_groups in (1, m.num_channels) and x.axis == 1
    elif isinstance(m, NORMS):
        per_unit = x.axis == 1
    if not per_unit or x.block != 1:
        return _unknown(tg, node)
    names = _names(str(node.target), m, "weight", "bias", "running_mean", "running_var")
    for n in names:
        tg.add_axis(x.group, Axis(n, 0))
    return x


def _attention(tg: TracedGroups, node: fx.Node, m: nn.MultiheadAttention) -> Any:
    """Self-attention: the input's group reads ``in_proj_weight`` axis 1; the heads are one group
    (``head_dim`` rows of each of q, k, v; ``head_dim`` columns of ``out_proj``); the output projection
    starts a new group. Anything else (cross-attention, ``kdim``, ``bias_k``) is left in place."""
    q = [_arg(node, i, k, None) for i, k in enumerate(("query", "key", "value"))]
    x, shape = _first(tg, node), node_shape(q[0])
    same = isinstance(q[0], fx.Node) and q[0] is q[1] is q[2]
    if not (same and m.in_proj_weight is not None and m.bias_k is None) or x is None or shape is None:
        return (_unknown(tg, node), None)
    name, hd = str(node.target), m.head_dim
    if x.group is not None and x.axis == len(shape) - 1 and x.block == 1:
        tg.add_axis(x.group, Axis(f"{name}.in_proj_weight", 1))
        tg.read.append(_node_name(q[0]))
    else:
        tg.fix(x)
    heads = [
        Axis(f"{name}.in_proj_weight", 0, block=hd, segments=3),
        Axis(f"{name}.out_proj.weight", 1, block=hd),
    ]
    if m.in_proj_bias is not None:
        heads.append(Axis(f"{name}.in_proj_bias", 0, block=hd, segments=3))
    tg.new(m.num_heads, heads)
    out = [Axis(n, 0) for n in _names(f"{name}.out_proj", m.out_proj, "weight", "bias")]
    tg.layers.append(f"{name}.out_proj")
    return (Feat(tg.new(m.embed_dim, out), len(shape) - 1), None)


def call_module(tg: TracedGroups, node: fx.Node, m: nn.Module) -> Any:
    """The feature a leaf module's output carries, recording the axes of its weights."""
    x, shape = _first(tg, node), node_shape(node.args[0]) if node.args else None
    ndim = len(shape) if shape else 0
    if isinstance(m, nn.Linear):
        return _dense(tg, node, m, x, 1, ndim - 1)
    if isinstance(m, (*CONVS, *TRANSPOSED)):
        return _conv(tg, node, m, x)
    if isinstance(m, (nn.LayerNorm, *NORMS)):
        return _norm(tg, node, m, x, ndim)
    if isinstance(m, nn.Embedding):
        out = node_shape(node)
        return Feat(tg.new(m.embedding_dim, [Axis(f"{node.target}.weight", 1)]), len(out) - 1 if out else 1)
    if isinstance(m, nn.MultiheadAttention):
        return _attention(tg, node, m)
    if isinstance(m, (*PASS_MODULES, nn.Softmax)):
        return x if x is not None else _unknown(tg, node)
    if isinstance(m, nn.Flatten):
        return _flatten(tg, node, x, shape, m.start_dim, m.end_dim)
    if any(True for _ in m.parameters()) or any(t.ndim > 0 for t in m.buffers()):
        raise AlignError(
            f"Cannot derive the permutation groups of module {node.target!r} ({type(m).__name__}): "
            "unimerge.align knows Linear, Conv, BatchNorm, LayerNorm, GroupNorm, Embedding and "
            "MultiheadAttention. Declare the spec by hand with unimerge.align.declare_spec(...) and pass spec=."
        )
    return _unknown(tg, node)


def _flatten(
    tg: TracedGroups, node: fx.Node, x: Feat | None, shape: tuple[int, ...] | None, start: int, end: int
) -> Feat | None:
    if x is None or shape is None:
        return _unknown(tg, node)
    n = len(shape)
    out = flatten_feat(x, shape, start % n, end % n)
    return out if out is not None else _unknown(tg, node)


def _node_name(value: object) -> str:
    return value.name if isinstance(value, fx.Node) else ""


def _arg(node: fx.Node, i: int, key: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


def call_function(tg: TracedGroups, node: fx.Node) -> Any:
    """The feature a function or method call's output carries (see the module docstring)."""
    t, x = node.target, _first(tg, node)
    if t is operator.getitem:
        return _getitem(tg, node)
    if t is getattr or t in ("size", "dim"):
        return None
    if (t in ELEMENTWISE_FUNCS or t in ELEMENTWISE_METHODS) and x is not None:
        return x
    if t in JOINING or t in JOINING_METHODS:
        return _join(tg, node)
    if t in (torch.softmax, torch.nn.functional.softmax, "softmax") and x is not None:
        return x
    if t in (torch.flatten, "flatten"):
        start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
        return _flatten(tg, node, x, node_shape(node.args[0]), start, end)
    if t in ("view", "reshape") or t is torch.reshape:
        return _reshape(tg, node, x)
    if t in (torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"):
        return _reduce(tg, node, x)
    if t in (torch.transpose, "transpose", "permute"):
        return _transpose(tg, node, x)
    return _unknown(tg, node)


def _getitem(tg: TracedGroups, node: fx.Node) -> Any:
    base, idx = tg.feats.get(node.args[0].name) if isinstance(node.args[0], fx.Node) else None, node.args[1]
    if isinstance(base, tuple) and isinstance(idx, int):
        return base[idx]
    if not isinstance(base, Feat):
        return _unknown(tg, node)
    items = idx if isinstance(idx, tuple) else (idx,)
    if (
        not all(isinstance(i, (int, slice)) for i in items)
        or len(items) > base.axis
        and items[base.axis] != slice(None)
    ):
        return _unknown(tg, node)
    before = sum(isinstance(i, int) for i in items[: base.axis])
    return Feat(base.group, base.axis - before, base.block)


def _join(tg: TracedGroups, node: fx.Node) -> Feat | None:
    """Elementwise add / sub / mul: every input that varies along the output's channel axis must
    carry a group there, and they are joined; inputs constant along it (a ``(1, 1, W)`` shift) keep
    their own units in place. The channel axis is taken from an activation before a parameter."""
    out = node_shape(node)
    if out is None:
        return _unknown(tg, node)
    entries = [(a, node_shape(a), tg.feats.get(a.name)) for a in node.args if isinstance(a, fx.Node)]
    tensors = [(a.op, shape, feat, len(out) - len(shape)) for a, shape, feat in entries if shape is not None]
    varying = [(op, f, off) for op, shape, f, off in tensors if isinstance(f, Feat) and shape[f.axis] != 1]
    if not varying:
        return _unknown(tg, node)
    _, first, first_off = min(varying, key=lambda e: e[0] == "get_attr")
    axis = first.axis + first_off
    for _, shape, feat, off in tensors:
        d = axis - off
        if not 0 <= d < len(shape) or shape[d] == 1:
            tg.fix(feat)  # constant along the channel axis: its own axes stay in place
        elif isinstance(feat, Feat) and feat.axis == d and feat.block == first.block:
            tg.union(first.group, feat.group)
        else:
            return _unknown(tg, node)
    return Feat(first.group, axis, first.block)


def _reshape(tg: TracedGroups, node: fx.Node, x: Feat | None) -> Feat | None:
    shape, out = node_shape(node.args[0]), node_shape(node)
    if x is None or shape is None or out is None:
        return _unknown(tg, node)
    if out[: x.axis + 1] == shape[: x.axis + 1] and (x.axis == len(shape) - 1) == (x.axis == len(out) - 1):
        return x  # dims after the channel axis merged or split: channel and block unchanged
    for start in range(len(shape)):
        if out == (*shape[:start], math.prod(shape[start:])):
            return _flatten(tg, node, x, shape, start, len(shape) - 1)
    return _unknown(tg, node)


def _reduce(tg: TracedGroups, node: fx.Node, x: Feat | None) -> Feat | None:
    shape, dims = node_shape(node.args[0]), _arg(node, 1, "dim", None)
    if x is None or shape is None or dims is None or x.block != 1:
        return _unknown(tg, node)
    dims = {d % len(shape) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    if x.axis in dims:
        return _unknown(tg, node)
    keep = bool(_arg(node, 2, "keepdim", False))
    return Feat(x.group, x.axis if keep else x.axis - sum(d < x.axis for d in dims))


def _transpose(tg: TracedGroups, node: fx.Node, x: Feat | None) -> Feat | None:
    shape = node_shape(node.args[0])
    if x is None or shape is None:
        return _unknown(tg, node)
    n = len(shape)
    if node.target == "permute":
        rest: Any = node.args[1:]
        dims = [
            int(d) % n for d in (rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest)
        ]
        return Feat(x.group, dims.index(x.axis), x.block)
    a, b = _arg(node, 1, "dim0", 0) % n, _arg(node, 2, "dim1", 1) % n
    return Feat(x.group, {a: b, b: a}.get(x.axis, x.axis), x.block)
