"""mergekit-moe's YAML, read unchanged and checked before any weight is read.

The keys are mergekit 0.1.5's ``MoEMergeConfig`` (``mergekit/moe/config.py``): ``base_model``,
``experts`` (each ``source_model``, ``positive_prompts``, ``negative_prompts``, ``noise_scale``,
``residual_scale``), ``gate_mode``, ``dtype``, ``experts_per_token``, ``shared_experts`` and
``architecture``. Unknown keys are refused (mergekit ignores them, so a typo there goes unnoticed).
The checks of mergekit's ``is_bad_config`` are made here, as errors naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from unimerge.errors import ConfigError, describe_invalid

__all__ = ["RANDOM_MODES", "GateMode", "MoEConfig", "MoEExpert", "load_moe_config", "parse_moe_config"]

GateMode = Literal["hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random"]
RANDOM_MODES: tuple[GateMode, ...] = ("random", "uniform_random")


class MoEExpert(BaseModel, extra="forbid", frozen=True):
    """One dense model whose MLPs become one expert in every layer, with the prompts that route to it."""

    source_model: str = Field(min_length=1, description="Folder (or BASE+ADAPTER) of the expert model.")
    positive_prompts: list[str] | None = Field(
        default=None,
        description="Prompts that should be routed to this expert (needed unless gates are random).",
    )
    negative_prompts: list[str] | None = Field(
        default=None, description="Prompts whose hidden states are subtracted from the positive ones."
    )
    noise_scale: float | None = Field(
        default=None,
        ge=0.0,
        le=1e3,
        description="Add N(0, noise_scale^2) noise to this expert's MLP weights.",
    )
    residual_scale: float | None = Field(
        default=None,
        ge=-1e3,
        le=1e3,
        description="Multiply this expert's down_proj (its residual output) by this.",
    )


class MoEConfig(BaseModel, extra="forbid", frozen=True):
    """A mergekit-moe config: a base model's attention and embeddings, each expert's MLPs, a router."""

    base_model: str = Field(
        min_length=1, description="Model whose non-MLP weights, config and tokenizer are used."
    )
    experts: list[MoEExpert] = Field(min_length=1, max_length=1024, description="One entry per expert.")
    gate_mode: GateMode = Field(
        default="hidden",
        description="Router initialisation: hidden (= hidden_last) / hidden_avg (base model hidden states of the "
        "prompts: last token / mean over tokens), cheap_embed (token embeddings), random, uniform_random.",
    )
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = Field(
        default=None, description="Output dtype; default the base config's torch_dtype."
    )
    experts_per_token: int = Field(default=2, ge=1, le=1024, description="Experts used per token (top-k).")
    shared_experts: list[MoEExpert] | None = Field(
        default=None, description="Not supported by the Mixtral output; must be empty."
    )
    architecture: str | None = Field(default=None, description="Output architecture; only `mixtral`.")

    @field_validator("dtype", mode="before")
    @classmethod
    def _strip_torch(cls, value: Any) -> Any:
        return value.removeprefix("torch.") if isinstance(value, str) else value

    @field_validator("shared_experts")
    @classmethod
    def _no_shared(cls, value: list[MoEExpert] | None) -> list[MoEExpert] | None:
        if value:
            raise ValueError(
                "the Mixtral output has no shared experts (mergekit writes them only for DeepSeek/Qwen MoE "
                "outputs, which unimerge does not); remove `shared_experts`"
            )
        return value

    @field_validator("architecture")
    @classmethod
    def _mixtral_only(cls, value: str | None) -> str | None:
        if value is not None and not "mixtral".startswith(value.lower()):
            raise ValueError(
                f"output architecture {value!r} is not supported; use `mixtral` (or leave it out)"
            )
        return value

    @model_validator(mode="after")
    def _check_experts(self) -> MoEConfig:
        if len(self.experts) < self.experts_per_token:
            raise ValueError(
                f"experts_per_token is {self.experts_per_token} but there are only {len(self.experts)} experts; "
                "lower experts_per_token or add experts"
            )
        if self.gate_mode in RANDOM_MODES:
            return self
        for i, expert in enumerate(self.experts):
            if not expert.positive_prompts:
                raise ValueError(
                    f"experts[{i}] ({expert.source_model}) has no positive_prompts; gate_mode "
                    f"{self.gate_mode!r} builds the router from them (or use gate_mode: random)"
                )
        prompts = {(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in self.experts}
        if len(self.experts) > 1 and len(prompts) == 1:
            raise ValueError(
                "every expert has the same positive and negative prompts, so the router cannot tell them apart; "
                "give each expert prompts of what should be routed to it"
            )
        return self

    def refs(self) -> list[str]:
        """The base model then every expert's ``source_model``, as written."""
        return [self.base_model, *(e.source_model for e in self.experts)]


def parse_moe_config(data: Any, path: Path | None = None) -> MoEConfig:
    """Validate a parsed YAML mapping; ``path`` (the file it came from) is named in errors.

    Raises:
        ConfigError: naming the file, the key and the fix.
    """
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path or 'config'}: expected a mapping with `base_model` and `experts`, got {type(data).__name__}."
        )
    try:
        return MoEConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            describe_invalid(err, f"{path or 'config'}: ", "mergekit-moe config", "docs/moe.md")
        ) from None


def load_moe_config(path: str | Path) -> MoEConfig:
    """Read a mergekit-moe YAML file (``yaml.safe_load``) and validate it.

    Raises:
        ConfigError: the file is missing, not YAML, or not a valid config.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file {p} does not exist.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    return parse_moe_config(data, p)
