"""Shared pieces of the MoE-style and test-time methods (SMILE, WEMoE, Twin-Merging, surgery).

- choosing the ``nn.Linear`` submodules a method upgrades (regular expressions on module names);
- task vectors and task-arithmetic states from a :class:`MergeProblem`;
- :class:`LowRankExperts`: ``n`` low-rank weight differences applied with per-input weights;
- helpers for training loops (cycling unlabeled batches, frozen head copies; bf16 autocast is
  :func:`unimerge.modelmerge.stats.autocast`) and
  counting stored parameters.

Every module class a method puts into a model has a ``kind`` class attribute, ``config()`` (a JSON
dict of its constructor arguments) and ``from_config(cfg)`` (an uninitialised module of the same
shapes), so :mod:`unimerge.modelmerge.load` can rebuild a saved model.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from unimerge.errors import MergeError
from unimerge.methods import Batch, MergeProblem, TaskSource

__all__ = [
    "ALL_LINEARS",
    "METHOD_ATTR",
    "MLP_TARGETS",
    "LowRankExperts",
    "backward",
    "count_params",
    "cycle_batches",
    "dense_copy",
    "frozen_heads",
    "linear_at",
    "low_rank",
    "match_linears",
    "record_method",
    "recorded_method",
    "replace_module",
    "task_arithmetic_state",
    "task_vectors",
    "to_device",
]

# BERT MLP linears (not ``attention.output.dense``) and Llama/Mistral/Qwen MLP projections.
MLP_TARGETS: tuple[str, ...] = (
    r"(^|\.)layer\.\d+\.intermediate\.dense$",
    r"(^|\.)layer\.\d+\.output\.dense$",
    r"(^|\.)mlp\.(gate|up|down)_proj$",
)
ALL_LINEARS: tuple[str, ...] = (r".",)
# The attribute on a merged module naming the method and parameters that made it (save_merged writes it).
METHOD_ATTR = "unimerge_method"


def match_linears(module: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` submodules of ``module`` matching any of ``targets`` (``re.search``).

    Raises:
        MergeError: no linear layer matches (the message lists a few linear names to pick from).
    """
    patterns = [re.compile(t) for t in targets]
    linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    chosen = [name for name in linears if any(p.search(name) for p in patterns)]
    if not chosen:
        sample = ", ".join(linears[:6]) or "none"
        raise MergeError(
            f"no nn.Linear of the model matches targets {list(targets)}; its linear layers include: {sample}. "
            "Pass `targets` as regular expressions matching some of them."
        )
    return chosen


def linear_at(root: nn.Module, name: str) -> nn.Linear:
    """The ``nn.Linear`` at dotted path ``name`` inside ``root``.

    Raises:
        MergeError: the submodule there is not an ``nn.Linear``.
    """
    module = root.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise MergeError(f"{name!r} is a {type(module).__name__}, not an nn.Linear; check `targets`")
    return module


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted path ``name`` inside ``root`` (in place)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def record_method(module: nn.Module, method: str, params: Mapping[str, Any]) -> None:
    """Note on ``module`` the method and JSON parameters that made it (read by :func:`recorded_method`)."""
    setattr(module, METHOD_ATTR, {"method": method, "params": params})


def recorded_method(module: nn.Module) -> dict[str, Any]:
    """What :func:`record_method` noted on ``module`` (``{}`` when nothing was)."""
    record = getattr(module, METHOD_ATTR, None)
    return record if isinstance(record, dict) else {}


def task_vectors(problem: MergeProblem) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """The base state and ``expert - base`` for every floating-point tensor of the base.

    Non-float tensors (e.g. ``position_ids`` buffers) are left out of the task vectors.

    Raises:
        MergeError: an expert lacks a tensor of the base or has a different shape.
    """
    base = {k: v.detach() for k, v in problem.base.state_dict().items()}
    out: list[dict[str, Tensor]] = []
    for i, expert in enumerate(problem.experts):
        tv = {}
        for name, b in base.items():
            if not b.is_floating_point():
                continue
            if name not in expert:
                raise MergeError(
                    f"expert {i} has no tensor {name!r}; experts must use the base's state_dict names"
                )
            e = expert[name]
            if e.shape != b.shape:
                raise MergeError(
                    f"expert {i} tensor {name!r} has shape {tuple(e.shape)}, base {tuple(b.shape)}"
                )
            tv[name] = e.detach().to(device=b.device, dtype=torch.float32) - b.float()
        out.append(tv)
    if not out:
        raise MergeError("the merge problem has no experts")
    return base, out


def task_arithmetic_state(
    base: Mapping[str, Tensor], tvs: Sequence[Mapping[str, Tensor]], scale: float
) -> dict[str, Tensor]:
    """``base + scale * sum_i tau_i`` for every task-vector entry; other tensors as in ``base``."""
    out = dict(base)
    for name in tvs[0]:
        total = torch.stack([tv[name] for tv in tvs]).sum(0)  # (*shape)
        out[name] = (base[name].float() + scale * total).to(base[name].dtype)
    return out


def dense_copy(base: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """A frozen deep copy of ``base`` holding ``state`` (eval mode, no gradients)."""
    module = copy.deepcopy(base)
    module.load_state_dict(dict(state))
    return module.requires_grad_(False).eval()


def low_rank(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors of ``delta (out, in)``: ``up (out, r)`` (= U S) and ``down (r, in)`` (= V^T).

    ``rank`` 0 or above ``min(out, in)`` keeps every singular value (exact).
    """
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (out, m), (m,), (m, in)
    r = s.numel() if rank <= 0 else min(rank, s.numel())
    return u[:, :r] * s[:r], vh[:r]


class LowRankExperts(nn.Module):
    """``n`` low-rank linear maps ``x -> up_i (down_i x) + bias_i`` mixed with per-input weights.

    Attributes:
        down: ``(n, r, in)``; up: ``(n, out, r)``; bias: ``(n, out)`` or ``None``.
    """

    def __init__(self, n: int, rank: int, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.zeros(n, rank, in_features), requires_grad=False)
        self.up = nn.Parameter(torch.zeros(n, out_features, rank), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(n, out_features), requires_grad=False) if bias else None

    @classmethod
    def from_deltas(cls, weights: Tensor, biases: Tensor | None, rank: int) -> LowRankExperts:
        """Factor weight differences ``(n, out, in)`` to rank ``rank`` (0: full); biases ``(n, out)`` kept exactly."""
        factors = [low_rank(w, rank) for w in weights]
        return cls.from_factors(
            torch.stack([f[0] for f in factors]), torch.stack([f[1] for f in factors]), biases
        )

    @classmethod
    def from_factors(cls, up: Tensor, down: Tensor, biases: Tensor | None) -> LowRankExperts:
        """From ``up (n, out, r)``, ``down (n, r, in)`` and optional ``biases (n, out)``."""
        (n, out_f, r), in_f = up.shape, down.shape[2]
        experts = cls(n, r, in_f, out_f, biases is not None)
        with torch.no_grad():
            experts.up.copy_(up)
            experts.down.copy_(down)
            if biases is not None and experts.bias is not None:
                experts.bias.copy_(biases)
        return experts

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        """``sum_i w[..., i] * expert_i(x)``: ``x (*lead, in)``, ``w`` broadcastable to ``(*lead, n)``."""
        h = torch.einsum("...i,nri->...nr", x, self.down.to(x.dtype))  # (*lead, n, r)
        h = h * w.to(h.dtype).unsqueeze(-1)
        out = torch.einsum("...nr,nor->...o", h, self.up.to(h.dtype))  # (*lead, out)
        if self.bias is not None:
            out = out + w.to(out.dtype) @ self.bias.to(out.dtype)
        return out


def backward(loss: Tensor) -> None:
    """Accumulate the gradients of the scalar ``loss`` (``loss.backward()``, typed)."""
    torch.autograd.backward(loss)


def count_params(*modules: nn.Module) -> int:
    """Number of stored values (parameters and floating buffers) of ``modules``, shared tensors once."""
    seen: dict[int, int] = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if t.is_floating_point():
                seen[id(t)] = t.numel()
    return sum(seen.values())


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """``batch`` with every tensor moved to ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


def cycle_batches(
    task: TaskSource, n: int, batch_size: int, seed: int, device: torch.device | str
) -> Iterator[Batch]:
    """Endless unlabeled batches of ``task``: the same ``n`` examples (the data budget), pass after pass."""
    while True:
        empty = True
        for batch in task.unlabeled(n, batch_size=batch_size, seed=seed):
            empty = False
            yield to_device(batch, device)
        if empty:
            raise MergeError(f"task {task.name!r} yielded no unlabeled examples (budget {n})")


def frozen_heads(problem: MergeProblem) -> dict[str, nn.Module]:
    """Copies of the problem's heads without gradients (training never touches the caller's heads)."""
    return {k: copy.deepcopy(h).requires_grad_(False).to(problem.device) for k, h in problem.heads.items()}
