"""The examples of a data-aware merge: a config's ``data:`` section as one task source per model.

Two sources (see :class:`unimerge.config.DataSpec`):

- ``suite: NAME``: the *train* split of a benchmark suite's task (the same deterministic split and
  the same seeded sample as ``unimerge bench``), matched to each merged model by its ``task:``, else
  by the task a benchmark expert was trained on, else by position in the suite;
- ``files:``: one JSONL file per merged model; each line an object with a ``text`` string, optionally
  a ``text_pair`` string and an integer ``label`` (all lines or none).

A :class:`TextTask` satisfies :class:`unimerge.modelmerge.TaskSource`: it draws a seeded sample of
its examples and tokenises each batch with the merge's tokenizer (dynamic padding, truncation to
``max_length``; pairs truncated ``longest_first`` as the benchmark does).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unimerge.config import DataSpec, check_data_path
from unimerge.data import SUITES, load_dataset
from unimerge.errors import ConfigError
from unimerge.io.cache import sha256_file

__all__ = ["FILE_MAX_LENGTH", "TaskPlan", "TextTask", "load_task", "plan_tasks", "read_jsonl", "suite_task"]

FILE_MAX_LENGTH = 128  # tokens per example for `files:` when `max_length` is not given
Text = str | tuple[str, str]
Batch = dict[str, Tensor]
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class TextTask:
    """One task's training examples, tokenised batch by batch (a :class:`TaskSource`).

    Attributes:
        name: the task name (keys the task's head).
        texts: the examples, single texts or ``(text, text_pair)`` tuples.
        labels: class indices, one per example, or ``None`` for unlabelled data.
        tokenizer: a Hugging Face tokenizer.
        max_length: tokens per example after truncation.
        source: where the examples come from, for messages (``suite:quick/rt_sentiment``, a file).
    """

    name: str
    texts: tuple[Text, ...]
    labels: tuple[int, ...] | None
    tokenizer: Any = field(repr=False)
    max_length: int
    source: str

    def unlabeled(self, n: int, batch_size: int = 32, seed: int = 0) -> Iterator[Batch]:
        """Up to ``n`` examples (seeded sample, as ``unimerge bench`` draws them) in batches, no labels."""
        return self._sample(n, batch_size, seed, with_labels=False)

    def labeled(self, n: int, batch_size: int = 32, seed: int = 0) -> Iterator[Batch]:
        """The same sample with ``labels``.

        Raises:
            ConfigError: the examples have no labels.
        """
        if self.labels is None:
            raise ConfigError(f"{self.source} has no `label` fields, but labelled examples were asked for.")
        return self._sample(n, batch_size, seed, with_labels=True)

    def _sample(self, n: int, batch_size: int, seed: int, with_labels: bool) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.texts), generator=g)[: min(n, len(self.texts))].tolist()
        for start in range(0, len(idx), batch_size):
            yield self.collate(idx[start : start + batch_size], with_labels)

    def collate(self, idx: Sequence[int], with_labels: bool = False) -> Batch:
        """Tokenise examples ``idx`` and pad them to the longest one."""
        texts = [self.texts[i] for i in idx]
        if isinstance(texts[0], tuple):
            enc = self.tokenizer(
                [t[0] for t in texts], [t[1] for t in texts], truncation="longest_first",
                max_length=self.max_length, padding=True, return_tensors="pt",
            )  # fmt: skip
        else:
            enc = self.tokenizer(
                texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
            )
        batch = {k: enc[k] for k in _MODEL_INPUTS if k in enc}
        if with_labels and self.labels is not None:
            batch["labels"] = torch.tensor([self.labels[i] for i in idx], dtype=torch.long)
        return batch


@dataclass(frozen=True)
class TaskPlan:
    """Where one merged model's examples come from, before anything is read or tokenised.

    ``describe`` is what a statistics sidecar records as its data source; ``recipe`` everything about
    the examples that its hash covers.
    """

    name: str
    describe: str
    recipe: dict[str, Any]
    path: Path | None = None  # the JSONL file, for `files:`
    suite: str | None = None


def _line_error(where: str, lineno: int, what: str) -> ConfigError:
    return ConfigError(
        f"{where}, line {lineno}: {what}. Each line must be a JSON object with a `text` string, "
        "optionally a `text_pair` string and an integer `label` (0, 1, ...)."
    )


def _parse_line(where: str, lineno: int, line: str) -> tuple[Text, int | None]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise _line_error(where, lineno, f"not valid JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise _line_error(where, lineno, f"expected an object, got {type(obj).__name__}")
    text, pair, label = obj.get("text"), obj.get("text_pair"), obj.get("label")
    if not isinstance(text, str) or not text.strip():
        raise _line_error(where, lineno, "missing or empty `text`")
    if pair is not None and (not isinstance(pair, str) or not pair.strip()):
        raise _line_error(where, lineno, "`text_pair` must be a non-empty string")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
        raise _line_error(where, lineno, f"`label` must be a non-negative integer, got {label!r}")
    return (text, pair) if pair is not None else text, label


def read_jsonl(path: Path, where: str | None = None) -> tuple[tuple[Text, ...], tuple[int, ...] | None]:
    """Examples and labels (``None`` when no line has one) of a JSONL data file.

    Raises:
        ConfigError: naming the file and line: invalid JSON, no ``text``, a bad ``label``, some lines
            with labels or pairs and others without, or no examples at all.
    """
    where = where or str(path)
    texts: list[Text] = []
    labels: list[int | None] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                text, label = _parse_line(where, lineno, line)
                if texts and isinstance(text, tuple) != isinstance(texts[0], tuple):
                    raise _line_error(where, lineno, "some lines have `text_pair` and others not")
                if labels and (label is None) != (labels[0] is None):
                    raise _line_error(where, lineno, "some lines have a `label` and others not")
                texts.append(text)
                labels.append(label)
    if not texts:
        raise ConfigError(f"{where} holds no examples; give at least one JSON line with a `text` field.")
    return tuple(texts), _all_labels(labels)


def _all_labels(labels: Sequence[int | None]) -> tuple[int, ...] | None:
    """The labels when every line has one, else ``None`` (:func:`read_jsonl` checks: all or none)."""
    known = tuple(y for y in labels if y is not None)
    return known if len(known) == len(labels) else None


def _task_names(data: DataSpec, specs: Sequence[Any], trained_on: Sequence[str | None]) -> list[str]:
    """Each merged model's task: its ``task:``; else (suites) a benchmark expert's own task or the
    suite's task at the model's position; else (files) the file's stem (``stem-N`` for model N when
    several models share a file name)."""
    suite_tasks = data.task_names()
    names = []
    for i, spec in enumerate(specs):
        if spec.task is not None:
            names.append(spec.task)
        elif data.files is not None:
            stem = Path(data.files[i]).stem
            shared = sum(Path(f).stem == stem for f in data.files) > 1
            names.append(f"{stem}-{i + 1}" if shared else stem)
        elif trained_on[i] in suite_tasks:
            names.append(str(trained_on[i]))
        elif i < len(suite_tasks):
            names.append(suite_tasks[i])
        else:
            raise ConfigError(
                f"Suite {data.suite!r} has {len(suite_tasks)} tasks but model {i + 1} ({spec.model}) has no "
                f"task left; name each model's task with `task:` (one of {suite_tasks})."
            )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f"Several models use task {dupes[0]!r}; every merged model needs its own task (its own head). "
            "Give distinct `task:` names."
        )
    return names


def plan_tasks(
    data: DataSpec,
    specs: Sequence[Any],
    trained_on: Sequence[str | None],
    config_dir: Path | None,
    seed: int,
) -> list[TaskPlan]:
    """One :class:`TaskPlan` per merged model (``specs``: the config's model entries, base excluded).

    Args:
        trained_on: per model, the task a benchmark expert was trained on (``None`` for others).
        config_dir: the config file's folder (``files:`` are resolved against it; default: cwd).
        seed: the split and sampling seed.
    """
    names = _task_names(data, specs, trained_on)
    common = {"budget": data.budget, "max_length": data.max_length, "seed": seed}
    if data.suite is not None:
        return [
            TaskPlan(
                n, f"suite:{data.suite}/{n}", {**common, "suite": data.suite, "task": n}, suite=data.suite
            )
            for n in names
        ]
    out = []
    for name, rel in zip(names, data.files or [], strict=True):
        try:
            path = check_data_path(rel, config_dir)
        except ValueError as err:
            raise ConfigError(f"data.files: {err}") from None
        out.append(
            TaskPlan(name, f"file:{rel}", {**common, "file": rel, "sha256": sha256_file(path)}, path=path)
        )
    return out


def suite_task(
    name: str, suite_name: str, seed: int, split: str = "train"
) -> tuple[tuple[Text, ...], tuple[int, ...], int, int]:
    """A benchmark task's ``split`` (train, val or test): ``(texts, labels, number of classes, the
    suite's max_len)``.

    The splits are the ones ``unimerge bench --suite SUITE --seed SEED`` uses (its experts train on
    ``train``).
    """
    suite = SUITES[suite_name]
    spec = next(t for t in suite.tasks if t.dataset == name)
    raw = load_dataset(spec.dataset)
    train = suite.split(spec, len(raw.texts), seed)[split]
    texts = tuple(raw.texts[i] for i in train)
    labels = tuple(int(raw.labels[i]) for i in train)
    return texts, labels, len(raw.classes), spec.max_len


def load_task(plan: TaskPlan, tokenizer: Any, max_length: int | None) -> tuple[TextTask, int | None]:
    """The :class:`TextTask` of ``plan`` and its number of classes when known (suites).

    ``max_length`` overrides the suite's per-task length (files default to :data:`FILE_MAX_LENGTH`).
    """
    if plan.suite is not None:
        texts, labels, classes, suite_len = suite_task(plan.name, plan.suite, int(plan.recipe["seed"]))
        length = max_length or suite_len
        return TextTask(plan.name, texts, labels, tokenizer, length, plan.describe), classes
    assert plan.path is not None
    texts, file_labels = read_jsonl(plan.path, plan.describe.removeprefix("file:"))
    length = max_length or FILE_MAX_LENGTH
    return TextTask(
        plan.name, texts, file_labels, tokenizer, length, plan.describe.removeprefix("file:")
    ), None
