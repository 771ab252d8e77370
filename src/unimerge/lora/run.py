"""Configs whose models are PEFT LoRA adapters: run (:func:`run_adapter_merge`) and checked
(:func:`check_adapter_merge`, what ``unimerge validate`` prints) the same way.

A config is an adapter merge when a model is a folder with ``adapter_config.json``, when it has an
``output:`` section (:class:`~unimerge.config.OutputSpec`), or when it names one of PEFT's
combination types. With ``merge_method:`` any registered data-free method merges the updates
(:func:`~unimerge.lora.merge.merge_adapters`)::

    merge_method: ties
    models:
      - {model: ./lora-math, parameters: {weight: 1.0, density: 0.5}}
      - {model: ./lora-code, parameters: {weight: 0.7, density: 0.5}}
    parameters: {lambda: 1.0}
    output: {format: peft_lora, rank: 16}     # or {format: dense} with base_model: ./base

With ``combination_type:`` in place of ``merge_method:`` it is PEFT's ``add_weighted_adapter``
(:func:`~unimerge.lora.weighted.combine_adapters`, :class:`CombineConfig`)::

    combination_type: ties_svd
    models:
      - {model: ./lora-math, parameters: {weight: 1.0}}
      - {model: ./lora-code, parameters: {weight: 0.7}}
    parameters: {density: 0.5, svd_rank: 16}
    output: {format: peft_lora}                 # or {format: dense} with base_model: ./base

Parameter values are plain numbers here (per-layer gradients and filters are for whole models).

The routing lives here, above :mod:`unimerge.execute` (which must not import this package); the
public :func:`unimerge.run_merge` / :func:`unimerge.check_merge` (:mod:`unimerge.api`) and the CLI
send adapter configs here and every other config to the streaming engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from unimerge.config import DType, MergeConfig, ModelSpec, OutputSpec, parse_config, read_yaml
from unimerge.core import split_params, validate_params
from unimerge.errors import ConfigError, describe_invalid
from unimerge.io.resolve import check_output_outside, resolve_ref
from unimerge.lora.adapter import LoraAdapter
from unimerge.lora.combine import check_combination
from unimerge.lora.merge import LINEAR_IN_UPDATES, LoraMergeResult, merge_adapters, on_weights
from unimerge.lora.plan import (
    ModuleJob,
    ModuleProgress,
    Request,
    check_request,
    open_all,
    plan_modules,
    tensor_method,
)
from unimerge.lora.svd import check_rank
from unimerge.lora.weighted import (
    CombineParams,
    CombineResult,
    check_module_ranks,
    combine_adapters,
    new_rank,
    resolved_type,
)
from unimerge.options import Check, MergeResult, Progress, RunOptions

__all__ = [
    "CombineConfig",
    "check_adapter_merge",
    "is_adapter_config",
    "load_adapter_config",
    "run_adapter_merge",
]

ConfigLike = MergeConfig | str | Path | Mapping[str, Any]
_SHOWN_MODULES = 40  # rows of `unimerge validate`'s module plan


class CombineConfig(BaseModel):
    """A config running PEFT's ``add_weighted_adapter``: ``combination_type:`` in place of ``merge_method:``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    combination_type: str
    models: list[ModelSpec] = Field(min_length=1)
    base_model: str | None = None
    parameters: CombineParams = CombineParams()
    output: OutputSpec = OutputSpec(format="peft_lora")
    dtype: DType | None = None
    out_dtype: DType | None = None
    name: str | None = None
    seed: int = Field(default=0, ge=0, le=2**63 - 1)

    @model_validator(mode="after")
    def _check(self) -> CombineConfig:
        check_combination(self.combination_type, len(self.models), len(self.models), 1.0)
        kind = resolved_type(self.combination_type, len(self.models))
        check_combination(kind, len(self.models), len(self.models), self.parameters.density)
        if self.output.rank is not None or self.output.energy is not None:
            raise ValueError(
                "PEFT's combination types size the new adapter themselves: give `parameters: {svd_rank: R}` "
                "(the *svd types) instead of `output: {rank/energy}`"
            )
        for i, m in enumerate(self.models):
            if m.task is not None:
                raise ValueError(f"models[{i}].task: `task:` is for data-aware merges, not PEFT combinations")
            extra = sorted(set(m.parameters) - {"weight"})
            if extra or not isinstance(m.parameters.get("weight", 1.0), (int, float)):
                raise ValueError(
                    f"models[{i}].parameters: a PEFT combination takes one number per adapter, `weight` "
                    f"(got {m.parameters}); put {', '.join(extra) or 'options'} under the global `parameters:`"
                )
        return self

    def weights(self) -> list[float]:
        """One weight per adapter (default 1)."""
        return [float(m.parameters.get("weight", 1.0)) for m in self.models]


AdapterConfig = MergeConfig | CombineConfig


def _parse(data: Any, path: Path | None) -> AdapterConfig:
    if isinstance(data, dict) and "combination_type" in data:
        if "merge_method" in data:
            raise ConfigError(
                f"{path or 'config'}: give `merge_method:` (a registered method on the updates) or "
                "`combination_type:` (PEFT's add_weighted_adapter), not both."
            )
        try:
            return CombineConfig.model_validate(data)
        except ValidationError as err:
            where = f"{path}: " if path else ""
            raise ConfigError(
                describe_invalid(err, where, "PEFT combination config", "docs/lora.md")
            ) from None
    return parse_config(data, path)


def load_adapter_config(config: ConfigLike) -> tuple[AdapterConfig, Path | None]:
    """``config`` parsed as a merge config or a PEFT combination config, and its folder (for a file)."""
    if isinstance(config, MergeConfig):
        return config, None
    if isinstance(config, (str, Path)):
        return _parse(read_yaml(config), Path(config)), Path(config).resolve().parent
    return _parse(dict(config), None), None


def _is_adapter(ref: str, config_dir: Path | None) -> bool:
    if "+" in ref:
        return False
    path = Path(ref).expanduser()
    if not path.is_absolute() and config_dir is not None and (config_dir / path).exists():
        path = config_dir / path
    return (path / "adapter_config.json").is_file()


def is_adapter_config(config: ConfigLike) -> bool:
    """Whether ``config`` merges PEFT adapters (``combination_type:``, ``output:``, or a model folder with
    ``adapter_config.json``)."""
    cfg, cdir = load_adapter_config(config)
    if isinstance(cfg, CombineConfig):
        return True
    return cfg.output is not None or any(_is_adapter(m.model, cdir) for m in cfg.model_specs())


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, (list, dict)):
        raise ConfigError(
            f"{where} is {value!r}: merges of adapters take plain values (per-layer gradients and filters are "
            "for whole models). Give one number."
        )
    return value


def _paths(
    specs: Sequence[ModelSpec], base_model: str | None, cdir: Path | None
) -> tuple[list[str], str | None]:
    """(adapter paths, base path); every model must be an adapter folder."""
    for i, m in enumerate(specs):
        if not _is_adapter(m.model, cdir):
            raise ConfigError(
                f"models[{i}] {m.model!r} is not a PEFT adapter folder (no adapter_config.json), but this config "
                "merges adapters (it has an adapter model, an `output:` section or a `combination_type:`). List "
                "only adapter folders under `models:` and the full model as `base_model:`."
            )
    adapters = [resolve_ref(m.model, cdir) for m in specs]
    return adapters, resolve_ref(base_model, cdir) if base_model is not None else None


def _checked(cfg: MergeConfig, cdir: Path | None) -> tuple[list[str], str | None, dict[str, Any]]:
    """(adapter paths, base path, method parameters with per-model lists) of an adapter config."""
    if cfg.slices is not None:
        raise ConfigError("A merge of adapters lists them under `models:`; `slices:` are for whole models.")
    if cfg.align is not None:
        raise ConfigError(
            "`align:` permutes whole models into one basis; adapters of one base share it already and are "
            "merged at the update level: remove `align:` (or merge BASE+ADAPTER models with it)."
        )
    if cfg.tokenizer is not None or cfg.tokenizer_source is not None:
        raise ConfigError(
            "A merge of adapters keeps the base's vocabulary: remove `tokenizer:`/`tokenizer_source:`."
        )
    specs = cfg.merged_specs()
    adapters, base = _paths(specs, cfg.base_model, cdir)
    params = {k: _plain(v, f"parameters.{k}") for k, v in cfg.parameters.items()}
    per_model_keys = sorted({k for m in specs for k in m.parameters})
    for key in per_model_keys:
        values = [m.parameters.get(key, params.get(key)) for m in specs]
        if any(v is None for v in values):
            raise ConfigError(
                f"Parameter {key!r} is set for some adapters only; set it for every adapter or globally."
            )
        params[key] = [_plain(v, f"models[{i}].parameters.{key}") for i, v in enumerate(values)]
    return adapters, base, params


def _dtype(cfg: AdapterConfig) -> torch.dtype | None:
    name = cfg.out_dtype or cfg.dtype
    return getattr(torch, name) if name else None


def _per_module(progress: Progress | None, what: str) -> ModuleProgress | None:
    """``progress(what, done, total)`` as the ``progress(done, total)`` of one adapter merge."""
    return (lambda done, total: progress(what, done, total)) if progress is not None else None


def _run(
    cfg: AdapterConfig, cdir: Path | None, out_dir: Path, options: RunOptions, progress: Progress | None
) -> LoraMergeResult | CombineResult:
    seed = cfg.seed if options.seed is None else options.seed
    what = "combine adapters" if isinstance(cfg, CombineConfig) else "merge adapters"
    common: dict[str, Any] = {"out": out_dir, "force": options.force, "dtype": _dtype(cfg), "allow_pickle": options.allow_pickle,
              "out_shard_size": options.out_shard_size, "progress": _per_module(progress, what)}  # fmt: skip
    if isinstance(cfg, CombineConfig):
        adapters, base = _paths(cfg.models, cfg.base_model, cdir)
        return combine_adapters(cfg.combination_type, adapters, cfg.weights(), **cfg.parameters.model_dump(),
                                seed=seed, base=base, output=cfg.output.format, **common)  # fmt: skip
    adapters, base, params = _checked(cfg, cdir)
    spec = cfg.output
    return merge_adapters(
        cfg.merge_method, adapters, base, rank=spec.rank if spec else None,
        energy=spec.energy if spec else None, output=spec.format if spec else "dense", seed=seed,
        method_params=params, **common,
    )  # fmt: skip


def _device_warnings(options: RunOptions) -> list[str]:
    return (
        []
        if options.device == "cpu"
        else [f"adapter merges run on the CPU (--device {options.device} ignored)"]
    )


def run_adapter_merge(
    config: ConfigLike,
    out_dir: str | Path,
    options: RunOptions = RunOptions(),
    progress: Progress | None = None,
) -> tuple[MergeResult, LoraMergeResult | CombineResult]:
    """Run an adapter config; writes a PEFT adapter or a dense Hugging Face folder to ``out_dir``.

    ``merge_method:`` configs run :func:`~unimerge.lora.merge.merge_adapters`, ``combination_type:``
    configs :func:`~unimerge.lora.weighted.combine_adapters`; ``progress`` is called as
    ``progress("merge adapters" or "combine adapters", done, total)`` as each module is finished.

    Raises:
        ConfigError, CheckpointError, PlanError: Bad input; nothing is written.
    """
    cfg, cdir = load_adapter_config(config)
    lora = _run(cfg, cdir, Path(out_dir), options, progress)
    files = sorted(Path(out_dir).glob("*.safetensors"))
    result = MergeResult(
        Path(out_dir), len(lora.modules), sum(f.stat().st_size for f in files), lora.seconds,
        _device_warnings(options),
    )  # fmt: skip
    return result, lora


# ------------------------------------------------------------------ unimerge validate: the plan, no data


def _module_rows(
    jobs: Sequence[ModuleJob], ads: Sequence[LoraAdapter], out_rank: dict[str, str]
) -> list[tuple[str, str]]:
    rows = []
    for job in jobs[:_SHOWN_MODULES]:
        ranks = " + ".join(
            str(ads[i].modules[job.module].rank) if i in job.sources else "-" for i in range(len(ads))
        )
        rows.append((job.module, f"{list(job.shape)}, ranks {ranks} -> {out_rank[job.module]}"))
    if len(jobs) > _SHOWN_MODULES:
        rows.append(("...", f"{len(jobs) - _SHOWN_MODULES} more modules"))
    return rows


def _input_rows(
    ads: Sequence[LoraAdapter], base: str | None, jobs: Sequence[ModuleJob]
) -> list[tuple[str, str]]:
    rows = []
    for ad in ads:
        ranks = sorted({m.rank for m in ad.modules.values()})
        shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        rows.append(("adapter", f"{ad.folder} ({len(ad.modules)} modules, rank {shown})"))
    if base is not None:
        rows.append(("base", base))
    every = sum(len(j.sources) == len(ads) for j in jobs)
    rows.append(("modules", f"{len(jobs)} ({every} in every adapter)"))
    return rows


def _merge_plan(
    cfg: MergeConfig,
    params: dict[str, Any],
    jobs: Sequence[ModuleJob],
    ads: Sequence[LoraAdapter],
    have_base: bool,
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """merge_adapters' checks from headers and parameters, and each module's output rank."""
    info = tensor_method(cfg.merge_method)
    on_weights(info, have_base)
    validate_params(info, *split_params(info, len(ads), params))
    head = [("method", f"{info.name} ({info.family}) on the updates dW = s B A")]
    spec = cfg.output or OutputSpec()
    if spec.format == "dense":
        return [*head, ("output", "dense: base + merged update")], {j.module: "dense" for j in jobs}
    if spec.rank is not None:
        for job in jobs:
            check_rank(spec.rank, job.module, job.shape)
        ranks = {j.module: str(spec.rank) for j in jobs}
        return [*head, ("output", f"peft_lora, truncated SVD to rank {spec.rank}")], ranks
    if cfg.merge_method in LINEAR_IN_UPDATES and spec.energy is None:
        ranks = {j.module: str(sum(ads[i].modules[j.module].rank for i in j.sources)) for j in jobs}
        return [*head, ("output", "peft_lora, exact: factors concatenated (rank = sum of the ranks)")], ranks
    how = (
        f"the fewest singular values holding {spec.energy} of |dW|^2" if spec.energy else "the numerical rank"
    )
    ranks = {j.module: f"<= {min(j.shape)}" for j in jobs}
    return [*head, ("output", f"peft_lora, truncated SVD to {how}")], ranks


def _combine_plan(
    cfg: CombineConfig, jobs: Sequence[ModuleJob], ads: Sequence[LoraAdapter]
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """combine_adapters' checks from headers, and each module's output rank."""
    kind = resolved_type(cfg.combination_type, len(ads))
    r = new_rank(kind, ads, cfg.parameters.svd_rank)
    check_module_ranks(kind, jobs, ads, r)
    if kind == "cat":
        ranks = {j.module: str(sum(ads[i].modules[j.module].rank for i in j.sources)) for j in jobs}
    else:
        ranks = {j.module: str(r) for j in jobs}
    head = [("method", f"PEFT add_weighted_adapter, combination_type {kind}"),
            ("output", f"{cfg.output.format}" + (f": new adapter r = lora_alpha = {r}" if cfg.output.format == "peft_lora" else ": base + combined update"))]  # fmt: skip
    return head, ranks


def check_adapter_merge(config: ConfigLike, out_dir: str | Path, options: RunOptions = RunOptions()) -> Check:
    """Every check :func:`run_adapter_merge` makes, from headers only, and the plan: modules, ranks, output rank.

    Raises:
        ConfigError, CheckpointError, PlanError: what the merge would raise.
    """
    cfg, cdir = load_adapter_config(config)
    out = Path(out_dir)
    params: dict[str, Any] = {}
    if isinstance(cfg, CombineConfig):
        paths, base = _paths(cfg.models, cfg.base_model, cdir)
    else:
        paths, base, params = _checked(cfg, cdir)
    fmt = cfg.output.format if cfg.output is not None else "dense"
    spec = cfg.output or OutputSpec()
    check_request(
        Request(fmt, spec.rank, spec.energy, out, options.force, _dtype(cfg), options.out_shard_size), base
    )
    ads, ck, opened = open_all(paths, base, options.allow_pickle)
    try:
        check_output_outside(out, [str(a.folder) for a in ads] + ([ck.ref] if ck is not None else []))
        jobs = plan_modules(ads, ck)
        if isinstance(cfg, CombineConfig):
            head, ranks = _combine_plan(cfg, jobs, ads)
        else:
            head, ranks = _merge_plan(cfg, params, jobs, ads, base is not None)
        rows = head + _input_rows(ads, base, jobs) + _module_rows(jobs, ads, ranks)
    finally:
        for o in opened:
            o.close()
    return Check(rows, _device_warnings(options))
