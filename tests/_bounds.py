"""The bounds contract every registered method's parameter models meet (tests/test_contract*.py).

A number a user writes in a config is checked when the config is read, never at merge time: every
numeric field (``int``, ``float``, also ``X | None``) declares a lower (``ge``/``gt``) and an upper
(``le``/``lt``) bound; strings and sequences declare a ``max_length``; ``bool`` and ``Literal``
fields are bounded by their type. A field checked some other way is listed in ``CHECKED_ELSEWHERE``
with the reason.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel

from unimerge.methods import MethodInfo

# (method, field) -> why it needs no bound of its own
CHECKED_ELSEWHERE: dict[tuple[str, str], str] = {
    ("lorahub", "method"): "a registered data-free method name: LoraHubParams' validator calls get_method",
    ("lorahub", "method_params"): "that method's own (bounded) parameters, validated by its first merge",
}


def _kinds(annotation: Any) -> set[str]:
    """``annotation``'s kinds: ``numeric``, ``sized`` (str, tuple, list), ``closed`` (bool, Literal), ``other``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation) if a is not type(None)))
    if annotation is bool or origin is Literal:
        return {"closed"}
    if annotation in (int, float):
        return {"numeric"}
    if annotation is str or origin in (tuple, list):
        return {"sized"}
    return {"other"}


def _has(metadata: list[Any], *attrs: str) -> bool:
    return any(getattr(m, a, None) is not None for m in metadata for a in attrs)


def field_problems(model: type[BaseModel], method: str) -> list[str]:
    """What is unbounded in ``model``: one ``"method.field: why"`` line per field."""
    out = []
    for name, f in model.model_fields.items():
        if (method, name) in CHECKED_ELSEWHERE:
            continue
        kinds = _kinds(f.annotation)
        if "numeric" in kinds and not (_has(f.metadata, "ge", "gt") and _has(f.metadata, "le", "lt")):
            out.append(f"{method}.{name}: a number needs a lower (ge/gt) and an upper (le/lt) bound")
        if "sized" in kinds and not _has(f.metadata, "max_length"):
            out.append(f"{method}.{name}: a string or sequence needs a max_length")
        if "other" in kinds:
            out.append(
                f"{method}.{name}: type {f.annotation} cannot be bounded; list it in CHECKED_ELSEWHERE"
            )
    return out


def unbounded_fields(info: MethodInfo) -> list[str]:
    """:func:`field_problems` of both of ``info``'s parameter models (global and per model)."""
    return [p for model in (info.params, info.model_params) for p in field_problems(model, info.name)]
