"""Passthrough: copy one model's tensor unchanged (optionally scaled).

mergekit's ``passthrough`` method (``mergekit/merge_methods/passthrough.py``), the building block of
layer-stacking "frankenmerges" (e.g. Goliath-120B), where each output slice takes its layers from
exactly one source model: https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from unimerge.errors import ConfigError
from unimerge.methods.registry import NoParams, register_method

__all__ = ["PassthroughModelParams", "passthrough"]


class PassthroughModelParams(BaseModel):
    """Per-model ``scale`` (mergekit's; unset = no scaling). ``weight`` is accepted and unused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    weight: float = Field(
        default=1.0, ge=-100.0, le=100.0, description="Accepted for mergekit configs; unused."
    )
    scale: float | None = Field(
        default=None, ge=-100.0, le=100.0, description="Multiply the copied tensor by this."
    )


@register_method(
    "passthrough",
    params=NoParams,
    model_params=PassthroughModelParams,
    family="layer",
    needs_base=False,
    inputs="tensors",
    paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    max_models=1,
)
def passthrough(
    x: Tensor,
    params: NoParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The single model's tensor, times its ``scale`` if set; more than one model is an error."""
    if x.shape[0] != 1:
        raise ConfigError(
            f"Method 'passthrough' copies one model's tensor, but {x.shape[0]} models contribute to it. "
            "Give each tensor (or each slice's layer range) exactly one source model, or pick a merging "
            "method such as linear."
        )
    scale = per_model.get("scale")
    return x[0] * scale[0].to(x.dtype) if scale is not None else x[0]
