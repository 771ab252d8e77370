"""Giving memory the allocator holds free back to the operating system.

PyTorch's CPU tensors come from ``malloc``. glibc serves a large request with its own ``mmap`` (unmapped
again on ``free``) only above a threshold that it *raises* to the size of each such block freed, up to
32 MiB: after the first few tensors are freed, every tensor of a few MiB comes from a malloc arena
(one per thread) instead. A streaming merge frees one job's inputs, scratch and output while other
jobs' buffers are still alive, so those arenas fill with free holes that stay resident and pile up as
more tensors are merged: on a Llama-shaped model (hidden 1024, largest tensor 49 MB, two threads) they
held 260 MB free after four layers, on top of the tensors in flight. :func:`release_free_memory`
(``malloc_trim(0)``, which also returns free pages in the middle of an arena) after each job keeps the
resident set to the buffers actually in use.

It changes no allocator setting of the process (``mallopt`` would, for the caller's other work too).
Where the C library has no ``malloc_trim`` (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable

__all__ = ["release_free_memory"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the free memory of every malloc arena to the OS (``malloc_trim(0)``; thread-safe).

    Returns:
        True when the C library has ``malloc_trim`` (glibc), False where this does nothing.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
