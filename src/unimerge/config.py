"""Merge configuration: unimerge's YAML, which is mergekit's YAML.

A mergekit file is accepted unchanged::

    merge_method: ties
    base_model: ./base
    models:
      - model: ./expert-a
        parameters: {weight: 1.0, density: [1.0, 0.5, 0.2]}   # a gradient over layers
      - model: ./base+./lora-b                                 # a PEFT adapter applied on a base
        parameters:
          weight: [{filter: self_attn, value: 0.5}, {value: 1.0}]
    parameters: {normalize: true, lambda: 1.0}
    dtype: bfloat16

Parameter values follow mergekit's rules (:func:`evaluate_setting`): a scalar; a list of numbers,
interpolated linearly over the layer position ``t`` in [0, 1]; or a list of ``{filter, value}``
conditions, the first whose ``filter`` is a substring of the tensor name wins (no filter matches all).
The method name and every parameter value are checked against the registry when the file is read.

A data-aware method (``regmean``, ``fisher``, ``wemoe``, ...: a ``ModelMethod`` in the registry) needs a
``data:`` section (:class:`DataSpec`) naming where its examples come from; a data-free method refuses
one. See :mod:`unimerge.datamerge` for how such a merge runs::

    merge_method: regmean
    base_model: ./base
    models:
      - {model: ./expert-a, task: rt_sentiment}
      - {model: ./expert-b, task: autos_electronics}
    data: {suite: quick, budget: 64}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from unimerge.alignconfig import AlignInputs, AlignSpec, check_align
from unimerge.core import validate_params
from unimerge.data import SUITES
from unimerge.errors import ConfigError, describe_invalid
from unimerge.methods import Method, MethodInfo, ModelMethod, get_method
from unimerge.vocab import ModelTokenSource, TokenizerSpec, TokenSpec, ZeroSource

__all__ = [
    "AlignInputs",
    "AlignSpec",
    "DataSpec",
    "MergeConfig",
    "ModelSpec",
    "ModelTokenSource",
    "OutputSpec",
    "SliceSpec",
    "SourceSpec",
    "TokenSpec",
    "TokenizerSpec",
    "ZeroSource",
    "check_data_path",
    "evaluate_setting",
    "dump_config",
    "load_config",
    "method_params",
    "read_yaml",
]

DType = Literal["float32", "float16", "bfloat16"]
_DTYPE_ALIASES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "half": "float16",
    "float": "float32",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """One input model and its per-model parameters.

    ``task`` (data-aware merges only) names the task whose data this model's statistics are computed
    on: a task of ``data.suite``, or a display name for the model's ``data.files`` entry.
    """

    model: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    task: str | None = Field(default=None, min_length=1)


def check_data_path(rel: str, config_dir: Path | None = None) -> Path:
    """``rel`` resolved against ``config_dir`` (default: the working folder), refusing escapes.

    Raises:
        ValueError: ``rel`` is absolute, climbs out with ``..``, or (when the file exists) resolves
            through a link to a place outside ``config_dir``; or, with ``config_dir`` given, is missing.
    """
    p = Path(rel)
    fix = "give a path relative to the config file's folder, inside it (copy or link the data there)"
    if p.is_absolute() or ".." in p.parts or not str(rel).strip():
        raise ValueError(f"data file {rel!r} is outside the config file's folder; {fix}")
    root = (config_dir or Path.cwd()).resolve()
    full = (root / p).resolve()
    if not full.is_relative_to(root):
        raise ValueError(f"data file {rel!r} resolves to {full}, outside {root}; {fix}")
    if config_dir is not None and not full.is_file():
        raise ValueError(f"data file {rel!r} not found in {root}; check the path (relative to the config)")
    return full


class DataSpec(_Strict):
    """Where a data-aware merge draws its examples from (the ``data:`` section).

    Exactly one source: ``suite`` (a benchmark suite's *train* split per task, see
    ``unimerge bench``) or ``files`` (one JSONL file per merged model, in order; each line an object
    with ``text``, optionally ``text_pair`` and an integer ``label``; paths relative to the config
    file's folder and inside it).
    """

    suite: str | None = Field(default=None, min_length=1)
    files: list[str] | None = Field(default=None, min_length=1)
    budget: int = Field(default=64, ge=1, le=1_000_000, description="Examples per task.")
    batch_size: int | None = Field(
        default=None, ge=1, le=4096, description="Examples per forward pass (the method's `batch_size`)."
    )
    max_length: int | None = Field(
        default=None, ge=2, le=32768, description="Tokens per example (default: the suite's, or 128)."
    )
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Sampling seed (default: `seed`).")

    @field_validator("suite")
    @classmethod
    def _known_suite(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v not in SUITES:
            raise ValueError(f"unknown suite {v!r}; use one of {sorted(SUITES)} or give `files:`")
        return v

    @field_validator("files")
    @classmethod
    def _safe_paths(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        ctx = info.context or {}
        for rel in v or []:
            check_data_path(rel, ctx.get("config_dir"))
        return v

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.suite is None) == (self.files is None):
            raise ValueError(
                "give exactly one data source: `suite: NAME` (a benchmark suite's train splits) or "
                "`files: [one JSONL file per model]`"
            )
        return self

    def task_names(self) -> list[str]:
        """The suite's task names, in order (``[]`` for ``files``)."""
        if self.suite is None:
            return []
        return [t.dataset for t in SUITES[self.suite].tasks]


class SourceSpec(ModelSpec):
    """One source of a slice: a model and the half-open layer range taken from it."""

    layer_range: tuple[int, int]

    @field_validator("layer_range")
    @classmethod
    def _range_ok(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class SliceSpec(_Strict):
    """A run of output layers built from one or more sources with equally long layer ranges.

    ``parameters`` (mergekit's slice-level settings) take precedence over the config's ``parameters:``
    for this slice's tensors.
    """

    sources: list[SourceSpec] = Field(min_length=1)
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="Method parameters for this slice's tensors, taking precedence over the config's "
        "`parameters:` (mergekit's slice-level settings).",
    )

    @model_validator(mode="after")
    def _same_length(self) -> SliceSpec:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(
                f"all sources of a slice must span the same number of layers, got {sorted(lengths)}"
            )
        return self


class OutputSpec(_Strict):
    """``output:`` of a merge of PEFT LoRA adapters (:mod:`unimerge.lora`): a dense model (base + merged
    update) or a PEFT adapter, re-factorised to ``rank`` or to keep ``energy`` of each update."""

    format: Literal["dense", "peft_lora"] = "dense"
    rank: int | None = Field(default=None, ge=1, le=1_000_000, description="Rank of every output module.")
    energy: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Fraction of squared singular values kept per module."
    )

    @model_validator(mode="after")
    def _one_size(self) -> OutputSpec:
        if self.rank is not None and self.energy is not None:
            raise ValueError("give `rank` or `energy`, not both")
        if self.format == "dense" and (self.rank is not None or self.energy is not None):
            raise ValueError("`rank` and `energy` size an adapter output: use them with `format: peft_lora`")
        return self


class MergeConfig(_Strict):
    """A validated merge configuration (mergekit-compatible)."""

    merge_method: str
    models: list[ModelSpec] | None = None
    slices: list[SliceSpec] | None = None
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: str | None = Field(default=None, min_length=1)
    tokenizer: TokenizerSpec | None = None
    name: str | None = None  # mergekit allows a name; kept for the model card
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    data: DataSpec | None = None
    output: OutputSpec | None = None  # merges of PEFT adapters only (unimerge.lora)
    align: AlignSpec | None = None  # permute the models into one basis first (unimerge.align.run)

    @field_validator("dtype", "out_dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: Any) -> Any:
        return _DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return get_method(v).name  # raises ConfigError (a ValueError) with 'did you mean'

    @model_validator(mode="after")
    def _check(self) -> MergeConfig:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of `models:` or `slices:`")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give `tokenizer_source:` or a `tokenizer:` section, not both (as mergekit)")
        info = self.method
        if info.needs_base and self.base_model is None and self.output is None:  # adapters: task vectors
            raise ValueError(f"method {info.name!r} needs `base_model:`")
        if self.align is not None:
            refs = list(dict.fromkeys([*self.expert_refs(), *([self.base_model] if self.base_model else [])]))
            adapters = self.output is not None or any("+" in r for r in refs)
            check_align(self.align, refs, self.base_model, slices=self.slices is not None,
                        data_aware=isinstance(info, ModelMethod), adapters=adapters)  # fmt: skip
        if isinstance(info, ModelMethod) or self.data is not None:
            _check_data(self)
            return self
        if any(m.task is not None for m in self.model_specs()):
            raise ValueError("`task:` on a model is only used by data-aware methods (with a `data:` section)")
        _validate_settings(info, self.parameters, [m.parameters for m in self.model_specs()])
        for sl in self.slices or []:
            if sl.parameters:
                _validate_settings(
                    info, {**self.parameters, **sl.parameters}, [s.parameters for s in sl.sources]
                )
        return self

    def vocabulary(self) -> TokenizerSpec | None:
        """The output vocabulary asked for (``tokenizer:``, or ``tokenizer_source:`` as its ``source``);
        ``None``: the base's tokenizer files are copied and every model must share its vocabulary."""
        if self.tokenizer_source is not None:
            return TokenizerSpec(source=self.tokenizer_source)
        return self.tokenizer

    @property
    def method(self) -> Method:
        """The registered method (a :class:`~unimerge.methods.TensorMethod` or a data-aware
        :class:`~unimerge.methods.ModelMethod`)."""
        return get_method(self.merge_method)

    def model_specs(self) -> list[ModelSpec]:
        """Every model entry: ``models`` or all slice sources, in order."""
        if self.models is not None:
            return list(self.models)
        return [s for sl in self.slices or [] for s in sl.sources]

    def expert_refs(self) -> list[str]:
        """Distinct expert model references in order of first appearance."""
        return list(dict.fromkeys(m.model for m in self.model_specs()))

    def merged_specs(self) -> list[ModelSpec]:
        """The merged models: ``models`` without the base when the method takes the base separately."""
        info = self.method
        return [m for m in self.model_specs() if not (info.uses_base and m.model == self.base_model)]


def _check_data(cfg: MergeConfig) -> None:
    """A data-aware method has a usable ``data:`` section, and only a data-aware method has one."""
    info, data = cfg.method, cfg.data
    if not isinstance(info, ModelMethod):
        raise ValueError(
            f"`data:` is only for data-aware methods, and {info.name!r} is data-free; remove the `data:` "
            "section (or pick a data-aware method: `unimerge methods` lists them with their data needs)"
        )
    if info.data == "none":
        raise ValueError(
            f"method {info.name!r} builds one model per task (a MergedModel with per-task modules), which "
            "`unimerge merge` cannot write as one Hugging Face folder; run it in Python on a MergeProblem "
            f"(unimerge.modelmerge) or benchmark it: `unimerge bench --methods {info.name}`"
        )
    if cfg.tokenizer is not None or cfg.tokenizer_source == "union":
        raise ValueError(
            f"method {info.name!r} runs the models on tokenised data, so they must share one tokenizer: "
            "`tokenizer_source: union` and a `tokenizer:` section are for data-free methods only"
        )
    if data is None:
        raise ValueError(
            f"method {info.name!r} needs {info.data} examples: add a `data:` section with `suite: NAME` "
            "(a benchmark suite's train splits) or `files: [one JSONL file per model]`, e.g. "
            "`data: {suite: quick, budget: 64}` (see docs/data-aware.md)"
        )
    if cfg.models is None:
        raise ValueError(f"method {info.name!r} merges whole models: use `models:`, not `slices:`")
    specs = cfg.merged_specs()
    if not specs:
        raise ValueError(f"method {info.name!r} has no models to merge besides the base model")
    if data.files is not None and len(data.files) != len(specs):
        raise ValueError(
            f"data.files lists {len(data.files)} files but {len(specs)} models are merged; give one file "
            "per model (the base model excluded), in the order of `models:`"
        )
    known = data.task_names()
    for i, m in enumerate(specs):
        if known and m.task is not None and m.task not in known:
            raise ValueError(f"models[{i}].task {m.task!r} is not a task of suite {data.suite!r} ({known})")
    for i, m in enumerate(specs):
        if any(not isinstance(v, (bool, int, float, str)) for v in m.parameters.values()):
            raise ValueError(f"models[{i}]: data-aware methods take plain per-model values (no gradients)")
    validate_params(info, _with_batch_size(cfg), [m.parameters for m in specs])


def _with_batch_size(cfg: MergeConfig) -> dict[str, Any]:
    """The method's global parameters, with ``data.batch_size`` as its ``batch_size`` when it has one."""
    raw = dict(cfg.parameters)
    size = cfg.data.batch_size if cfg.data is not None else None
    if size is None or "batch_size" not in cfg.method.params.model_fields:
        return raw
    if "batch_size" in raw and raw["batch_size"] != size:
        raise ConfigError(
            f"batch_size is set twice ({raw['batch_size']} in `parameters:`, {size} in `data:`); keep one"
        )
    return {**raw, "batch_size": size}


def method_params(cfg: MergeConfig) -> tuple[BaseModel, list[BaseModel]]:
    """Validated global and per-model parameters of a data-aware config (``data.batch_size`` folded in)."""
    return validate_params(cfg.method, _with_batch_size(cfg), [m.parameters for m in cfg.merged_specs()])


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """Resolve a parameter setting for one tensor at layer position ``t`` in [0, 1] (mergekit rules)."""
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return setting
    if isinstance(setting, list) and setting and all(isinstance(e, (int, float)) for e in setting):
        if len(setting) == 1:
            return setting[0]
        scaled = t * (len(setting) - 1)
        i0 = min(int(math.floor(scaled)), len(setting) - 1)
        i1 = min(i0 + 1, len(setting) - 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    if isinstance(setting, list) and all(isinstance(e, dict) for e in setting):
        for cond in setting:
            flt = cond.get("filter")
            if not flt or flt == "*" or flt in tensor_name:  # mergekit: "*" matches every tensor
                return evaluate_setting(cond.get("value"), tensor_name, t)
        return None
    raise ConfigError(
        f"Cannot read parameter value {setting!r}: use a number, a list of numbers (a gradient over "
        "layers) or a list of {filter, value} entries."
    )


def _leaves(setting: Any) -> list[Any]:
    """All values a setting can take (for validation at parse time)."""
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        for cond in setting:
            extra = set(cond) - {"filter", "value"}
            if extra or "value" not in cond:
                raise ConfigError(
                    f"A filtered parameter entry needs keys `filter` and `value`, got {cond!r}."
                )
        return [leaf for cond in setting for leaf in _leaves(cond["value"])]
    if isinstance(setting, list):
        if not setting:
            raise ConfigError("A parameter gradient must list at least one value.")
        return list(setting)
    return [setting]


def _validate_settings(info: MethodInfo, global_raw: dict[str, Any], per_model: list[dict[str, Any]]) -> None:
    """Validate every value every setting can take, one field at a time."""
    first_g = {k: _leaves(v)[0] for k, v in global_raw.items()}
    first_m = [{k: _leaves(v)[0] for k, v in raw.items()} for raw in per_model]
    validate_params(info, first_g, first_m)
    for key, value in global_raw.items():
        for leaf in _leaves(value)[1:]:
            validate_params(info, {**first_g, key: leaf}, first_m)
    for i, raw in enumerate(per_model):
        for key, value in raw.items():
            for leaf in _leaves(value)[1:]:
                models = [dict(m) for m in first_m]
                models[i][key] = leaf
                validate_params(info, first_g, models)


def parse_config(data: Any, path: Path | None = None) -> MergeConfig:
    """Validate a config mapping (already parsed from YAML); ``path`` is the file it came from
    (``data.files`` are resolved against its folder, else against the working folder)."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path or 'config'}: expected a mapping with `merge_method`, got {type(data).__name__}."
        )
    try:
        context = {"config_dir": path.resolve().parent if path else None}
        return MergeConfig.model_validate(data, context=context)
    except ValidationError as err:
        raise ConfigError(
            describe_invalid(err, f"{path}: " if path else "", "merge config", "docs/config-reference.md")
        ) from None


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a YAML config (safe loading); errors name the file and the key."""
    return parse_config(read_yaml(path), Path(path))


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path`` (safe loading), not validated.

    Raises:
        ConfigError: no such file, or not YAML.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file {p} does not exist.")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None


def dump_config(cfg: MergeConfig) -> str:
    """``cfg`` as YAML with only what was set (written next to a merge's output)."""
    dump = cfg.model_dump(exclude_none=True, exclude_defaults=True)
    dump["merge_method"] = cfg.merge_method
    return yaml.safe_dump(dump, sort_keys=False)
