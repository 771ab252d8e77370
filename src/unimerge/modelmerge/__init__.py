"""Data-aware, test-time and MoE-style merging on ``torch.nn.Module`` s.

Methods here are registered in the same registry as the data-free ones, with ``inputs="problem"``
and ``data="unlabeled"`` or ``"labeled"``; they are called as ``fn(problem, params)`` with a
:class:`MergeProblem` and return a :class:`MergedModel`. Every non-underscore module of this package is
imported once and registers its methods. Modules must not import ``transformers`` at import time.
"""

from __future__ import annotations

import importlib
import pkgutil

from unimerge.modelmerge._problem import Batch, MergedModel, MergeProblem, TaskSource

__all__ = ["Batch", "MergeProblem", "MergedModel", "TaskSource"]

for _mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
