"""Starting Ray (the extra ``distributed``) for whatever runs on it: searches and merges.

:func:`start_ray` joins a cluster at ``address`` or starts a local Ray with ``num_cpus`` CPUs, and
returns the ``ray`` module with a closer that shuts down only a Ray it started (a caller that
already runs Ray keeps it). :func:`task_error` unwraps the exception a Ray task raised.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from unimerge.errors import ConfigError

__all__ = ["start_ray", "task_error"]


def _nothing() -> None:
    return None


def start_ray(address: str | None, num_cpus: int | None, purpose: str) -> tuple[Any, Callable[[], None]]:
    """``(ray, close)``: Ray at ``address`` (a cluster) or local with ``num_cpus`` CPUs (default: all).

    Raises:
        ConfigError: Ray is not installed (``purpose`` says what needed it and how else to run it).
    """
    try:
        import ray
    except ImportError:
        raise ConfigError(f"{purpose} runs on Ray: pip install 'unimerge[distributed]'.") from None
    if ray.is_initialized():
        return ray, _nothing
    cpus = None if address else (num_cpus or os.cpu_count() or 1)
    ray.init(address=address, num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return ray, ray.shutdown


def task_error(err: BaseException) -> BaseException:
    """The exception a Ray task raised (``RayTaskError.cause``), else ``err`` itself (a dead worker)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err
