"""Tensor bytes at planned offsets: what a :class:`~unimerge.io.writer.ShardedWriter` and the
processes that write for it (Ray tasks, :mod:`unimerge.cluster`) share.

A writer lays out the shards and hands out each tensor's :class:`Placement`; whoever merges the
tensor puts its bytes there with a :class:`PlacedWriter` (``os.pwrite``: no two tensors overlap, so any
number of processes write at once) and the writer's commit checks that every tensor arrived.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from unimerge.errors import MergeError

__all__ = ["PlacedWriter", "Placement", "pwrite_all", "tensor_bytes"]


@dataclass(frozen=True)
class Placement:
    """Where a planned tensor's bytes go: ``nbytes`` at ``offset`` of shard file ``path`` (in the
    writer's temporary folder)."""

    path: str
    offset: int
    nbytes: int


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor`` as safetensors stores them (row-major, little-endian: the CPU's)."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte of ``data`` is at ``offset`` of ``fd``."""
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class PlacedWriter:
    """Puts tensors' bytes at their :class:`Placement` from a process other than the writer's: opens
    each shard file on first use; leaving the block syncs and closes them, so the writer's commit
    finds the bytes on shared storage too.

    Raises:
        MergeError: a tensor's size is not the planned one, or a file cannot be written.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def __enter__(self) -> PlacedWriter:
        return self

    def put(self, place: Placement, tensor: torch.Tensor) -> None:
        """Write ``tensor``'s bytes at ``place``."""
        data = tensor_bytes(tensor)
        if len(data) != place.nbytes:
            raise MergeError(f"{place.path}: {len(data)} bytes to write where {place.nbytes} are planned.")
        try:
            if place.path not in self._fds:
                self._fds[place.path] = os.open(place.path, os.O_WRONLY)
            pwrite_all(self._fds[place.path], data, place.offset)
        except OSError as err:
            raise MergeError(f"Could not write {place.path}: {err.strerror or err}.") from None

    def __exit__(self, *exc: object) -> None:
        fds, self._fds = self._fds, {}
        try:
            for fd in fds.values():
                os.fsync(fd)
        except OSError as err:
            raise MergeError(f"Could not sync the output files: {err.strerror or err}.") from None
        finally:
            for fd in fds.values():
                os.close(fd)
