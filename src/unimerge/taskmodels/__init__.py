"""Per-task compressed models: one shared vector plus compact per-task entries, rebuilt on demand.

- :mod:`~unimerge.taskmodels.fileformat`: the task-model file (metadata, tensor names, bit packing,
  deterministic atomic writing, checked opening, per-task reads); :func:`file_kind` tells masks
  from experts.
- :mod:`~unimerge.taskmodels.masks`: EMR-Merging and TALL masks (shared vector, bit masks, rescalers).
- :mod:`~unimerge.taskmodels.experts`: FREE-Merging (FR-Merging vector, one sparse expert per task).
- :mod:`~unimerge.taskmodels.common`: what both share (expert naming, stacked task vectors, checks).
- :mod:`~unimerge.taskmodels.build`: from a merge config to a file (``unimerge masks``), and one
  task's model streamed into a Hugging Face folder (``unimerge task``).
"""

from unimerge.taskmodels.build import (
    BuiltTaskModels,
    TaskModelKind,
    build_task_models,
    rebuild_task,
    task_names,
)
from unimerge.taskmodels.experts import (
    TaskExperts,
    compute_task_experts,
    load_expert_model,
    load_task_experts,
    save_task_experts,
    task_experts_state_dict,
)
from unimerge.taskmodels.fileformat import TaskKind, file_kind, is_task_experts_file
from unimerge.taskmodels.masks import (
    TaskMasks,
    compute_task_masks,
    load_task_masks,
    load_task_model,
    save_task_masks,
    task_state_dict,
)

__all__ = [
    "BuiltTaskModels",
    "TaskExperts",
    "TaskKind",
    "TaskMasks",
    "TaskModelKind",
    "build_task_models",
    "compute_task_experts",
    "compute_task_masks",
    "file_kind",
    "is_task_experts_file",
    "load_expert_model",
    "load_task_experts",
    "load_task_masks",
    "load_task_model",
    "rebuild_task",
    "save_task_experts",
    "save_task_masks",
    "task_experts_state_dict",
    "task_names",
    "task_state_dict",
]
