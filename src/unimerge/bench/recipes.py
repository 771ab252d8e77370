"""Cache keys of the benchmark's built models: a recipe names everything that determines one.

Every cached head, expert and multi-task model lives in a folder named by :func:`recipe_hash` of its
recipe, so changing any ingredient (data, split, budget, protocol, the head an expert trains
through) builds a new entry instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from unimerge.data import TaskData

__all__ = ["FROZEN", "PROTOCOL", "RECIPE_VERSION", "data_digest", "recipe_hash", "task_recipe"]

RECIPE_VERSION = 2  # 2: protocol v2 (frozen heads on unit-norm features, early stopping)
FROZEN = "embeddings.word_embeddings"  # the module whose weight experts do not train
PROTOCOL = {
    "version": 2,
    "head": "logistic regression on the pretrained encoder's features, frozen before fine-tuning",
    "features": "attention-masked mean of the last hidden states, L2-normalised",
    "experts": "encoder fine-tuned through the frozen head (word embeddings frozen)",
    "stopping": "best validation accuracy, evaluated every `eval_every` steps; stop after `patience` "
    "evaluations without improvement or at `steps`",
    "tuning": "each method's grid searched on validation, the best point reported on test",
    "statistics": "95% bootstrap interval of the mean over tasks; paired bootstrap against task_arithmetic",
}


def recipe_hash(rec: dict[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable recipe (key order does not matter)."""
    blob = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def data_digest(task: TaskData) -> str:
    """A digest of the task's tokenised splits and labels: the data an expert sees, exactly."""
    h = hashlib.sha256()
    for split in (task.train, task.val, task.test):
        h.update(json.dumps([split.input_ids, split.token_type_ids, split.labels.tolist()]).encode())
    return h.hexdigest()[:16]


def task_recipe(kind: str, tasks: Sequence[TaskData], seed: int, model_sha: str) -> dict[str, Any]:
    """What every built model of ``kind`` on ``tasks`` depends on: the data (tokenised splits), the
    pretrained model, the protocol. No suite name: suites sharing a task share its models."""
    return {
        "kind": kind,
        "version": RECIPE_VERSION,
        "tasks": [t.name for t in tasks],
        "split_seed": seed,
        "sizes": [[len(t.train), len(t.val), len(t.test)] for t in tasks],
        "data": [data_digest(t) for t in tasks],
        "model_sha": model_sha,
        "frozen": FROZEN,
    }
