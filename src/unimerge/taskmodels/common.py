"""What EMR/TALL masks and FREE-Merging experts share: expert naming, the stacked task vectors,
the checks of a state against a file, and one task seen tensor by tensor (:class:`TaskView`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Literal, Protocol

import torch
from torch import Tensor

from unimerge.errors import ConfigError, PlanError

__all__ = [
    "ExpertStates",
    "HasShape",
    "StateKind",
    "TaskView",
    "check_covers",
    "check_state_kind",
    "compute_dtype",
    "named_experts",
    "rebuild_state",
    "stacked_deltas",
]

StateKind = Literal["base", "merged"]
ExpertStates = Mapping[str, Mapping[str, Tensor]] | Sequence[Mapping[str, Tensor]]


class HasShape(Protocol):
    """A tensor or a tensor's header (:class:`unimerge.io.TensorMeta`)."""

    @property
    def shape(self) -> Sequence[int]: ...


class TaskView(Protocol):
    """One task of a task-model file (or of one in memory), rebuilt one tensor at a time."""

    @property
    def shapes(self) -> Mapping[str, torch.Size]:
        """Covered tensor name -> shape."""
        ...

    def apply(self, key: str, w: Tensor, state_is: StateKind = "base") -> Tensor:
        """Task ``key``'s rebuilt weight from the base (or merged) weight ``w``, in ``w``'s dtype."""
        ...


def named_experts(experts: ExpertStates) -> tuple[list[str], list[Mapping[str, Tensor]]]:
    """Task names and state dicts; a list is named ``model_0``, ``model_1``, ..."""
    if isinstance(experts, Mapping):
        return [str(k) for k in experts], list(experts.values())
    return [f"model_{i}" for i in range(len(experts))], list(experts)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 weights, float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expert_tensor(task: str, sd: Mapping[str, Tensor], key: str, shape: torch.Size) -> Tensor:
    if key not in sd:
        raise PlanError(
            f"Expert {task!r} has no tensor {key!r} that the base has; merge experts "
            "fine-tuned from the same base model."
        )
    t = sd[key]
    if t.shape != shape:
        raise PlanError(
            f"Tensor {key!r}: expert {task!r} has shape {tuple(t.shape)}, the base {tuple(shape)}."
        )
    return t


def stacked_deltas(
    names: Sequence[str], experts: Sequence[Mapping[str, Tensor]], base: Mapping[str, Tensor]
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(tensor name, task vectors (n, *shape))`` for every floating-point base tensor.

    The task vectors are in float32 (float64 for a float64 base); each expert tensor is read once.
    """
    for key, b in base.items():
        if not b.is_floating_point():
            continue
        rows = [_expert_tensor(task, sd, key, b.shape) for task, sd in zip(names, experts, strict=True)]
        cdtype = compute_dtype(b.dtype)
        yield key, torch.stack([t.to(cdtype) for t in rows]) - b.to(cdtype)  # (n, *shape)


def check_state_kind(state_is: str) -> None:
    """``state_is`` is ``"base"`` or ``"merged"``."""
    if state_is not in ("base", "merged"):
        raise ConfigError(f"state_is must be 'base' or 'merged', not {state_is!r}.")


def check_covers(state: Mapping[str, HasShape], covered: Mapping[str, torch.Size], source: str) -> None:
    """Every tensor ``source`` covers is in ``state`` with the same shape (checks headers only)."""
    for key, shape in covered.items():
        if key not in state:
            raise PlanError(
                f"The model has no tensor {key!r} that {source} covers; use the base model the masks "
                "were computed from."
            )
        if tuple(state[key].shape) != tuple(shape):
            raise PlanError(
                f"Tensor {key!r}: the model has shape {tuple(state[key].shape)}, {source} has {tuple(shape)}."
            )


def rebuild_state(
    state: Mapping[str, Tensor], view: TaskView, source: str, state_is: StateKind = "base"
) -> dict[str, Tensor]:
    """``state`` with every tensor ``view`` covers rebuilt for its task (the others unchanged)."""
    check_state_kind(state_is)
    check_covers(state, view.shapes, source)
    out = dict(state)
    for key in view.shapes:
        out[key] = view.apply(key, state[key], state_is)
    return out
