"""unimerge: merge many fine-tuned models into one.

The public surface is :data:`__all__` (checked by ``tests/test_public_api.py``):

- in memory: :func:`merge_state_dicts` runs any data-free method on state dicts;
- LoRA adapters: :func:`merge_adapters` merges PEFT adapters at the update level, :func:`combine_adapters`
  runs PEFT's ``add_weighted_adapter`` combination types by name (see :mod:`unimerge.lora`);
- from files: :func:`run_merge` plans and streams a config (unimerge or mergekit YAML; adapter
  configs go to :mod:`unimerge.lora`, see :mod:`unimerge.api`);
  :func:`plan_config` only validates and plans it;
- data-aware merges on ``nn.Module`` s: :class:`MergeProblem` -> :class:`MergedModel`
  (see :mod:`unimerge.modelmerge`); :func:`save_merged` / :func:`load` for routed models;
- from files: :func:`check_merge` runs every check a merge makes, without merging;
- the method registry, two typed kinds: :class:`TensorMethod` (data-free, per tensor, registered with
  :func:`register_method`) and :class:`ModelMethod` (data-aware, :func:`register_model_method`);
  :func:`list_methods`, :func:`get_method`;
- errors: :class:`UnimergeError` and its subclasses.
- method and parameter search: :func:`search` (``unimerge.search(CONFIG, OUT)``, from
  :mod:`unimerge.tune`; trials on Ray).

Names are imported on first use (PEP 562, as SciPy does), so ``import unimerge.cli`` does not pay
for torch until a command needs it; :func:`unimerge.cli.main` uses that to import torch with the
garbage collector paused.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unimerge.api import check_merge, run_merge
    from unimerge.config import MergeConfig, load_config
    from unimerge.core import merge_state_dicts
    from unimerge.errors import CheckpointError, ConfigError, MergeError, PlanError, UnimergeError
    from unimerge.execute import Check, MergeResult, RunOptions, plan_config
    from unimerge.lora import combine_adapters, merge_adapters
    from unimerge.methods import (
        MergedModel,
        MergeProblem,
        MethodInfo,
        ModelMethod,
        TensorMethod,
        get_method,
        list_methods,
        register_method,
        register_model_method,
    )
    from unimerge.modelmerge.load import load, load_merged, save_merged
    from unimerge.tune import search

__version__ = "0.1.0"

_SOURCES = {
    "unimerge.config": ("MergeConfig", "load_config"),
    "unimerge.core": ("merge_state_dicts",),
    "unimerge.errors": ("CheckpointError", "ConfigError", "MergeError", "PlanError", "UnimergeError"),
    "unimerge.api": ("check_merge", "run_merge"),
    "unimerge.execute": ("Check", "MergeResult", "RunOptions", "plan_config"),
    "unimerge.lora": ("combine_adapters", "merge_adapters"),
    "unimerge.methods": (
        "MergedModel",
        "MergeProblem",
        "MethodInfo",
        "ModelMethod",
        "TensorMethod",
        "get_method",
        "list_methods",
        "register_method",
        "register_model_method",
    ),
    "unimerge.modelmerge.load": ("load", "load_merged", "save_merged"),
    "unimerge.tune": ("search",),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}  # == __all__ (tested)

__all__ = [
    "Check",
    "CheckpointError",
    "ConfigError",
    "MergeConfig",
    "MergeError",
    "MergeProblem",
    "MergeResult",
    "MergedModel",
    "MethodInfo",
    "ModelMethod",
    "PlanError",
    "RunOptions",
    "TensorMethod",
    "UnimergeError",
    "check_merge",
    "combine_adapters",
    "get_method",
    "list_methods",
    "load",
    "load_config",
    "load_merged",
    "merge_adapters",
    "merge_state_dicts",
    "plan_config",
    "register_method",
    "register_model_method",
    "run_merge",
    "save_merged",
    "search",
]


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'unimerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
