"""Streaming RegMean and Fisher merges: tensor by tensor from the checkpoints and the sidecars.

The statistics pass (:mod:`unimerge.datamerge.sidecars`) leaves one sidecar per expert; this pass
then reads, for each output tensor, that tensor from every expert and from every sidecar (one tensor
at a time, through :func:`unimerge.io.open_checkpoint`), merges it with the same per-tensor code the
in-memory methods use (:func:`~unimerge.modelmerge.regmean.regmean_state_dict` around
:func:`~unimerge.modelmerge.regmean.regmean_merge`, :func:`~unimerge.modelmerge.fisher.fisher_state_dict`
around :func:`~unimerge.modelmerge.fisher.fisher_merge`) and writes it with
:class:`~unimerge.io.ShardedWriter` (temporary folder, renamed into place when complete).

As the methods document: RegMean solves its closed form for each linear weight and averages every
other tensor (biases, embeddings, norms); Fisher merging weights each tensor by the experts' Fishers
(per-model ``weight`` scales expert ``i``'s Fisher) and takes the weighted average of tensors without
one. Tensors equal in every expert (frozen embeddings) are copied from the first, and tensors outside
the merged body (a base checkpoint's own head, buffers) are copied from the base. With Fisher's
``normalize``, a first pass computes each expert's Fisher norm over the tensors the experts disagree
on, as the in-memory method does. Memory is one tensor per expert and sidecar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel
from torch import Tensor

from unimerge.datamerge.models import ModelRef
from unimerge.io import Checkpoint, OutTensor, ShardedWriter, open_checkpoint
from unimerge.io.writer import write_model_files
from unimerge.modelmerge.fisher import fisher_state_dict
from unimerge.modelmerge.regmean import regmean_state_dict
from unimerge.modelmerge.stats import varying_names

__all__ = ["OutEntry", "OutputFiles", "StreamInputs", "layout", "merge_one", "stream_merge"]

Report = Callable[[str, int, int], None]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class OutEntry:
    """One output tensor: its name (the base checkpoint's naming) and the body key merged into it
    (``None``: copied from the base)."""

    name: str
    key: str | None
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class StreamInputs:
    """What the merge pass reads: experts (with body key -> checkpoint name maps), sidecars, the base."""

    method: str  # "regmean" or "fisher"
    params: BaseModel
    weights: list[float]
    experts: list[ModelRef]
    maps: list[dict[str, str | None]]
    sidecars: list[Path]
    base: ModelRef
    entries: list[OutEntry]


@dataclass(frozen=True)
class OutputFiles:
    """The non-tensor files of the output folder."""

    meta_root: Path  # config.json, generation config, tokenizer (the base's folder)
    tokenizer_root: Path
    config_yaml: str
    readme: str
    dtype: str | None  # written into config.json's torch_dtype when set


def layout(
    base: ModelRef,
    base_map: Mapping[str, str | None],
    body: Mapping[str, Tensor],
    prefix: str,
    dtype: str | None,
) -> list[OutEntry]:
    """The output tensors: the base checkpoint's, in its order and naming, with the body merged
    (body tensors the base lacks are added, named like the base's others)."""
    metas = base.checkpoint.tensors()
    key_of = {n: k for k, n in base_map.items() if n is not None}
    prefixed = bool(prefix) and sum(n != k for n, k in key_of.items()) > len(key_of) / 2
    out_dtype = _DTYPES.get(dtype or "")

    def cast(d: torch.dtype) -> torch.dtype:
        return out_dtype if out_dtype is not None and d.is_floating_point else d

    entries = [OutEntry(n, key_of.get(n), tuple(m.shape), cast(m.dtype)) for n, m in metas.items()]
    for k, n in base_map.items():
        if n is None:
            name = f"{prefix}.{k}" if prefixed else k
            entries.append(OutEntry(name, k, tuple(body[k].shape), cast(body[k].dtype)))
    return entries


def merge_one(
    method: str,
    params: BaseModel,
    key: str,
    xs: Sequence[Tensor],
    stats: Sequence[Tensor | None],
    weights: Sequence[float],
) -> Tensor:
    """One tensor merged from the experts' values ``xs`` and their statistics (``None``: none)."""
    experts = [{key: x} for x in xs]
    given = [s for s in stats if s is not None]
    use = bool(varying_names(experts)) and len(given) == len(stats)
    per: list[dict[str, Tensor]] = [{key: s} for s in given] if use else [{} for _ in stats]
    if method == "regmean":
        return regmean_state_dict(experts, per, getattr(params, "alpha", 1.0))[key]
    return fisher_state_dict(experts, per, list(weights), getattr(params, "eps", 1e-6))[key]


def _read(ck: Checkpoint, name: str) -> Tensor | None:
    return ck.read(name) if name in ck.tensors() else None


def _expert_tensors(inp: StreamInputs, key: str) -> list[Tensor]:
    """Body tensor ``key`` of every expert, as stored."""
    return [m.checkpoint.read(str(mp[key])) for m, mp in zip(inp.experts, inp.maps, strict=True)]


def _fisher_norms(inp: StreamInputs, stats: Sequence[Checkpoint], report: Report | None) -> list[float]:
    """Each expert's Fisher L2 norm over the tensors the experts disagree on (Fisher's ``normalize``)."""
    sums = [0.0] * len(inp.experts)
    keys = list(inp.maps[0])
    for j, key in enumerate(keys):
        xs = _expert_tensors(inp, key)
        if varying_names([{key: x} for x in xs]):
            for i, ck in enumerate(stats):
                f = _read(ck, key)
                sums[i] += float(f.double().pow(2).sum()) if f is not None else 0.0
        if report:
            report("Fisher norms", j + 1, len(keys))
    return [math.sqrt(s) for s in sums]


def _tensor(
    inp: StreamInputs, e: OutEntry, stats: Sequence[Checkpoint], norms: Sequence[float] | None
) -> Tensor:
    if e.key is None:
        return inp.base.checkpoint.read(e.name)
    xs = _expert_tensors(inp, e.key)
    st = [_read(ck, e.key) for ck in stats]
    if norms is not None:
        st = [s / n if s is not None and n > 0 else s for s, n in zip(st, norms, strict=True)]
    return merge_one(inp.method, inp.params, e.key, xs, st, inp.weights)


def _write_files(writer: ShardedWriter, files: OutputFiles) -> None:
    updates = {"torch_dtype": files.dtype} if files.dtype else {}
    write_model_files(writer, files.meta_root, files.tokenizer_root, updates)
    writer.write_text("unimerge_config.yaml", files.config_yaml)
    writer.write_text("README.md", files.readme)


def stream_merge(
    inp: StreamInputs,
    out_dir: Path,
    files: OutputFiles,
    *,
    shard_bytes: int,
    force: bool,
    report: Report | None = None,
) -> tuple[int, int]:
    """Merge and write every output tensor; returns (tensors, bytes written)."""
    outs = [OutTensor(e.name, e.shape, e.dtype) for e in inp.entries]
    stats = [open_checkpoint(str(p)) for p in inp.sidecars]
    try:
        norms = _fisher_norms(inp, stats, report) if getattr(inp.params, "normalize", False) else None
        with ShardedWriter(
            out_dir, outs, max_shard_bytes=shard_bytes, force=force, metadata={"unimerge_method": inp.method}
        ) as writer:
            for i, e in enumerate(inp.entries):
                writer.write(e.name, _tensor(inp, e, stats, norms).to(e.dtype))
                if report:
                    report(f"merging ({inp.method})", i + 1, len(inp.entries))
            _write_files(writer, files)
            writer.commit()
    finally:
        for ck in stats:
            ck.close()
    return len(outs), sum(o.nbytes for o in outs)
