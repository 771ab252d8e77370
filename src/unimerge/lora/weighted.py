"""PEFT's ``add_weighted_adapter`` on adapter folders, by its combination type's name.

:func:`combine_adapters` reads PEFT LoRA folders, combines every module with
:func:`~unimerge.lora.combine.combine_lora` (``cat``, ``linear``, ``svd``, ``ties``, ``ties_svd``,
``dare_*``, ``magnitude_prune*``; see :mod:`unimerge.lora.combine` for the math) and writes a PEFT
adapter (or ``base + dW``), so that the new adapter's updates are those PEFT's
``LoraModel.add_weighted_adapter(adapters, weights, name, combination_type, ...)`` gives for the same
request. What is taken from PEFT (peft 0.21.2, ``tuners/lora/model.py``), beyond one module's math:

- one adapter makes the whole request ``linear``; a module only some adapters have is combined from
  those adapters (with their weights) with the asked type;
- the new adapter's rank ``r`` comes from the adapters' configs (``max(r, *rank_pattern)`` each): the
  ``svd`` types' default ``svd_rank`` is the largest, ``cat``'s the sum, and the factor-wise types
  (``linear``, ``ties``, ``dare_*``, ``magnitude_prune``) need them equal; ``lora_alpha = r``, and
  PEFT keeps the first adapter's ``use_rslora``, which then scales every update by ``sqrt(r)``;
- DARE draws, module by module, from one generator seeded with ``seed`` (``None``: torch's global
  RNG, as PEFT). PEFT walks the modules in the model's order, here they go in name order (the base
  model's tensor order when ``base`` is given), so the masks are PEFT's only where both orders agree.

This is not :func:`~unimerge.lora.merge.merge_adapters`: PEFT merges the ``A`` and ``B`` factors
separately for the factor-wise types (``(B_1 + B_2)(A_1 + A_2)`` has cross terms), and its TIES/DARE
differ from the registered methods in small ways (``unimerge.lora.combine``'s docstring lists them).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from unimerge.errors import ConfigError, describe_invalid
from unimerge.io.checkpoint import Checkpoint
from unimerge.io.resolve import check_output_outside
from unimerge.lora.adapter import LoraAdapter, LoraFactors, save_peft_adapter
from unimerge.lora.combine import check_combination, combine_lora
from unimerge.lora.plan import (
    ModuleJob,
    ModuleProgress,
    Output,
    Request,
    check_request,
    open_all,
    plan_modules,
    reporting,
    write_dense,
)
from unimerge.lora.svd import check_rank

__all__ = [
    "CombineParams",
    "CombineResult",
    "check_module_ranks",
    "combine_adapters",
    "new_rank",
    "resolved_type",
]

FACTORWISE = frozenset({"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})


class CombineParams(BaseModel):
    """``add_weighted_adapter``'s options (PEFT's names and defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    svd_rank: int | None = Field(
        default=None, ge=1, le=1 << 20, description="Rank of the *svd types' result."
    )
    svd_clamp: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Quantile clamping both factors."
    )
    svd_full_matrices: bool = True
    svd_driver: Literal["gesvd", "gesvdj", "gesvda"] | None = None
    density: float | None = Field(default=None, ge=0.0, le=1.0, description="Fraction kept by pruning types.")
    majority_sign_method: Literal["total", "frequency"] = "total"


@dataclass
class CombineResult:
    """What :func:`combine_adapters` produced: ``factors`` (``output="peft_lora"``) or ``deltas`` (dense).

    ``combination_type`` is the type run (``linear`` for one adapter); ``rank`` the new adapter's ``r``.
    """

    combination_type: str
    output: Output
    modules: list[str]
    rank: int
    factors: dict[str, LoraFactors] = field(default_factory=dict)
    deltas: dict[str, Tensor] = field(default_factory=dict)
    out_dir: Path | None = None
    seconds: float = 0.0

    def report(self) -> dict[str, object]:
        """JSON-ready summary (written as ``merge_report.json`` beside an adapter output)."""
        rows = [{"module": m, "rank": f.rank} for m, f in self.factors.items()]
        return {"combination_type": self.combination_type, "r": self.rank, "modules": rows}


def resolved_type(combination_type: str, n_adapters: int) -> str:
    """PEFT's rule: a request of one adapter is ``linear``."""
    return "linear" if n_adapters == 1 else combination_type


def _config_rank(ad: LoraAdapter) -> int:
    """PEFT's rank of an adapter: ``max(r, *rank_pattern)``."""
    return max([ad.settings.r, *(r for _, r in ad.settings.rank_pattern)])


def new_rank(kind: str, adapters: Sequence[LoraAdapter], svd_rank: int | None) -> int:
    """The new adapter's ``r``, as PEFT's ``_check_add_weighted_adapter`` sets it.

    Raises:
        ConfigError: a factor-wise type on adapters of different ranks.
    """
    ranks = [_config_rank(ad) for ad in adapters]
    if kind == "cat":
        return sum(ranks)
    if kind.endswith("svd"):
        return svd_rank or max(ranks)
    if len(set(ranks)) != 1:
        listed = ", ".join(f"{ad.folder} r={r}" for ad, r in zip(adapters, ranks, strict=True))
        raise ConfigError(
            f"combination_type {kind!r} combines the A and B factors entry by entry, so the adapters must have "
            f"one rank ({listed}); use 'cat' or an '*_svd' type (with svd_rank) for adapters of different ranks."
        )
    return ranks[0]


def check_module_ranks(kind: str, jobs: Sequence[ModuleJob], adapters: Sequence[LoraAdapter], r: int) -> None:
    """From headers: a factor-wise type needs one rank per module, an ``*svd`` type ``r <= min(out, in)``.

    Raises:
        ConfigError: naming the module and the fix.
    """
    for job in jobs:
        if kind.endswith("svd"):
            check_rank(r, job.module, job.shape)
        elif kind in FACTORWISE:
            ranks = {adapters[i].modules[job.module].rank for i in job.sources}
            if len(ranks) > 1:
                raise ConfigError(
                    f"combination_type {kind!r} needs one rank per module, but module {job.module!r} has ranks "
                    f"{sorted(ranks)} (rank_pattern); use 'cat' or an '*_svd' type."
                )


def _params(raw: dict[str, object]) -> CombineParams:
    try:
        return CombineParams.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe_invalid(err, "", "PEFT combination options", "docs/lora.md")) from None


def _combine_module(
    job: ModuleJob,
    ads: Sequence[LoraAdapter],
    weights: Sequence[float],
    kind: str,
    p: CombineParams,
    r: int,
    generator: torch.Generator | None,
) -> LoraFactors:
    fs = [ads[i].factors(job.module) for i in job.sources]
    fs = [LoraFactors(f.a.float(), f.b.float(), f.scale, f.transpose, f.embedding) for f in fs]
    c = combine_lora(
        kind, fs, [weights[i] for i in job.sources],
        svd_rank=r if kind.endswith("svd") else None, svd_clamp=p.svd_clamp,
        svd_full_matrices=p.svd_full_matrices, svd_driver=p.svd_driver, density=p.density,
        majority_sign_method=p.majority_sign_method, generator=generator, transposed=job.transpose,
        one_is_linear=False,
    )  # fmt: skip
    return LoraFactors(c.a, c.b, 1.0, job.transpose, job.embedding)


def combine_adapters(
    combination_type: str,
    adapters: Sequence[str | Path | LoraAdapter],
    weights: Sequence[float],
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = 0,
    base: str | Path | Checkpoint | None = None,
    output: Output = "peft_lora",
    out: str | Path | None = None,
    force: bool = False,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    out_shard_size: int = 2_000_000_000,
    progress: ModuleProgress | None = None,
) -> CombineResult:
    """PEFT's ``add_weighted_adapter(adapters, weights, name, combination_type, ...)`` on adapter folders.

    Args:
        combination_type: ``cat``, ``linear``, ``svd``, ``ties``, ``ties_svd``, ``dare_linear``,
            ``dare_ties``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune``, ``magnitude_prune_svd``.
        adapters: PEFT LoRA folders (or opened :class:`~unimerge.lora.adapter.LoraAdapter` s).
        weights: One weight per adapter (negative subtracts it).
        svd_rank, svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method: PEFT's options.
        seed: Seed of the DARE types' masks (``None``: torch's global RNG, as PEFT).
        base: The base model; needed for a dense output folder only.
        output: ``"peft_lora"`` (the new adapter) or ``"dense"`` (its updates, or ``base + dW`` in ``out``).
        out: Write the result here (a PEFT adapter folder with ``merge_report.json``, or a model folder).
        force: Replace ``out`` if it exists.
        dtype: Dtype written (default float32 for an adapter, the base's for a dense folder).
        allow_pickle: Read pickled base weights.
        out_shard_size: Max bytes per shard of a dense output folder.
        progress: Called as ``progress(done, total)`` after each module is combined (or written).

    Raises:
        ConfigError, CheckpointError, PlanError: Bad input, before anything is written.

    Example:
        >>> combine_adapters("ties_svd", ["lora-a", "lora-b"], [1.0, 0.7], density=0.5, out="merged")
    """
    start = time.perf_counter()
    p = _params({"svd_rank": svd_rank, "svd_clamp": svd_clamp, "svd_full_matrices": svd_full_matrices,
                 "svd_driver": svd_driver, "density": density, "majority_sign_method": majority_sign_method})  # fmt: skip
    check_combination(combination_type, len(adapters), len(weights), 1.0)  # the name and the counts
    check_combination(resolved_type(combination_type, len(adapters)), len(adapters), len(weights), density)
    req = Request(output, None, None, Path(out) if out is not None else None, force, dtype, out_shard_size)
    check_request(req, base)
    ads, ck, opened = open_all(adapters, base, allow_pickle)
    try:
        if req.out_dir is not None:
            check_output_outside(req.out_dir, [str(a.folder) for a in ads] + ([ck.ref] if ck else []))
        kind = resolved_type(combination_type, len(ads))
        jobs = plan_modules(ads, ck)
        r = new_rank(kind, ads, p.svd_rank)
        check_module_ranks(kind, jobs, ads, r)
        result = CombineResult(kind, output, [j.module for j in jobs], r)
        _produce(result, jobs, ads, ck, [float(w) for w in weights], p, req, seed, progress)
    finally:
        for o in opened:
            o.close()
    result.out_dir, result.seconds = req.out_dir, time.perf_counter() - start
    return result


def _produce(
    result: CombineResult,
    jobs: Sequence[ModuleJob],
    ads: Sequence[LoraAdapter],
    ck: Checkpoint | None,
    weights: list[float],
    p: CombineParams,
    req: Request,
    seed: int | None,
    progress: ModuleProgress | None,
) -> None:
    """Combine every module (in ``jobs``' order, which DARE's draws follow) and write or keep the result.

    A dense folder combines each module as :func:`write_dense` reaches it: in the base's tensor order,
    which is ``jobs``' order (:func:`plan_modules` sorts by it when there is a base).
    """
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    scale = math.sqrt(result.rank) if ads[0].settings.rslora else 1.0  # PEFT: alpha = r, first's rsLoRA

    def combined(job: ModuleJob) -> LoraFactors:
        f = _combine_module(job, ads, weights, result.combination_type, p, result.rank, g)
        return LoraFactors(f.a, f.b, scale, f.transpose, f.embedding)

    step = reporting(combined, len(jobs), progress)
    if req.output == "dense" and req.out_dir is not None:
        assert ck is not None  # check_request: a dense folder needs the base
        write_dense(req.out_dir, ck, jobs, lambda j: step(j).delta(), f"peft:{result.combination_type}", req)
        return
    for job in jobs:
        f = step(job)
        if req.output == "peft_lora":
            result.factors[job.module] = f
        else:
            result.deltas[job.module] = f.delta()
    if req.output == "peft_lora" and req.out_dir is not None:
        name = ads[0].settings.base_model or (ck.ref if ck is not None else None)
        save_peft_adapter(req.out_dir, result.factors, name, dtype=req.dtype or torch.float32,
                          exists="replace" if req.force else "error",
                          extra_files={"merge_report.json": json.dumps(result.report(), indent=2)})  # fmt: skip
