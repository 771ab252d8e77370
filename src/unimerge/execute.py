"""Running merges: :func:`run_merge` and :func:`check_merge`, and the streaming engine.

:func:`_engine` is the one place that dispatches on the method's kind: a
:class:`~unimerge.methods.TensorMethod` is planned from headers (:mod:`unimerge.plan`) and streamed
here; a :class:`~unimerge.methods.ModelMethod` runs forward passes in :mod:`unimerge.datamerge`.

The streaming engine runs a plan: jobs go through a thread pool into a sharded, atomic writer.

Memory is bounded by the tensors in flight, never by model size: at most ``2 * threads`` jobs, and
no more of them than fit a byte budget (by default the largest job's working set, so the largest
tensor is merged alone); what a job frees goes back to the OS when it ends (:mod:`unimerge.heap`),
not into malloc arenas that would grow with the number of tensors. Each job reads its inputs straight
into one stacked buffer, merges (the method may overwrite that buffer), casts and writes its bytes at
their planned offset. Random methods get a generator seeded from ``(seed, tensor name)``, so output
does not depend on the thread count.
Methods with ``scope="model"`` first run their statistics pass (``MethodInfo.prepare``), which
streams the inputs again, before the merge pass.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from unimerge.config import MergeConfig, dump_config, load_config, parse_config
from unimerge.core import compute_dtype, merge_stacked, stack_buffer, stack_per_model, to_method_input
from unimerge.errors import ConfigError, MergeError
from unimerge.heap import release_free_memory
from unimerge.io import OutTensor, ShardedWriter, sha256_file
from unimerge.io.tokenizer import write_tokenizer
from unimerge.io.writer import format_size, write_model_files
from unimerge.methods import Method, ModelMethod, TensorMethod, generator_for
from unimerge.modelcard import model_card
from unimerge.options import Check, MergeResult, Progress, RunOptions, compute_device
from unimerge.plan import MergePlan, TensorJob, make_plan
from unimerge.vocab import gather_rows

__all__ = [
    "Check",
    "Dispatch",
    "JobRunner",
    "MergeResult",
    "Report",
    "RunOptions",
    "ThreadDispatch",
    "as_config",
    "check_merge",
    "plan_config",
    "run_merge",
    "run_plan",
]

log = logging.getLogger("unimerge")


def as_config(config: MergeConfig | str | Path | Mapping[str, Any]) -> tuple[MergeConfig, Path | None]:
    """A config as :class:`MergeConfig` and the folder its relative paths resolve in (a file's)."""
    if isinstance(config, MergeConfig):
        return config, None
    if isinstance(config, (str, Path)):
        return load_config(config), Path(config).resolve().parent
    return parse_config(dict(config)), None


def plan_config(
    config: MergeConfig | str | Path | Mapping[str, Any],
    out_dir: str | Path,
    *,
    allow_pickle: bool = False,
    config_dir: Path | None = None,
) -> MergePlan:
    """Validate a config and plan it against the inputs' headers (no tensor data is read).

    ``config_dir`` resolves relative paths of an already parsed config (a YAML path brings its own).
    """
    cfg, cdir = as_config(config)
    return make_plan(cfg, Path(out_dir), config_dir=cdir or config_dir, allow_pickle=allow_pickle)


class JobRunner:
    """Reads and merges jobs; shared by the statistics and merge passes, and by every dispatch
    (threads here, Ray tasks in :mod:`unimerge.cluster`)."""

    def __init__(self, plan: MergePlan, device: torch.device, seed: int) -> None:
        self.plan, self.device, self.seed = plan, device, seed
        self.warnings: list[str] = []
        self._stacked: dict[int, dict[str, Tensor]] = {}
        self.extra: dict[str, Tensor] = {}

    def per_model(self, job: TensorJob) -> dict[str, Tensor]:
        key = id(job.per_model)
        if key not in self._stacked:
            self._stacked[key] = stack_per_model(job.per_model, self.device)
        return {**self._stacked[key], **self.extra}

    def _warn_nonfinite(self, job: TensorJob, x: Tensor, base: Tensor | None) -> None:
        """Name every input of ``job`` holding NaN/Inf (called only when a cheap check failed)."""
        srcs = [*job.sources, *([job.base] if job.base is not None else [])]
        for src, t in zip(srcs, [*x, *([base] if base is not None else [])], strict=True):
            if not bool(torch.isfinite(t).all()):
                msg = (
                    f"{self.plan.checkpoints[src.model].ref}: tensor {src.name!r} contains NaN or Inf values"
                )
                self.warnings.append(msg)
                log.warning(msg)

    def inputs(self, job: TensorJob) -> tuple[Tensor | None, Tensor | None]:
        """``(x, base)``: the sources read straight into one ``(n, *shape)`` compute-dtype buffer on
        the device and the base in the compute dtype (or ``None``); for a non-float tensor ``x`` is
        ``None`` and the base (or first model) is as stored."""
        if job.rows is not None:
            return self._gathered(job)
        read = self.plan.checkpoints
        base = read[job.base.model].read(job.base.name) if job.base is not None else None
        first = job.sources[0]
        dtype = base.dtype if base is not None else read[first.model].tensors()[first.name].dtype
        if not dtype.is_floating_point:
            return None, base if base is not None else read[first.model].read(first.name)
        x = stack_buffer(len(job.sources), job.shape, dtype, "cpu")
        for i, src in enumerate(job.sources):
            read[src.model].read_into(src.name, x[i])
        if base is not None:  # in the compute dtype now: no stored-dtype copy stays alive beside it
            base = base.to(x.dtype)
        # One cheap pass in the buffer's dtype (a float64 sum would convert the whole buffer first);
        # NaN/Inf make it non-finite, and only then (or on an overflow) a full scan names the input.
        total = float(x.sum()) + (float(base.sum()) if base is not None else 0.0)
        if not math.isfinite(total):
            self._warn_nonfinite(job, x, base)
        return x.to(self.device), base

    def _gathered(self, job: TensorJob) -> tuple[Tensor, Tensor | None]:
        """:meth:`inputs` of a vocabulary tensor: each input's rows gathered into the output vocabulary."""
        assert job.rows is not None
        srcs = [*job.sources, *([job.base] if job.base is not None else [])]
        name = {s.model: s.name for s in srcs}
        raw = [self.plan.checkpoints[m].read(name[m]) for m in job.rows.models]
        dtype = compute_dtype(raw[0].dtype)
        rows = dict(zip(job.rows.models, gather_rows(job.rows, [t.to(dtype) for t in raw]), strict=True))
        x = torch.stack([rows[s.model] for s in job.sources]).to(self.device)
        return x, rows[job.base.model] if job.base is not None else None

    def merge(self, job: TensorJob) -> Tensor:
        x, base = self.inputs(job)
        if x is None:  # integer buffers pass through from the base (or first model)
            assert base is not None
            return base.to(job.dtype)
        info = self.plan.method
        g = generator_for(self.seed, job.name, self.device) if info.random else None
        out = merge_stacked(info, x, base, job.params, self.per_model(job), generator=g)
        if tuple(out.shape) != job.shape:
            raise MergeError(
                f"Method {info.name!r} returned shape {list(out.shape)} for tensor {job.name!r}, "
                f"expected {list(job.shape)}."
            )
        return out.to(job.dtype)

    def deltas(self) -> Iterator[tuple[str, Tensor]]:
        """Every job's stacked input as the method's ``fn`` sees it (statistics pass)."""
        for job in self.plan.jobs:
            x, base = self.inputs(job)
            if x is not None:
                yield job.name, to_method_input(self.plan.method, x, base)[0]
            release_free_memory()


def _merge_one(runner: JobRunner, writer: ShardedWriter, job: TensorJob) -> None:
    """Merge and write one job, then hand the memory it freed back to the OS (see :mod:`unimerge.heap`:
    otherwise malloc keeps it, and the resident set grows with the number of tensors merged)."""
    writer.write(job.name, runner.merge(job))
    release_free_memory()


Report = Callable[[int, int], None]


class Dispatch(Protocol):
    """Runs every job of a plan and puts its bytes into ``writer`` (``report(done, total)`` as jobs
    finish). The default runs a thread pool in this process; :mod:`unimerge.cluster` runs Ray tasks."""

    def __call__(
        self, plan: MergePlan, runner: JobRunner, writer: ShardedWriter, report: Report | None
    ) -> None: ...


class ThreadDispatch:
    """Jobs on ``threads`` threads within a byte budget of jobs in flight (see :func:`_run_pool`)."""

    def __init__(self, threads: int, memory_budget: int | None) -> None:
        self.threads, self.memory_budget = threads, memory_budget

    def __call__(
        self, plan: MergePlan, runner: JobRunner, writer: ShardedWriter, report: Report | None
    ) -> None:
        budget = self.memory_budget or plan.default_budget()
        _run_pool(plan.jobs, lambda job: _merge_one(runner, writer, job), self.threads, report, budget)


def _run_pool(
    jobs: Sequence[TensorJob],
    fn: Callable[[TensorJob], None],
    threads: int,
    progress: Callable[[int, int], None] | None,
    budget: int,
) -> None:
    """Run ``fn`` over jobs with at most ``2 * threads`` in flight whose working sets (:attr:`~unimerge.plan.TensorJob.working_bytes`) sum stays
    within ``budget`` (a job larger than the budget runs alone); the first error stops the run."""
    done = 0
    pending: dict[Future[None], int] = {}

    def settle() -> None:
        nonlocal done
        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
        for f in finished:
            del pending[f]
            f.result()
            done += 1
            if progress:
                progress(done, len(jobs))

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="unimerge") as pool:
        try:
            for job in jobs:
                cost = job.working_bytes
                while pending and (
                    len(pending) >= 2 * max(1, threads) or sum(pending.values()) + cost > budget
                ):
                    settle()
                pending[pool.submit(fn, job)] = cost
            while pending:
                settle()
        finally:
            for f in pending:
                f.cancel()


def _hash_inputs(plan: MergePlan, pool: ThreadPoolExecutor) -> dict[str, Future[str]]:
    files = sorted({str(f) for ck in plan.checkpoints for f in ck.files()})
    return {f: pool.submit(sha256_file, Path(f)) for f in files}


def _write_metadata(plan: MergePlan, writer: ShardedWriter, hashes: Mapping[str, str]) -> None:
    updates: dict[str, Any] = {}
    if plan.num_layers_out:
        updates["num_hidden_layers"] = plan.num_layers_out
    if plan.config.out_dtype or plan.config.dtype:
        updates["torch_dtype"] = plan.config.out_dtype or plan.config.dtype
    if plan.vocabulary is None:
        write_model_files(writer, plan.meta_root, plan.tokenizer_root, updates)
    else:  # the merged vocabulary's tokenizer, saved as mergekit does, and its size in config.json
        write_model_files(writer, plan.meta_root, None, {**updates, "vocab_size": plan.vocabulary.size})
        write_tokenizer(plan.vocabulary.tokenizer, writer)
    writer.write_text("unimerge_config.yaml", dump_config(plan.config))
    writer.write_text("README.md", model_card(plan, hashes))


def run_plan(
    plan: MergePlan,
    out_dir: str | Path,
    options: RunOptions = RunOptions(),
    progress: Progress | None = None,
    dispatch: Dispatch | None = None,
) -> MergeResult:
    """Execute a plan; the output appears at ``out_dir`` only when complete.

    ``dispatch`` runs the jobs (default: :class:`ThreadDispatch` with ``options``' threads and budget);
    the statistics pass, the metadata files and the commit are the same whoever runs them.
    """
    start = time.perf_counter()
    device = compute_device(options.device)
    seed = plan.config.seed if options.seed is None else options.seed
    runner = JobRunner(plan, device, seed)
    outs = [OutTensor(j.name, j.shape, j.dtype) for j in plan.jobs]
    meta = {"unimerge_method": plan.method.name}
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unimerge-sha")
    try:
        with ShardedWriter(
            Path(out_dir), outs, max_shard_bytes=options.out_shard_size, force=options.force, metadata=meta
        ) as writer:
            hashes = _hash_inputs(plan, hasher)
            if plan.method.prepare is not None and plan.jobs:
                job0 = plan.jobs[0]
                runner.extra = plan.method.prepare(job0.params, runner.per_model(job0), runner.deltas)
            what = f"merging ({plan.method.name})"
            report = (lambda done, total: progress(what, done, total)) if progress else None
            run = dispatch or ThreadDispatch(options.threads, options.memory_budget)
            run(plan, runner, writer, report)
            _write_metadata(plan, writer, {f: h.result() for f, h in hashes.items()})
            writer.commit()
    finally:
        hasher.shutdown(wait=False, cancel_futures=True)
        for ck in plan.checkpoints:
            ck.close()
    written = sum(o.nbytes for o in outs)
    return MergeResult(
        Path(out_dir), len(outs), written, time.perf_counter() - start, [*plan.warnings, *runner.warnings]
    )


class _Engine(Protocol):
    """How merges of one method kind are checked and run."""

    def check(
        self, cfg: MergeConfig, config_dir: Path | None, out_dir: Path, options: RunOptions
    ) -> Check: ...

    def run(
        self,
        cfg: MergeConfig,
        config_dir: Path | None,
        out_dir: Path,
        options: RunOptions,
        progress: Progress | None,
    ) -> MergeResult: ...


class _Streaming:
    """Tensor methods: plan from headers, then stream tensor jobs (this module)."""

    def check(self, cfg: MergeConfig, config_dir: Path | None, out_dir: Path, options: RunOptions) -> Check:
        plan = make_plan(cfg, out_dir, config_dir=config_dir, allow_pickle=options.allow_pickle)
        s = plan.summary(options.memory_budget)
        rows = [("method", f"{plan.method.name} ({plan.method.family})")]
        rows += [
            ("base" if plan.base is not None and ck is plan.checkpoints[plan.base] else "model", ck.ref)
            for ck in plan.checkpoints
        ]
        rows += [
            ("tensors", str(s["tensors"])),
            ("bytes to read", format_size(s["bytes_read"])),
            ("bytes to write", format_size(s["bytes_written"])),
            ("peak memory (est.)", format_size(s["peak_memory"])),
        ]
        return Check(rows, list(plan.warnings))

    def run(
        self,
        cfg: MergeConfig,
        config_dir: Path | None,
        out_dir: Path,
        options: RunOptions,
        progress: Progress | None,
    ) -> MergeResult:
        plan = make_plan(cfg, out_dir, config_dir=config_dir, allow_pickle=options.allow_pickle)
        return run_plan(plan, out_dir, options, progress)


def _engine(method: Method) -> _Engine:
    """The one place that tells the method kinds apart: which engine checks and runs a merge."""
    match method:
        case TensorMethod():
            return _Streaming()
        case ModelMethod():
            from unimerge.datamerge import DataAware  # forward passes: imported only when needed

            return DataAware()


def _refuse_align(cfg: MergeConfig) -> None:
    """``align:`` is run by :mod:`unimerge.align.run`, which sits above this module."""
    if cfg.align is not None:
        raise ConfigError(
            "This config has an `align:` section, which unimerge.align.run.run_aligned_merge runs (as "
            "`unimerge merge` does); run_merge and check_merge would merge the models unaligned."
        )


def check_merge(
    config: MergeConfig | str | Path | Mapping[str, Any],
    out_dir: str | Path,
    options: RunOptions = RunOptions(),
) -> Check:
    """Every check a merge makes before reading tensor data (or running a forward pass).

    Example:
        >>> for label, value in check_merge("ties.yaml", "out/").rows: print(label, value)
    """
    cfg, cdir = as_config(config)
    _refuse_align(cfg)
    return _engine(cfg.method).check(cfg, cdir, Path(out_dir), options)


def run_merge(
    config: MergeConfig | str | Path | Mapping[str, Any],
    out_dir: str | Path,
    options: RunOptions = RunOptions(),
    progress: Progress | None = None,
) -> MergeResult:
    """Check and run a merge config (a path to YAML, a mapping, or a :class:`MergeConfig`).

    A tensor method is planned from the inputs' headers and streamed tensor by tensor; a data-aware
    method (a config with ``data:``) runs forward passes (:mod:`unimerge.datamerge`). ``progress``
    is called as ``progress(what, done, total)`` while each phase runs.

    Example:
        >>> run_merge("ties.yaml", "out/", RunOptions(threads=4))
    """
    cfg, cdir = as_config(config)
    _refuse_align(cfg)
    return _engine(cfg.method).run(cfg, cdir, Path(out_dir), options, progress)
