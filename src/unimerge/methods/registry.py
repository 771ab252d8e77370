"""The one registry of merge methods: two typed kinds, one way to register each.

```
MethodInfo                      what every method declares: name, params, family, paper, grid, ...
├── TensorMethod                data-free, per tensor:  fn(x, params, per_model, *, base, generator) -> Tensor
│                               registered with @register_method
└── ModelMethod                 data-aware / MoE-style: fn(problem, params) -> MergedModel
                                registered with @register_model_method
```

A **tensor method** (:class:`MergeFn`) gets, for one tensor:

- ``x``: the stacked inputs, ``(n_models, *shape)`` float32. With ``inputs="deltas"`` (the default)
  these are task vectors ``expert - base`` and the engine adds ``base`` back to the result; with
  ``inputs="tensors"`` they are the raw expert tensors and the function returns the merged tensor.
- ``params``: the validated global parameters (an instance of ``params``).
- ``per_model``: per-model parameters stacked across models, name -> tensor ``(n_models,)``
  (always has ``"weight"``).
- ``base``: the base tensor (``None`` when the merge has no base model).
- ``generator``: a seeded :class:`torch.Generator` (per tensor) for random methods, else ``None``.

A **model method** (:class:`ModelFn`) gets a :class:`~unimerge.methods.problem.MergeProblem` (base
module, expert state dicts, tasks with data, heads) and returns a
:class:`~unimerge.methods.problem.MergedModel`.

The kind is the class of the registry entry, so callers narrow with ``isinstance`` (or ask for one
kind: ``get_method(name, TensorMethod)``, ``list_methods(kind=ModelMethod)``), never with a string.

Methods outside :mod:`unimerge.methods` (the data-aware ones in :mod:`unimerge.modelmerge`, and
third-party packages) register through the ``unimerge.methods`` entry-point group: each entry point
names a module that registers its methods on import. The registry loads them on first lookup, so
this module never imports a layer above it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Literal, Protocol, TypeVar, overload

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from unimerge.errors import ConfigError
from unimerge.methods.problem import MergedModel, MergeProblem

__all__ = [
    "Method",
    "MergeFn",
    "MethodInfo",
    "ModelFn",
    "ModelMethod",
    "ModelWeight",
    "NoParams",
    "Prepare",
    "Registry",
    "TensorMethod",
    "get_method",
    "list_methods",
    "register_method",
    "register_model_method",
]

Family = Literal[
    "average",
    "task_arithmetic",
    "sparsify",
    "geometric",
    "subspace",
    "mask",
    "optimise",
    "layer",
    "data",
    "moe",
]
DataNeeds = Literal["none", "unlabeled", "labeled"]
Inputs = Literal["deltas", "tensors"]
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


class ModelFn(Protocol):
    """A data-aware method: everything it may use is in ``problem``; returns the merged model."""

    def __call__(self, problem: MergeProblem, params: Any, /) -> MergedModel: ...


class Prepare(Protocol):
    """Whole-model statistics pass of a ``scope="model"`` tensor method.

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
    weight: float = Field(
        default=1.0, ge=-100.0, le=100.0, description="This model's weight (negative negates its task)."
    )


Kind = Literal["tensor", "model"]


@dataclass(frozen=True, kw_only=True)
class MethodInfo:
    """What every registered method declares; the engine, the CLI and the benchmark read it.

    Never instantiated itself: an entry is a :class:`TensorMethod` or a :class:`ModelMethod`.
    """

    kind: ClassVar[Kind]
    name: str
    params: type[BaseModel]
    model_params: type[BaseModel]
    family: Family
    needs_base: bool
    paper: str
    data: DataNeeds = "none"
    random: bool = False
    grid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    summary: str = ""
    optional_base: bool = False
    max_models: int | None = None  # most models merged besides the base (slerp: 1); None: any number

    @property
    def uses_base(self) -> bool:
        """Whether the base model is an input of its own (then it is not one of the merged models)."""
        return self.needs_base or self.optional_base

    def param_schema(self) -> dict[str, dict[str, Any]]:
        """name -> {type, default, scope, bounds, description} for global and per-model parameters."""
        out: dict[str, dict[str, Any]] = {}
        for scope, model in (("global", self.params), ("per_model", self.model_params)):
            for name, f in model.model_fields.items():
                ann = f.annotation
                out[f.alias or name] = {
                    "type": getattr(ann, "__name__", str(ann)).replace("typing.", ""),
                    "default": None if f.is_required() else f.get_default(call_default_factory=True),
                    "scope": scope,
                    "bounds": _bounds(f.metadata),
                    "description": f.description or "",
                }
        return out

    def to_json(self) -> dict[str, Any]:
        """The ``unimerge methods --json`` entry of this method."""
        return {
            "name": self.name,
            "kind": self.kind,
            "family": self.family,
            "needs_base": self.needs_base,
            "data": self.data,
            "paper": self.paper,
            "params": self.param_schema(),
            "random": self.random,
            "max_models": self.max_models,
            "summary": self.summary,
        }


def _bounds(metadata: list[Any]) -> dict[str, float]:
    """A field's numeric bounds (pydantic ``ge``/``gt``/``le``/``lt``) as ``{op: value}``."""
    out: dict[str, float] = {}
    for m in metadata:
        for op in ("ge", "gt", "le", "lt"):
            value = getattr(m, op, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[op] = value
    return out


@dataclass(frozen=True, kw_only=True)
class TensorMethod(MethodInfo):
    """A data-free method: a pure function of one tensor's stacked inputs (:class:`MergeFn`).

    ``inputs``: ``"deltas"`` (task vectors; the engine adds the base back) or ``"tensors"``.
    ``scope="model"`` with ``prepare``: a whole-model statistics pass runs first (:class:`Prepare`).
    """

    kind: ClassVar[Kind] = "tensor"
    fn: MergeFn
    inputs: Inputs = "deltas"
    scope: Scope = "tensor"
    prepare: Prepare | None = None

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "inputs": self.inputs, "scope": self.scope}


@dataclass(frozen=True, kw_only=True)
class ModelMethod(MethodInfo):
    """A data-aware (or MoE-style) method on ``nn.Module`` s and data (:class:`ModelFn`)."""

    kind: ClassVar[Kind] = "model"
    fn: ModelFn


Method = TensorMethod | ModelMethod
M = TypeVar("M", TensorMethod, ModelMethod)

_WRONG_KIND = {
    TensorMethod: "is a model method ({data} data): it merges nn.Modules, not tensors. Run it from "
    "a config with a `data:` section (`unimerge merge`), or call it with a MergeProblem (unimerge.modelmerge)",
    ModelMethod: "is data-free: it merges tensors, not nn.Modules with data. Run it with `unimerge merge` "
    "(no `data:` section) or unimerge.merge_state_dicts",
}


class Registry:
    """Name -> :class:`TensorMethod` | :class:`ModelMethod`. A duplicate name is an error."""

    def __init__(self, plugin_group: str | None = None) -> None:
        self._methods: dict[str, Method] = {}
        self._plugin_group = plugin_group
        self._plugins_loaded = plugin_group is None

    def add(self, info: Method) -> None:
        if info.name in self._methods:
            raise ValueError(f"merge method {info.name!r} is registered twice")
        self._methods[info.name] = info

    def _load_plugins(self) -> None:
        if self._plugins_loaded or self._plugin_group is None:
            return
        self._plugins_loaded = True
        for ep in sorted(entry_points(group=self._plugin_group), key=lambda e: e.name):
            ep.load()

    def get(self, name: str) -> Method:
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

    def list(self, family: str | None = None, data: str | None = None) -> list[Method]:
        self._load_plugins()
        return sorted(
            (
                m
                for m in self._methods.values()
                if (family is None or m.family == family) and (data is None or m.data == data)
            ),
            key=lambda m: m.name,
        )


_REGISTRY = Registry(plugin_group="unimerge.methods")
F = TypeVar("F", bound=MergeFn)
G = TypeVar("G", bound=ModelFn)


def _summary(fn: Callable[..., Any]) -> str:
    doc = (fn.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def _check_model_params(name: str, model_params: type[BaseModel]) -> None:
    if "weight" not in model_params.model_fields:
        raise ValueError(f"{name}: model_params must define 'weight'")


def register_method(
    name: str,
    *,
    params: type[BaseModel] = NoParams,
    model_params: type[BaseModel] = ModelWeight,
    family: Family,
    needs_base: bool,
    paper: str,
    inputs: Inputs = "deltas",
    random: bool = False,
    scope: Scope = "tensor",
    grid: Mapping[str, tuple[Any, ...]] | None = None,
    optional_base: bool = False,
    prepare: Prepare | None = None,
    max_models: int | None = None,
    registry: Registry | None = None,
) -> Callable[[F], F]:
    """Decorator: register ``fn`` as the data-free :class:`TensorMethod` ``name``.

    ``grid`` is the documented hyperparameter grid the benchmark searches on validation data,
    keyed by parameter name as written in a config (per-model names set every model's value).
    ``optional_base``: the method uses a base when one is given (then, like with ``needs_base``,
    the base is not one of the merged models). ``prepare``: see :class:`Prepare` (``scope="model"``).
    ``max_models``: the most models it merges besides the base (plans and searches refuse more).
    """
    _check_model_params(name, model_params)

    def deco(fn: F) -> F:
        (registry or _REGISTRY).add(
            TensorMethod(
                name=name,
                fn=fn,
                params=params,
                model_params=model_params,
                family=family,
                needs_base=needs_base,
                paper=paper,
                inputs=inputs,
                random=random,
                scope=scope,
                grid=dict(grid or {}),
                summary=_summary(fn),
                optional_base=optional_base,
                prepare=prepare,
                max_models=max_models,
            )
        )
        return fn

    return deco


def register_model_method(
    name: str,
    *,
    params: type[BaseModel] = NoParams,
    model_params: type[BaseModel] = ModelWeight,
    family: Family,
    data: DataNeeds,
    paper: str,
    needs_base: bool = True,
    random: bool = False,
    grid: Mapping[str, tuple[Any, ...]] | None = None,
    registry: Registry | None = None,
) -> Callable[[G], G]:
    """Decorator: register ``fn`` as the :class:`ModelMethod` ``name`` (``data``: what examples it draws
    from each task; ``"none"`` for a method that needs the modules but no data, e.g. one that returns
    per-task modules, like TSV-C)."""
    _check_model_params(name, model_params)

    def deco(fn: G) -> G:
        (registry or _REGISTRY).add(
            ModelMethod(
                name=name,
                fn=fn,
                params=params,
                model_params=model_params,
                family=family,
                needs_base=needs_base,
                paper=paper,
                data=data,
                random=random,
                grid=dict(grid or {}),
                summary=_summary(fn),
            )
        )
        return fn

    return deco


@overload
def get_method(name: str) -> Method: ...
@overload
def get_method(name: str, kind: type[M]) -> M: ...
def get_method(name: str, kind: type[M] | None = None) -> Method:
    """The registered method ``name`` (of ``kind``, when given).

    Raises:
        ConfigError: unknown name (with suggestions), or a method of the other kind.
    """
    _ensure_builtin()
    info = _REGISTRY.get(name)
    if kind is not None and not isinstance(info, kind):
        raise ConfigError(f"Method {info.name!r} " + _WRONG_KIND[kind].format(data=info.data) + ".")
    return info


@overload
def list_methods(family: str | None = None, data: str | None = None) -> list[Method]: ...
@overload
def list_methods(family: str | None = None, data: str | None = None, *, kind: type[M]) -> list[M]: ...
def list_methods(
    family: str | None = None, data: str | None = None, *, kind: type[M] | None = None
) -> list[Method] | list[M]:
    """All registered methods, sorted by name, optionally filtered by family, data needs and kind."""
    _ensure_builtin()
    found = _REGISTRY.list(family=family, data=data)
    if kind is None:
        return found
    return [m for m in found if isinstance(m, kind)]


def _ensure_builtin() -> None:
    import unimerge.methods  # noqa: F401  (registers the built-in tensor methods on first import)
