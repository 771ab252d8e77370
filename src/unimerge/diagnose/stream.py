"""Diagnose a merge config by streaming its plan: one tensor name at a time across all models.

The config is planned exactly as ``unimerge merge`` plans it (:func:`unimerge.execute.plan_config`:
the same checks and errors, from headers, before any tensor data is read). Then each floating-point
job's inputs are read through the same checkpoint readers into one ``(n, *shape)`` buffer, turned into
task vectors against the base, reduced to additive :class:`~unimerge.diagnose.stats.Stats` and dropped.
Memory is bounded like a merge's: at most ``threads + 1`` tensors in flight, and no more of them than
fit the largest tensor's working set (:attr:`unimerge.plan.TensorJob.working_bytes`) or 512 MB.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from unimerge.config import MergeConfig
from unimerge.core import stack_buffer
from unimerge.diagnose.stats import Stats, SubspaceSettings, summarize, tensor_stats
from unimerge.errors import ConfigError
from unimerge.execute import plan_config
from unimerge.methods import generator_for
from unimerge.options import Progress, compute_device
from unimerge.plan import MIN_BUDGET, MergePlan, Source, TensorJob, layer_index

__all__ = ["DiagnoseOptions", "Diagnosis", "diagnose", "diagnose_models", "diagnose_plan", "tensor_sources"]

_NO_OUTPUT = Path("/dev/null")  # planned output when nothing is written: overlaps no input folder


@dataclass(frozen=True)
class DiagnoseOptions:
    """How to diagnose (not what): ``top_k`` is the fraction of each task vector's entries (by
    magnitude, per tensor) that the top-k sign conflicts and the sign election keep, as TIES trims."""

    top_k: float = 0.2
    threads: int = 2
    device: str = "cpu"
    allow_pickle: bool = False
    seed: int | None = None  # overrides the config's seed (randomized SVDs)
    subspace: SubspaceSettings = SubspaceSettings()


@dataclass
class Diagnosis:
    """What :func:`diagnose` measured; :meth:`to_json` is ``diagnosis.json`` without the verdict."""

    models: list[str]
    base: str
    overall: dict[str, Any]
    tensors: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    settings: dict[str, Any]
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "models": self.models,
            "base": self.base,
            "overall": self.overall,
            "tensors": self.tensors,
            "layers": self.layers,
            "settings": self.settings,
            "warnings": self.warnings,
            "seconds": self.seconds,
        }


def tensor_sources(plan: MergePlan) -> list[tuple[TensorJob, tuple[Source, ...], Source]]:
    """Each floating-point job with its expert sources and the base source it is compared with.

    Raises:
        ConfigError: the config has no base model, or its slices change the models between tensors.
    """
    if plan.base is None:
        raise ConfigError(
            f"Diagnosing {plan.config.merge_method!r} needs a base model: task vectors are measured "
            "against it. Add `base_model:` to the config."
        )
    out = []
    models: tuple[int, ...] | None = None
    for job in plan.jobs:
        src = plan.checkpoints[job.sources[0].model].tensors()[job.sources[0].name]
        if not src.dtype.is_floating_point:
            continue
        if job.base is None and plan.config.slices is not None:
            raise ConfigError(
                f"{plan.config.merge_method!r} with `slices:` takes no base per tensor; diagnose a "
                "config with `models:` or a method that uses the base (e.g. task_arithmetic)."
            )
        base = job.base or Source(plan.base, job.name)
        experts = tuple(s for s in job.sources if s.model != plan.base)
        models = models or tuple(s.model for s in experts)
        if tuple(s.model for s in experts) != models or not experts:
            raise ConfigError(
                f"Tensor {job.name!r} is merged from other models than the first tensor: diagnose "
                "compares one set of models over all tensors; use `models:` (not varying `slices:`)."
            )
        out.append((job, experts, base))
    return out


def _read(plan: MergePlan, job: TensorJob, experts: Sequence[Source], base: Source) -> tuple[Tensor, Tensor]:
    """``(tau, theta_0)``: task vectors ``(n, *shape)`` in the compute dtype and the base tensor."""
    cks = plan.checkpoints
    theta = cks[base.model].read(base.name)
    x = stack_buffer(len(experts), job.shape, theta.dtype, "cpu")
    for i, src in enumerate(experts):
        cks[src.model].read_into(src.name, x[i])
    x.sub_(theta.to(x.dtype))
    return x, theta


def _ordered(
    items: Sequence[Any], fn: Callable[[Any], Stats], cost: Callable[[Any], int], threads: int, budget: int
) -> Iterator[Stats]:
    """``fn`` over ``items`` on a thread pool, in order, with at most ``threads + 1`` items in flight
    whose ``cost`` sums within ``budget`` (a larger item runs alone)."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="unimerge-diag") as pool:
        pending: list[tuple[Future[Stats], int]] = []
        try:
            for item in items:
                c = cost(item)
                while pending and (len(pending) > threads or sum(p[1] for p in pending) + c > budget):
                    yield pending.pop(0)[0].result()
                pending.append((pool.submit(fn, item), c))
            while pending:
                yield pending.pop(0)[0].result()
        finally:
            for f, _ in pending:
                f.cancel()


def diagnose_plan(
    plan: MergePlan, options: DiagnoseOptions = DiagnoseOptions(), progress: Progress | None = None
) -> Diagnosis:
    """Stream ``plan``'s tensors and measure them (see the module docstring)."""
    start = time.perf_counter()
    if not 0.0 < options.top_k <= 1.0:
        raise ConfigError(f"top_k is {options.top_k}; give a fraction in (0, 1] (1 keeps every entry).")
    device = compute_device(options.device)
    seed = plan.config.seed if options.seed is None else options.seed
    items = tensor_sources(plan)
    if not items:
        raise ConfigError("The models have no floating-point tensors to diagnose.")

    def measure(item: tuple[TensorJob, tuple[Source, ...], Source]) -> Stats:
        job, experts, base = item
        x, theta = _read(plan, job, experts, base)
        g = generator_for(seed, job.name, device)
        return tensor_stats(
            x.to(device), theta.to(device), top_k=options.top_k, settings=options.subspace, generator=g
        )

    budget = max([MIN_BUDGET, *(j.working_bytes for j, _, _ in items)])
    per_tensor: list[tuple[TensorJob, Stats]] = []
    try:
        for done, st in enumerate(
            _ordered(items, measure, lambda it: it[0].working_bytes, options.threads, budget), 1
        ):
            per_tensor.append((items[done - 1][0], st))
            if progress:
                progress("diagnosing", done, len(items))
    finally:
        for ck in plan.checkpoints:
            ck.close()
    refs = [plan.checkpoints[s.model].ref for s in items[0][1]]
    return Diagnosis(
        models=refs,
        base=plan.checkpoints[plan.base].ref if plan.base is not None else "",
        overall=summarize(_total(st for _, st in per_tensor)),
        tensors=[_tensor_record(job, st) for job, st in per_tensor],
        layers=_layers(per_tensor),
        settings=_settings(options, seed),
        seconds=time.perf_counter() - start,
        warnings=list(plan.warnings),
    )


def _total(stats: Iterator[Stats] | Sequence[Stats]) -> Stats:
    it = iter(stats)
    total = next(it)
    for st in it:
        total = total + st
    return total


def _tensor_record(job: TensorJob, st: Stats) -> dict[str, Any]:
    return {
        "name": job.name,
        "shape": list(job.shape),
        "layer": layer_index(job.name),
        **summarize(st),
        **st.extra,
    }


def _layers(per_tensor: Sequence[tuple[TensorJob, Stats]]) -> list[dict[str, Any]]:
    """Per-layer summaries (tensors outside the layer stack are left out), in layer order."""
    groups: dict[int, list[Stats]] = {}
    for job, st in per_tensor:
        idx = layer_index(job.name)
        if idx is not None:
            groups.setdefault(idx, []).append(st)
    return [{"layer": k, **summarize(_total(v))} for k, v in sorted(groups.items())]


def _settings(options: DiagnoseOptions, seed: int) -> dict[str, Any]:
    s = options.subspace
    return {
        "top_k": options.top_k,
        "seed": seed,
        "subspace_energy": s.energy,
        "subspace_max_rank": s.max_rank,
        "exact_svd_max_dim": s.exact_max_dim,
        "oversample": s.oversample,
        "power_iterations": s.power_iterations,
    }


def diagnose(
    config: MergeConfig | str | Path | Mapping[str, Any],
    out_dir: str | Path | None = None,
    options: DiagnoseOptions = DiagnoseOptions(),
    progress: Progress | None = None,
) -> Diagnosis:
    """Plan ``config`` as ``unimerge merge`` would (same checks, same errors) and diagnose it.

    ``out_dir`` is where the report will go (checked, as a merge's output, to lie outside every input);
    nothing is written here.

    Example:
        >>> d = diagnose("ties.yaml")
        >>> d.overall["cosine"], d.overall["norm_ratio"]
    """
    plan = plan_config(config, Path(out_dir) if out_dir is not None else _NO_OUTPUT,
                       allow_pickle=options.allow_pickle)  # fmt: skip
    return diagnose_plan(plan, options, progress)


def diagnose_models(
    base: str | Path, experts: Sequence[str | Path], options: DiagnoseOptions = DiagnoseOptions()
) -> Diagnosis:
    """Diagnose ``experts`` against ``base`` (model folders) without writing a config."""
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
    }
    return diagnose(cfg, None, options)
