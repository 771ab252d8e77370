"""Merging on Ray (the extra ``distributed``): the streaming engine's jobs as Ray tasks, and the
plan of a merge across N nodes.

- :mod:`~unimerge.cluster.session`: start or join Ray; unwrap a task's error.
- :mod:`~unimerge.cluster.dispatch`: ``unimerge merge --executor ray``: batches of tensor jobs as Ray
  tasks writing at the driver's planned offsets (byte-identical to a local merge).
- :mod:`~unimerge.cluster.layout`: ``unimerge validate --executor ray --nodes N``: bytes per node and
  the expected time at given disk and network bandwidths.

Ray is imported only when a merge runs on it; planning needs nothing beyond the core.
"""

from unimerge.cluster.dispatch import (
    BATCH_BYTES,
    PlanSource,
    RayDispatch,
    batches,
    merge_batch,
    run_merge_on_ray,
)
from unimerge.cluster.layout import ClusterPlan, NodeLoad, cluster_plan
from unimerge.cluster.session import start_ray, task_error

__all__ = [
    "BATCH_BYTES",
    "ClusterPlan",
    "NodeLoad",
    "PlanSource",
    "RayDispatch",
    "batches",
    "cluster_plan",
    "merge_batch",
    "run_merge_on_ray",
    "start_ray",
    "task_error",
]
