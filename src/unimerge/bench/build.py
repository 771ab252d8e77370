"""Building the benchmark's models, or loading them from the cache: heads, experts, multi-task model.

Heads come first (they are fitted on the pretrained encoder and frozen); experts are fine-tuned
through them. Missing experts train in up to ``jobs`` worker processes at once (``spawn``ed, one
torch thread each, as :mod:`unimerge.bench.train` always trains), so a cold suite uses every core
and the bits do not depend on how many workers there were. Each expert's cache folder is named by
the hash of its recipe (:mod:`unimerge.bench.recipes`), which holds no suite name: two suites that
share a task with the same split and budget share its head and expert.

```
<cache>/heads/<task>-<hash>/        head.safetensors + meta.json (pretrained accuracy)
<cache>/experts/<task>-<hash>/      encoder/ (Hugging Face) + head.safetensors + meta.json
<cache>/multitask/<hash>/           encoder/ + meta.json
```
"""

from __future__ import annotations

import multiprocessing
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from unimerge.bench.heads import FrozenHead, build_head
from unimerge.bench.recipes import recipe_hash
from unimerge.bench.train import Expert, Tick, expert_recipe, load_expert, multitask_recipe, train_and_save
from unimerge.data import Suite, TaskData

__all__ = ["Ticker", "build_experts", "build_heads", "build_multitask", "expert_dir"]

Ticker = Callable[[str, int], Tick]  # (bar name, total steps) -> a callback advancing that bar


def build_heads(root: Path, pretrained: nn.Module, tasks: Sequence[TaskData], seed: int,
                model_sha: str) -> list[FrozenHead]:  # fmt: skip
    """Every task's frozen head (:func:`unimerge.bench.heads.build_head`), in task order."""
    return [build_head(root, pretrained, t, seed, model_sha) for t in tasks]


def expert_dir(root: Path, task: TaskData, rec: dict[str, Any]) -> Path:
    """The cache folder of the expert with recipe ``rec``."""
    return root / "experts" / f"{task.name}-{recipe_hash(rec)}"


@dataclass(frozen=True)
class _Job:
    """One expert to train (everything a worker process needs, picklable)."""

    final: Path
    rec: dict[str, Any]
    pretrained: Path
    task: TaskData
    head: FrozenHead
    suite: Suite
    seed: int
    quiet: bool  # the caller silenced transformers' progress bars and warnings: so does the worker


def _transformers_quiet() -> bool:
    from transformers.utils import logging as hf_logging

    return not hf_logging.is_progress_bar_enabled()


def _train(job: _Job, tick: Tick | None) -> None:
    train_and_save(job.final, job.rec, job.pretrained, [job.task], [job.head], job.suite.steps, job.suite,
                   job.seed, tick)  # fmt: skip


def _worker(job: _Job, ticks: Any) -> None:
    """A worker process's entry point: ``ticks`` is a queue that carries ``(task, n)`` progress.

    A spawned process starts with transformers' defaults; it takes the caller's quiet setting.
    """
    if job.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    _train(job, lambda n: ticks.put((job.task.name, n)))


def _in_workers(jobs: Sequence[_Job], workers: int, ticker: Ticker | None) -> None:
    """Train ``jobs`` in ``workers`` processes, forwarding their progress to ``ticker``'s bars."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        ticks = manager.Queue()
        bars = {j.task.name: ticker(f"expert {j.task.name}", j.suite.steps) for j in jobs} if ticker else {}
        pending: set[Future[None]] = {pool.submit(_worker, j, ticks) for j in jobs}
        while pending:
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            _drain(ticks, bars)
            for f in finished:
                f.result()  # a failed expert stops the run with its error
        _drain(ticks, bars)


def _drain(ticks: Any, bars: dict[str, Tick]) -> None:
    while True:
        try:
            name, n = ticks.get_nowait()
        except queue.Empty:
            return
        if name in bars:
            bars[name](n)


def build_experts(root: Path, pretrained: Path, tasks: Sequence[TaskData], heads: Sequence[FrozenHead],
                  suite: Suite, seed: int, model_sha: str, *, jobs: int = 1,
                  ticker: Ticker | None = None) -> list[Expert]:  # fmt: skip
    """Every task's expert, in task order; missing ones are trained first (``jobs`` at a time)."""
    finals, todo = [], []
    quiet = _transformers_quiet()
    for task, head in zip(tasks, heads, strict=True):
        rec = expert_recipe(suite, task, head, seed, model_sha)
        final = expert_dir(root, task, rec)
        finals.append(final)
        if not (final / "meta.json").exists():
            todo.append(_Job(final, rec, pretrained, task, head, suite, seed, quiet))
    if len(todo) > 1 and jobs > 1:
        _in_workers(todo, min(jobs, len(todo)), ticker)
    else:
        for job in todo:
            _train(job, ticker(f"expert {job.task.name}", job.suite.steps) if ticker else None)
    return [load_expert(f) for f in finals]


def build_multitask(root: Path, pretrained: Path, tasks: Sequence[TaskData], heads: Sequence[FrozenHead],
                    suite: Suite, seed: int, model_sha: str, ticker: Ticker | None = None) -> Expert:  # fmt: skip
    """The multi-task model (one encoder through every task's frozen head), trained first if absent."""
    rec = multitask_recipe(suite, tasks, heads, seed, model_sha)
    final = root / "multitask" / recipe_hash(rec)
    if not (final / "meta.json").exists():
        tick = ticker("multi-task model", suite.mtl_steps) if ticker else None
        train_and_save(final, rec, pretrained, tasks, heads, suite.mtl_steps, suite, seed, tick)
    return load_expert(final)
