"""unimerge: merge many fine-tuned models into one."""

from unimerge.core import merge_state_dicts
from unimerge.errors import CheckpointError, ConfigError, MergeError, PlanError, UnimergeError
from unimerge.methods import MethodInfo, get_method, list_methods, register_method

__all__ = [
    "CheckpointError",
    "ConfigError",
    "MergeError",
    "MethodInfo",
    "PlanError",
    "UnimergeError",
    "get_method",
    "list_methods",
    "merge_state_dicts",
    "register_method",
]
