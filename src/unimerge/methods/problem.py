"""The one interface between data-aware merging methods and whoever holds models and data.

A data-aware method (Fisher, RegMean, AdaMerging, WEMoE, SMILE, ...) is a
:class:`~unimerge.methods.registry.ModelMethod`, registered with
``register_model_method(..., data="unlabeled" | "labeled")`` and called as
``fn(problem, params) -> MergedModel``. It gets everything from :class:`MergeProblem` and nothing
else: the benchmark builds one from a suite (``unimerge.bench``), a config's ``data:`` section builds
one through :mod:`unimerge.datamerge`, a user builds one from their own ``nn.Module`` and data loaders.
These types live with the registry because they are the signature of a model method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn

__all__ = ["Batch", "MergeProblem", "MergedModel", "TaskSource"]

Batch = dict[str, Tensor]  # model inputs (e.g. input_ids, attention_mask); "labels" when labelled


class TaskSource(Protocol):
    """One task: its name, its head, and a way to draw (un)labelled training batches.

    ``unimerge.data.TaskData`` satisfies this protocol.
    """

    @property
    def name(self) -> str: ...  # read-only: a frozen dataclass's field satisfies it

    def unlabeled(self, n: int, batch_size: int = 32, seed: int = 0) -> Iterator[Batch]: ...

    def labeled(self, n: int, batch_size: int = 32, seed: int = 0) -> Iterator[Batch]: ...


@dataclass
class MergeProblem:
    """What a data-aware merge gets.

    Attributes:
        base: the pretrained module; methods must not modify it (copy it).
        experts: one state dict per task, keys as ``base.state_dict()``.
        tasks: one :class:`TaskSource` per expert, same order.
        heads: task name -> head module mapping features to logits (kept per task, never merged).
        features: ``features(module, batch) -> (b, hidden)`` the representation the heads read.
        budget: examples per task the method may draw (the data budget reported by the benchmark).
        seed: seed for sampling and any randomness.
        device: where to compute.
    """

    base: nn.Module
    experts: Sequence[Mapping[str, Tensor]]
    tasks: Sequence[TaskSource]
    heads: Mapping[str, nn.Module]
    features: Callable[[nn.Module, Batch], Tensor]
    budget: int = 64
    seed: int = 0
    device: torch.device | str = "cpu"

    def logits(self, module: nn.Module, task: int, batch: Batch) -> Tensor:
        """Task ``task``'s logits of ``module`` on ``batch`` (features then that task's head)."""
        return cast(Tensor, self.heads[self.tasks[task].name](self.features(module, batch)))


@dataclass
class MergedModel:
    """A data-aware method's result.

    Attributes:
        module: the merged module (for MoE-style methods it routes inputs itself).
        task_modules: optional per-task modules (e.g. representation surgery); ``for_task`` uses them.
        examples_used: examples drawn per task; ``labeled`` whether labels were used.
        params_total: parameter count of what must be stored to run it (vs. the dense model).
        details: what the method learned, for reports (e.g. AdaMerging's coefficients and entropies).
    """

    module: nn.Module
    examples_used: int
    labeled: bool
    task_modules: Mapping[str, nn.Module] = field(default_factory=dict)
    params_total: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def for_task(self, name: str) -> nn.Module:
        """The module to evaluate task ``name`` with."""
        return self.task_modules.get(name, self.module)
