"""How a merge runs (not what it merges), what it reports back (results, checks, progress).

Shared by the streaming engine (:mod:`unimerge.execute`) and data-aware merges
(:mod:`unimerge.datamerge`), which both sit above this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from unimerge.errors import ConfigError

__all__ = ["DEVICES", "Check", "Device", "MergeResult", "Progress", "RunOptions", "compute_device"]

Device = Literal["cpu", "cuda"]
DEVICES: tuple[Device, ...] = ("cpu", "cuda")
Progress = Callable[[str, int, int], None]
"""``progress(what, done, total)``: called as each phase of a merge advances (one ``what`` per phase)."""


@dataclass(frozen=True)
class RunOptions:
    """How to run a merge (not what to merge)."""

    threads: int = 2
    device: str = "cpu"
    out_shard_size: int = 2_000_000_000
    force: bool = False
    seed: int | None = None  # overrides the config's seed
    allow_pickle: bool = False
    memory_budget: int | None = None  # bytes of jobs in flight; default: the largest job's, >= 512 MB


@dataclass
class MergeResult:
    """What a merge did."""

    out_dir: Path
    tensors: int
    bytes_written: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


@dataclass
class Check:
    """What checking a merge found (``unimerge validate``): ``(label, value)`` rows, and warnings."""

    rows: list[tuple[str, str]]
    warnings: list[str] = field(default_factory=list)


def compute_device(name: str) -> torch.device:
    """The torch device for ``--device`` (``cpu``, ``cuda`` or ``cuda:N``).

    Raises:
        ConfigError: an unknown device, or CUDA on a machine without it.
    """
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"Unknown device {name!r}; use one of {', '.join(DEVICES)}.") from None
    if dev.type not in DEVICES:
        raise ConfigError(f"Device {name!r} is not supported; use one of {', '.join(DEVICES)}.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for, but this machine has no CUDA device; use --device cpu."
        )
    return dev
