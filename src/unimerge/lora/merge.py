"""Merging LoRA adapters at the update level: any data-free method on ``dW = s * B @ A``, module by module.

Merging the ``A`` and ``B`` factors separately (as PEFT's ``add_weighted_adapter`` does for most of its
combination types) is not the merge of the updates: ``(B1 + B2)(A1 + A2) != B1 A1 + B2 A2``. Here each
adapted module's updates are materialised one module at a time, stacked ``(n, out, in)`` (zeros for an
adapter that lacks the module) and handed to the registered method through the same code path as
:func:`unimerge.merge_state_dicts` (:func:`~unimerge.core.validate_params`,
:func:`~unimerge.core.merge_stacked`). How a method sees the updates:

- ``inputs="deltas"`` methods (task arithmetic, TIES, DARE, TSV, ...) get the updates as task vectors
  over a zero base: they never read the base weights, so no base model is needed;
- ``inputs="tensors"`` methods that use a base only through task vectors (``optional_base``: nuslerp,
  multislerp) get the same zero base; ``linear`` is linear in its inputs and runs on the updates;
- the other ``inputs="tensors"`` methods (slerp, nearswap, karcher, passthrough) interpolate whole
  weights: they run on ``base + dW_i`` and need the base model;
- data-aware methods (``ModelMethod``) are refused.

Output is the merged update per module (``output="dense"``, or a Hugging Face folder of
``base + merged dW`` when ``out`` is given), or LoRA factors (``output="peft_lora"``): methods in
:data:`LINEAR_IN_UPDATES` merge to ``sum_i c_i dW_i``, which is exactly the concatenation of the
scaled factors (rank = sum of the ranks); any other merge, or any merge with ``rank``/``energy``
given, is re-factorised by truncated SVD and the relative Frobenius error of each module reported.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor

from unimerge.core import merge_stacked, split_params, stack_per_model, to_method_input, validate_params
from unimerge.errors import ConfigError
from unimerge.io.checkpoint import Checkpoint
from unimerge.io.resolve import check_output_outside
from unimerge.lora.adapter import LoraAdapter, LoraFactors, save_peft_adapter
from unimerge.lora.plan import (
    ModuleJob,
    ModuleProgress,
    Output,
    Request,
    check_request,
    open_all,
    plan_modules,
    reporting,
    tensor_method,
    write_dense,
)
from unimerge.lora.svd import check_rank, truncate
from unimerge.methods import TensorMethod, generator_for

__all__ = [
    "LINEAR_IN_UPDATES",
    "LoraMergeResult",
    "ModuleJob",
    "Output",
    "merge_adapters",
    "on_weights",
    "plan_modules",
]

LINEAR_IN_UPDATES = frozenset({"task_arithmetic", "linear"})
"""Methods whose merge is ``sum_i c_i dW_i`` with constants ``c_i``: their adapter output is exact."""
_LINEAR_TENSORS = frozenset({"linear"})  # inputs="tensors" methods run on the updates themselves


@dataclass
class LoraMergeResult:
    """What :func:`merge_adapters` produced.

    ``deltas``: merged update per module (``output="dense"`` without ``out``), in the base weight's
    layout, float32. ``factors`` and ``errors`` (relative Frobenius error of each module's factors;
    0 where exact): ``output="peft_lora"``.
    """

    method: str
    output: Output
    modules: list[str]
    deltas: dict[str, Tensor] = field(default_factory=dict)
    factors: dict[str, LoraFactors] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    exact: bool = False
    out_dir: Path | None = None
    seconds: float = 0.0

    def report(self) -> dict[str, Any]:
        """A JSON-able summary (written beside the output as ``merge_report.json``)."""
        rows = [
            {"module": m, "rank": self.factors[m].rank, "relative_error": self.errors[m]}
            for m in self.modules
            if m in self.factors
        ]
        return {"method": self.method, "output": self.output, "exact": self.exact, "modules": rows}


def on_weights(info: TensorMethod, have_base: bool) -> bool:
    """Whether ``info`` runs on whole weights ``base + dW_i`` (slerp, ...) rather than on the updates.

    Raises:
        ConfigError: it does, and there is no base.
    """
    on_base = not (info.inputs == "deltas" or info.optional_base or info.name in _LINEAR_TENSORS)
    if on_base and not have_base:
        raise ConfigError(
            f"Method {info.name!r} interpolates whole weights, not updates, so merging adapters with it "
            "needs their base model: pass base=... (`base_model:` in a config). Methods that need no "
            "base here: task_arithmetic, linear, ties, dare_ties, tsv_m, multislerp, ..."
        )
    return on_base


class _Merger:
    """Merges one module's updates with a validated method (the pieces merge_state_dicts uses)."""

    def __init__(
        self,
        info: TensorMethod,
        params: BaseModel,
        per_model: dict[str, Tensor],
        adapters: Sequence[LoraAdapter],
        base: Checkpoint | None,
        seed: int,
    ) -> None:
        self.info, self.params, self.per_model = info, params, per_model
        self.adapters, self.base, self.seed = adapters, base, seed
        self.on_base = on_weights(info, base is not None)

    def inputs(self, job: ModuleJob) -> tuple[Tensor, Tensor | None]:
        """``(x (n, *shape), base)`` as merge_stacked takes them: the updates over a zero base, or
        ``base + dW_i`` over the base weight."""
        x = torch.zeros((len(self.adapters), *job.shape))  # (n, out, in); zero where a module is absent
        for i in job.sources:
            x[i] = self.adapters[i].factors(job.module).delta()
        if self.on_base:
            assert self.base is not None
            w = self.base.read(job.weight).float()
            return x.add_(w), w
        zero = self.info.inputs == "deltas" or self.info.optional_base
        return x, torch.zeros(job.shape) if zero else None

    def merged(self, job: ModuleJob) -> Tensor:
        """The merged update of one module, float32, in the base weight's layout."""
        x, b = self.inputs(job)
        g = generator_for(self.seed, job.weight) if self.info.random else None
        out = merge_stacked(self.info, x, b, self.params, self.per_model, generator=g)
        return out - b if self.on_base and b is not None else out

    def deltas(self, jobs: Sequence[ModuleJob]) -> Iterator[tuple[str, Tensor]]:
        """Every module's input as the method's ``fn`` sees it (a ``scope="model"`` statistics pass)."""
        for job in jobs:
            x, b = self.inputs(job)
            yield job.weight, to_method_input(self.info, x, b)[0]

    def coefficients(self) -> Tensor:
        """``c`` with merge = ``sum_i c_i dW_i``, for a method of :data:`LINEAR_IN_UPDATES`: the method
        run on the unit vectors ``e_i`` (each input a ``(n,)`` tensor)."""
        n = len(self.adapters)
        zero = torch.zeros(n) if self.info.inputs == "deltas" else None
        return merge_stacked(self.info, torch.eye(n), zero, self.params, self.per_model)


def _concatenated(job: ModuleJob, adapters: Sequence[LoraAdapter], c: Tensor) -> LoraFactors:
    """The exact factors of ``sum_i c_i dW_i``: ``B = [c_i s_i B_i]``, ``A = [A_i]`` stacked, scale 1."""
    parts = [(float(c[i]), adapters[i].factors(job.module)) for i in job.sources if float(c[i]) != 0.0]
    if not parts:
        out, inp = (job.shape[1], job.shape[0]) if job.transpose else job.shape
        return LoraFactors(torch.zeros(1, inp), torch.zeros(out, 1), 1.0, job.transpose, job.embedding)
    b = torch.cat([ci * f.scale * f.b.float() for ci, f in parts], dim=1)  # (out, sum r_i)
    a = torch.cat([f.a.float() for _, f in parts], dim=0)  # (sum r_i, in)
    return LoraFactors(a, b, 1.0, job.transpose, job.embedding)


def merge_adapters(
    method: str,
    adapters: Sequence[str | Path | LoraAdapter],
    base: str | Path | Checkpoint | None = None,
    rank: int | None = None,
    energy: float | None = None,
    output: Output = "dense",
    seed: int = 0,
    *,
    out: str | Path | None = None,
    force: bool = False,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    out_shard_size: int = 2_000_000_000,
    method_params: Mapping[str, Any] | None = None,
    progress: ModuleProgress | None = None,
    **params: Any,
) -> LoraMergeResult:
    """Merge PEFT LoRA adapters with any data-free method, at the level of their updates.

    Args:
        method: A registered data-free method (``unimerge methods``).
        adapters: PEFT adapter folders (or opened :class:`~unimerge.lora.adapter.LoraAdapter` s).
        base: The base model (folder or checkpoint); needed only for a dense output folder and for
            methods that interpolate whole weights (slerp, nearswap, karcher, passthrough).
        rank: Adapter output: truncate each merged update to this rank (``<= min(out, in)``).
        energy: Adapter output: keep the fewest singular values holding this fraction of ``|dW|_F^2``.
        output: ``"dense"`` (merged updates, or ``base + dW`` written to ``out``) or ``"peft_lora"``.
        seed: Seed of random methods (per module, as in a file merge).
        out: Write the result here (a Hugging Face folder, or a PEFT adapter folder) as it is merged.
        force: Replace ``out`` if it exists.
        dtype: Dtype written (default: the base's for dense, float32 for adapters).
        allow_pickle: Read pickled ``pytorch_model.bin`` base weights.
        out_shard_size: Max bytes per shard of a dense output folder.
        method_params: Method parameters whose names clash with this function's (e.g. ``rank``).
        progress: Called as ``progress(done, total)`` after each module is merged (and factorised or written).
        **params: Method parameters; per-model ones take a scalar or one value per adapter.

    Raises:
        ConfigError, CheckpointError, PlanError: Bad input, before anything is written.

    Example:
        >>> r = merge_adapters("ties", ["lora-a", "lora-b"], output="peft_lora", rank=16, density=0.5)
    """
    start = time.perf_counter()
    req = Request(output, rank, energy, Path(out) if out is not None else None, force, dtype, out_shard_size)
    check_request(req, base)
    info = tensor_method(method)
    ads, ck, opened = open_all(adapters, base, allow_pickle)
    try:
        merger, jobs = _prepare(info, ads, ck, req, seed, {**(method_params or {}), **params})
        result = _produce(merger, jobs, req, progress)
    finally:
        for o in opened:
            o.close()
    result.out_dir, result.seconds = req.out_dir, time.perf_counter() - start
    return result


def _prepare(
    info: TensorMethod,
    ads: Sequence[LoraAdapter],
    ck: Checkpoint | None,
    req: Request,
    seed: int,
    raw: Mapping[str, Any],
) -> tuple[_Merger, list[ModuleJob]]:
    """Every check from headers and parameters (no tensor data read, except a statistics pass)."""
    if not ads:
        raise ConfigError("merge_adapters needs at least one adapter.")
    if req.out_dir is not None:
        check_output_outside(req.out_dir, [str(a.folder) for a in ads] + ([ck.ref] if ck is not None else []))
    jobs = plan_modules(ads, ck)
    if req.rank is not None:
        for job in jobs:
            check_rank(req.rank, job.module, job.shape)
    p, models = validate_params(info, *split_params(info, len(ads), raw))
    merger = _Merger(info, p, stack_per_model(models), ads, ck, seed)
    if info.prepare is not None:  # whole-model statistics first (e.g. TIES trim_scope: global)
        merger.per_model = {
            **merger.per_model,
            **info.prepare(p, merger.per_model, lambda: merger.deltas(jobs)),
        }
    return merger, jobs


def _produce(
    merger: _Merger, jobs: Sequence[ModuleJob], req: Request, progress: ModuleProgress | None
) -> LoraMergeResult:
    """Merge every module and return (or write) the result."""
    result = LoraMergeResult(merger.info.name, req.output, [j.module for j in jobs])
    merged = reporting(merger.merged, len(jobs), progress)
    if req.output == "peft_lora":
        _factorise(result, jobs, merger, req, progress)
        if req.out_dir is not None:
            ck = merger.base
            name = merger.adapters[0].settings.base_model or (ck.ref if ck is not None else None)
            report = {"merge_report.json": json.dumps(result.report(), indent=2)}
            save_peft_adapter(req.out_dir, result.factors, name, dtype=req.dtype or torch.float32,
                              exists="replace" if req.force else "error", extra_files=report)  # fmt: skip
    elif req.out_dir is None:
        result.deltas = {j.module: merged(j) for j in jobs}
    else:
        assert merger.base is not None  # check_request: a dense folder needs the base
        write_dense(req.out_dir, merger.base, jobs, merged, merger.info.name, req)
    return result


def _factorise(
    result: LoraMergeResult,
    jobs: Sequence[ModuleJob],
    merger: _Merger,
    req: Request,
    progress: ModuleProgress | None,
) -> None:
    """Fill ``result.factors``/``errors``: exact concatenation when possible, else truncated SVD."""
    result.exact = merger.info.name in LINEAR_IN_UPDATES and req.rank is None and req.energy is None
    c = merger.coefficients() if result.exact else None

    def factors(job: ModuleJob) -> tuple[LoraFactors, float]:
        if c is not None:
            return _concatenated(job, merger.adapters, c), 0.0
        return truncate(
            merger.merged(job), req.rank, req.energy, transpose=job.transpose, embedding=job.embedding
        )

    step = reporting(factors, len(jobs), progress)
    for job in jobs:
        result.factors[job.module], result.errors[job.module] = step(job)
