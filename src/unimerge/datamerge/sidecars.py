"""Per-expert statistics computed once and kept as safetensors sidecars next to each expert.

RegMean needs each expert's input Gram matrices, Fisher merging each expert's diagonal Fisher; both
depend on one expert and its own task's data only, so they are computed once per expert, saved at
:func:`unimerge.modelmerge.stats.sidecar_path` (``EXPERT/unimerge_{gram,fisher}.safetensors``) and
reused by later merges. A sidecar's metadata records ``data_source`` (``suite:quick/rt_sentiment``,
``file:data/a.jsonl``), ``budget``, and ``data_hash``: the hash of a recipe holding everything the
numbers depend on (the data source and the file's sha256, budget, max_length, seed, batch size, bf16,
Fisher mode and micro-batch, the expert's weight files' sha256, how features are computed, the
tokenizer). A sidecar whose hash differs from the current recipe is recomputed; one that matches is
read as is. Sidecars are written to a temporary name and renamed, so a killed run leaves none half-written.

Statistics cover every linear layer (Gram) or every parameter (Fisher) of the expert, whatever the
other experts are, so one sidecar serves any merge that expert takes part in.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from unimerge.datamerge.data import TaskPlan, TextTask
from unimerge.datamerge.models import Batch, Features, ModelRef
from unimerge.errors import CheckpointError, MergeError
from unimerge.io import read_safetensors_header
from unimerge.io.cache import sha256_file
from unimerge.modelmerge.stats import (
    STATS_FORMAT,
    collect_fisher,
    collect_grams,
    count,
    load_state,
    save_stats,
    sidecar_path,
)

__all__ = [
    "STATS_KINDS",
    "StatsJob",
    "compute",
    "ensure_sidecars",
    "is_current",
    "recipe_digest",
    "save_sidecar",
    "stats_recipe",
]

STATS_KINDS = {"regmean": "gram", "fisher": "fisher"}  # methods whose statistics are per tensor
Report = Callable[[str, int, int], None]  # (what, done, total)


@dataclass(frozen=True)
class StatsJob:
    """One expert's statistics: where they go and what they are computed from."""

    expert: ModelRef
    task: TextTask
    head: nn.Module | None
    state: Callable[[], dict[str, Tensor]]  # reads the expert's body tensors (only when computing)
    recipe: dict[str, Any]
    source: str  # the data source, as the sidecar records it

    @property
    def path(self) -> Path:
        return sidecar_path(self.expert.stats_dir, self.recipe["kind"])


def stats_recipe(
    kind: str, plan: TaskPlan, params: BaseModel, expert: ModelRef, features: str, tokenizer: str
) -> dict[str, Any]:
    """Everything a sidecar's numbers depend on (its ``data_hash`` is :func:`recipe_digest` of this)."""
    stat: dict[str, Any] = {
        "bf16": getattr(params, "bf16", True),
        "batch_size": getattr(params, "batch_size", 0),
    }
    if kind == "fisher":
        stat |= {
            "mode": getattr(params, "mode", "empirical"),
            "micro_batch": getattr(params, "micro_batch", 1),
        }
    return {
        "format": STATS_FORMAT,
        "kind": kind,
        "data": plan.recipe,
        "stats": stat,
        "expert": [sha256_file(f) for f in expert.files()],
        "features": features,
        "tokenizer": tokenizer,
    }


def recipe_digest(recipe: dict[str, Any]) -> str:
    """A stable hex digest of a JSON-serialisable recipe (key order does not matter)."""
    blob = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def is_current(path: Path, kind: str, digest: str) -> bool:
    """Whether ``path`` is a readable sidecar of ``kind`` computed from the recipe with ``digest``."""
    if not path.is_file():
        return False
    try:
        _, meta = read_safetensors_header(path)
    except CheckpointError:
        return False
    return meta.get("format") == STATS_FORMAT and meta.get("kind") == kind and meta.get("data_hash") == digest


def _reporting(
    batches: Sequence[dict[str, Tensor]], what: str, report: Report | None
) -> Iterator[dict[str, Tensor]]:
    for i, b in enumerate(batches):
        yield b
        if report:
            report(what, i + 1, len(batches))


def _batches(
    job: StatsJob, labeled: bool, budget: int, batch_size: int, seed: int, device: Any
) -> list[Batch]:
    draw = job.task.labeled if labeled else job.task.unlabeled
    return [{k: v.to(device) for k, v in b.items()} for b in draw(budget, batch_size, seed)]


def compute(
    job: StatsJob,
    module: nn.Module,
    features: Features,
    params: BaseModel,
    *,
    budget: int,
    seed: int,
    device: Any,
    report: Report | None = None,
) -> tuple[dict[str, Tensor], int]:
    """One expert's statistics: Gram matrices of every linear layer, or the Fisher of every parameter.

    ``module`` is a work copy of the body (its tensors are replaced by the expert's).
    """
    kind = job.recipe["kind"]
    load_state(module, job.state())
    labeled = kind == "fisher" and getattr(params, "mode", "empirical") == "empirical"
    batch_size = int(getattr(params, "batch_size", 16))
    batches = _batches(job, labeled, budget, batch_size, seed, device)
    bf16 = bool(getattr(params, "bf16", True))
    stream = _reporting(batches, f"{kind} statistics: {job.task.name}", report)
    if kind == "gram":
        return collect_grams(module, stream, features, bf16=bf16, device=device), count(batches)
    head = job.head
    assert head is not None

    def log_probs(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return torch.log_softmax(head(features(m, batch)).float(), dim=-1)  # (b, k)

    g = torch.Generator().manual_seed(seed)
    fisher, seen = collect_fisher(
        module, stream, log_probs, mode=getattr(params, "mode", "empirical"),
        micro_batch=int(getattr(params, "micro_batch", 1)), generator=g, bf16=bf16, device=device,
    )  # fmt: skip
    return fisher, seen


def save_sidecar(
    path: Path, stats: dict[str, Tensor], *, kind: str, examples: int, meta: dict[str, str]
) -> None:
    """Write a sidecar (all at once, :func:`~unimerge.modelmerge.stats.save_stats`).

    Raises:
        MergeError: the expert's folder is not writable (or the disk is full).
    """
    try:
        save_stats(path, stats, kind=kind, examples=examples, extra=meta)
    except OSError as err:
        raise MergeError(
            f"Cannot write the statistics sidecar {path}: {err.strerror or err}. Sidecars are kept next to "
            "each expert; make its folder writable (or copy the expert to a writable folder)."
        ) from None


def ensure_sidecars(
    jobs: Sequence[StatsJob],
    body: nn.Module,
    features: Features,
    params: BaseModel,
    *,
    budget: int,
    seed: int,
    device: Any,
    report: Report | None = None,
) -> list[bool]:
    """Compute the sidecars that are missing or stale; returns, per job, whether it was computed."""
    computed = []
    module: nn.Module | None = None
    for job in jobs:
        kind, digest = job.recipe["kind"], recipe_digest(job.recipe)
        if is_current(job.path, kind, digest):
            computed.append(False)
            continue
        if module is None:
            module = copy.deepcopy(body).to(device).eval().requires_grad_(False)
        head = job.head.to(device) if job.head is not None else None
        job = StatsJob(job.expert, job.task, head, job.state, job.recipe, job.source)
        stats, used = compute(
            job, module, features, params, budget=budget, seed=seed, device=device, report=report
        )
        meta = {
            "data_source": job.source,
            "budget": str(budget),
            "data_hash": digest,
            "recipe": json.dumps(job.recipe, sort_keys=True, default=str),
        }
        save_sidecar(job.path, stats, kind=kind, examples=used, meta=meta)
        computed.append(True)
    return computed
