"""Greedy model soup: average experts, one at a time, while held-out accuracy does not drop.

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time" (https://arxiv.org/abs/2203.05482), Algorithm 1 ("GreedySoup"):
rank the ingredients by their own held-out accuracy (best first), start the soup with the best, and
try each next one: keep it if the uniform average of the soup plus it scores at least as well as
the soup (``>=``), else leave it out and go on (``mode="skip"``, the paper's algorithm);
``mode="stop"`` ends at the first candidate that lowers the score instead.

In the multi-task setting the held-out score is the mean accuracy over all tasks (each task's head
on that task's data), on ``problem.budget`` labelled examples per task drawn from the *training*
split with ``problem.seed`` (validation and test stay untouched for the benchmark).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from unimerge.methods import Batch, MergedModel, MergeProblem, register_model_method
from unimerge.modelmerge.stats import (
    autocast,
    average_state,
    check_experts,
    count,
    draw,
    finish,
    load_state,
    work_module,
)

__all__ = ["SoupParams", "SoupTrace", "greedy_select", "greedy_soup", "soup_accuracy", "soup_search"]


class SoupParams(BaseModel):
    """Parameters of ``greedy_soup``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mode: Literal["skip", "stop"] = Field(
        default="skip", description="skip: try every candidate (the paper); stop: end at the first drop."
    )
    batch_size: int = Field(default=64, ge=1, le=1024, description="Examples per forward pass.")
    bf16: bool = Field(default=True, description="bf16 autocast for forward passes.")


@dataclass(frozen=True)
class SoupTrace:
    """The greedy search: candidate order, chosen experts, and the soup's score after each try."""

    order: list[int]
    chosen: list[int]
    scores: list[float]


def greedy_select(
    ranked: Sequence[int], score: Callable[[list[int]], float], mode: Literal["skip", "stop"] = "skip"
) -> SoupTrace:
    """Greedy soup over ``ranked`` candidates (best first); ``score(members)`` rates a uniform soup."""
    chosen = [ranked[0]]
    best = score(chosen)
    scores = [best]
    for cand in ranked[1:]:
        s = score([*chosen, cand])
        scores.append(s)
        if s >= best:
            chosen, best = [*chosen, cand], s
        elif mode == "stop":
            break
    return SoupTrace(list(ranked), chosen, scores)


@torch.no_grad()
def soup_accuracy(
    problem: MergeProblem, module: nn.Module, data: Sequence[Sequence[Batch]], bf16: bool
) -> float:
    """Mean over tasks of ``module``'s accuracy on that task's labelled batches."""
    accs = []
    for t, batches in enumerate(data):
        right = total = 0
        for b in batches:
            with autocast(problem.device, bf16):
                pred = problem.logits(module, t, b).argmax(-1)
            right += int((pred == b["labels"]).sum())
            total += int(b["labels"].numel())
        accs.append(right / max(total, 1))
    return sum(accs) / len(accs)


def soup_search(problem: MergeProblem, params: SoupParams) -> tuple[SoupTrace, dict[str, Tensor], int]:
    """Run the greedy search; returns (trace, the soup's state dict, examples used per task)."""
    check_experts(problem, paired=False)
    module = work_module(problem)
    data = [draw(problem, t, labeled=True, batch_size=params.batch_size) for t in range(len(problem.tasks))]

    def score(members: list[int]) -> float:
        load_state(module, average_state([problem.experts[i] for i in members]))
        return soup_accuracy(problem, module, data, params.bf16)

    alone = [score([i]) for i in range(len(problem.experts))]
    ranked = sorted(range(len(alone)), key=lambda i: -alone[i])  # stable: ties keep expert order
    trace = greedy_select(ranked, score, params.mode)
    return trace, average_state([problem.experts[i] for i in trace.chosen]), max(count(d) for d in data)


@register_model_method(
    "greedy_soup",
    params=SoupParams,
    family="data",
    needs_base=True,
    paper="https://arxiv.org/abs/2203.05482",
    data="labeled",
    grid={"mode": ("skip",)},
)
def greedy_soup(problem: MergeProblem, params: SoupParams) -> MergedModel:
    """Greedy soup: add experts by held-out accuracy while the uniform average does not get worse."""
    _, merged, used = soup_search(problem, params)
    return finish(problem, merged, used, labeled=True)
