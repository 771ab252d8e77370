"""Building the benchmark's models, or loading them from the cache: heads, experts, multi-task model.

Heads come first (they are fitted on the pretrained encoder and frozen); experts and the
multi-task model are fine-tuned through them. Missing models train in up to ``jobs`` worker
processes at once (``spawn``ed, one torch thread each, as :mod:`unimerge.bench.train` always
trains), so a cold suite uses every core and the bits do not depend on how many workers there were. Each expert's cache folder is named by
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
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from unimerge.bench.heads import FrozenHead, build_head
from unimerge.bench.recipes import recipe_hash
from unimerge.bench.train import Expert, Tick, expert_recipe, load_expert, multitask_recipe, train_and_save
from unimerge.data import Suite, TaskData

__all__ = ["Ticker", "build_heads", "build_models", "expert_jobs", "multitask_job", "train_missing"]

Ticker = Callable[[str, int], Tick]  # (bar name, total steps) -> a callback advancing that bar


def build_heads(root: Path, pretrained: nn.Module, tasks: Sequence[TaskData], seed: int,
                model_sha: str) -> list[FrozenHead]:  # fmt: skip
    """Every task's frozen head (:func:`unimerge.bench.heads.build_head`), in task order."""
    return [build_head(root, pretrained, t, seed, model_sha) for t in tasks]


@dataclass(frozen=True)
class _Job:
    """One model to train: an expert or the multi-task model (picklable, for a worker process)."""

    name: str  # its progress bar
    final: Path
    rec: dict[str, Any]
    pretrained: Path
    tasks: tuple[TaskData, ...]
    heads: tuple[FrozenHead, ...]
    suite: Suite
    seed: int
    quiet: bool  # the caller silenced transformers' progress bars and warnings: so does the worker

    @property
    def steps(self) -> int:
        return int(self.rec["steps"])


def _transformers_quiet() -> bool:
    from transformers.utils import logging as hf_logging

    return not hf_logging.is_progress_bar_enabled()


def _train(job: _Job, tick: Tick | None) -> None:
    train_and_save(job.final, job.rec, job.pretrained, job.tasks, job.heads, job.suite, job.seed, tick)


def _worker(job: _Job, ticks: Any) -> None:
    """A worker process's entry point: ``ticks`` is a queue that carries ``(name, n)`` progress.

    A spawned process starts with transformers' defaults; it takes the caller's quiet setting.
    """
    if job.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    _train(job, lambda n: ticks.put((job.name, n)))


def _in_workers(jobs: Sequence[_Job], workers: int, ticker: Ticker | None) -> None:
    """Train ``jobs`` in ``workers`` processes, forwarding their progress to ``ticker``'s bars."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        ticks = manager.Queue()
        bars = {j.name: _Bar(ticker(j.name, j.steps), j.steps) for j in jobs} if ticker else {}
        pending = {pool.submit(_worker, j, ticks): j for j in jobs}
        while pending:
            finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            _drain(ticks, bars)
            for f in finished:
                job = pending.pop(f)
                f.result()  # a failed model stops the run with its error
                if job.name in bars:
                    bars[job.name].finish()


@dataclass
class _Bar:
    """A progress bar advanced by training steps; early stopping ends it before its total."""

    tick: Tick
    total: int
    done: int = 0

    def __call__(self, n: int) -> None:
        self.done += n
        self.tick(n)

    def finish(self) -> None:
        self.tick(max(0, self.total - self.done))
        self.done = self.total


def _drain(ticks: Any, bars: dict[str, _Bar]) -> None:
    while True:
        try:
            name, n = ticks.get_nowait()
        except queue.Empty:
            return
        if name in bars:
            bars[name](n)


def train_missing(jobs: Sequence[_Job], workers: int, ticker: Ticker | None) -> None:
    """Train the jobs whose model is not cached yet: ``workers`` at a time, in worker processes when
    more than one runs."""
    todo = [j for j in jobs if not (j.final / "meta.json").exists()]
    if len(todo) > 1 and workers > 1:
        _in_workers(todo, min(workers, len(todo)), ticker)
        return
    for job in todo:
        bar = _Bar(ticker(job.name, job.steps), job.steps) if ticker else None
        _train(job, bar)
        if bar:
            bar.finish()


def expert_jobs(root: Path, pretrained: Path, tasks: Sequence[TaskData], heads: Sequence[FrozenHead],
                suite: Suite, seed: int, model_sha: str) -> list[_Job]:  # fmt: skip
    """One job per task's expert, in task order."""
    quiet = _transformers_quiet()
    out = []
    for task, head in zip(tasks, heads, strict=True):
        rec = expert_recipe(suite, task, head, seed, model_sha)
        final = root / "experts" / f"{task.name}-{recipe_hash(rec)}"
        out.append(_Job(f"expert {task.name}", final, rec, pretrained, (task,), (head,), suite, seed, quiet))
    return out


def multitask_job(root: Path, pretrained: Path, tasks: Sequence[TaskData], heads: Sequence[FrozenHead],
                  suite: Suite, seed: int, model_sha: str) -> _Job | None:  # fmt: skip
    """The multi-task model's job (``None`` when the suite has none: ``mtl_steps == 0``)."""
    if suite.mtl_steps <= 0:
        return None
    rec = multitask_recipe(suite, tasks, heads, seed, model_sha)
    final = root / "multitask" / recipe_hash(rec)
    return _Job("multi-task model", final, rec, pretrained, tuple(tasks), tuple(heads), suite, seed,
                _transformers_quiet())  # fmt: skip


def build_models(root: Path, pretrained: Path, tasks: Sequence[TaskData], heads: Sequence[FrozenHead],
                 suite: Suite, seed: int, model_sha: str, *, jobs: int = 1,
                 ticker: Ticker | None = None) -> tuple[list[Expert], Expert | None]:  # fmt: skip
    """Every task's expert (in task order) and the multi-task model (or ``None``), trained first
    when not cached; the multi-task model trains in the same pool as the experts (it goes first,
    being the longest)."""
    experts = expert_jobs(root, pretrained, tasks, heads, suite, seed, model_sha)
    mtl = multitask_job(root, pretrained, tasks, heads, suite, seed, model_sha)
    train_missing([*([mtl] if mtl else []), *experts], jobs, ticker)
    return [load_expert(j.final) for j in experts], load_expert(mtl.final) if mtl else None
