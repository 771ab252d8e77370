"""Multiple-choice tasks for causal language models: JSONL files and tasks built from packaged data.

A :class:`ChoiceTask` is a list of prompts, each with its answer choices (continuations of the
prompt, e.g. ``" positive"``) and the index of the right one; a causal LM is scored by the summed
log-likelihood of each choice given the prompt, as lm-evaluation-harness's ``acc``
(:func:`unimerge.bench.causal.choice_accuracy`).

Files are JSON Lines, one example a line::

    {"prompt": "Review: a delight.\\nSentiment (positive or negative):",
     "choices": [" positive", " negative"], "answer": 0}

``answer`` is the index of the right choice or its text. :func:`read_choice_jsonl` checks every line
and names the file, the line and the fix of the first bad one (:class:`~unimerge.errors.ConfigError`).

:data:`CHOICE_TASKS` builds short tasks out of the packaged datasets of :mod:`unimerge.data.datasets`
(prompts cut to a few dozen words, so a 135M model trains on them on a CPU), split like the
benchmark suites (:func:`~unimerge.data.suites.split_indices`, one seeded permutation):

| name      | dataset      | prompt ends with                                                     | choices |
|-----------|--------------|----------------------------------------------------------------------|---------|
| sentiment | rt_sentiment | ``Sentiment (positive or negative):``                                | 2       |
| boolq     | boolq        | ``Answer (yes or no):``                                              | 2       |
| topic     | bbc_topic    | ``Topic (business, entertainment, politics, sports or tech):``       | 5       |
| newsgroup | autos_electronics | ``Newsgroup (autos or electronics):``                           | 2       |
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unimerge.data.datasets import RawDataset, load_dataset
from unimerge.data.parsing import Text
from unimerge.data.suites import split_indices
from unimerge.errors import ConfigError
from unimerge.io.atomic import atomic_write_text

__all__ = [
    "CHOICE_TASKS",
    "ChoiceSpec",
    "ChoiceTask",
    "choice_splits",
    "is_choice_jsonl",
    "read_choice_jsonl",
    "write_choice_jsonl",
]


@dataclass(frozen=True)
class ChoiceTask:
    """Prompts with their answer choices: ``answers[i]`` indexes ``choices[i]``."""

    name: str
    prompts: list[str]
    choices: list[list[str]]
    answers: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, n: int) -> ChoiceTask:
        """The first ``n`` examples (all when fewer)."""
        return ChoiceTask(self.name, self.prompts[:n], self.choices[:n], self.answers[:n], self.source)


# ---------------------------------------------------------------------------------------------- JSONL


def _bad(shown: str, line: int, what: str, fix: str) -> ConfigError:
    return ConfigError(f"{shown}, line {line}: {what}. {fix}")


def _answer_index(raw: Any, choices: list[str], shown: str, line: int) -> int:
    """``raw`` (an index or the text of a choice) as an index into ``choices``."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        if 0 <= raw < len(choices):
            return raw
        what = f'"answer" is {raw}, outside the {len(choices)} choices (indices 0 to {len(choices) - 1})'
        raise _bad(shown, line, what, "Give the 0-based index of the right choice, or its text.")
    if isinstance(raw, str):
        if raw in choices:
            return choices.index(raw)
        what = f'"answer" {raw!r} is not one of the choices {choices}'
        raise _bad(
            shown, line, what, "Give the text of a choice exactly (with its leading space), or its index."
        )
    what = f'"answer" is {json.dumps(raw)}' if raw is not None else 'the "answer" key is missing'
    raise _bad(shown, line, what, 'Add "answer": the 0-based index of the right choice or its text.')


def _parse_line(text: str, shown: str, line: int) -> tuple[str, list[str], int]:
    """One JSONL line as (prompt, choices, answer index), checked."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        what = f"not valid JSON ({err.msg} at column {err.colno})"
        raise _bad(shown, line, what, "Write one JSON object per line.") from None
    if not isinstance(obj, dict):
        what = f"a JSON {type(obj).__name__}, not an object"
        raise _bad(
            shown, line, what, 'Write one object per line: {"prompt": ..., "choices": [...], "answer": ...}.'
        )
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        what = 'the "prompt" key is missing' if prompt is None else '"prompt" is not a non-empty string'
        raise _bad(shown, line, what, 'Add "prompt": the text the choices continue.')
    choices = obj.get("choices")
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)
    ):
        what = '"choices" is not a list of at least 2 non-empty strings'
        raise _bad(
            shown, line, what, 'Give "choices" as a list of 2 or more continuations, e.g. [" yes", " no"].'
        )
    if len(set(choices)) < len(choices):
        raise _bad(shown, line, f'"choices" {choices} repeats a choice', "Make every choice distinct.")
    return prompt, choices, _answer_index(obj.get("answer"), choices, shown, line)


def read_choice_jsonl(path: Path, shown: str, name: str) -> ChoiceTask:
    """Read and check a multiple-choice JSONL file.

    Args:
        path: the file; blank lines are skipped.
        shown: how errors name the file (e.g. the path as the user wrote it).
        name: the task's name.

    Raises:
        ConfigError: the file cannot be read, is empty, or a line is not a valid example
            (the message names ``shown``, the line number, what is wrong and the fix).
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{shown}: cannot read the choice file ({err}). Give a UTF-8 JSONL file.") from None
    prompts, choices, answers = [], [], []
    for number, text in enumerate(lines, start=1):
        if text.strip():
            prompt, options, answer = _parse_line(text, shown, number)
            prompts.append(prompt)
            choices.append(options)
            answers.append(answer)
    if not prompts:
        raise ConfigError(
            f"{shown}: the choice file holds no examples. Write one JSON object per line: "
            '{"prompt": ..., "choices": [...], "answer": ...}.'
        )
    return ChoiceTask(name, prompts, choices, answers, shown)


def is_choice_jsonl(path: Path) -> bool:
    """True when the first non-empty line of ``path`` is a JSON object with a ``choices`` key."""
    try:
        with path.open(encoding="utf-8") as f:
            for text in f:
                if text.strip():
                    obj = json.loads(text)
                    return isinstance(obj, dict) and "choices" in obj
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return False


def write_choice_jsonl(task: ChoiceTask, path: Path) -> None:
    """Write ``task`` as JSONL (answers as indices), atomically."""
    rows = [
        json.dumps({"prompt": p, "choices": c, "answer": a}, ensure_ascii=False)
        for p, c, a in zip(task.prompts, task.choices, task.answers, strict=True)
    ]
    atomic_write_text(path, "\n".join(rows) + "\n")


# ------------------------------------------------------------------------------- packaged data


def _words(text: str, n: int, chars: int = 240) -> str:
    """The first ``n`` words of ``text``, at most ``chars`` characters (with ``...`` when cut)."""
    words = text.split()
    cut = " ".join(words[:n])
    if len(cut) > chars:
        cut = cut[:chars].rsplit(" ", 1)[0]
    return cut + (" ..." if len(cut) < len(" ".join(words)) else "")


def _first(text: Text) -> str:
    return text if isinstance(text, str) else text[0]


def _sentiment_prompt(text: Text) -> str:
    return f"Review: {_words(_first(text), 40)}\nSentiment (positive or negative):"


def _boolq_prompt(text: Text) -> str:
    question, passage = text if isinstance(text, tuple) else (text, "")
    question = question.rstrip("?").strip()
    return f"Passage: {_words(passage, 45, 260)}\nQuestion: {question}?\nAnswer (yes or no):"


def _topic_prompt(text: Text) -> str:
    return f"Article: {_words(_first(text), 40)}\nTopic (business, entertainment, politics, sports or tech):"


def _newsgroup_prompt(text: Text) -> str:
    return f"Post: {_words(_first(text), 40)}\nNewsgroup (autos or electronics):"


@dataclass(frozen=True)
class ChoiceSpec:
    """A choice task built from a packaged dataset: ``labels[c]`` is the choice of dataset class ``c``."""

    name: str
    dataset: str
    prompt: Callable[[Text], str]
    labels: dict[str, str]
    description: str


CHOICE_TASKS: dict[str, ChoiceSpec] = {
    s.name: s
    for s in (
        ChoiceSpec(
            "sentiment",
            "rt_sentiment",
            _sentiment_prompt,
            {"fresh": " positive", "rotten": " negative"},
            "movie review sentiment",
        ),  # fmt: skip
        ChoiceSpec(
            "boolq",
            "boolq",
            _boolq_prompt,
            {"True": " yes", "False": " no"},
            "yes/no question about a passage (cut to 45 words)",
        ),  # fmt: skip
        ChoiceSpec(
            "topic",
            "bbc_topic",
            _topic_prompt,
            {c: f" {c}" for c in ("business", "entertainment", "politics", "sports", "tech")},
            "BBC news topic, 5 choices",
        ),
        ChoiceSpec(
            "newsgroup",
            "autos_electronics",
            _newsgroup_prompt,
            {"rec.autos": " autos", "sci.electronics": " electronics"},
            "Usenet post: which group",
        ),  # fmt: skip
    )
}


def _task_of(spec: ChoiceSpec, raw: RawDataset, index: Sequence[int], split: str) -> ChoiceTask:
    choices = [spec.labels[c] for c in raw.classes]  # one fixed order: the dataset's classes
    return ChoiceTask(
        spec.name,
        [spec.prompt(raw.texts[i]) for i in index],
        [list(choices) for _ in index],
        [raw.labels[i] for i in index],
        f"{spec.dataset}:{split}",
    )


def choice_splits(
    name: str,
    root: Path | None = None,
    seed: int = 0,
    n_val: int = 100,
    n_test: int = 300,
    n_train: int = 2000,
) -> dict[str, ChoiceTask]:
    """The ``train`` / ``val`` / ``test`` splits of choice task ``name`` (a key of :data:`CHOICE_TASKS`).

    Deterministic given ``seed``: the split of :func:`~unimerge.data.suites.split_indices`.

    Raises:
        KeyError: unknown task name.
        ValueError: the dataset has fewer than ``n_val + n_test + 1`` examples.
        CheckpointError: the dataset's package cannot be downloaded and is not cached.
    """
    spec = CHOICE_TASKS[name]
    raw = load_dataset(spec.dataset, root)
    parts = split_indices(len(raw.texts), n_val, n_test, n_train, seed)
    return {split: _task_of(spec, raw, [int(i) for i in index], split) for split, index in parts.items()}
