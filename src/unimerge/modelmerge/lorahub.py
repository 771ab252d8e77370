"""LoraHub-style search: gradient-free search of per-model merge weights on a few labelled examples.

Huang et al. 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition"
(https://arxiv.org/abs/2307.13269). LoraHub composes LoRA modules as ``sum_i w_i A_i`` /
``sum_i w_i B_i`` and searches ``w`` with a gradient-free optimizer (nevergrad, 40 evaluations,
``w`` in ``[-1.5, 1.5]`` starting at 0) to minimise the cross-entropy on a few labelled examples plus
``0.05 * mean_i |w_i|``. Here the composition is any registered data-free method (default
``task_arithmetic``: ``theta_0 + sum_i w_i (theta_i - theta_0)``, which is exactly LoraHub's
composition when the experts are LoRA adapters whose base adapter tensors are zero, and task
arithmetic for full fine-tunes); its per-model ``weight`` is the searched variable. The optimizer is
CMA-ES (``cma`` package, an optional dependency) with the same bounds, start and budget; the
objective is the mean over tasks of each task head's cross-entropy on ``min(examples,
problem.budget)`` labelled training examples (LoraHub uses 5 per task; default 32). The best weights
evaluated are used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from unimerge.core import merge_state_dicts, validate_params
from unimerge.errors import ConfigError
from unimerge.methods import Batch, MergedModel, MergeProblem, TensorMethod, get_method, register_model_method
from unimerge.modelmerge.stats import autocast, check_experts, count, draw, finish, load_state, work_module

__all__ = ["LoraHubParams", "SearchResult", "cma_minimize", "lorahub", "lorahub_search", "task_loss"]


class LoraHubParams(BaseModel):
    """Parameters of ``lorahub``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: str = Field(default="task_arithmetic", description="Registered data-free method to compose with.")
    method_params: dict[str, float | int | bool | str] = Field(
        default_factory=dict, description="Global parameters of `method` (its `weight` is searched)."
    )
    evaluations: int = Field(default=40, ge=1, le=2000, description="Objective evaluations (merges).")
    reg: float = Field(default=0.05, ge=0.0, le=10.0, description="L1 penalty on the weights (mean |w|).")
    lower: float = Field(default=-1.5, ge=-100.0, le=100.0, description="Lower bound of each weight.")
    upper: float = Field(default=1.5, ge=-100.0, le=100.0, description="Upper bound of each weight.")
    init: float = Field(default=0.0, ge=-100.0, le=100.0, description="Starting weight of every model.")
    sigma: float = Field(default=0.5, gt=0.0, le=100.0, description="CMA-ES initial step size.")
    examples: int = Field(default=32, ge=1, le=100_000, description="Labelled examples per task (<= budget).")
    batch_size: int = Field(default=32, ge=1, le=1024, description="Examples per forward pass.")
    bf16: bool = Field(default=True, description="bf16 autocast for forward passes.")

    @model_validator(mode="after")
    def _check(self) -> LoraHubParams:
        if not self.lower <= self.init <= self.upper or self.lower == self.upper:
            raise ValueError(
                f"need lower <= init <= upper with lower < upper, got {self.lower}, {self.init}, {self.upper}"
            )
        info = get_method(self.method)
        if not isinstance(info, TensorMethod):
            raise ValueError(f"lorahub composes data-free methods; {self.method!r} needs data")
        if "weight" in self.method_params:
            raise ValueError("'weight' is what lorahub searches; do not set it in method_params")
        validate_params(
            info, self.method_params, [{}]
        )  # per-model names too; checked when the config is read, not at the first merge
        return self


@dataclass(frozen=True)
class SearchResult:
    """The search's best weights and objective, and every evaluated objective in order."""

    weights: list[float]
    score: float
    history: list[float]
    state: dict[str, Tensor]
    examples: int


def cma_minimize(
    f: Callable[[list[float]], float],
    x0: Sequence[float],
    sigma: float,
    bounds: tuple[float, float],
    evaluations: int,
    seed: int,
) -> tuple[list[float], float, list[float]]:
    """Minimise ``f`` with CMA-ES (``cma``) within ``evaluations`` calls; 1-D falls back to a grid.

    Returns:
        (best x, best f(x), every f value in evaluation order).

    Raises:
        ConfigError: ``cma`` is not installed.
    """
    history: list[float] = []
    best: tuple[float, list[float]] = (float("inf"), list(x0))

    def call(x: Sequence[float]) -> float:
        nonlocal best
        x = [float(min(max(v, bounds[0]), bounds[1])) for v in x]
        y = float(f(x))
        history.append(y)
        if y < best[0]:
            best = (y, x)
        return y

    if len(x0) == 1:
        for v in np.linspace(bounds[0], bounds[1], evaluations):
            call([v])
        return best[1], best[0], history
    try:
        import cma
    except ImportError:
        raise ConfigError("lorahub needs the optional package `cma` (pip install cma).") from None
    state = np.random.get_state()  # cma seeds numpy's global generator; restore the caller's
    try:
        es = cma.CMAEvolutionStrategy(
            list(x0),
            sigma,
            {"bounds": list(bounds), "seed": seed + 1, "verbose": -9, "maxfevals": evaluations},
        )
        while not es.stop() and len(history) < evaluations:
            xs = es.ask()
            if len(history) + len(xs) > evaluations:  # last, partial population: evaluate, no update
                for x in xs[: evaluations - len(history)]:
                    call(x)
                break
            es.tell(xs, [call(x) for x in xs])
    finally:
        np.random.set_state(state)
    return best[1], best[0], history


@torch.no_grad()
def task_loss(problem: MergeProblem, module: nn.Module, data: Sequence[Sequence[Batch]], bf16: bool) -> float:
    """Mean over tasks of the cross-entropy of ``module`` with that task's head on its batches."""
    losses = []
    for t, batches in enumerate(data):
        total, n = 0.0, 0
        for b in batches:
            with autocast(problem.device, bf16):
                logits = problem.logits(module, t, b).float()
            total += float(torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum"))
            n += int(b["labels"].numel())
        losses.append(total / max(n, 1))
    return sum(losses) / len(losses)


def _composer(problem: MergeProblem, params: LoraHubParams) -> Callable[[Sequence[float]], dict[str, Tensor]]:
    """``weights -> merged state dict``. For per-tensor methods on task vectors, tensors that every
    expert leaves at the base value (zero task vectors) are not re-merged each evaluation."""
    base = problem.base.state_dict()
    info = get_method(params.method, TensorMethod)  # LoraHubParams refused model methods
    extra: Mapping[str, Any] = params.method_params
    keep = list(base)
    if info.inputs == "deltas" and info.scope == "tensor":
        keep = [k for k in base if any(not torch.equal(sd[k], base[k]) for sd in problem.experts)]
    experts = [{k: sd[k] for k in keep} for sd in problem.experts]
    sub_base = {k: base[k] for k in keep}

    def compose(w: Sequence[float]) -> dict[str, Tensor]:
        weights = [float(v) for v in w]
        merged = merge_state_dicts(
            params.method, experts, sub_base, seed=problem.seed, weight=weights, **extra
        )
        return {**base, **merged}

    return compose


def lorahub_search(problem: MergeProblem, params: LoraHubParams) -> SearchResult:
    """Search per-model weights (see the module docstring); returns the best merge found."""
    check_experts(problem, paired=False)
    module = work_module(problem)
    n = min(params.examples, problem.budget)
    data = [
        draw(problem, t, labeled=True, batch_size=params.batch_size, n=n) for t in range(len(problem.tasks))
    ]
    compose = _composer(problem, params)
    compose([params.init] * len(problem.experts))  # bad method_params fail here, before the search

    def objective(w: list[float]) -> float:
        load_state(module, compose(w))
        return task_loss(problem, module, data, params.bf16) + params.reg * float(np.mean(np.abs(w)))

    w, score, history = cma_minimize(
        objective,
        [params.init] * len(problem.experts),
        params.sigma,
        (params.lower, params.upper),
        params.evaluations,
        problem.seed,
    )
    return SearchResult(w, score, history, compose(w), max(count(d) for d in data))


@register_model_method(
    "lorahub",
    params=LoraHubParams,
    family="data",
    needs_base=True,
    paper="https://arxiv.org/abs/2307.13269",
    data="labeled",
    grid={"reg": (0.05,)},
)
def lorahub(problem: MergeProblem, params: LoraHubParams) -> MergedModel:
    """LoraHub: CMA-ES search of per-model weights of a data-free merge, scored on few labelled examples."""
    res = lorahub_search(problem, params)
    return finish(problem, res.state, res.examples, labeled=True)
