"""Repairing an interpolated model's activation statistics after averaging aligned models.

Averaging two aligned networks shrinks the variance of their hidden activations ("variance
collapse"); Jordan et al., *REPAIR: REnormalizing Permuted Activations for Interpolation Repair*
(ICLR 2023, https://arxiv.org/abs/2211.08403) restore it. For networks with BatchNorm this is a reset
of the running statistics on data (:func:`reset_batchnorm`). For networks without it,
:func:`repair` rescales every hidden Linear / Conv output channel of the merged model so that its
mean and standard deviation on data equal the interpolation of the endpoints' (their Sec. 3.2),
folding the correction into the layer's weight and bias.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from unimerge.align.activations import as_inputs, eval_mode
from unimerge.align.derive import BATCH_NORMS, trace_groups
from unimerge.errors import AlignError

__all__ = ["channel_stats", "repair", "repairable_layers", "reset_batchnorm"]

M = TypeVar("M", bound=nn.Module)


def reset_batchnorm(model: M, batches: Iterable[object]) -> M:
    """Recompute every BatchNorm's running mean and variance on ``batches`` (in place; returns ``model``).

    As in Jordan et al.'s code, the statistics are the cumulative average of the per-batch statistics
    (``momentum=None``: the data mean when batches have equal sizes, and the mean of the batches'
    unbiased variances); other modules stay in eval mode (dropout off) and every module's mode and
    momentum are restored after.

    Raises:
        AlignError: the model has no BatchNorm (use :func:`repair`).
    """
    norms = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
    if not norms:
        raise AlignError(
            f"{type(model).__name__} has no BatchNorm to reset; use unimerge.align.repair instead."
        )
    momenta = [m.momentum for m in norms]
    with torch.no_grad(), eval_mode(model):
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for batch in batches:
            model(*as_inputs(batch))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return model


class _Sums:
    """Running per-channel count, sum and sum of squares of one layer's output (float64)."""

    def __init__(self, axis: int) -> None:
        self.axis, self.parts = axis, list[Tensor]()

    def __call__(self, module: nn.Module, inputs: object, out: Tensor) -> None:
        x = out.detach().to(torch.float64).movedim(self.axis, -1)
        x = x.reshape(-1, x.shape[-1])
        part = [torch.full_like(x[0], x.shape[0]), x.sum(0), (x * x).sum(0)]
        self.parts = part if not self.parts else [s + p for s, p in zip(self.parts, part, strict=True)]


def channel_stats(
    model: nn.Module, layers: Sequence[str], batches: Iterable[object]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-output-channel mean and standard deviation of each named Linear / Conv layer on ``batches``
    (channel axis: last for Linear, 1 for Conv); float64. Layers whose forward never ran are left out."""
    modules = dict(model.named_modules())
    sums = {name: _Sums(-1 if isinstance(modules[name], nn.Linear) else 1) for name in layers}
    handles = [modules[name].register_forward_hook(sums[name]) for name in layers]
    try:
        with torch.no_grad(), eval_mode(model):
            for batch in batches:
                model(*as_inputs(batch))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, acc in sums.items():
        if acc.parts:
            n, s, ss = acc.parts
            mean = s / n
            out[name] = (mean, (ss / n - mean**2).clamp_min(0).sqrt())
    return out


def repairable_layers(model: nn.Module, example_inputs: Sequence[object]) -> list[str]:
    """Linear / Conv modules with a bias whose output channels belong to a permutation group (hidden
    layers), in the order the traced graph runs them; the output layer is left out."""
    tg = trace_groups(model, tuple(example_inputs))
    axes, modules = tg.spec().axes_of(), dict(model.named_modules())
    dense = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [
        name
        for name in tg.layers
        if isinstance(m := modules.get(name), dense)
        and m.bias is not None
        and any(ax.axis == 0 for _, ax in axes.get(f"{name}.weight", []))
    ]


def repair(
    merged: M,
    endpoints: Sequence[nn.Module],
    batches: Iterable[object],
    *,
    weights: Sequence[float] | None = None,
    example_inputs: Sequence[object] | None = None,
    eps: float = 1e-5,
) -> M:
    """REPAIR ``merged`` in place (returns it): each hidden layer's output channels get the mean and
    std ``sum_i weights[i] * stat_i`` of the endpoints' same channels, one layer at a time in order.

    Args:
        merged: the interpolated model, e.g. ``(1 - t) * a + t * b`` of aligned ``a`` and ``b``.
        endpoints: the aligned models it interpolates.
        batches: model inputs (a tensor or a tuple per batch); a few thousand examples suffice.
        weights: interpolation weights of the endpoints (default: equal).
        example_inputs: inputs to trace the model with (default: the first batch).
        eps: added to the merged channel's std before dividing.
    """
    batches = list(batches)
    w = list(weights) if weights is not None else [1.0 / len(endpoints)] * len(endpoints)
    layers = repairable_layers(merged, example_inputs or as_inputs(batches[0]))
    ends = [channel_stats(e, layers, batches) for e in endpoints]
    modules = dict(merged.named_modules())
    for name in layers:
        got = channel_stats(merged, [name], batches)
        if name not in got:
            continue  # the module's forward is not called (e.g. MultiheadAttention.out_proj)
        mean, std = got[name]
        t_mean = sum(wi * e[name][0] for wi, e in zip(w, ends, strict=True))
        t_std = sum(wi * e[name][1] for wi, e in zip(w, ends, strict=True))
        scale = t_std / (std + eps)
        m = modules[name]
        assert isinstance(m.weight, Tensor) and isinstance(m.bias, Tensor)
        with torch.no_grad():
            shape = (-1,) + (1,) * (m.weight.ndim - 1)
            m.weight.mul_(scale.reshape(shape).to(m.weight.dtype))
            m.bias.copy_(((m.bias.to(torch.float64) - mean) * scale + t_mean).to(m.bias.dtype))
    return merged
