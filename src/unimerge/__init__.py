"""unimerge: merge many fine-tuned models into one.

The public surface is :data:`__all__` (checked by ``tests/test_public_api.py``):

- in memory: :func:`merge_state_dicts` runs any data-free method on state dicts;
- from files: :func:`run_merge` plans and streams a config (unimerge or mergekit YAML);
  :func:`plan_config` only validates and plans it;
- data-aware merges on ``nn.Module`` s: :class:`MergeProblem` -> :class:`MergedModel`
  (see :mod:`unimerge.modelmerge`); :func:`save_merged` / :func:`load` for routed models;
- the method registry: :func:`list_methods`, :func:`get_method`, :func:`register_method`;
- errors: :class:`UnimergeError` and its subclasses.
"""

from unimerge.config import MergeConfig, load_config
from unimerge.core import merge_state_dicts
from unimerge.errors import CheckpointError, ConfigError, MergeError, PlanError, UnimergeError
from unimerge.execute import MergeResult, RunOptions, plan_config, run_merge
from unimerge.methods import MethodInfo, get_method, list_methods, register_method
from unimerge.modelmerge import MergedModel, MergeProblem
from unimerge.modelmerge.load import load, load_merged, save_merged

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "MergeConfig",
    "MergeError",
    "MergeProblem",
    "MergeResult",
    "MergedModel",
    "MethodInfo",
    "PlanError",
    "RunOptions",
    "UnimergeError",
    "get_method",
    "list_methods",
    "load",
    "load_config",
    "load_merged",
    "merge_state_dicts",
    "plan_config",
    "register_method",
    "run_merge",
    "save_merged",
]
