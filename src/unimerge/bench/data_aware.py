"""Benchmark rows for data-aware methods (:class:`~unimerge.methods.ModelMethod`): the one interface is MergeProblem.

A suite hands a data-aware method a :class:`~unimerge.methods.MergeProblem` built from its cached
pieces: the pretrained encoder, the experts' encoder tensors, each task's :class:`~unimerge.data.TaskData` (the
method draws ``unlabeled``/``labeled`` batches from the *train* split only), each task's frozen head
and the benchmark's unit-norm features (:func:`unimerge.bench.model.embed`) as ``features``. The method runs at its registered defaults (its grid is not
searched: a data-aware merge costs minutes, not seconds) with a budget of
:data:`BUDGET` examples per task; the row records that budget, whether labels were used, the merge
time, and the parameter count of what must be stored (for MoE-style results).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from unimerge.bench.model import EVAL_BATCH, embed
from unimerge.bench.scores import correct_row
from unimerge.core import validate_params
from unimerge.data import Batch, Split, TaskData, batches
from unimerge.errors import UnimergeError
from unimerge.methods import MergedModel, MergeProblem, ModelMethod

__all__ = ["BUDGET", "correct_merged", "data_row", "evaluate_merged", "make_problem", "run_data_method"]

BUDGET = 64  # examples per task a data-aware method may draw (the papers use tens to hundreds)


def _head(weights: Mapping[str, Tensor]) -> nn.Linear:
    k, d = weights["weight"].shape
    head = nn.Linear(d, k)
    head.load_state_dict({"weight": weights["weight"].float(), "bias": weights["bias"].float()})
    return head.eval().requires_grad_(False)


def _features(module: nn.Module, batch: Batch) -> Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return embed(module, batch)


def make_problem(
    base: nn.Module,
    states: Sequence[Mapping[str, Tensor]],
    tasks: Sequence[TaskData],
    heads: Mapping[str, Mapping[str, Tensor]],
    *,
    budget: int = BUDGET,
    seed: int = 0,
) -> MergeProblem:
    """A MergeProblem over the benchmark's pieces (``base`` is copied, never modified)."""
    return MergeProblem(
        base=copy.deepcopy(base).eval(),
        experts=list(states),
        tasks=list(tasks),
        heads={t.name: _head(heads[t.name]) for t in tasks},
        features=_features,
        budget=budget,
        seed=seed,
    )


@torch.inference_mode()
def _correct(problem: MergeProblem, module: nn.Module, i: int, split: Split) -> Tensor:
    out = torch.zeros(len(split), dtype=torch.bool)
    for idx, batch in batches(split, EVAL_BATCH):
        logits = problem.logits(module, i, {k: v for k, v in batch.items() if k != "labels"})
        out[idx] = logits.argmax(-1) == split.labels[idx]
    return out


def correct_merged(problem: MergeProblem, merged: MergedModel, split: str) -> dict[str, Tensor]:
    """Task name -> per-example correctness ``(n,)`` of the module the merge gives for that task."""
    return {
        task.name: _correct(problem, merged.for_task(task.name).eval(), i, getattr(task, split))
        for i, task in enumerate(problem.tasks)
    }


def evaluate_merged(problem: MergeProblem, merged: MergedModel, split: str) -> dict[str, float]:
    """Task name -> accuracy of the module the merge gives for that task, on ``split``."""
    return {t: float(c.float().mean()) for t, c in correct_merged(problem, merged, split).items()}


def run_data_method(info: ModelMethod, problem: MergeProblem) -> dict[str, Any]:
    """Run one data-aware method at its defaults; returns validation and test accuracies and costs."""
    params, _ = validate_params(info, {}, [])
    start = time.perf_counter()
    merged = info.fn(problem, params)
    seconds = time.perf_counter() - start
    dense = sum(p.numel() for p in problem.base.parameters())
    test = correct_merged(problem, merged, "test")
    return {
        "val": evaluate_merged(problem, merged, "val"),
        "test": {t: float(c.float().mean()) for t, c in test.items()},
        "test_correct": test,
        "seconds": round(seconds, 3),
        "params": params.model_dump(by_alias=True),
        "data_budget": {"examples_per_task": merged.examples_used, "labeled": merged.labeled},
        "params_total": merged.params_total or dense,
        "params_dense": dense,
        "details": merged.details,
    }


def data_row(info: ModelMethod, problem: MergeProblem, individual: Mapping[str, float]) -> dict[str, Any]:
    """A benchmark row (or ``{"method", "reason"}``) for data-aware ``info`` on ``problem``.

    Args:
        info: a data-aware method.
        problem: the suite's pieces (:func:`make_problem`).
        individual: task name -> the task's own expert's test accuracy (for ``normalized_avg``).
    """
    try:
        out = run_data_method(info, problem)
    except UnimergeError as err:
        return {"method": info.name, "reason": str(err)}
    row = correct_row(info.name, out["test_correct"], individual)
    return (
        row
        | {
            "params": out["params"],
            "seconds": out["seconds"],
            "val_avg": sum(out["val"].values()) / len(out["val"]),
            "family": info.family,
            "data_budget": out["data_budget"],
            "params_total": out["params_total"],
            "params_dense": out["params_dense"],
        }
        | ({"details": out["details"]} if out["details"] else {})
    )
