"""Loaders for tasks read out of the BIG-bench sdist (``bigbench==1.0.0``, 358 MB, read once).

Each BIG-bench task is a ``task.json`` whose ``examples`` hold an ``input`` (the prompt) and
``target_scores`` (the score of every answer option). A loader keeps the text a classifier needs and
drops the prompt and the option list, which would give the label away or say nothing. Multiple-choice
tasks become classification by pairing a question with one option (``squad_sentence``,
``knowledge_conflict``) or by splitting the two options (``hyperbaton``), alternating between the
right and a wrong option so that the classes stay balanced. See :mod:`unimerge.data.datasets` for
the table of every dataset.
"""

from __future__ import annotations

import json
import re
from typing import Any

from unimerge.data.archives import Archive
from unimerge.data.parsing import DatasetSpec, Reader, Text, clean

__all__ = ["BIGBENCH", "MORE_DATASETS"]

BIGBENCH = Archive(
    "bigbench",
    "1.0.0",
    "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
)
_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def _examples(archive: Reader, task: str) -> list[dict[str, Any]]:
    """The ``examples`` of a BIG-bench ``task.json``."""
    examples: list[dict[str, Any]] = json.loads(archive.read(f"{_TASKS}{task}/task.json"))["examples"]
    return examples


def _best(example: dict[str, Any]) -> str:
    """The answer option with the highest score."""
    scores: dict[str, float] = example["target_scores"]
    return max(scores, key=lambda k: scores[k])


def _parse_multiemo(archive: Reader) -> tuple[list[Text], list[str]]:
    """English MultiEmo review sentences (hotels, medicine, products, school): 4 sentiment classes."""
    examples = _examples(archive, "multiemo/all_sentence_en")
    return [clean(ex["input"]) for ex in examples], [_best(ex) for ex in examples]


_CLAIM = re.compile(r"claim was made: (.*)\nQ: Was this claim true or false\?", re.DOTALL)


def _parse_fever(archive: Reader) -> tuple[list[Text], list[str]]:
    """FEVER claims about Wikipedia topics, without evidence: true or false (the prompt removed)."""
    texts: list[Text] = []
    labels: list[str] = []
    for ex in _examples(archive, "fact_checker/fever"):
        found = _CLAIM.search(ex["input"])
        if found:
            texts.append(clean(found[1]))
            labels.append(_best(ex))
    return texts, labels


_QUOTED = re.compile(r'"\s*(.+?)\s*"')


def _parse_hyperbaton(archive: Reader) -> tuple[list[Text], list[str]]:
    """Both noun phrases of every question, the same words in two orders: is the order right?"""
    texts: list[Text] = []
    labels: list[str] = []
    for ex in _examples(archive, "hyperbaton"):
        a, b = _QUOTED.findall(ex["input"])
        good = _best(ex)
        texts += [a, b]
        labels += ["correct" if good == "a" else "incorrect", "correct" if good == "b" else "incorrect"]
    return texts, labels


def _parse_winowhy(archive: Reader) -> tuple[list[Text], list[str]]:
    """A Winograd sentence with a reason for resolving its pronoun: is the reasoning correct?

    A sentence comes with about ten reasons, so the splits share sentences (not examples).
    """
    examples = _examples(archive, "winowhy")
    return [clean(ex["input"]) for ex in examples], [_best(ex) for ex in examples]


def _parse_epistemic(archive: Reader) -> tuple[list[Text], list[str]]:
    """(premise, hypothesis) about who knows or believes what: entailment or not (HANS-style)."""
    texts: list[Text] = []
    labels: list[str] = []
    for ex in _examples(archive, "epistemic_reasoning"):
        premise, hypothesis = ex["input"].removeprefix("Premise: ").split(" Hypothesis: ", 1)
        texts.append((clean(premise), clean(hypothesis)))
        labels.append(_best(ex))
    return texts, labels


_LINE_PAIR = re.compile(r'were the sentences "(.*)" and "(.*)"\s*$', re.DOTALL)


def _parse_movie_dialog(archive: Reader) -> tuple[list[Text], list[str]]:
    """Two adjacent lines of a movie conversation: said by the same person or by different ones?

    Only the two lines are kept (the surrounding conversation and the question are dropped).
    """
    texts: list[Text] = []
    labels: list[str] = []
    for ex in _examples(archive, "movie_dialog_same_or_different"):
        found = _LINE_PAIR.search(ex["input"])
        if found:
            texts.append((clean(found[1]), clean(found[2])))
            labels.append(_best(ex))
    return texts, labels


def _parse_knowledge_conflict(archive: Reader) -> tuple[list[Text], list[str]]:
    """(question + a candidate answer, a passage edited to give another answer): supported?

    The passages had their answer entity replaced; questions alternate between the passage's
    answer (``supported``) and the original, memorised one (``unsupported``).
    """
    texts: list[Text] = []
    labels: list[str] = []
    for ex in _examples(archive, "contextual_parametric_knowledge_conflicts"):
        scores: dict[str, float] = ex["target_scores"]
        if len(scores) != 2:
            continue
        question, context = ex["input"].strip().removeprefix("Question: ").split("\nContext: ", 1)
        supported = len(texts) % 2 == 0
        answer = next(a for a in scores if (scores[a] == max(scores.values())) == supported)
        texts.append((clean(f"{question} {answer}"), clean(context)))
        labels.append("supported" if supported else "unsupported")
    return texts, labels


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"“'(\[A-Z0-9])")
_SQUAD_FILES = ("squaddev_v1.1", "new_wiki_v1.0", "nyt_v1.0", "reddit_v1.0", "amazon_reviews_v1.0")


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the sentences of ``text`` (split after . ! ?)."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    return [*spans, (start, len(text))]


def _answer_sentence(spans: list[tuple[int, int]], answer: dict[str, Any]) -> int | None:
    """Index of the sentence that holds the whole answer span, or ``None`` (it straddles two)."""
    first, last = answer["answer_start"], answer["answer_start"] + len(answer["text"])
    return next((i for i, (a, b) in enumerate(spans) if a <= first and last <= b), None)


def _parse_squad(archive: Reader) -> tuple[list[Text], list[str]]:
    """(question, sentence of its paragraph): does the sentence hold the answer?

    SQuAD v1.1 dev and the four SQuAD-shifts sets (Wikipedia, NYT, Reddit, Amazon reviews).
    Questions alternate between the answer's sentence (``contains``) and the sentence next to it
    (``lacks``; the one before when the answer is in the last sentence), so the classes are
    balanced and the negative is on the same topic as the positive.
    """
    texts: list[Text] = []
    labels: list[str] = []
    for name in _SQUAD_FILES:
        for article in json.loads(archive.read(f"{_TASKS}squad_shifts/{name}.json"))["data"]:
            for para in article["paragraphs"]:
                context = para["context"]
                spans = _sentence_spans(context)
                for qa in para["qas"] if len(spans) > 1 else ():
                    hit = _answer_sentence(spans, qa["answers"][0])
                    if hit is None:
                        continue
                    positive = len(texts) % 2 == 0
                    i = hit if positive else (hit + 1 if hit + 1 < len(spans) else hit - 1)
                    texts.append((clean(qa["question"]), clean(context[spans[i][0] : spans[i][1]])))
                    labels.append("contains" if positive else "lacks")
    return texts, labels


MORE_DATASETS: tuple[DatasetSpec, ...] = (
    DatasetSpec("multiemo", BIGBENCH, _parse_multiemo, "review sentences: 4 sentiments (incl. ambivalent)"),
    DatasetSpec("fever", BIGBENCH, _parse_fever, "FEVER claims without evidence: true or false"),
    DatasetSpec("hyperbaton", BIGBENCH, _parse_hyperbaton, "noun phrases: is the adjective order right"),
    DatasetSpec("winowhy", BIGBENCH, _parse_winowhy, "Winograd pronoun + reason: is the reasoning right"),
    DatasetSpec(
        "epistemic", BIGBENCH, _parse_epistemic, "premise/hypothesis on knowing, believing: entailed?"
    ),
    DatasetSpec("movie_dialog", BIGBENCH, _parse_movie_dialog, "two movie lines: same speaker or not"),
    DatasetSpec(
        "knowledge_conflict",
        BIGBENCH,
        _parse_knowledge_conflict,
        "question + answer: does the passage say so",
    ),
    DatasetSpec("squad_sentence", BIGBENCH, _parse_squad, "question + sentence: does it hold the answer"),
)
