"""``unimerge validate --executor ray --nodes N``: the plan of a merge across Ray nodes, printed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from unimerge.cli.common import out

if TYPE_CHECKING:
    from unimerge.options import RunOptions

__all__ = ["print_cluster_plan"]


def print_cluster_plan(
    config: Path,
    output_dir: Path,
    options: RunOptions,
    nodes: int,
    disk: float,
    network: float,
    compute_ns: float,
) -> None:
    """Plan ``config`` (headers only) across ``nodes`` and print bytes per node and expected times."""
    from unimerge.cluster import cluster_plan
    from unimerge.cluster.dispatch import tensor_plan
    from unimerge.io.writer import format_size

    plan = tensor_plan(config, output_dir, options)
    cp = cluster_plan(plan, nodes, disk, network, compute_ns)
    table = Table(title=f"on {nodes} Ray node{'s' * (nodes > 1)}: disk {format_size(disk)}/s in all, "
                        f"network {format_size(network)}/s per node, compute {compute_ns:g} ns per input element")  # fmt: skip
    for col in ("node", "tasks", "tensors", "bytes read", "bytes written", "seconds", "bound by"):
        table.add_column(col, justify="right")
    for n in cp.nodes:
        table.add_row(str(n.node), str(n.tasks), str(n.tensors), format_size(n.bytes_read),
                      format_size(n.bytes_written), f"{n.seconds:.1f}", n.bound)  # fmt: skip
    out.print(table)
    out.print(
        f"expected: {cp.seconds:.1f} s on {nodes} node{'s' * (nodes > 1)} (bound by the {cp.bound}), "
        f"{cp.one_machine_seconds:.1f} s on one machine from its own disk"
        + ("" if compute_ns else "; I/O only (--compute-ns adds the arithmetic)")
        + "."
    )
