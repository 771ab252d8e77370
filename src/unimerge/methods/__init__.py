"""Built-in merge methods and the registry. Importing this package registers every module in it.

Each non-underscore module of this package is imported once, and registers its methods with
:func:`register_method`; there is no other list to keep up to date. Data-aware methods
(:mod:`unimerge.modelmerge`) and third-party ones register through the ``unimerge.methods``
entry-point group (see :mod:`unimerge.methods.registry`).
"""

from __future__ import annotations

import importlib
import pkgutil

from unimerge.methods.primitives import expand_like, generator_for
from unimerge.methods.problem import Batch, MergedModel, MergeProblem, TaskSource
from unimerge.methods.registry import (
    MergeFn,
    Method,
    MethodInfo,
    ModelFn,
    ModelMethod,
    ModelWeight,
    NoParams,
    TensorMethod,
    get_method,
    list_methods,
    register_method,
    register_model_method,
)

__all__ = [
    "Batch",
    "MergeFn",
    "MergeProblem",
    "MergedModel",
    "Method",
    "MethodInfo",
    "ModelFn",
    "ModelMethod",
    "ModelWeight",
    "NoParams",
    "TaskSource",
    "TensorMethod",
    "expand_like",
    "generator_for",
    "get_method",
    "list_methods",
    "register_method",
    "register_model_method",
]

_SUPPORT = {"primitives", "problem", "registry"}  # the registry's own modules: nothing to register
for _mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _mod.name.startswith("_") and _mod.name not in _SUPPORT:
        importlib.import_module(f"{__name__}.{_mod.name}")
