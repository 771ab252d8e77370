"""Planning: (config, checkpoint headers) -> one job per output tensor.

Every check happens here, before any tensor data is read: inputs exist and are readable, tensor
names agree (what is missing/extra per model), shapes agree (vocabulary sizes named), architectures
agree, method parameters validate for every tensor, and the output folder is not inside an input.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel

from unimerge.config import MergeConfig, ModelSpec, SourceSpec, evaluate_setting
from unimerge.core import validate_params
from unimerge.errors import ConfigError, PlanError
from unimerge.io import Checkpoint, TensorMeta, check_output_outside, open_checkpoint, resolve_ref
from unimerge.methods import MethodInfo, TensorMethod, get_method
from unimerge.plancheck import check_architectures, check_model_count, check_names, check_shapes
from unimerge.vocab import RowMap, VocabPlan, plan_vocabulary

__all__ = ["MergePlan", "Source", "TensorJob", "layer_index", "make_plan"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_Spec = TypeVar("_Spec", bound=ModelSpec)  # a model or a slice source
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Methods without a separate base that mergekit gives an unlisted `base_model` as one more input, and the
# per-model parameters the global `parameters:` must then set (mergekit requires them of every input).
_BASE_JOINS_WITH: dict[str, tuple[str, ...]] = {"karcher": (), "linear": ("weight",)}


MIN_BUDGET = 512 * 2**20  # the smallest default byte budget of jobs in flight


@dataclass(frozen=True)
class Source:
    """Tensor ``name`` of checkpoint ``model`` (an index into :attr:`MergePlan.checkpoints`)."""

    model: int
    name: str


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: where its inputs come from and the parameters resolved for it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    sources: tuple[Source, ...]
    base: Source | None
    params: BaseModel
    per_model: tuple[BaseModel, ...]
    rows: RowMap | None = None  # a vocabulary tensor gathered into the output vocabulary first

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def working_bytes(self) -> int:
        """Working set of the job: its stacked inputs, the base, the output and two scratch tensors."""
        itemsize = 8 if self.dtype == torch.float64 else 4
        return (len(self.sources) + 4) * self.numel * itemsize


@dataclass
class MergePlan:
    """Everything needed to run a merge, computed from headers only."""

    config: MergeConfig
    method: TensorMethod
    checkpoints: list[Checkpoint]
    base: int | None
    jobs: list[TensorJob]
    meta_root: Path
    tokenizer_root: Path
    num_layers_out: int | None = None
    warnings: list[str] = field(default_factory=list)
    vocabulary: VocabPlan | None = None  # `tokenizer_source:` / `tokenizer:`: the output vocabulary
    config_dir: Path | None = None  # where the config's relative paths resolve (a worker re-plans from it)

    def summary(self, memory_budget: int | None = None) -> dict[str, Any]:
        """Tensors, bytes to read and write, and an estimate of peak memory in bytes: the byte budget
        of jobs in flight (default :meth:`default_budget`) plus 300 MB for the process itself."""
        metas = [ck.tensors() for ck in self.checkpoints]
        read = sum(self.bytes_read(j, metas) for j in self.jobs)
        write = sum(j.numel * j.dtype.itemsize for j in self.jobs)
        peak = (memory_budget or self.default_budget()) + 300 * 2**20
        return {"tensors": len(self.jobs), "bytes_read": read, "bytes_written": write, "peak_memory": peak}

    def default_budget(self) -> int:
        """Bytes of jobs in flight a merge allows by default: the largest job's working set, at least
        :data:`MIN_BUDGET` (so the largest tensor is merged alone)."""
        return max([MIN_BUDGET, *(j.working_bytes for j in self.jobs)])

    def bytes_read(self, job: TensorJob, metas: Sequence[Mapping[str, TensorMeta]] | None = None) -> int:
        """Bytes ``job`` reads from its inputs (``metas``: every checkpoint's headers, if at hand)."""
        metas = metas if metas is not None else [ck.tensors() for ck in self.checkpoints]
        return sum(metas[s.model][s.name].nbytes for s in (*job.sources, *filter(None, [job.base])))


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _position(name: str, n_layers: int) -> float:
    """mergekit 0.1.5's ``t`` for gradients: ``layer / (n_layers - 1)`` (1 for a single layer) inside the
    layer stack, 0 for every tensor outside it.

    mergekit plans the tensors before the layers (embeddings) and after them (final norm, ``lm_head``)
    with the module's ``ConfigReader(t=0)`` (``mergekit/plan.py::plan_module``), so a gradient such as
    ``t: [0, 0.5, 1]`` gives them its first value, not its last.
    """
    idx = layer_index(name)
    if idx is not None:
        return idx / (n_layers - 1) if n_layers > 1 else 1.0
    return 0.0


def _before_layers(name: str) -> bool:
    """A tensor read from the first slice's sources (embeddings); the others outside the layers come from
    the last slice's."""
    return "embed" in name or name.endswith(("wte.weight", "wpe.weight"))


def _first_set(scopes: Sequence[Mapping[str, Any]], key: str, name: str, t: float) -> Any:
    """The first non-``None`` value of setting ``key`` over ``scopes`` (highest precedence first)."""
    for sc in scopes:
        if key in sc and (value := evaluate_setting(sc[key], name, t)) is not None:
            return value
    return None


class _Params:
    """Resolve + validate parameters per tensor, caching by resolved values."""

    def __init__(
        self,
        config: MergeConfig,
        scope: Mapping[str, Any] | None = None,
        cache: dict[str, tuple[BaseModel, tuple[BaseModel, ...]]] | None = None,
    ) -> None:
        self.info = config.method
        self.config = config
        self.scope = scope or {}
        self._cache: dict[str, tuple[BaseModel, tuple[BaseModel, ...]]] = {} if cache is None else cache

    def for_slice(self, parameters: Mapping[str, Any]) -> _Params:
        """The resolver inside a slice: its ``parameters:`` take precedence over the config's."""
        return _Params(self.config, parameters, self._cache)

    def __call__(
        self, name: str, t: float, specs: Sequence[ModelSpec], inputs: Sequence[str] | None = None
    ) -> tuple[BaseModel, tuple[BaseModel, ...]]:
        """Global parameters for output tensor ``name``, each model's for its input tensor ``inputs[i]``
        (``name`` by default): in ``slices:`` a source's filters see its own layer numbers, as in mergekit.
        A global setting is looked up in the slice's ``parameters:``, then the config's; one whose filters
        match nothing falls through to the next, as mergekit resolves them.
        """
        names = list(inputs) if inputs is not None else [name] * len(specs)
        scopes = [self.scope, self.config.parameters]
        g = {k: _first_set(scopes, k, name, t) for k in dict.fromkeys(k for sc in scopes for k in sc)}
        m = [
            {k: evaluate_setting(v, n, t) for k, v in s.parameters.items()}
            for s, n in zip(specs, names, strict=True)
        ]
        g = {k: v for k, v in g.items() if v is not None}
        m = [{k: v for k, v in d.items() if v is not None} for d in m]
        key = repr((sorted(g.items()), [sorted(d.items()) for d in m]))
        if key not in self._cache:
            p, pm = validate_params(self.info, g, m)
            self._cache[key] = (p, tuple(pm))
        return self._cache[key]


def _out_dtype(config: MergeConfig, meta: TensorMeta) -> torch.dtype:
    name = config.out_dtype or config.dtype
    return _DTYPES[name] if name and meta.dtype.is_floating_point else meta.dtype


def make_plan(
    config: MergeConfig, out_dir: Path, *, config_dir: Path | None = None, allow_pickle: bool = False
) -> MergePlan:
    """Open every input's headers, check everything, and lay out one job per output tensor."""
    info = get_method(config.merge_method, TensorMethod)  # a data-aware method has no tensor plan
    refs = config.expert_refs()
    all_refs = list(dict.fromkeys(([config.base_model] if config.base_model else []) + refs))
    resolved = [resolve_ref(r, config_dir) for r in all_refs]
    cks = [open_checkpoint(r, allow_pickle=allow_pickle) for r in resolved]
    index = {r: i for i, r in enumerate(all_refs)}
    base = index[config.base_model] if config.base_model else None
    check_output_outside(out_dir, [ck.ref for ck in cks])
    check_architectures(all_refs, cks)
    meta_root = cks[base if base is not None else 0].root
    spec = config.vocabulary()
    vocab = plan_vocabulary(spec, cks, all_refs, base, config_dir) if spec is not None else None
    free = vocab.names if vocab is not None else frozenset()
    plan = MergePlan(
        config, info, cks, base, [], meta_root, meta_root, vocabulary=vocab, config_dir=config_dir
    )
    if config.models is not None:
        plan.jobs = _model_jobs(config, cks, index, base, plan.warnings, free)
    else:
        plan.jobs, plan.num_layers_out = _slice_jobs(config, cks, index, base, free)
    if vocab is not None:
        plan.jobs = [_gathered(j, vocab) for j in plan.jobs]
        plan.warnings.extend(vocab.warnings)
    if info.needs_base and base is None:
        raise ConfigError(f"Method {info.name!r} needs `base_model:`.")
    check_model_count(info, [(j.name, len(j.sources)) for j in plan.jobs])
    return plan


def _gathered(job: TensorJob, vocab: VocabPlan) -> TensorJob:
    """``job`` with its inputs gathered into the output vocabulary, when it is a vocabulary tensor."""
    if job.name not in vocab.names:
        return job
    models = tuple(dict.fromkeys(s.model for s in (*job.sources, *([job.base] if job.base else []))))
    rows = vocab.row_map(models)
    return replace(job, shape=(rows.size, *job.shape[1:]), rows=rows)


def _merged_models(info: MethodInfo, specs: Sequence[_Spec], base_ref: str | None) -> list[_Spec]:
    """The models that are stacked as ``x``: the base is excluded when the method takes it separately."""
    keep = [s for s in specs if not (info.uses_base and s.model == base_ref)]
    if not keep:
        raise ConfigError(f"Method {info.name!r} has no models to merge besides the base model.")
    return keep


def _with_unlisted_base(
    info: MethodInfo, config: MergeConfig, specs: list[ModelSpec], warnings: list[str]
) -> list[ModelSpec]:
    """``specs`` plus the base model where mergekit 0.1.5 merges a ``base_model`` missing from ``models:``.

    mergekit adds such a base as one more input ("Base model specified but not in input models -
    adding") with the global ``parameters:`` as its per-model ones. That succeeds for ``karcher`` (no
    per-model parameters) and for ``linear`` when the global section sets ``weight``; otherwise mergekit
    stops (a missing ``weight``, or a second input to ``passthrough``), and here the base is left out,
    as before. Methods that take a separate base never get it among the merged models.
    """
    base = config.base_model
    required = _BASE_JOINS_WITH.get(info.name)
    if base is None or required is None or any(s.model == base for s in specs):
        return specs
    if not set(required) <= set(config.parameters):
        return specs
    warnings.append(
        f"base_model {base!r} is not among `models:`: merged as one more model with the global `parameters:`, "
        f"as mergekit does ({info.name!r} takes no separate base)"
    )
    return [*specs, ModelSpec(model=base)]


def _model_jobs(
    config: MergeConfig,
    cks: list[Checkpoint],
    index: dict[str, int],
    base: int | None,
    warnings: list[str],
    free: Collection[str] = (),
) -> list[TensorJob]:
    info = config.method
    specs = _with_unlisted_base(
        info, config, _merged_models(info, config.models or [], config.base_model), warnings
    )
    used = sorted({index[s.model] for s in specs} | ({base} if base is not None else set()))
    metas = [cks[i].tensors() for i in range(len(cks))]
    ref_idx = base if base is not None else index[specs[0].model]
    refs = [cks[i].ref for i in used]
    partial, notes = _partial_buffers(refs, [metas[i] for i in used], used.index(ref_idx))
    warnings.extend(notes)
    check_names(
        refs, [{k: v for k, v in metas[i].items() if k not in partial} for i in used], used.index(ref_idx)
    )
    n_layers = 1 + max((layer_index(n) or 0 for n in metas[ref_idx]), default=0)
    resolve = _Params(config)
    check_shapes(
        [(name, [(cks[i].ref, metas[i][name]) for i in used if name in metas[i]]) for name in metas[ref_idx]],
        free,
    )
    jobs = []
    for name, meta in metas[ref_idx].items():
        p, pm = resolve(name, _position(name, n_layers), specs)
        if name in partial:  # an integer buffer only some models store: the reference's copy
            srcs: tuple[Source, ...] = (Source(ref_idx, name),)
            b = None
        else:
            srcs = tuple(Source(index[s.model], name) for s in specs)
            b = Source(base, name) if base is not None and info.uses_base else None
        jobs.append(TensorJob(name, meta.shape, _out_dtype(config, meta), srcs, b, p, pm))
    return jobs


def _partial_buffers(
    refs: Sequence[str], metas: Sequence[dict[str, TensorMeta]], ref_idx: int
) -> tuple[set[str], list[str]]:
    """Integer tensors that only some models store, and a note on each.

    Such buffers are not weights: BERT's ``embeddings.position_ids`` (``arange``) is in older saves
    and not in newer ones, and a merge takes integer tensors from one model anyway. So the reference
    model's (the base, else the first model's) copy is written, and one the reference lacks is left
    out. A floating-point tensor missing anywhere stays an error (see :func:`~unimerge.plancheck.check_names`).
    """
    names = {n for m in metas for n in m}
    partial = {
        n
        for n in names
        if any(n not in m for m in metas) and not any(m[n].dtype.is_floating_point for m in metas if n in m)
    }
    notes = []
    for n in sorted(partial):
        lacking = [r for r, m in zip(refs, metas, strict=True) if n not in m]
        if n in metas[ref_idx]:
            notes.append(f"integer buffer {n!r} is missing from {lacking}; written from {refs[ref_idx]}")
        else:
            notes.append(f"integer buffer {n!r} is not in {refs[ref_idx]} (the reference model); left out")
    return partial, notes


def _slice_jobs(
    config: MergeConfig,
    cks: list[Checkpoint],
    index: dict[str, int],
    base: int | None,
    free: Collection[str] = (),
) -> tuple[list[TensorJob], int]:
    """mergekit ``slices:``: output layers are the slices' layers renumbered in order."""
    info = config.method
    slices = config.slices or []
    jobs: list[TensorJob] = []
    resolve = _Params(config)
    offset = 0
    for k, sl in enumerate(slices):
        specs = _merged_models(info, sl.sources, config.base_model)
        base_src = next((s for s in sl.sources if s.model == config.base_model), None)
        if info.uses_base and base_src is None:
            raise ConfigError(
                f"slices[{k}]: method {info.name!r} needs the base model among the slice's sources."
            )
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        scoped = resolve.for_slice(sl.parameters)
        if k == 0:
            jobs += _edge_jobs(config, cks, index, specs, base_src, pre=True, resolve=scoped, free=free)
        for i in range(length):
            t = i / (length - 1) if length > 1 else 1.0
            jobs += _layer_jobs(config, cks, index, specs, base_src, i, offset + i, t, scoped)
        offset += length
        if k == len(slices) - 1:
            jobs += _edge_jobs(config, cks, index, specs, base_src, pre=False, resolve=scoped, free=free)
    return jobs, offset


def _layer_names(ck: Checkpoint, layer: int) -> dict[str, str]:
    """suffix -> name for the tensors of one layer."""
    out = {}
    for name in ck.tensors():
        m = _LAYER.search(name)
        if m is not None and int(m.group(1)) == layer:
            out[name[: m.start(1)] + "{}" + name[m.end(1) :]] = name
    return out


def _layer_jobs(
    config: MergeConfig,
    cks: list[Checkpoint],
    index: dict[str, int],
    specs: Sequence[SourceSpec],
    base_src: SourceSpec | None,
    i: int,
    out_layer: int,
    t: float,
    resolve: _Params,
) -> list[TensorJob]:
    info = config.method
    per_src = [(s, _layer_names(cks[index[s.model]], s.layer_range[0] + i)) for s in specs]
    if base_src is not None and info.uses_base:
        per_src_base = _layer_names(cks[index[base_src.model]], base_src.layer_range[0] + i)
    first_spec, first = per_src[0]
    if not first:
        raise PlanError(
            f"{first_spec.model} has no layer {first_spec.layer_range[0] + i} (layer_range too long)."
        )
    jobs = []
    for pattern, name in first.items():
        srcs = []
        for s, names in per_src:
            if pattern not in names:
                raise PlanError(
                    f"{s.model} layer {s.layer_range[0] + i} has no tensor {pattern.format('N')!r}."
                )
            srcs.append(Source(index[s.model], names[pattern]))
        metas = [(cks[src.model].ref, cks[src.model].tensors()[src.name]) for src in srcs]
        b = (
            Source(index[base_src.model], per_src_base[pattern])
            if base_src is not None and info.uses_base
            else None
        )
        if b is not None:
            metas.append((cks[b.model].ref, cks[b.model].tensors()[b.name]))
        check_shapes([(name, metas)])
        p, pm = resolve(pattern.format(out_layer), t, specs, [src.name for src in srcs])
        jobs.append(
            TensorJob(
                pattern.format(out_layer),
                metas[0][1].shape,
                _out_dtype(config, metas[0][1]),
                tuple(srcs),
                b,
                p,
                pm,
            )
        )
    return jobs


def _edge_jobs(
    config: MergeConfig,
    cks: list[Checkpoint],
    index: dict[str, int],
    specs: Sequence[SourceSpec],
    base_src: SourceSpec | None,
    *,
    pre: bool,
    resolve: _Params,
    free: Collection[str] = (),
) -> list[TensorJob]:
    """Non-layer tensors: embeddings from the first slice's sources, the rest from the last slice's."""
    info = config.method
    ref = cks[index[specs[0].model]]
    jobs = []
    for name, meta in ref.tensors().items():
        if layer_index(name) is not None or _before_layers(name) != pre:
            continue
        srcs = tuple(Source(index[s.model], name) for s in specs)
        b = Source(index[base_src.model], name) if base_src is not None and info.uses_base else None
        found = [(cks[s.model].ref, cks[s.model].tensors().get(name)) for s in (*srcs, *filter(None, [b]))]
        entries = [(r, m) for r, m in found if m is not None]
        if len(entries) < len(found):
            raise PlanError(f"Tensor {name!r} is missing from {[r for r, m in found if m is None]}.")
        check_shapes([(name, entries)], free)
        p, pm = resolve(name, 0.0, specs)  # t = 0 outside the layers, as mergekit (see _position)
        jobs.append(TensorJob(name, meta.shape, _out_dtype(config, meta), srcs, b, p, pm))
    return jobs
