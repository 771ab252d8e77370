"""The ``align:`` section of a merge config: permute the models into one basis before merging.

Read by :mod:`unimerge.config` (validation) and run by :mod:`unimerge.align.run`::

    merge_method: linear
    models:
      - {model: ./a, parameters: {weight: 0.5}}
      - {model: ./b, parameters: {weight: 0.5}}
    align: {method: weight_matching, reference: ./a, seed: 0}

Only weight matching (data-free) runs from a config; activation matching needs data and is in the
Python API (:func:`unimerge.align.activation_matching`).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["AlignInputs", "AlignSpec", "check_align"]

ALIGN_METHODS = ("weight_matching",)


class AlignInputs(BaseModel):
    """Inputs the aligned models are run on to check each still computes what it did: a random
    float tensor of ``shape`` (vision models), or ``text`` tokenized by the reference's tokenizer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: list[int] | None = Field(
        default=None,
        min_length=1,
        max_length=6,
        description="Shape of one random float input, e.g. `[1, 3, 32, 32]`.",
    )
    text: str | None = Field(
        default=None,
        min_length=1,
        max_length=10_000,
        description="Text tokenized by the reference's tokenizer.",
    )

    @field_validator("shape")
    @classmethod
    def _sizes(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and not all(1 <= d <= 4096 for d in v):
            raise ValueError(f"every size of `shape` must be in [1, 4096], got {v}")
        return v

    @model_validator(mode="after")
    def _one(self) -> AlignInputs:
        if (self.shape is None) == (self.text is None):
            raise ValueError("give exactly one of `shape: [1, 3, 32, 32]` (float inputs) or `text: ...`")
        return self


class AlignSpec(BaseModel):
    """``align:``: which models move into whose basis, and how the permutations are found."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field(default="weight_matching", description="Only `weight_matching` runs from a config.")
    reference: str | None = Field(
        default=None,
        min_length=1,
        description="Model whose basis the others join (default: base, else first).",
    )
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="Seeds weight matching's group order.")
    max_sweeps: int = Field(default=100, ge=1, le=10_000, description="Coordinate-descent sweeps at most.")
    inputs: AlignInputs | None = Field(
        default=None, description="Inputs for the function check (default: random token ids)."
    )

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v == "activation_matching":
            raise ValueError(
                "activation_matching needs data and runs only in Python "
                "(unimerge.align.align_models(..., method='activation', batches=...)); use "
                "`method: weight_matching` in a config (data-free)"
            )
        if v not in ALIGN_METHODS:
            raise ValueError(f"unknown alignment method {v!r}; use `weight_matching`")
        return v


def check_align(
    spec: AlignSpec, refs: Sequence[str], base: str | None, *, slices: bool, data_aware: bool, adapters: bool
) -> None:
    """Raise ``ValueError`` when ``align:`` cannot run with the rest of the config.

    Args:
        spec: the ``align:`` section.
        refs: every model reference of the config (``models:`` entries and the base), as written.
        base: ``base_model``, if any.
        slices: the config uses ``slices:``.
        data_aware: the method is data-aware.
        adapters: the config merges PEFT adapters (an ``output:`` section or a ``BASE+ADAPTER`` ref).
    """
    if slices:
        raise ValueError(
            "`align:` works with `models:` only: `slices:` stack layers taken from different positions, "
            "which alignment (layer i of each model onto layer i of the reference) does not match; use `models:`"
        )
    if data_aware:
        raise ValueError(
            "`align:` runs before data-free methods only (the data-aware engine loads the models itself); "
            "align in Python with unimerge.align.align_models and merge the aligned models"
        )
    if adapters:
        raise ValueError(
            "`align:` permutes whole models and cannot align PEFT adapters (`output:` or BASE+ADAPTER); "
            "merge each adapter into its base first (a full model folder), then align those"
        )
    if spec.reference is not None and spec.reference not in refs:
        raise ValueError(
            f"align.reference {spec.reference!r} is not one of the config's models {list(refs)}; "
            "write it exactly as under `models:` or `base_model:`"
            + (f" (default: the base, {base!r})" if base else " (default: the first model)")
        )
