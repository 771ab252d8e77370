"""Memory that does not grow with the model: freed heap goes back to the OS, and no tensor outlives its job.

The depth-dependent growth this guards against came from malloc arenas keeping the freed buffers of
finished jobs resident (see :mod:`unimerge.heap`); ``benchmarks/merge_memory.py`` measures the peak of
a Llama-shaped merge at two depths.
"""

from __future__ import annotations

import ctypes
import re
import sys
import weakref
from pathlib import Path

import pytest
import torch

import unimerge.execute as execute
from _fixtures import make_tiny_llama
from unimerge.execute import RunOptions, run_merge
from unimerge.heap import release_free_memory
from unimerge.io import ShardedWriter

MiB = 2**20


def _rss_anon() -> int:
    """Resident anonymous memory of this process, in bytes (Linux)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"RssAnon:\s+(\d+) kB", text)[1]) * 1024  # type: ignore[index]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc are Linux-only")
def test_release_free_memory_returns_free_holes_of_the_heap() -> None:
    """Free blocks pinned between live ones stay resident until released (the merge's fragmentation)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    if not release_free_memory():
        pytest.skip("this C library has no malloc_trim")
    # Free one mmapped block first: glibc then raises its mmap threshold above 4 MiB (as freed
    # tensors do during a merge), so the blocks below come from the heap, not from mmap.
    first = libc.malloc(8 * MiB)
    ctypes.memset(first, 1, 8 * MiB)
    libc.free(first)
    big, pins = [], []
    for _ in range(24):
        big.append(libc.malloc(4 * MiB))
        ctypes.memset(big[-1], 1, 4 * MiB)  # resident
        pins.append(libc.malloc(MiB))  # live after each (too big for the small holes torch leaves):
        # no freed block reaches the top of the heap, so none is returned by free() itself
    try:
        for p in big:
            libc.free(p)
        held = _rss_anon()
        assert release_free_memory()
        released = held - _rss_anon()
    finally:
        for p in pins:
            libc.free(p)
    assert released >= 48 * MiB, f"only {released / MiB:.0f} MiB of 96 MiB of free holes went back"


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("deep")
    base = make_tiny_llama(d / "base", n_layers=12, shards=2)
    return {
        "base": base,
        "e1": make_tiny_llama(d / "e1", perturb_from=base, seed=1),
        "e2": make_tiny_llama(d / "e2", perturb_from=base, seed=2),
    }


def _ties(models: dict[str, Path], **params: object) -> dict[str, object]:
    return {
        "merge_method": "ties",
        "base_model": str(models["base"]),
        "models": [{"model": str(models[k]), "parameters": {"density": 0.5}} for k in ("e1", "e2")],
        "parameters": params,
    }


@pytest.mark.parametrize("trim_scope", ["tensor", "global"])
def test_every_job_hands_its_freed_memory_back(deep, tmp_path, monkeypatch, trim_scope) -> None:
    """One release after each job's write (and each tensor of a statistics pass): none at the end only."""
    events: list[str] = []
    monkeypatch.setattr(execute, "release_free_memory", lambda: events.append("release") or True)
    write = ShardedWriter.write

    def spy(self: ShardedWriter, name: str, tensor: torch.Tensor) -> None:
        events.append("write")
        write(self, name, tensor)

    monkeypatch.setattr(ShardedWriter, "write", spy)
    run_merge(_ties(deep, trim_scope=trim_scope), tmp_path / "out", RunOptions(threads=1))
    n = len(events) // 2 if trim_scope == "tensor" else events.count("write")
    merge_pass = events[-2 * n :]
    assert n == 12 * 9 + 3  # every tensor of the 12-layer model
    assert merge_pass == ["write", "release"] * n
    if trim_scope == "global":  # two statistics passes over every tensor before the merge pass
        assert events[: -2 * n] == ["release"] * (2 * n)


def test_no_tensor_outlives_its_job(deep, tmp_path, monkeypatch) -> None:
    """What was read and written for a finished job is freed: nothing collects tensors as depth grows."""
    alive: list[weakref.ref[torch.UntypedStorage]] = []
    write = ShardedWriter.write

    def spy(self: ShardedWriter, name: str, tensor: torch.Tensor) -> None:
        alive.append(weakref.ref(tensor.untyped_storage()))
        write(self, name, tensor)

    most: list[int] = []

    def progress(what: str, done: int, total: int) -> None:
        most.append(sum(r() is not None for r in alive))

    monkeypatch.setattr(ShardedWriter, "write", spy)
    run_merge(_ties(deep), tmp_path / "out", RunOptions(threads=2), progress=progress)
    assert len(alive) == len(most) == 12 * 9 + 3
    assert max(most) <= 2 * 2  # at most the jobs in flight (2 * threads)
    assert sum(r() is not None for r in alive) == 0


def test_a_bf16_base_is_held_once_in_the_compute_dtype(tmp_path, monkeypatch) -> None:
    """bf16 inputs: the merge gets the base already in float32, so no bf16 copy of it stays alive
    beside the float32 one (on a 7B model that copy put peak RSS over its bound)."""
    base = make_tiny_llama(tmp_path / "base", dtype=torch.bfloat16)
    experts = [
        make_tiny_llama(tmp_path / f"e{k}", perturb_from=base, seed=k, dtype=torch.bfloat16) for k in (1, 2)
    ]
    seen: list[torch.dtype] = []
    merge_stacked = execute.merge_stacked

    def spy(info, x, base, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(base.dtype)
        return merge_stacked(info, x, base, *args, **kwargs)

    monkeypatch.setattr(execute, "merge_stacked", spy)
    config = _ties({"base": base, "e1": experts[0], "e2": experts[1]})
    run_merge({**config, "dtype": "bfloat16"}, tmp_path / "out", RunOptions(threads=1))
    assert seen and set(seen) == {torch.float32}
