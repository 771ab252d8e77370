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
    """A task of a suite: which dataset, how long its inputs may be."""

    dataset: str
    max_len: int = 64


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
    mtl_steps: int  # cap on optimizer steps of the multi-task model (batches alternate over tasks)
    batch_size: int = 32
    lr: float = 1e-4
    eval_every: int = 100  # steps between validation checks of an expert in training
    patience: int = 3  # checks without improvement before an expert stops
    scaling_subsets: int = 3  # random task subsets per size in --scaling
    scaling_methods: tuple[str, ...] = (
        "linear", "task_arithmetic", "ties", "tsv_m", "iso_cts", "cart", "regmean",
    )  # fmt: skip
    default_methods: tuple[str, ...] | None = None
    grids: tuple[tuple[str, tuple[tuple[str, tuple[Any, ...]], ...]], ...] = ()
    description: str = ""

    def grid_for(self, method: str) -> dict[str, tuple[Any, ...]] | None:
        """This suite's grid for ``method``, or ``None`` to search the method's registered grid."""
        found = dict(self.grids).get(method)
        return None if found is None else dict(found)


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            "text8",
            tasks=(
                TaskSpec("rt_sentiment"),
                TaskSpec("twitter_sentiment"),
                TaskSpec("bbc_topic"),
                TaskSpec("autos_electronics"),
                TaskSpec("health_source"),
                TaskSpec("news_outlet"),
                TaskSpec("boolq", 128),
                TaskSpec("privacy_qa", 128),
            ),
            n_val=150,
            n_test=400,
            n_train=2000,
            steps=200,
            mtl_steps=600,
            batch_size=16,
            description="8 text classification tasks, MiniLM-L6 experts, every data-free method",
        ),
        Suite(
            "quick",
            tasks=(
                TaskSpec("rt_sentiment"),
                TaskSpec("twitter_sentiment"),
                TaskSpec("autos_electronics"),
                TaskSpec("health_source"),
            ),
            n_val=100,
            n_test=200,
            n_train=1000,
            steps=100,
            mtl_steps=200,
            batch_size=16,
            default_methods=("linear", "task_arithmetic", "ties"),
            grids=(  # coarser than the registered grids: every point costs a validation pass
                ("task_arithmetic", (("lambda", (0.1, 0.3, 0.5, 1.0)),)),
                ("ties", (("density", (0.2, 0.5)), ("lambda", (0.5, 1.0)))),
            ),
            description="4 tasks, short budgets; core methods by default on coarser grids (all of them, "
            "or the full grids, would break the 1-minute cached target)",
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
