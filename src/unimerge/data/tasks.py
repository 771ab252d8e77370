"""Tasks as data-aware methods see them: deterministic splits, tokenised batches.

The data-aware interface
------------------------
Every task of a suite is a :class:`TaskData`. Data-aware merging methods (Fisher, RegMean,
AdaMerging, ...) get their data from it and from nothing else (it satisfies
:class:`unimerge.methods.TaskSource`):

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

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from unimerge.data.datasets import RawDataset, Text
from unimerge.data.suites import Suite, TaskSpec

__all__ = ["Batch", "Split", "TaskData", "batches", "make_task"]

Batch = dict[str, Tensor]  # input_ids, attention_mask, token_type_ids (b, t); "labels" (b,) if labelled
TokenIds = tuple[tuple[int, ...], ...]  # one tuple of token ids per example


@dataclass(frozen=True)
class Split:
    """Examples of one split: raw ``texts``, ``labels (n,)`` and token ids (one list per example)."""

    texts: tuple[Text, ...]
    labels: Tensor  # (n,) int64
    input_ids: TokenIds
    token_type_ids: TokenIds

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

    def head(self, k: int | None) -> Split:
        """The first ``k`` examples (splits are in a seeded random order, so a random sample);
        ``None`` or ``k >= len(self)``: the split itself."""
        if k is None or k >= len(self):
            return self
        return Split(self.texts[:k], self.labels[:k], self.input_ids[:k], self.token_type_ids[:k])


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

    def with_test(self, k: int | None) -> TaskData:
        """This task with its test split cut to the first ``k`` examples (:meth:`Split.head`)."""
        return dataclasses.replace(self, test=self.test.head(k))

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


def _encode(tokenizer: Any, texts: Sequence[Text], max_len: int) -> tuple[TokenIds, TokenIds]:
    """Token ids and token type ids of ``texts`` (pairs truncated ``longest_first``)."""
    if texts and isinstance(texts[0], tuple):
        enc = tokenizer(
            [t[0] for t in texts], [t[1] for t in texts], truncation="longest_first", max_length=max_len
        )
    else:
        enc = tokenizer(list(texts), truncation=True, max_length=max_len)
    return tuple(map(tuple, enc["input_ids"])), tuple(map(tuple, enc["token_type_ids"]))


def make_task(raw: RawDataset, spec: TaskSpec, suite: Suite, tokenizer: Any, seed: int) -> TaskData:
    """Split ``raw`` deterministically (``seed``) and tokenise each split to ``spec.max_len``."""
    parts = suite.split(spec, len(raw.texts), seed)
    labels = torch.tensor(raw.labels, dtype=torch.long)
    splits: dict[str, Split] = {}
    for key, idx in parts.items():  # test, val, train: tokenised in this order
        texts = tuple(raw.texts[i] for i in idx)
        ids, types = _encode(tokenizer, texts, spec.max_len)
        splits[key] = Split(texts, labels[torch.from_numpy(idx)], ids, types)
    train, val, test = splits["train"], splits["val"], splits["test"]
    return TaskData(raw.name, raw.classes, raw.is_pair, spec.max_len, train, val, test)
