"""Benchmark tasks: deterministic splits, tokenised batches, and the suites.

The data-aware interface
------------------------
Every task of a suite is a :class:`TaskData`. Data-aware merging methods (Fisher, RegMean,
AdaMerging, ...) get their data from it and from nothing else:

- ``name``, ``classes``, ``num_classes``, ``is_pair``
- ``train`` / ``val`` / ``test``: :class:`Split` (raw ``texts``, ``labels``, token ids)
- ``unlabeled(n, batch_size, seed)``: batches of ``input_ids`` / ``attention_mask`` /
  ``token_type_ids`` drawn from the *train* split, without labels
- ``labeled(n, batch_size, seed)``: the same with ``labels``
- ``head``: the task's classification head (``weight (k, hidden)``, ``bias (k,)``) once the
  task's expert is built (``None`` before); heads are kept per task and never merged.

Validation and test data are never handed to a method: hyperparameters are chosen on ``val`` by the
benchmark, and ``test`` is only used to report the chosen point.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unimerge.bench.datasets import RawDataset, Text

__all__ = [
    "SUITES",
    "Batch",
    "Split",
    "Suite",
    "TaskData",
    "TaskSpec",
    "batches",
    "make_task",
    "split_indices",
]

Batch = dict[str, Tensor]


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
    n_train: int  # cap on training examples per task (also the linear probe's training set)
    steps: int  # optimizer steps per expert
    mtl_steps: int  # optimizer steps of the multi-task model (batches alternate over tasks)
    batch_size: int = 32
    lr: float = 5e-5
    scaling_subsets: int = 3  # random task subsets per size in --scaling
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


@dataclass(frozen=True)
class Split:
    """Examples of one split: raw ``texts``, ``labels (n,)`` and token ids (one list per example)."""

    texts: tuple[Text, ...]
    labels: Tensor  # (n,) int64
    input_ids: tuple[tuple[int, ...], ...]
    token_type_ids: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.texts)

    def collate(self, idx: Sequence[int], with_labels: bool = True) -> Batch:
        """Pad the examples ``idx`` to their longest one (dynamic padding)."""
        width = max(len(self.input_ids[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)  # (b, width); 0 is [PAD]
        types = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            k = len(self.input_ids[i])
            ids[row, :k] = torch.tensor(self.input_ids[i])
            types[row, :k] = torch.tensor(self.token_type_ids[i])
            mask[row, :k] = 1
        out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        if with_labels:
            out["labels"] = self.labels[list(idx)]
        return out


@dataclass(frozen=True)
class TaskData:
    """One task of a suite, as data-aware methods see it (see the module docstring)."""

    name: str
    classes: tuple[str, ...]
    is_pair: bool
    max_len: int
    train: Split
    val: Split
    test: Split
    head: dict[str, Tensor] | None = field(default=None, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def unlabeled(self, n: int, batch_size: int = 32, seed: int = 0) -> Iterator[Batch]:
        """Up to ``n`` training examples (seeded sample) in batches, without labels."""
        return self._sample(n, batch_size, seed, with_labels=False)

    def labeled(self, n: int, batch_size: int = 32, seed: int = 0) -> Iterator[Batch]:
        """Up to ``n`` training examples (seeded sample) in batches, with ``labels``."""
        return self._sample(n, batch_size, seed, with_labels=True)

    def _sample(self, n: int, batch_size: int, seed: int, with_labels: bool) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.train), generator=g)[: min(n, len(self.train))].tolist()
        for start in range(0, len(idx), batch_size):
            yield self.train.collate(idx[start : start + batch_size], with_labels)


def batches(split: Split, batch_size: int) -> Iterator[tuple[list[int], Batch]]:
    """All of ``split`` in length-sorted batches (little padding): yields (indices, batch)."""
    order = sorted(range(len(split)), key=lambda i: len(split.input_ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, split.collate(idx)


def _encode(tokenizer, texts: Sequence[Text], max_len: int) -> tuple[tuple, tuple]:
    if texts and isinstance(texts[0], tuple):
        enc = tokenizer(
            [t[0] for t in texts], [t[1] for t in texts], truncation="longest_first", max_length=max_len
        )
    else:
        enc = tokenizer(list(texts), truncation=True, max_length=max_len)
    return tuple(map(tuple, enc["input_ids"])), tuple(map(tuple, enc["token_type_ids"]))


def make_task(raw: RawDataset, spec: TaskSpec, suite: Suite, tokenizer, seed: int) -> TaskData:
    """Split ``raw`` deterministically (``seed``) and tokenise each split to ``spec.max_len``."""
    parts = split_indices(len(raw.texts), suite.n_val, suite.n_test, suite.n_train, seed)
    labels = torch.tensor(raw.labels, dtype=torch.long)
    splits = {}
    for key, idx in parts.items():
        texts = tuple(raw.texts[i] for i in idx)
        ids, types = _encode(tokenizer, texts, spec.max_len)
        splits[key] = Split(texts, labels[torch.from_numpy(idx)], ids, types)
    return TaskData(raw.name, raw.classes, raw.is_pair, spec.max_len, **splits)
