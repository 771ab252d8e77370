"""The search config: a merge config's models and ``data:`` plus a ``search:`` section.

```yaml
base_model: ./base
models:
  - {model: ./expert-a}
  - {model: ./expert-b}
data: {files: [a.jsonl, b.jsonl], budget: 64}   # training examples of data-aware methods (optional)
search:
  methods:
    - ties                                        # its registered grid, as ranges
    - {name: task_arithmetic, params: {lambda: [0.1, 1.5]}}
  per_model: {weight: [0.5, 1.5]}                 # each model's weight searched on its own
  budget: 24
  strategy: tpe                                   # grid | random | cma | tpe
  objective: mean                                 # mean | min | weighted (task_weights)
  seed: 0
  validation: [a-val.jsonl, b-val.jsonl]          # scored per trial (or a suite's val split)
  test: [a-test.jsonl, b-test.jsonl]              # scored once, for the chosen trial
```

Every trial is an ordinary merge config (:func:`unimerge.tune.evaluate.trial_config`), so the
chosen one is written as a config ``unimerge merge`` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from unimerge.config import DataSpec, ModelSpec, check_data_path, read_yaml
from unimerge.errors import ConfigError, describe_invalid
from unimerge.methods import get_method

__all__ = ["MethodChoice", "SearchConfig", "SearchSpec", "load_search_config", "parse_search_config"]

_DOCS = "docs/search.md"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MethodChoice(_Strict):
    """One method of the space; ``params`` name -> ``[low, high]`` (a range of a number),
    a list of choices (a ``Literal`` or ``bool``), ``{values: [...]}`` (numbers to pick from) or a
    scalar (fixed). Without ``params`` the method's registered grid spans its space."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return get_method(v).name  # ConfigError (a ValueError): unknown, with 'did you mean'


def _check_files(files: list[str] | None, info: ValidationInfo) -> list[str] | None:
    for rel in files or []:
        check_data_path(rel, (info.context or {}).get("config_dir"))
    return files


class SearchSpec(_Strict):
    """The ``search:`` section."""

    methods: list[MethodChoice] = Field(min_length=1)
    budget: int = Field(ge=1, le=100_000, description="Trials to run (merges plus evaluations).")
    strategy: Literal["grid", "random", "cma", "tpe"] = "random"
    objective: Literal["mean", "min", "weighted"] = "mean"
    task_weights: dict[str, float] | None = Field(
        default=None, description="Task name -> weight of `objective: weighted` (unlisted tasks: 1)."
    )
    per_model: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="Per-model parameter -> [low, high], searched for each model."
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    batch: int = Field(default=4, ge=1, le=1024, description="Trials proposed together (CMA-ES: >= 2).")
    validation: list[str] | None = Field(default=None, min_length=1)
    test: list[str] | None = Field(default=None, min_length=1)
    merge: Literal["memory", "stream", "auto"] = Field(
        default="auto",
        description="How a trial merges causal LMs: in memory (every model held), stream (the streaming "
        "engine writes the merge to a temporary folder, then it is loaded: only one model held), auto "
        "(stream when the models take more than a quarter of this machine's memory).",
    )

    @field_validator("methods", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        return [{"name": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @field_validator("validation", "test")
    @classmethod
    def _safe(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        return _check_files(v, info)

    @model_validator(mode="after")
    def _weights(self) -> SearchSpec:
        if self.objective == "weighted" and not self.task_weights:
            raise ValueError("`objective: weighted` needs `task_weights: {task: weight, ...}`")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"a method is listed twice in search.methods ({names}); list each once")
        return self


class SearchConfig(_Strict):
    """A validated search config (see the module docstring)."""

    base_model: str = Field(min_length=1)
    models: list[ModelSpec] = Field(min_length=1)
    data: DataSpec | None = None
    search: SearchSpec
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="Seed of random merge methods.")
    tokenizer_source: str | None = None

    @model_validator(mode="after")
    def _eval_data(self) -> SearchConfig:
        spec, n = self.search, len(self.models)
        for key, files in (("validation", spec.validation), ("test", spec.test)):
            if files is not None and len(files) != n:
                raise ValueError(f"search.{key} lists {len(files)} files for {n} models; give one per model")
        suite = self.data is not None and self.data.suite is not None
        if not suite and (spec.validation is None or spec.test is None):
            raise ValueError(
                "the search needs labelled evaluation data: `search.validation` and `search.test` (one "
                "JSONL file per model, each line {text, label}), or `data: {suite: NAME}` (its val and "
                "test splits)"
            )
        if self.data is not None and self.data.files is not None and len(self.data.files) != n:
            raise ValueError(
                f"data.files lists {len(self.data.files)} files for {n} models; give one per model"
            )
        return self


def parse_search_config(data: Any, path: Path | None = None) -> SearchConfig:
    """Validate a search config mapping; ``path`` is its file (relative data paths resolve there).

    Raises:
        ConfigError: one paragraph naming the file, the key and the fix.
    """
    where = f"{path}: " if path else ""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}expected a mapping with `models:` and `search:`, got {type(data).__name__}."
        )
    if "merge_method" in data or "parameters" in data:
        raise ConfigError(
            f"{where}a search config names its methods in `search.methods` (with their parameter ranges), "
            "not `merge_method:` / `parameters:`; move them there (see docs/search.md)."
        )
    try:
        context = {"config_dir": path.resolve().parent if path else None}
        return SearchConfig.model_validate(data, context=context)
    except ValidationError as err:
        raise ConfigError(describe_invalid(err, where, "search config", _DOCS)) from None


def load_search_config(path: str | Path) -> SearchConfig:
    """Read (safe YAML) and validate a search config file."""
    return parse_search_config(read_yaml(path), Path(path))
