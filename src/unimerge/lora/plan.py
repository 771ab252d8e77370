"""What a merge of adapters will do, checked from headers, and the pieces every adapter merge shares.

:func:`plan_modules` lists the adapted modules (the union over the adapters, no tensor data read);
:class:`Request` and :func:`check_request` say what to produce and refuse a bad request before
anything is opened; :func:`open_all` opens adapters and base; :func:`write_dense` streams
``base + dW`` into a Hugging Face folder; :func:`reporting` counts finished modules for a progress bar. Used by :func:`~unimerge.lora.merge.merge_adapters` (any
registered method on the updates) and :func:`~unimerge.lora.peft.combine_adapters` (PEFT's
``add_weighted_adapter`` types).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch
from torch import Tensor

from unimerge.errors import ConfigError, PlanError
from unimerge.io.atomic import exists_error
from unimerge.io.checkpoint import Checkpoint
from unimerge.io.resolve import open_checkpoint
from unimerge.io.writer import OutTensor, ShardedWriter, write_model_files
from unimerge.lora.adapter import LoraAdapter, open_adapter
from unimerge.lora.combine import COMBINATION_TYPES
from unimerge.methods import ModelMethod, TensorMethod, get_method

__all__ = [
    "ModuleJob",
    "ModuleProgress",
    "Output",
    "Request",
    "check_request",
    "open_all",
    "plan_modules",
    "reporting",
    "tensor_method",
    "write_dense",
]

Output = Literal["dense", "peft_lora"]
ModuleProgress = Callable[[int, int], None]
"""``progress(done, total)``: called as each module of an adapter merge is finished."""
T = TypeVar("T")


@dataclass(frozen=True)
class ModuleJob:
    """One adapted module: its base tensor name, update shape, and which adapters adapt it."""

    module: str
    weight: str  # the base tensor: <module>.weight
    shape: tuple[int, int]
    sources: tuple[int, ...]  # indices of the adapters that have this module
    transpose: bool
    embedding: bool


def _where(adapter: LoraAdapter) -> str:
    return f"adapter {adapter.folder}"


def _check_base(job: ModuleJob, adapter: LoraAdapter, base: Checkpoint) -> None:
    meta = base.tensors().get(job.weight)
    if meta is None:
        raise PlanError(
            f"{_where(adapter)} adapts module {job.module!r}, but the base model {base.ref} has no tensor "
            f"{job.weight!r}. The adapter was trained on another base model; give that one."
        )
    if meta.shape != job.shape:
        raise PlanError(
            f"{_where(adapter)} adapts module {job.module!r} with an update of shape {list(job.shape)}, but "
            f"the base model {base.ref} has {job.weight} {list(meta.shape)}. The adapter was trained on another "
            "base model; give that one."
        )


def plan_modules(adapters: Sequence[LoraAdapter], base: Checkpoint | None = None) -> list[ModuleJob]:
    """One job per module in the union of the adapters' modules (headers only, no data read).

    Raises:
        PlanError: Two adapters give one module different shapes or layouts, an adapter carries
            ``modules_to_save`` tensors, or (with ``base``) a module the base lacks or shapes differ.
    """
    for ad in adapters:
        if ad.saved:
            raise PlanError(
                f"{_where(ad)} also stores full tensors (modules_to_save: {', '.join(sorted(ad.saved)[:5])}), "
                "which update-level merging does not handle. Merge it densely as BASE+ADAPTER instead."
            )
    names = sorted({m for ad in adapters for m in ad.modules})
    jobs = []
    for name in names:
        sources = tuple(i for i, ad in enumerate(adapters) if name in ad.modules)
        first = adapters[sources[0]].modules[name]
        for i in sources[1:]:
            other = adapters[i].modules[name]
            if other.shape != first.shape or other.transpose != first.transpose:
                raise PlanError(
                    f"Module {name!r}: {_where(adapters[sources[0]])} gives an update of shape "
                    f"{list(first.shape)}, {_where(adapters[i])} {list(other.shape)}"
                    f"{' (and another layout)' if other.shape == first.shape else ''}. The adapters were "
                    "trained on different base models; merge adapters of one base."
                )
        job = ModuleJob(name, f"{name}.weight", first.shape, sources, first.transpose, first.pair.embedding)
        if base is not None:
            _check_base(job, adapters[sources[0]], base)
        jobs.append(job)
    if base is not None:
        order = {n: i for i, n in enumerate(base.tensors())}
        jobs.sort(key=lambda j: order[j.weight])
    return jobs


def open_all(
    adapters: Sequence[str | Path | LoraAdapter], base: str | Path | Checkpoint | None, allow_pickle: bool
) -> tuple[list[LoraAdapter], Checkpoint | None, list[LoraAdapter | Checkpoint]]:
    """Open what was given as paths; returns (adapters, base, what to close)."""
    opened: list[LoraAdapter | Checkpoint] = []
    try:
        ads = []
        for a in adapters:
            if not isinstance(a, LoraAdapter):
                a = open_adapter(a, allow_pickle=allow_pickle)
                opened.append(a)
            ads.append(a)
        ck = base
        if base is not None and not isinstance(base, Checkpoint):
            ck = open_checkpoint(base, allow_pickle=allow_pickle)
            opened.append(ck)
    except BaseException:
        for o in opened:
            o.close()
        raise
    return ads, ck if isinstance(ck, Checkpoint) else None, opened


def tensor_method(method: str) -> TensorMethod:
    """The registered data-free method ``method``.

    Raises:
        ConfigError: an unknown name (one of PEFT's combination types points to ``combine_adapters``),
            or a data-aware method.
    """
    try:
        info = get_method(method)
    except ConfigError:
        if method not in COMBINATION_TYPES:
            raise
        raise ConfigError(
            f"{method!r} is one of PEFT's add_weighted_adapter combination types, not a merge method: use "
            f"unimerge.lora.combine_adapters({method!r}, ...) or `combination_type: {method}` in a config "
            "(docs/lora.md)."
        ) from None
    if isinstance(info, ModelMethod):
        raise ConfigError(
            f"Method {info.name!r} is data-aware: it runs the models on data, which adapter merging does not "
            "do. Pick a data-free method (`unimerge methods` lists them with their data needs)."
        )
    return info


@dataclass(frozen=True)
class Request:
    """What to produce: ``output``, its size, and where and how to write it."""

    output: Output
    rank: int | None
    energy: float | None
    out_dir: Path | None
    force: bool
    dtype: torch.dtype | None
    shard_size: int


def check_request(req: Request, base: object) -> None:
    """Refuse a request that cannot be met (before any file is opened).

    Raises:
        ConfigError, MergeError: naming the bad value and the fix.
    """
    if req.output not in ("dense", "peft_lora"):
        raise ConfigError(f"output must be 'dense' or 'peft_lora', got {req.output!r}.")
    if req.rank is not None and req.energy is not None:
        raise ConfigError("Give a rank or an energy for the adapter output, not both.")
    if (req.rank is not None or req.energy is not None) and req.output != "peft_lora":
        raise ConfigError(
            "rank and energy set the rank of an adapter output: use them with output='peft_lora'."
        )
    if req.rank is not None and req.rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {req.rank}.")
    if req.energy is not None and not 0.0 < req.energy <= 1.0:
        raise ConfigError(
            f"energy is the fraction of squared singular values kept, in (0, 1]; got {req.energy}."
        )
    if req.out_dir is not None and req.out_dir.exists() and not req.force:
        raise exists_error(req.out_dir)
    if req.output == "dense" and req.out_dir is not None and base is None:
        raise ConfigError(
            "A dense output folder is base + merged update, so it needs the base model: pass base=... "
            "(`base_model:`), or ask for output peft_lora to write an adapter without it."
        )


def write_dense(
    out_dir: Path,
    base: Checkpoint,
    jobs: Sequence[ModuleJob],
    delta: Callable[[ModuleJob], Tensor],
    method: str,
    req: Request,
) -> None:
    """``base + delta(job)`` for adapted tensors, the base's other tensors copied, one at a time."""
    by_weight = {j.weight: j for j in jobs}
    dtype = req.dtype
    outs = [OutTensor(n, m.shape, dtype if dtype is not None and m.dtype.is_floating_point else m.dtype)
            for n, m in base.tensors().items()]  # fmt: skip
    with ShardedWriter(
        out_dir, outs, max_shard_bytes=req.shard_size, force=req.force, metadata={"unimerge_method": method}
    ) as writer:
        for spec in outs:
            w = base.read(spec.name)
            job = by_weight.get(spec.name)
            if job is not None:
                w = w.float().add_(delta(job))
            writer.write(spec.name, w.to(spec.dtype))
        updates = {"torch_dtype": str(dtype).removeprefix("torch.")} if dtype is not None else {}
        write_model_files(writer, base.root, base.root, updates)
        writer.commit()


def reporting(
    step: Callable[[ModuleJob], T], total: int, progress: ModuleProgress | None
) -> Callable[[ModuleJob], T]:
    """``step``, calling ``progress(k, total)`` as its ``k``-th call returns (``step`` itself without ``progress``)."""
    if progress is None:
        return step
    done = 0

    def reported(job: ModuleJob) -> T:
        nonlocal done
        value = step(job)
        done += 1
        progress(done, total)
        return value

    return reported
