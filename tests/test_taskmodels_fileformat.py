"""The task-model file: deterministic bytes, old files still load, kinds told apart, bad files named."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unimerge.errors import CheckpointError, ConfigError
from unimerge.taskmodels import (
    compute_task_experts,
    compute_task_masks,
    file_kind,
    is_task_experts_file,
    load_expert_model,
    load_task_experts,
    load_task_masks,
    load_task_model,
    save_task_experts,
    save_task_masks,
    task_state_dict,
)
from unimerge.taskmodels.fileformat import (
    mask_key,
    open_task_file,
    pack_bits,
    task_metadata,
    unpack_bits,
    vector_key,
    write_task_file,
)


def _data(n_tasks: int = 3) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    base = {
        "z.weight": torch.randn(9, 5, generator=g),
        "a.bias": torch.randn(7, generator=g),
        "n": torch.tensor(2),
    }
    experts = {
        f"t{i}": {
            k: (v + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for i in range(n_tasks)
    }
    return experts, base


def _header(path) -> dict:
    raw = path.read_bytes()
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])


def test_same_content_gives_the_same_bytes(tmp_path) -> None:
    experts, base = _data()
    for name, save, compute in [
        ("m", save_task_masks, lambda: compute_task_masks(experts, base, method="emr")),
        ("e", save_task_experts, lambda: compute_task_experts(experts, base, density=0.2)),
    ]:
        a, b = tmp_path / f"{name}1.safetensors", tmp_path / f"{name}2.safetensors"
        size = save(a, compute())
        save(b, compute())
        assert a.read_bytes() == b.read_bytes() and size == a.stat().st_size
        header = _header(a)
        names = [k for k in header if k != "__metadata__"]
        assert names == sorted(names) and list(header)[0] == "__metadata__"
        starts = [header[k]["data_offsets"][0] for k in names]
        assert starts == sorted(starts)  # laid out in name order
        loaded = load_file(str(a))  # safetensors itself reads the file
        with safe_open(str(a), framework="pt") as f:
            assert f.metadata() == header["__metadata__"] and sorted(f.keys()) == sorted(loaded)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_file_has_normal_permissions_and_is_all_or_nothing(tmp_path, monkeypatch) -> None:
    experts, base = _data()
    path = tmp_path / "m.safetensors"
    save_task_masks(path, compute_task_masks(experts, base))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    before = path.read_bytes()

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr("unimerge.io.writer.os.fsync", boom)  # fails after the data, before the rename
    with pytest.raises(OSError, match="disk full"):
        save_task_masks(path, compute_task_masks(experts, base, method="tall"))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    with pytest.raises(ConfigError, match="folder"):
        write_task_file(tmp_path, {}, {})


def test_files_written_by_safetensors_save_file_still_load(tmp_path) -> None:
    """Files from before (safetensors' save_file, same tensor names and metadata) load unchanged."""
    experts, base = _data()
    tm = compute_task_masks(experts, base, method="emr")
    tensors = {"rescalers": tm.rescalers}
    for key, v in tm.vector.items():
        tensors[f"vector::{key}"] = v
        for i in range(3):
            tensors[f"mask::{i}::{key}"] = pack_bits(tm.masks[key][i])
    meta = {
        "format": "unimerge.taskmasks",
        "version": "1",
        "method": "emr",
        "tasks": json.dumps(list(tm.tasks)),
    }
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    back = load_task_masks(tmp_path / "old.safetensors")
    assert back.tasks == tm.tasks and all(torch.equal(back.masks[k], tm.masks[k]) for k in tm.masks)
    got = load_task_model(base, tmp_path / "old.safetensors", "t2")
    want = task_state_dict(base, tm, "t2")
    assert all(torch.equal(got[k], want[k]) for k in want)
    # and the new writer keeps the tensors and metadata exactly
    save_task_masks(tmp_path / "new.safetensors", tm)
    with safe_open(str(tmp_path / "new.safetensors"), "pt") as new:
        assert new.metadata() == meta and sorted(new.keys()) == sorted(tensors)
        assert all(torch.equal(new.get_tensor(k), tensors[k]) for k in tensors)


def test_file_kind_tells_masks_from_experts(tmp_path) -> None:
    experts, base = _data(2)
    save_task_masks(tmp_path / "m.safetensors", compute_task_masks(experts, base))
    save_task_experts(tmp_path / "e.safetensors", compute_task_experts(experts, base))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    assert file_kind(tmp_path / "m.safetensors") == "masks"
    assert file_kind(tmp_path / "e.safetensors") == "experts" and is_task_experts_file(
        tmp_path / "e.safetensors"
    )
    for name in ("other", "junk", "missing"):
        assert file_kind(tmp_path / f"{name}.safetensors") is None
    with pytest.raises(CheckpointError, match="not a unimerge task expert file.*unimerge.taskmasks"):
        load_task_experts(tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="not a unimerge task mask file.*unimerge.taskexperts"):
        load_task_model(base, tmp_path / "e.safetensors", 0)
    assert open_task_file(tmp_path / "e.safetensors").kind == "experts"
    with pytest.raises(CheckpointError, match="does not exist"):
        open_task_file(tmp_path / "missing.safetensors")


def _mask_file(tmp_path, tensors, **meta) -> os.PathLike:
    path = tmp_path / "bad.safetensors"
    write_task_file(path, tensors, {**task_metadata("masks", "tall", ["a", "b"]), **meta})
    return path


def test_bad_files_are_named_with_the_problem(tmp_path) -> None:
    v = torch.ones(3, 5)
    good = {
        "rescalers": torch.ones(2),
        vector_key("w"): v,
        mask_key(0, "w"): pack_bits(v > 0),
        mask_key(1, "w"): pack_bits(v > 0),
    }
    base = {"w": torch.zeros(3, 5)}
    assert torch.equal(load_task_model(base, _mask_file(tmp_path, good), "b")["w"], v)
    incomplete = {k: t for k, t in good.items() if k != mask_key(1, "w")}
    with pytest.raises(CheckpointError, match=r"incomplete.*mask::1::w"):
        load_task_model(base, _mask_file(tmp_path, incomplete), 0)
    with pytest.raises(CheckpointError, match="version '2'"):
        load_task_model(base, _mask_file(tmp_path, good, version="2"), 0)
    with pytest.raises(CheckpointError, match="tasks"):
        load_task_model(base, _mask_file(tmp_path, good, tasks="a,b"), 0)
    with pytest.raises(CheckpointError, match="method is 'ties'"):
        load_task_model(base, _mask_file(tmp_path, good, method="ties"), 0)
    short = {**good, mask_key(1, "w"): torch.zeros(1, dtype=torch.uint8)}
    with pytest.raises(CheckpointError, match=r"corrupt.*mask::1::w"):
        load_task_model(base, _mask_file(tmp_path, short), "b")


def test_expert_indices_outside_the_tensor_are_refused(tmp_path) -> None:
    experts, base = _data(2)
    te = compute_task_experts(experts, base, density=0.2)
    te.experts["a.bias"][1] = (torch.tensor([0, 7]), torch.ones(2))  # a.bias has 7 entries
    save_task_experts(tmp_path / "e.safetensors", te)
    assert set(load_expert_model(base, tmp_path / "e.safetensors", "t0")) == set(base)
    with pytest.raises(CheckpointError, match="outside"):
        load_expert_model(base, tmp_path / "e.safetensors", "t1")


@pytest.mark.parametrize("shape", [(), (1,), (7,), (8,), (3, 5), (2, 3, 4)])
def test_bit_packing_round_trips(shape) -> None:
    g = torch.Generator().manual_seed(len(shape))
    mask = torch.rand(shape, generator=g) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(math.prod(shape) / 8),)
    assert torch.equal(unpack_bits(packed, shape), mask)
