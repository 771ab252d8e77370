"""Data-aware, test-time and MoE-style merging on ``torch.nn.Module`` s.

Every method here is a :class:`~unimerge.methods.ModelMethod`: registered with
``register_model_method(..., data="unlabeled" | "labeled")`` in the one registry, called as
``fn(problem, params)`` with a :class:`MergeProblem`, returning a :class:`MergedModel`.

This package registers through the ``unimerge.methods`` entry-point group, the route third-party
methods take (``pyproject.toml``), so the registry never imports it: importing this package imports
each non-underscore module once, and each registers its methods. :mod:`~unimerge.modelmerge.stats`
holds the shared pieces (sampling, autocast, Fisher and Gram statistics, sidecar files).
Modules must not import ``transformers`` at import time.
"""

from __future__ import annotations

import importlib
import pkgutil

from unimerge.methods import Batch, MergedModel, MergeProblem, TaskSource

__all__ = ["Batch", "MergeProblem", "MergedModel", "TaskSource"]

_SUPPORT = {"load", "stats"}  # shared pieces and the routed-model loader: nothing to register
for _mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _mod.name.startswith("_") and _mod.name not in _SUPPORT:
        importlib.import_module(f"{__name__}.{_mod.name}")
