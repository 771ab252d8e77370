"""Activation matching: pair hidden units by the correlation of their activations on data.

Ainsworth et al., Git Re-basin (ICLR 2023, Sec. 3.1): for every permutation group, the units of the
two models are paired by a linear assignment maximising the summed Pearson correlation of their
activations over the inputs. A group's activations are read where a weight layer reads them (after
the nonlinearity of an MLP layer; the residual stream at every block's input). Groups with no such
activation (attention heads) are then matched by weights, the other groups' permutations fixed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, fx, nn

from unimerge.align.derive import trace_groups
from unimerge.align.matching import (
    check_same_architecture,
    linear_assignment,
    match_weights,
    permuted_copy,
)
from unimerge.align.spec import PermutationSpec
from unimerge.align.trace import Feat, TracedGroups, trace_graph
from unimerge.errors import ConfigError

__all__ = [
    "CorrelationStats",
    "activation_matching",
    "as_inputs",
    "checked_batches",
    "correlation_stats",
    "eval_mode",
    "joint_correlation_stats",
    "match_activations",
]

M = TypeVar("M", bound=nn.Module)


def as_inputs(batch: object) -> tuple[object, ...]:
    """A batch as positional model inputs: a tensor is one input, a tuple or list is all of them."""
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def checked_batches(
    what: str,
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[object],
    example_inputs: Sequence[object] | None,
) -> tuple[list[object], tuple[object, ...]]:
    """The batches of ``data`` as a list and the inputs to trace with (``example_inputs``, default the
    first batch), after checking there is data and the two models share one architecture."""
    batches = list(data)
    if not batches:
        raise ConfigError(f"{what} needs data: pass at least one batch of model inputs.")
    check_same_architecture(model_a, model_b)
    example = tuple(example_inputs) if example_inputs is not None else as_inputs(batches[0])
    return batches, example


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode (BatchNorm statistics untouched) and restore their modes after."""
    modes = [[m.training for m in model.modules()] for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, flags in zip(models, modes, strict=True):
            for m, flag in zip(model.modules(), flags, strict=True):
                m.training = flag


@dataclass
class CorrelationStats:
    """Running sums for the Pearson correlation between two ``(rows, units)`` activation streams."""

    units: int
    count: int = 0
    sums: list[Tensor] = field(default_factory=list)  # sum a, sum b, sum a^2, sum b^2, sum a^T b

    def update(self, a: Tensor, b: Tensor) -> None:
        a, b = a.to(torch.float64), b.to(torch.float64)
        parts = [a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), a.T @ b]
        self.sums = parts if not self.sums else [s + p for s, p in zip(self.sums, parts, strict=True)]
        self.count += a.shape[0]

    def correlation(self) -> Tensor:
        """``(units, units)``: entry ``[i, j]`` correlates the first stream's unit ``i`` with the
        second's unit ``j`` (0 where a unit is constant)."""
        sa, sb, saa, sbb, sab = (s / self.count for s in self.sums)
        cov = sab - sa[:, None] * sb[None, :]
        std_a, std_b = (saa - sa**2).clamp_min(0).sqrt(), (sbb - sb**2).clamp_min(0).sqrt()
        return torch.nan_to_num(cov / (std_a[:, None] * std_b[None, :]), nan=0.0, posinf=0.0, neginf=0.0)


class _Recorder(fx.Interpreter):
    """Runs a traced graph, keeping the outputs of the nodes named in ``keep``."""

    def __init__(self, gm: fx.GraphModule, keep: set[str]) -> None:
        super().__init__(gm)
        self.keep, self.seen = keep, dict[str, Any]()

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.keep:
            self.seen[n.name] = out
        return out


def _where(tg: TracedGroups) -> dict[str, tuple[str, int]]:
    """Node name -> (group, channel axis): where each group's activations are read."""
    names, plan = tg.names(), dict[str, tuple[str, int]]()
    carriers = [*tg.read, *tg.feats]  # what a weight layer reads first; any carrier as a fallback
    covered: set[str] = set()
    for i, node in enumerate(carriers):
        f = tg.feats.get(node)
        if not isinstance(f, Feat) or f.group is None or f.block != 1:
            continue
        g = names.get(tg.find(f.group))
        if g is not None and (i < len(tg.read) or g not in covered):
            plan[node] = (g, f.axis)
            covered.add(g)
    return plan


def _rows(x: Tensor, axis: int) -> Tensor:
    return x.detach().movedim(axis, -1).reshape(-1, x.shape[axis])


def correlation_stats(
    reference: nn.Module,
    model: nn.Module,
    batches: Iterable[object],
    example_inputs: Sequence[object],
    *,
    joint: bool = False,
) -> tuple[PermutationSpec, dict[str, list[CorrelationStats]]]:
    """The spec of ``reference`` and, per group, the correlation statistics of its activations at
    every place a weight layer reads them (groups with no such place are left out).

    Each entry correlates ``reference``'s units (rows) with ``model``'s (columns); with ``joint``
    both sides are the two models' units concatenated, ``reference`` first (``2 * units`` each):
    ZipIt!'s correlation of the concatenated features (:func:`joint_correlation_stats`).
    """
    return _stats((reference, model), batches, example_inputs, joint=joint)


def joint_correlation_stats(
    models: Sequence[nn.Module], batches: Iterable[object], example_inputs: Sequence[object]
) -> tuple[PermutationSpec, dict[str, list[CorrelationStats]]]:
    """As :func:`correlation_stats` with ``joint``, for any number of models: each entry correlates
    the ``len(models) * units`` features of all models, concatenated in order, with themselves."""
    return _stats(models, batches, example_inputs, joint=True)


def _stats(
    models: Sequence[nn.Module], batches: Iterable[object], example_inputs: Sequence[object], *, joint: bool
) -> tuple[PermutationSpec, dict[str, list[CorrelationStats]]]:
    tg = trace_groups(models[0], tuple(example_inputs))
    spec, plan = tg.spec(), _where(tg)
    runners = [_Recorder(trace_graph(m, tuple(example_inputs)), set(plan)) for m in models]
    width = len(models) if joint else 1
    stats = {node: CorrelationStats(width * spec.sizes[g]) for node, (g, _) in plan.items()}
    with torch.no_grad(), eval_mode(*models):
        for batch in batches:
            for r in runners:
                r.run(*as_inputs(batch))
            for node, (_, axis) in plan.items():
                rows = [_rows(r.seen[node], axis) for r in runners]
                if joint:
                    rows = [torch.cat(rows, dim=1)] * 2
                stats[node].update(rows[0], rows[1])
    out: dict[str, list[CorrelationStats]] = {}
    for node, (g, _) in plan.items():
        if stats[node].count:
            out.setdefault(g, []).append(stats[node])
    return spec, out


def match_activations(
    reference: nn.Module,
    model: nn.Module,
    batches: Iterable[object],
    example_inputs: Sequence[object],
    *,
    seed: int = 0,
) -> tuple[PermutationSpec, dict[str, Tensor]]:
    """The spec of ``reference`` and one permutation per group taking ``model`` into its basis."""
    spec, stats = correlation_stats(reference, model, batches, example_inputs)
    perms: dict[str, Tensor] = {
        g: linear_assignment(torch.stack([s.correlation() for s in found]).sum(0))
        for g, found in stats.items()
    }
    rest = [g for g in spec.groups if g not in perms]
    if rest:
        perms = match_weights(
            spec, reference.state_dict(), model.state_dict(), seed=seed, init=perms, groups=rest
        )
    return spec, perms


def activation_matching(
    reference: nn.Module,
    model: M,
    batches: Iterable[object],
    example_inputs: Sequence[object] | None = None,
    *,
    seed: int = 0,
) -> M:
    """A copy of ``model`` permuted into ``reference``'s basis by activation matching on ``batches``.

    Each batch is the models' input (a tensor, or a tuple of positional inputs); ``example_inputs``
    (default: the first batch) is used to trace the models. The copy computes the same function as
    ``model``. Raises the errors of :func:`~unimerge.align.matching.weight_matching`.
    """
    data, example = checked_batches("Activation matching", reference, model, batches, example_inputs)
    spec, perms = match_activations(reference, model, data, example, seed=seed)
    return permuted_copy(model, spec, perms)
