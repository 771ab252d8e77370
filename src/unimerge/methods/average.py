"""Weighted averaging of whole models: mergekit's ``linear`` (a uniform or weighted model soup).

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time" (https://arxiv.org/abs/2203.05482). Semantics follow mergekit's
``mergekit/merge_methods/linear.py``: ``sum_i w_i theta_i``, divided by ``sum_i w_i`` when
``normalize`` (the default).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from unimerge.errors import ConfigError
from unimerge.methods.primitives import weighted_sum
from unimerge.methods.registry import register_method

__all__ = ["LinearParams", "linear"]


class LinearParams(BaseModel):
    """Global parameters of ``linear``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    normalize: bool = Field(default=True, description="Divide by the sum of the weights.")


@register_method(
    "linear",
    params=LinearParams,
    family="average",
    needs_base=False,
    paper="https://arxiv.org/abs/2203.05482",
    inputs="tensors",
)
def linear(
    x: Tensor,
    params: LinearParams,
    per_model: Mapping[str, Tensor],
    *,
    base: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Linear: weighted average of the models' tensors (model soup).

    Args:
        x: the models' tensors ``(n, *shape)``.
        params: ``normalize`` divides by ``sum_i w_i``.
        per_model: ``weight`` ``(n,)``.

    Raises:
        ConfigError: ``normalize`` is on and the weights sum to zero.
    """
    w = per_model["weight"]  # (n,)
    merged = weighted_sum(x, w, out=x[0])  # (*shape); x is ours to overwrite
    if not params.normalize:
        return merged
    total = float(w.sum())
    if total == 0.0:
        raise ConfigError(
            f"linear: the model weights {w.tolist()} sum to 0, so they cannot be normalised; "
            "change the weights or set `normalize: false`."
        )
    return merged.div_(total)
