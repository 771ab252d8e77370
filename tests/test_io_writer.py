"""Sharded atomic writer: layout, header-first writes from many threads, failures leave nothing."""

from __future__ import annotations

import errno
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from _fixtures import load_all_tensors, make_tiny_llama
from unimerge.errors import MergeError
from unimerge.io import (
    OutTensor,
    ShardedWriter,
    copy_model_files,
    open_checkpoint,
    parse_size,
    read_safetensors_header,
)

MIXED = {
    "f32": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7,
    "f16": torch.tensor([[1.5, -2.25]], dtype=torch.float16),
    "bf16": torch.tensor([3.140625, -1.0, 0.5], dtype=torch.bfloat16),
    "i64": torch.tensor([1, -(2**40), 7], dtype=torch.int64),
    "scalar": torch.tensor(2.5),
    "flag": torch.tensor([True, False]),
    "empty": torch.zeros(0, 4),
}


def _plan(tensors: dict[str, torch.Tensor]) -> list[OutTensor]:
    return [OutTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def _leftovers(parent: Path, out: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_round_trip_mixed_dtypes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with ShardedWriter(out, _plan(MIXED), metadata={"merged_by": "unimerge"}) as w:
        for name, t in reversed(MIXED.items()):
            w.write(name, t)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    loaded = load_file(str(out / "model.safetensors"))
    for name, t in MIXED.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"merged_by": "unimerge", "format": "pt"}
    assert _leftovers(tmp_path, out) == []


def test_shard_boundaries_and_index(tmp_path: Path) -> None:
    # 40-byte tensors with an 80-byte limit: two fit exactly, the third starts a new shard;
    # a 400-byte tensor gets a shard of its own.
    tensors = {
        "a": torch.full((10,), 1.0),
        "b": torch.full((10,), 2.0),
        "c": torch.full((10,), 3.0),
        "big": torch.full((100,), 4.0),
        "d": torch.full((5,), 5.0),
    }
    out = tmp_path / "out"
    w = ShardedWriter(out, _plan(tensors), max_shard_bytes=80)
    assert w.shard_names == [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    for name, t in tensors.items():
        w.write(name, t)
    w.commit()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 40 * 3 + 400 + 20
    shard = {n: int(f[6:11]) for n, f in index["weight_map"].items()}
    assert shard == {"a": 1, "b": 1, "c": 2, "big": 3, "d": 4}
    metas, _ = read_safetensors_header(out / "model-00001-of-00004.safetensors")
    assert list(metas) == ["a", "b"]  # laid out in plan order
    ckpt = open_checkpoint(out)
    for name, t in tensors.items():
        assert torch.equal(ckpt.read(name), t)


def test_headers_written_first(tmp_path: Path) -> None:
    plan = [OutTensor("x", (4,), torch.float32), OutTensor("y", (2, 2), torch.bfloat16)]
    w = ShardedWriter(tmp_path / "out", plan, max_shard_bytes=16)
    tmp = next(p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-"))
    metas, meta = read_safetensors_header(tmp / "model-00002-of-00002.safetensors")
    assert meta == {"format": "pt"} and metas["y"].shape == (2, 2) and metas["y"].dtype == torch.bfloat16
    w.abort()
    assert not tmp.exists() and not (tmp_path / "out").exists()


def test_many_threads_random_order(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64]
    tensors = {
        f"t{i}": (torch.randn((i % 7 + 1, 3), generator=gen) * 100).to(dtypes[i % 4]) for i in range(120)
    }
    names = list(tensors)
    random.Random(0).shuffle(names)
    out = tmp_path / "out"
    with ShardedWriter(out, _plan(tensors), max_shard_bytes=300) as w, ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: w.write(n, tensors[n]), names))
    assert len(list(out.glob("model-*.safetensors"))) > 5
    got = load_all_tensors(out)
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(got[name], t), name


def test_partial_pwrite_is_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: real(fd, bytes(data[:3]), off))
    t = torch.arange(10, dtype=torch.float32)
    with ShardedWriter(tmp_path / "out", _plan({"t": t})) as w:
        w.write("t", t)
    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["t"], t)


def test_plan_mismatches(tmp_path: Path) -> None:
    w = ShardedWriter(tmp_path / "out", [OutTensor("x", (2,), torch.float32)])
    with pytest.raises(MergeError, match="not in the output plan"):
        w.write("y", torch.zeros(2))
    with pytest.raises(MergeError, match=r"\[3\] torch.float32, but the plan says \[2\]"):
        w.write("x", torch.zeros(3))
    with pytest.raises(MergeError, match="torch.float16, but the plan says"):
        w.write("x", torch.zeros(2, dtype=torch.float16))
    w.write("x", torch.zeros(2))
    with pytest.raises(MergeError, match="written twice"):
        w.write("x", torch.zeros(2))
    w.abort()
    with pytest.raises(MergeError, match="duplicate|planned twice"):
        ShardedWriter(tmp_path / "o2", [OutTensor("x", (1,), torch.float32)] * 2)


def test_commit_lists_missing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    w = ShardedWriter(out, _plan({"a": torch.ones(1), "b": torch.ones(1), "c": torch.ones(1)}))
    w.write("b", torch.ones(1))
    with pytest.raises(MergeError, match=r"2 planned tensors were never written \(a, c\)"):
        w.commit()
    assert not out.exists() and _leftovers(tmp_path, out) == []


def test_exception_in_block_aborts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ZeroDivisionError), ShardedWriter(out, _plan({"a": torch.ones(1)})) as w:
        w.write("a", torch.ones(1))
        _ = 1 / 0
    assert not out.exists() and _leftovers(tmp_path, out) == []
    with pytest.raises(MergeError, match="aborted"):
        w.write("a", torch.ones(1))


def test_existing_output_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(MergeError, match="--force"):
        ShardedWriter(out, _plan({"a": torch.ones(1)}))
    with ShardedWriter(out, _plan({"a": torch.ones(1)}), force=True) as w:
        w.write("a", torch.full((1,), 7.0))
        assert (out / "old.txt").exists()  # untouched until commit
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert load_file(str(out / "model.safetensors"))["a"].item() == 7.0
    assert _leftovers(tmp_path, out) == []


def test_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    w = ShardedWriter(out, _plan({"a": torch.ones(4), "b": torch.ones(4)}), max_shard_bytes=16)

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(
        MergeError, match=r"Disk full while writing .*model-00002-of-00002.safetensors; nothing was"
    ):
        w.write("b", torch.ones(4))
    assert not out.exists() and _leftovers(tmp_path, out) == []
    with pytest.raises(MergeError, match="Disk full"):  # later writes report the failure that closed it
        w.write("a", torch.ones(4))


def test_relpaths_stay_inside(tmp_path: Path) -> None:
    w = ShardedWriter(tmp_path / "out", _plan({"a": torch.ones(1)}))
    for bad in ["../evil.txt", "/tmp/evil.txt", "a/../../evil.txt", ""]:
        with pytest.raises(MergeError, match="inside the output folder"):
            w.write_text(bad, "x")
    with pytest.raises(MergeError, match="overwrite a weight file"):
        w.write_text("model.safetensors", "x")
    with pytest.raises(MergeError, match="no such file"):
        w.copy_file(tmp_path / "absent.json")
    w.write_text("docs/README.md", "hello")
    w.write("a", torch.ones(1))
    w.commit()
    assert (tmp_path / "out" / "docs" / "README.md").read_text() == "hello"
    assert not (tmp_path / "evil.txt").exists()


def test_copy_model_files_and_transformers_load(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    src = make_tiny_llama(tmp_path / "src", tokenizer=True)
    ckpt = open_checkpoint(src)
    metas = ckpt.tensors()
    out = tmp_path / "out"
    plan = [OutTensor(n, m.shape, torch.bfloat16) for n, m in metas.items()]
    with ShardedWriter(out, plan, max_shard_bytes=4000) as w:
        copied = copy_model_files(src, w)
        for name in metas:
            w.write(name, ckpt.read(name).to(torch.bfloat16))
    assert copied == [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]
    assert (out / "model.safetensors.index.json").exists()
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    state = model.state_dict()
    for name in metas:
        assert torch.equal(state[name], ckpt.read(name).to(torch.bfloat16)), name
    assert transformers.AutoTokenizer.from_pretrained(out)("w3 w4")["input_ids"] == [3, 4]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GB", 2_000_000_000),
        ("500MB", 500_000_000),
        ("1.5G", 1_500_000_000),
        ("1e9", 1_000_000_000),
        ("4GiB", 4 * 2**30),
        (" 10 kib ", 10240),
        ("123", 123),
        (123, 123),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "2XB", "-1GB", "0", 0, "1..5G", True, 1.5, "nan"])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="2GB"):
        parse_size(text)  # type: ignore[arg-type]
