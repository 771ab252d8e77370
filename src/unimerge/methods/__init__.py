"""Built-in merge methods. Importing this package registers every module in it.

Each non-underscore module of this package is imported once, and registers its methods with
:func:`unimerge.methods.register_method`; there is no other list to keep up to date.
"""

from __future__ import annotations

import importlib
import pkgutil

from unimerge.methods._registry import (
    MergeFn,
    MethodInfo,
    ModelWeight,
    NoParams,
    get_method,
    list_methods,
    register_method,
)

__all__ = ["MergeFn", "MethodInfo", "ModelWeight", "NoParams", "get_method", "list_methods", "register_method"]

for _mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
