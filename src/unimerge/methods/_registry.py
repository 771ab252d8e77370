"""The one registry of merge methods.

A method is a pure function registered once with :func:`register_method`::

    @register_method("ties", params=TiesParams, model_params=DensityWeight, family="sparsify",
                     needs_base=True, paper="https://arxiv.org/abs/2306.01708",
                     grid={"lambda": (0.6, 0.8, 1.0, 1.2)})
    def ties(x, params, per_model, *, base, generator):
        ...

Every method has the same call signature (:class:`MergeFn`):

- ``x``: the stacked inputs, ``(n_models, *shape)`` float32. With ``inputs="deltas"`` (the default)
  these are task vectors ``expert - base`` and the engine adds ``base`` back to the result; with
  ``inputs="tensors"`` they are the raw expert tensors and the function returns the merged tensor.
- ``params``: the validated global parameters (an instance of ``params``).
- ``per_model``: per-model parameters stacked across models, name -> tensor ``(n_models,)``
  (always has ``"weight"``).
- ``base``: the base tensor (``None`` when the merge has no base model).
- ``generator``: a seeded :class:`torch.Generator` (per tensor) for random methods, else ``None``.

Third-party packages register through the ``unimerge.methods`` entry-point group: each entry point
names a module that calls :func:`register_method` on import.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from unimerge.errors import ConfigError

__all__ = [
    "MergeFn",
    "MethodInfo",
    "ModelWeight",
    "NoParams",
    "Prepare",
    "Registry",
    "get_method",
    "list_methods",
    "register_method",
]

Family = Literal[
    "average", "task_arithmetic", "sparsify", "geometric", "subspace", "mask", "optimise", "layer", "data", "moe"
]
DataNeeds = Literal["none", "unlabeled", "labeled"]
Inputs = Literal["deltas", "tensors", "problem"]  # "problem": data-aware, see unimerge.modelmerge
Scope = Literal["tensor", "model"]


class MergeFn(Protocol):
    """A data-free method on one tensor: ``x`` ``(n_models, *shape)`` -> merged ``(*shape)``.

    ``x`` is a fresh buffer the caller gives up (task vectors for ``inputs="deltas"``): the method
    may overwrite it instead of allocating a second ``(n_models, *shape)`` buffer.
    """

    def __call__(
        self,
        x: Tensor,
        params: Any,
        per_model: Mapping[str, Tensor],
        *,
        base: Tensor | None,
        generator: torch.Generator | None,
    ) -> Tensor: ...


class Prepare(Protocol):
    """Whole-model statistics pass of a ``scope="model"`` method.

    ``deltas()`` yields, for every tensor of the model, ``(name, x)`` with ``x`` as the method's ``fn``
    receives it (``(n_models, *shape)``); it may be called several times (each call streams the
    checkpoints again). Returns extra per-model entries merged into every tensor's ``per_model``.
    """

    def __call__(
        self, params: Any, per_model: Mapping[str, Tensor], deltas: Callable[[], Iterator[tuple[str, Tensor]]]
    ) -> dict[str, Tensor]: ...


class NoParams(BaseModel):
    """A method without global parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelWeight(BaseModel):
    """Per-model parameters of most methods: a weight (negative weights negate a task)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    weight: float = Field(default=1.0, ge=-100.0, le=100.0)


@dataclass(frozen=True)
class MethodInfo:
    """Everything the engine, the CLI and the benchmark need to know about a method."""

    name: str
    fn: MergeFn
    params: type[BaseModel]
    model_params: type[BaseModel]
    family: Family
    needs_base: bool
    paper: str
    inputs: Inputs = "deltas"
    data: DataNeeds = "none"
    random: bool = False
    scope: Scope = "tensor"
    grid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    summary: str = ""
    optional_base: bool = False
    prepare: Prepare | None = None

    @property
    def uses_base(self) -> bool:
        """Whether the base model is an input of its own (then it is not one of the merged models)."""
        return self.needs_base or self.optional_base

    def param_schema(self) -> dict[str, dict[str, Any]]:
        """name -> {type, default, scope} for global and per-model parameters."""
        out: dict[str, dict[str, Any]] = {}
        for scope, model in (("global", self.params), ("per_model", self.model_params)):
            for name, f in model.model_fields.items():
                key = f.alias or name
                ann = f.annotation
                out[key] = {
                    "type": getattr(ann, "__name__", str(ann)).replace("typing.", ""),
                    "default": None if f.is_required() else f.get_default(call_default_factory=True),
                    "scope": scope,
                }
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "needs_base": self.needs_base,
            "data": self.data,
            "paper": self.paper,
            "params": self.param_schema(),
            "random": self.random,
            "scope": self.scope,
            "summary": self.summary,
        }


class Registry:
    """Name -> :class:`MethodInfo`. A duplicate name is an error."""

    def __init__(self) -> None:
        self._methods: dict[str, MethodInfo] = {}
        self._plugins_loaded = False

    def add(self, info: MethodInfo) -> None:
        if info.name in self._methods:
            raise ValueError(f"merge method {info.name!r} is registered twice")
        self._methods[info.name] = info

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group="unimerge.methods"):
            ep.load()

    def get(self, name: str) -> MethodInfo:
        self._load_plugins()
        key = name.lower()
        if key in self._methods:
            return self._methods[key]
        close = difflib.get_close_matches(key, list(self._methods), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(
            f"Unknown merge method {name!r}.{hint} Run `unimerge methods` to list the {len(self._methods)} "
            "available methods."
        )

    def list(self, family: str | None = None, data: str | None = None) -> list[MethodInfo]:
        self._load_plugins()
        return sorted(
            (
                m
                for m in self._methods.values()
                if (family is None or m.family == family) and (data is None or m.data == data)
            ),
            key=lambda m: m.name,
        )


_REGISTRY = Registry()


def register_method(
    name: str,
    *,
    params: type[BaseModel] = NoParams,
    model_params: type[BaseModel] = ModelWeight,
    family: Family,
    needs_base: bool,
    paper: str,
    inputs: Inputs = "deltas",
    data: DataNeeds = "none",
    random: bool = False,
    scope: Scope = "tensor",
    grid: Mapping[str, tuple[Any, ...]] | None = None,
    optional_base: bool = False,
    prepare: Prepare | None = None,
    registry: Registry | None = None,
) -> Callable[[MergeFn], MergeFn]:
    """Decorator: register ``fn`` as merge method ``name`` (see the module docstring).

    ``grid`` is the documented hyperparameter grid the benchmark searches on validation data,
    keyed by parameter name as written in a config (per-model names set every model's value).
    ``optional_base``: the method uses a base when one is given (then, like with ``needs_base``,
    the base is not one of the merged models). ``prepare``: see :class:`Prepare` (``scope="model"``).
    """
    if "weight" not in model_params.model_fields:
        raise ValueError(f"{name}: model_params must define 'weight'")

    def deco(fn: MergeFn) -> MergeFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        (registry or _REGISTRY).add(
            MethodInfo(
                name=name,
                fn=fn,
                params=params,
                model_params=model_params,
                family=family,
                needs_base=needs_base,
                paper=paper,
                inputs=inputs,
                data=data,
                random=random,
                scope=scope,
                grid=dict(grid or {}),
                summary=doc[0] if doc else "",
                optional_base=optional_base,
                prepare=prepare,
            )
        )
        return fn

    return deco


def get_method(name: str) -> MethodInfo:
    """The registered method ``name``; unknown names raise :class:`ConfigError` with suggestions."""
    _ensure_builtin()
    return _REGISTRY.get(name)


def list_methods(family: str | None = None, data: str | None = None) -> list[MethodInfo]:
    """All registered methods, sorted by name, optionally filtered."""
    _ensure_builtin()
    return _REGISTRY.list(family=family, data=data)


def _ensure_builtin() -> None:
    import unimerge.methods  # noqa: F401  (registers the built-in methods on first import)
    import unimerge.modelmerge  # noqa: F401  (data-aware methods)
