"""The benchmark suites: which datasets, split sizes and training budgets, and the split itself.

A :class:`Suite` names its tasks (:class:`TaskSpec`: a dataset of :data:`unimerge.data.DATASETS`
and an input length), its validation/test/train sizes and its training budgets. Every suite splits
a dataset the same way (:func:`split_indices`: one seeded permutation), so ``unimerge bench`` and a
config's ``data: {suite: NAME}`` see the very same *train* examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SUITES", "Suite", "TaskSpec", "split_indices"]


@dataclass(frozen=True)
class TaskSpec:
    """A task of a suite: which dataset, how long its inputs may be, and (for a dataset too small for
    the suite's test split) a smaller test split of its own."""

    dataset: str
    max_len: int = 64
    n_test: int | None = None


@dataclass(frozen=True)
class Suite:
    """A benchmark suite: tasks, split sizes, training budgets, and evaluation settings.

    ``default_methods`` is ``None`` for "every registered data-free method"; a suite with a strict
    time target may name a core subset instead (documented on the suite), and ``grids`` may replace
    a method's registered grid by a coarser one (``((method, ((param, values), ...)), ...)``).
    """

    name: str
    tasks: tuple[TaskSpec, ...]
    n_val: int
    n_test: int
    n_train: int  # cap on training examples per task (also the frozen head's training set)
    steps: int  # cap on optimizer steps per expert (early stopping usually ends sooner)
    mtl_steps: int  # cap on optimizer steps of the multi-task model (batches alternate over tasks; 0: none)
    batch_size: int = 32
    lr: float = 1e-4
    eval_every: int = 50  # steps between validation checks of an expert in training
    patience: int = 3  # checks without improvement before an expert stops
    mtl_eval_every: int = 200  # steps between validation checks of the multi-task model
    scaling_subsets: int = 3  # random task subsets per size in --scaling
    scaling_test: int | None = None  # test examples per task the scaling study reads (None: all)
    scaling_methods: tuple[str, ...] = (
        "linear", "task_arithmetic", "ties", "tsv_m", "iso_cts", "cart", "regmean",
    )  # fmt: skip
    default_methods: tuple[str, ...] | None = None
    grids: tuple[tuple[str, tuple[tuple[str, tuple[Any, ...]], ...]], ...] = ()
    description: str = ""

    def split(self, spec: TaskSpec, n: int, seed: int) -> dict[str, np.ndarray]:
        """The ``train`` / ``val`` / ``test`` indices of task ``spec``'s ``n`` examples (:func:`split_indices`)."""
        n_test = self.n_test if spec.n_test is None else spec.n_test
        return split_indices(n, self.n_val, n_test, self.n_train, seed)

    def grid_for(self, method: str) -> dict[str, tuple[Any, ...]] | None:
        """This suite's grid for ``method``, or ``None`` to search the method's registered grid."""
        found = dict(self.grids).get(method)
        return None if found is None else dict(found)


# The 12 tasks of protocol v2 (chosen where fine-tuning matters: each gained 5 to 31 points of
# validation accuracy over the pretrained encoder with the same frozen head in a 300-step check;
# docs/benchmark.md). Pairs read 128 tokens. epistemic has 2,000 examples: a 700-example test split.
_TEXT12 = (
    TaskSpec("knowledge_conflict", 128),
    TaskSpec("epistemic", 128, n_test=700),
    TaskSpec("squad_sentence", 128),
    TaskSpec("hyperbaton"),
    TaskSpec("health_source"),
    TaskSpec("winowhy"),
    TaskSpec("movie_dialog", 128),
    TaskSpec("news_outlet"),
    TaskSpec("multiemo"),
    TaskSpec("twitter_sentiment"),
    TaskSpec("privacy_qa", 128),
    TaskSpec("fever"),
)
_TEXT8 = ("hyperbaton", "health_source", "multiemo", "movie_dialog", "news_outlet", "squad_sentence",
          "epistemic", "winowhy")  # fmt: skip


def _text(name: str, tasks: tuple[TaskSpec, ...], mtl_steps: int, description: str) -> Suite:
    """A text suite of protocol v2: text12 and text8 share these splits and budgets, so they share
    every head and expert in the cache."""
    return Suite(name, tasks, n_val=300, n_test=1000, n_train=2000, steps=1000, mtl_steps=mtl_steps,
                 batch_size=32, lr=1e-4, eval_every=50, patience=3, mtl_eval_every=200,
                 scaling_test=400, description=description)  # fmt: skip


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        _text(
            "text12",
            _TEXT12,
            2400,
            "12 text tasks where fine-tuning matters, MiniLM-L6 experts through "
            "frozen heads, every data-free method",
        ),
        _text(
            "text8",
            tuple(t for t in _TEXT12 if t.dataset in _TEXT8),
            1600,
            "8 of text12's tasks (the same heads and experts), every data-free method",
        ),
        Suite(
            "quick",
            tasks=(
                TaskSpec("hyperbaton"),
                TaskSpec("health_source"),
                TaskSpec("multiemo"),
                TaskSpec("movie_dialog", 128),
            ),
            n_val=200,
            n_test=500,
            n_train=2000,
            steps=400,
            mtl_steps=0,
            batch_size=32,
            lr=1e-4,
            eval_every=50,
            patience=2,
            default_methods=("linear", "task_arithmetic", "ties"),
            grids=(  # coarser than the registered grids: every point costs a validation pass
                ("task_arithmetic", (("lambda", (0.3, 0.5, 0.7, 1.0)),)),
                ("ties", (("density", (0.2, 0.5)), ("lambda", (0.7, 1.0, 1.5)))),
            ),
            description="4 tasks with short inputs, short budgets, no multi-task model; core methods by "
            "default on coarser grids (the 10-minute cold and 1-minute cached targets)",
        ),
        Suite(
            "smoke",
            tasks=(TaskSpec("rt_sentiment", 48), TaskSpec("autos_electronics", 48)),
            n_val=48,
            n_test=64,
            n_train=256,
            steps=12,
            mtl_steps=12,
            batch_size=16,
            lr=1e-4,
            eval_every=4,
            patience=2,
            scaling_subsets=1,
            default_methods=("linear", "task_arithmetic", "ties"),
            description="2 tasks, tiny budgets, core methods: exercises the whole pipeline for CI",
        ),
    )
}


def split_indices(n: int, n_val: int, n_test: int, n_train: int, seed: int) -> dict[str, np.ndarray]:
    """Deterministic disjoint ``train`` / ``val`` / ``test`` index sets of ``range(n)``.

    One seeded permutation: test first, then validation, then up to ``n_train`` training examples.

    Raises:
        ValueError: fewer examples than ``n_val + n_test + 1``.
    """
    if n < n_val + n_test + 1:
        raise ValueError(f"{n} examples cannot give {n_val} validation + {n_test} test + training examples")
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    return {
        "test": perm[:n_test],
        "val": perm[n_test : n_test + n_val],
        "train": perm[n_test + n_val : n_test + n_val + n_train],
    }
