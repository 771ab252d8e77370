"""How a merge would spread over N Ray nodes: ``unimerge validate --executor ray --nodes N``.

From the plan alone (headers; no tensor data is read): the jobs are grouped into the batches
:class:`~unimerge.cluster.dispatch.RayDispatch` submits, and the batches are spread over the nodes
largest first, each to the node with the fewest bytes so far (Ray hands the next batch to the first
free worker, which this greedy order approximates). Per node: tensors, bytes read, bytes written.

The expected time: inputs and output live on shared storage, every node moves its bytes over its
own link (``network`` bytes/s each), and the storage serves everyone together (``disk`` bytes/s in
all). A node streams, so its reading, writing and arithmetic overlap: it takes the longer of its
bytes / ``network`` and its input elements x ``compute_ns`` (the method's cost per input element on
one node; 0 leaves compute out; TIES costs about 6 ns per task-vector element on 2 threads here,
docs/speed.md, so 6 n / (n + 1) ns per input element for n models and the base). The merge takes
``max(slowest node, all bytes / disk)``; one machine merging from its own disk takes
``max(all bytes / disk, all elements x compute_ns)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from unimerge.cluster.dispatch import BATCH_BYTES, batches
from unimerge.io import TensorMeta
from unimerge.plan import MergePlan, TensorJob

__all__ = ["ClusterPlan", "NodeLoad", "cluster_plan"]


@dataclass(frozen=True)
class NodeLoad:
    """What one node reads, writes and computes, and how long that takes (see the module docstring)."""

    node: int
    tasks: int
    tensors: int
    bytes_read: int
    bytes_written: int
    elements: int  # input elements merged
    seconds: float
    bound: str  # "network" or "compute"


@dataclass(frozen=True)
class ClusterPlan:
    """The per-node loads and the expected times (see the module docstring)."""

    nodes: list[NodeLoad]
    disk: float
    network: float
    compute_ns: float
    seconds: float  # expected wall-clock on the cluster (I/O)
    one_machine_seconds: float  # the same merge on one machine reading its own disk
    bound: str  # "network", "compute" or "disk": what sets ``seconds``


def cluster_plan(
    plan: MergePlan,
    nodes: int,
    disk: float,
    network: float,
    compute_ns: float = 0.0,
    batch_bytes: int = BATCH_BYTES,
) -> ClusterPlan:
    """Spread ``plan``'s batches (of ``batch_bytes``, as the Ray executor's) over ``nodes`` (module
    docstring); bandwidths in bytes per second, ``compute_ns`` in nanoseconds per input element."""
    if nodes < 1 or disk <= 0 or network <= 0 or compute_ns < 0:
        raise ValueError("nodes and bandwidths must be positive, compute_ns not negative")
    metas = [ck.tensors() for ck in plan.checkpoints]
    loads = [_batch_load(plan, b, metas) for b in batches(plan.jobs, batch_bytes)]
    per_node = [[0] * 5 for _ in range(nodes)]  # tasks, tensors, read, written, elements
    for load in sorted(loads, key=lambda t: -(t[1] + t[2])):
        node = min(per_node, key=lambda n: n[2] + n[3])
        for k, v in enumerate((1, *load)):
            node[k] += v
    rows = [_node(i, *n, network=network, compute_ns=compute_ns) for i, n in enumerate(per_node)]
    total = sum(r + w for _, r, w, _ in loads)
    compute_all = sum(e for *_, e in loads) * compute_ns / 1e9
    slowest = max(rows, key=lambda r: r.seconds)
    shared = total / disk
    return ClusterPlan(rows, disk, network, compute_ns, max(slowest.seconds, shared), max(shared, compute_all),
                       slowest.bound if slowest.seconds >= shared else "disk")  # fmt: skip


def _batch_load(
    plan: MergePlan, batch: Sequence[TensorJob], metas: Sequence[Mapping[str, TensorMeta]]
) -> tuple[int, int, int, int]:
    """``(tensors, bytes read, bytes written, input elements)`` of one batch."""
    return (
        len(batch),
        sum(plan.bytes_read(j, metas) for j in batch),
        sum(j.numel * j.dtype.itemsize for j in batch),
        sum(j.numel * (len(j.sources) + (j.base is not None)) for j in batch),
    )


def _node(
    i: int,
    tasks: int,
    tensors: int,
    read: int,
    written: int,
    elements: int,
    *,
    network: float,
    compute_ns: float,
) -> NodeLoad:
    io, compute = (read + written) / network, elements * compute_ns / 1e9
    return NodeLoad(
        i,
        tasks,
        tensors,
        read,
        written,
        elements,
        max(io, compute),
        "network" if io >= compute else "compute",
    )
