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
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from unimerge.core import validate_params
from unimerge.errors import ConfigError
from unimerge.methods import MethodInfo, get_method

__all__ = ["MergeConfig", "ModelSpec", "SliceSpec", "SourceSpec", "evaluate_setting", "load_config"]

DType = Literal["float32", "float16", "bfloat16"]
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """One input model and its per-model parameters."""

    model: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)


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
    """A run of output layers built from one or more sources with equally long layer ranges."""

    sources: list[SourceSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _same_length(self) -> SliceSpec:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(f"all sources of a slice must span the same number of layers, got {sorted(lengths)}")
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
    tokenizer_source: str | None = None
    name: str | None = None  # mergekit allows a name; kept for the model card
    seed: int = Field(default=0, ge=0, le=2**63 - 1)

    @field_validator("dtype", "out_dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: Any) -> Any:
        return _DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return get_method(v).name  # raises ConfigError (a ValueError) with 'did you mean'

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer_source(cls, v: str | None) -> str | None:
        if v in ("union", "model:union"):
            raise ValueError(
                "tokenizer_source: union (merging vocabularies) is not supported; use `base` or a model path, "
                "and merge only models that share a tokenizer"
            )
        return v

    @model_validator(mode="after")
    def _check(self) -> MergeConfig:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of `models:` or `slices:`")
        info = self.method
        if info.data != "none":
            raise ValueError(f"method {info.name!r} needs data; run it through `unimerge.modelmerge`")
        if info.needs_base and self.base_model is None:
            raise ValueError(f"method {info.name!r} needs `base_model:`")
        _validate_settings(info, self.parameters, [m.parameters for m in self.model_specs()])
        return self

    @property
    def method(self) -> MethodInfo:
        return get_method(self.merge_method)

    def model_specs(self) -> list[ModelSpec]:
        """Every model entry: ``models`` or all slice sources, in order."""
        if self.models is not None:
            return list(self.models)
        return [s for sl in self.slices or [] for s in sl.sources]

    def expert_refs(self) -> list[str]:
        """Distinct expert model references in order of first appearance."""
        return list(dict.fromkeys(m.model for m in self.model_specs()))


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
            if not flt or flt in tensor_name:
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
                raise ConfigError(f"A filtered parameter entry needs keys `filter` and `value`, got {cond!r}.")
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


def _locate(err: ValidationError, path: Path | None) -> str:
    where = f"{path}: " if path else ""
    msgs = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = str(e.get("ctx", {}).get("error", e["msg"])) if e["type"] == "value_error" else e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; see the README for the config format)"
        msgs.append(f"{loc}: {msg}" if loc else msg)
    return f"{where}invalid merge config: " + "; ".join(msgs)


def parse_config(data: Any, path: Path | None = None) -> MergeConfig:
    """Validate a config mapping (already parsed from YAML)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping with `merge_method`, got {type(data).__name__}.")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_locate(err, path)) from None


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a YAML config (safe loading); errors name the file and the key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file {p} does not exist.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    return parse_config(data, p)
