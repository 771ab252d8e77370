"""The search space: which method, and each method's parameters within their registered bounds.

A method's dimensions come from its registry entry (:class:`~unimerge.methods.MethodInfo`):

- the parameters of its registered ``grid`` (a numeric grid becomes the range ``[min, max]`` with the
  grid's values as grid points; other values become choices), unless the config says otherwise;
- the parameters the config names in ``search.methods[].params`` (their type, ``Literal`` choices and
  ``ge``/``gt``/``le``/``lt`` bounds read from the method's pydantic params model);
- per-model parameters (``search.per_model``: ``weight``, ``density``, ...), one dimension per model,
  for every data-free method that has that per-model parameter (data-aware methods run in memory on
  a :class:`~unimerge.methods.MergeProblem`, which has no per-model settings).

A point of the space is a :class:`Trial`: a method, its global parameters and each model's parameters.
"""

from __future__ import annotations

import itertools
import types
import typing
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

from unimerge.errors import ConfigError
from unimerge.methods import MethodInfo, TensorMethod, get_method
from unimerge.tune.config import MethodChoice, SearchSpec

__all__ = ["ChoiceDim", "Dim", "FloatDim", "IntDim", "MethodSpace", "SearchSpace", "Trial", "build_space"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatDim(_Strict):
    """A real parameter in ``[low, high]``; ``model`` is the model index of a per-model parameter."""

    kind: Literal["float"] = "float"
    name: str
    model: int | None = None
    low: float
    high: float
    grid: tuple[float, ...]


class IntDim(_Strict):
    """An integer parameter in ``[low, high]``."""

    kind: Literal["int"] = "int"
    name: str
    model: int | None = None
    low: int
    high: int
    grid: tuple[int, ...]


class ChoiceDim(_Strict):
    """A parameter taking one of ``choices``."""

    kind: Literal["choice"] = "choice"
    name: str
    model: int | None = None
    choices: tuple[Any, ...]

    @property
    def grid(self) -> tuple[Any, ...]:
        return self.choices


Dim = Annotated[FloatDim | IntDim | ChoiceDim, Field(discriminator="kind")]


class Trial(_Strict):
    """One point: ``params`` the method's global settings (a per-model name here sets every model's
    value), ``per_model`` one mapping per model."""

    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    per_model: list[dict[str, Any]] = Field(default_factory=list)


class MethodSpace(_Strict):
    """One method's dimensions and fixed values."""

    method: str
    dims: tuple[Dim, ...] = ()
    fixed: dict[str, Any] = Field(default_factory=dict)

    def trial(self, values: Sequence[Any], n_models: int) -> Trial:
        """The trial with ``values[i]`` for ``dims[i]``."""
        params: dict[str, Any] = dict(self.fixed)
        per_model: list[dict[str, Any]] = [{} for _ in range(n_models)]
        for dim, value in zip(self.dims, values, strict=True):
            (params if dim.model is None else per_model[dim.model])[dim.name] = value
        return Trial(method=self.method, params=params, per_model=per_model)


class SearchSpace(_Strict):
    """The methods to choose from and the number of merged models."""

    methods: tuple[MethodSpace, ...]
    n_models: int

    def grid(self) -> list[Trial]:
        """Each method's grid (the product of its dimensions' grid points), interleaved method by
        method (trial k of method 0, trial k of method 1, ...) so a truncated grid covers every method."""
        per_method = [
            [ms.trial(v, self.n_models) for v in itertools.product(*(d.grid for d in ms.dims))]
            for ms in self.methods
        ]
        out: list[Trial] = []
        for row in itertools.zip_longest(*per_method):
            out.extend(t for t in row if t is not None)
        return out


def _fields(info: MethodInfo) -> dict[str, tuple[FieldInfo, bool]]:
    """Config name -> (field, is per-model) of ``info``'s global and per-model parameters."""
    out = {(f.alias or n): (f, True) for n, f in info.model_params.model_fields.items()}
    out.update({(f.alias or n): (f, False) for n, f in info.params.model_fields.items()})
    return out


def _kind(f: FieldInfo) -> tuple[str, tuple[Any, ...]]:
    """("float" | "int" | "choice" | "", choices) of a field's annotation (Optional unwrapped)."""
    ann = f.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and len(args) == 1:
        ann = args[0]
    if ann is bool:
        return "choice", (False, True)
    if typing.get_origin(ann) is Literal:
        return "choice", typing.get_args(ann)
    if ann is float:
        return "float", ()
    if ann is int:
        return "int", ()
    return "", ()


def _allowed(bounds: dict[str, float]) -> str:
    lo = f"[{bounds['ge']}" if "ge" in bounds else f"({bounds['gt']}" if "gt" in bounds else "(-inf"
    hi = f"{bounds['le']}]" if "le" in bounds else f"{bounds['lt']})" if "lt" in bounds else "inf)"
    return f"{lo}, {hi}"


def _inside(bounds: dict[str, float], v: float) -> bool:
    return (
        v >= bounds.get("ge", -float("inf"))
        and v > bounds.get("gt", -float("inf"))
        and v <= bounds.get("le", float("inf"))
        and v < bounds.get("lt", float("inf"))
    )


def _error(method: str, name: str, what: str) -> ConfigError:
    return ConfigError(f"search: method {method!r}, parameter {name!r}: {what}. See docs/search.md.")


def _check_values(
    info: MethodInfo, name: str, f: FieldInfo, values: Sequence[Any]
) -> tuple[str, tuple[Any, ...]]:
    """The field's kind and choices, after checking every value in ``values`` against them."""
    method, (kind, choices) = info.name, _kind(f)
    if not kind:
        raise _error(method, name, f"its type ({f.annotation}) cannot be searched; fix it with a scalar")
    if kind == "choice":
        bad = [v for v in values if v not in choices]
        if bad:
            raise _error(method, name, f"{bad[0]!r} is not one of the allowed values {list(choices)}")
        return kind, choices
    bounds: dict[str, float] = info.param_schema()[name]["bounds"]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind == "int" and v != int(v)):
            raise _error(method, name, f"{v!r} is not a{'n integer' if kind == 'int' else ' number'}")
        if not _inside(bounds, float(v)):
            raise _error(
                method, name, f"the value {v} is outside the registered range {_allowed(bounds)}; "
                "pick bounds inside it",
            )  # fmt: skip
    return kind, choices


def _range_dim(kind: str, name: str, model: int | None, lo: float, hi: float, pts: Sequence[Any]) -> Dim:
    inside = tuple(sorted({p for p in pts if lo <= p <= hi}))
    if kind == "int":
        grid = inside if len(inside) > 1 else tuple(sorted({int(lo), int(round((lo + hi) / 2)), int(hi)}))
        return IntDim(name=name, model=model, low=int(lo), high=int(hi), grid=grid)
    grid_f = inside if len(inside) > 1 else (lo, round((lo + hi) / 2, 6), hi)
    return FloatDim(name=name, model=model, low=float(lo), high=float(hi), grid=tuple(map(float, grid_f)))


def _user_dim(info: MethodInfo, name: str, f: FieldInfo, value: Any) -> Dim | None:
    """The dimension ``name: value`` asks for (``None``: a fixed scalar)."""
    registered = tuple(info.grid.get(name, ()))
    if isinstance(value, dict):
        if set(value) != {"values"} or not isinstance(value["values"], list) or not value["values"]:
            raise _error(info.name, name, f"expected {{values: [...]}}, got {value!r}")
        _check_values(info, name, f, value["values"])
        return ChoiceDim(name=name, choices=tuple(value["values"]))
    if not isinstance(value, list):
        _check_values(info, name, f, [value])
        return None
    kind, _ = _check_values(info, name, f, value)
    if kind == "choice":
        return ChoiceDim(name=name, choices=tuple(value))
    if len(value) != 2 or not value[0] < value[1]:
        raise _error(info.name, name, f"a range is [low, high] with low < high, got {value!r}")
    return _range_dim(kind, name, None, value[0], value[1], registered)


def _grid_dim(info: MethodInfo, name: str, f: FieldInfo) -> Dim | None:
    values = tuple(info.grid[name])
    kind, _ = _check_values(info, name, f, values)
    if len(set(values)) < 2:
        return None
    if kind == "choice" or not all(isinstance(v, (int, float)) for v in values):
        return ChoiceDim(name=name, choices=values)
    return _range_dim(kind, name, None, min(values), max(values), values)


def _method_space(choice: MethodChoice, spec: SearchSpec, n_models: int) -> MethodSpace:
    info = get_method(choice.name)
    fields = _fields(info)
    dims: list[Dim] = []
    fixed: dict[str, Any] = {}
    for name, value in choice.params.items():
        if name not in fields:
            raise _error(info.name, name, f"the method has no such parameter (it has {sorted(fields)})")
        dim = _user_dim(info, name, fields[name][0], value)
        if dim is None:
            fixed[name] = value
        else:
            dims.append(dim)
    for name in info.grid:
        if name not in choice.params and name not in spec.per_model and name in fields:
            dim = _grid_dim(info, name, fields[name][0])
            if dim is not None:
                dims.append(dim)
    for name, (lo, hi) in spec.per_model.items():
        if (
            name in fields
            and fields[name][1]
            and name not in choice.params
            and isinstance(info, TensorMethod)
        ):
            f = fields[name][0]
            kind, _ = _check_values(info, name, f, [lo, hi])
            dims += [_range_dim(kind, name, i, lo, hi, ()) for i in range(n_models)]
    return MethodSpace(method=info.name, dims=tuple(dims), fixed=fixed)


def build_space(spec: SearchSpec, n_models: int) -> SearchSpace:
    """The space ``spec`` describes for ``n_models`` merged models.

    Raises:
        ConfigError: naming the method and parameter: no such parameter, a bound outside the
            registered range, a value of the wrong type; a ``per_model`` name no method has.
    """
    for name, (lo, hi) in spec.per_model.items():
        if not lo < hi:
            raise ConfigError(
                f"search.per_model.{name}: a range is [low, high] with low < high, got {[lo, hi]}."
            )
        if not any(name in get_method(m.name).model_params.model_fields for m in spec.methods):
            raise ConfigError(
                f"search.per_model.{name}: none of the methods {[m.name for m in spec.methods]} has a "
                f"per-model parameter {name!r} (see `unimerge methods --json`, scope per_model)."
            )
    for m in spec.methods:
        most = get_method(m.name).max_models
        if most is not None and n_models > most:
            raise ConfigError(
                f"search.methods: {m.name!r} merges at most {most} model besides the base, and this search "
                f"has {n_models}; drop it from search.methods (multislerp, karcher or model_stock merge any number)."
            )
    return SearchSpace(
        methods=tuple(_method_space(m, spec, n_models) for m in spec.methods), n_models=n_models
    )
