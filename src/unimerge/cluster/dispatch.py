"""The streaming engine on Ray: ``unimerge merge --executor ray``.

The driver plans the merge and lays out the output shards as a local merge does
(:func:`unimerge.execute.run_plan`: same header, same offsets, same metadata files, same commit).
Only the jobs move: consecutive jobs are grouped into batches of about :data:`BATCH_BYTES` of working
set, and each batch is one Ray task (retried once if its worker dies). A task re-plans the config
from the inputs' headers in its worker (cached there for the run), merges its jobs one at a time and
puts each tensor's bytes at the offset the driver's writer planned (:class:`~unimerge.io.PlacedWriter`,
synced before the task returns); the driver records them and commits when every batch is back.

Every input and the output folder must be on storage that every node sees under the same path (one
machine's disk for a local Ray; a shared file system on a cluster). A random method seeds each tensor
from ``(seed, tensor name)``, so the output is byte-identical to a local merge's whichever worker
runs which tensor (``tests/test_cluster.py``). The statistics pass of ``scope="model"`` methods runs
in the driver; its result travels to the workers once, through Ray's object store.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from unimerge.cluster.session import start_ray, task_error
from unimerge.config import MergeConfig
from unimerge.errors import ConfigError, MergeError, UnimergeError
from unimerge.execute import JobRunner, Report, as_config, run_plan
from unimerge.heap import release_free_memory
from unimerge.io import PlacedWriter, Placement, ShardedWriter
from unimerge.io.writer import consecutive_groups
from unimerge.methods import TensorMethod
from unimerge.options import MergeResult, Progress, RunOptions, compute_device
from unimerge.plan import MergePlan, TensorJob, make_plan

__all__ = [
    "BATCH_BYTES",
    "PlanSource",
    "RayDispatch",
    "batches",
    "merge_batch",
    "run_merge_on_ray",
    "tensor_plan",
]

BATCH_BYTES = 1 << 30  # working set (working_bytes) of one task's jobs; a larger job is a batch of its own


def batches(jobs: Sequence[TensorJob], limit: int = BATCH_BYTES) -> list[list[TensorJob]]:
    """Consecutive jobs in groups whose working sets (:attr:`~unimerge.plan.TensorJob.working_bytes`)
    sum to at most ``limit``."""
    return consecutive_groups(jobs, lambda job: job.working_bytes, limit)


@dataclass(frozen=True)
class PlanSource:
    """What a worker needs to make the driver's plan again: the config and where it was read."""

    config: MergeConfig
    config_dir: Path | None
    out_dir: Path
    allow_pickle: bool
    device: str
    seed: int


_WORKER: dict[str, tuple[JobRunner, dict[str, TensorJob]]] = {}  # run key -> this worker's plan


def _worker_runner(
    key: str, src: PlanSource, extra: Mapping[str, Tensor]
) -> tuple[JobRunner, dict[str, TensorJob]]:
    """The plan of run ``key`` in this worker process (made once; an older run's is closed)."""
    if key not in _WORKER:
        for runner, _ in _WORKER.values():
            for ck in runner.plan.checkpoints:
                ck.close()
        _WORKER.clear()
        plan = make_plan(src.config, src.out_dir, config_dir=src.config_dir, allow_pickle=src.allow_pickle)
        runner = JobRunner(plan, compute_device(src.device), src.seed)
        runner.extra = dict(extra)
        _WORKER[key] = (runner, {j.name: j for j in plan.jobs})
    return _WORKER[key]


def merge_batch(
    key: str, src: PlanSource, extra: Mapping[str, Tensor], items: Sequence[tuple[str, Placement]]
) -> list[str]:
    """One Ray task: merge the named jobs and put their bytes at their placements; the warnings."""
    runner, jobs = _worker_runner(key, src, extra)
    seen = len(runner.warnings)
    with PlacedWriter() as out:
        for name, place in items:
            out.put(place, runner.merge(jobs[name]))
            release_free_memory()
    return runner.warnings[seen:]


Task = Callable[[str, PlanSource, Mapping[str, Tensor], Sequence[tuple[str, Placement]]], list[str]]


class RayDispatch:
    """A :class:`~unimerge.execute.Dispatch` that runs batches of jobs as Ray tasks (module docstring)."""

    def __init__(
        self, ray: Any, source: PlanSource, task: Task = merge_batch, limit: int = BATCH_BYTES
    ) -> None:
        self.ray, self.source, self.task, self.limit = ray, source, task, limit

    def __call__(
        self, plan: MergePlan, runner: JobRunner, writer: ShardedWriter, report: Report | None
    ) -> None:
        ray = self.ray
        remote = ray.remote(max_retries=1, num_cpus=1)(self.task)
        key, src, extra = uuid.uuid4().hex, ray.put(self.source), ray.put(runner.extra)
        refs = {
            remote.remote(key, src, extra, [(j.name, writer.placement(j.name)) for j in batch]): batch
            for batch in batches(plan.jobs, self.limit)
        }
        pending, done = list(refs), 0
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    runner.warnings.extend(self._result(ref, refs[ref]))
                    for job in refs[ref]:
                        writer.record(job.name)
                    done += len(refs[ref])
                    if report:
                        report(done, len(plan.jobs))
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def _result(self, ref: Any, batch: Sequence[TensorJob]) -> list[str]:
        try:
            return list(self.ray.get(ref))
        except Exception as err:  # noqa: BLE001 - the task's own error, or its worker died twice
            cause = task_error(err)
            if isinstance(cause, UnimergeError):
                raise cause from None
            shown = ", ".join(j.name for j in batch[:3]) + (" ..." if len(batch) > 3 else "")
            raise MergeError(
                f"A Ray task merging {len(batch)} tensors ({shown}) failed twice: "
                f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}. "
                "Nothing was written; check that every node sees the inputs and the output folder under "
                "the same paths, then retry."
            ) from None


def run_merge_on_ray(
    config: MergeConfig | str | Path | Mapping[str, Any],
    out_dir: str | Path,
    options: RunOptions = RunOptions(),
    *,
    address: str | None = None,
    progress: Progress | None = None,
    batch_bytes: int = BATCH_BYTES,
) -> MergeResult:
    """Run a tensor-method merge config with its jobs as Ray tasks (local Ray with ``options.threads``
    CPUs, or the cluster at ``address``); the output is byte-identical to :func:`~unimerge.run_merge`'s.
    ``batch_bytes``: working set of the jobs one task runs (see :func:`batches`).

    Raises:
        ConfigError: a data-aware method or an ``align:`` config (they run in one process), or Ray
            is not installed.
    """
    plan = tensor_plan(config, Path(out_dir), options)
    seed = plan.config.seed if options.seed is None else options.seed
    source = PlanSource(plan.config, plan.config_dir, Path(out_dir).resolve(), options.allow_pickle,
                        options.device, seed)  # fmt: skip
    ray, close = start_ray(address, options.threads, "`unimerge merge --executor ray`")
    try:
        return run_plan(plan, out_dir, options, progress, RayDispatch(ray, source, limit=batch_bytes))
    finally:
        close()


def tensor_plan(
    config: MergeConfig | str | Path | Mapping[str, Any], out_dir: Path, options: RunOptions
) -> MergePlan:
    """The streaming plan of ``config``, refusing what runs in one process (data-aware, ``align:``)."""
    cfg, config_dir = as_config(config)
    if cfg.align is not None or not isinstance(cfg.method, TensorMethod):
        what = (
            "an `align:` section" if cfg.align is not None else f"the data-aware method {cfg.method.name!r}"
        )
        raise ConfigError(
            f"This config has {what}, which runs in one process: drop --executor ray (the Ray executor "
            "runs the tensor jobs of data-free methods)."
        )
    return make_plan(cfg, out_dir, config_dir=config_dir, allow_pickle=options.allow_pickle)
