"""Checkpoint reading: formats, lazy headers, and every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _fixtures import load_all_tensors, make_tiny_llama, save_sharded
from unimerge.errors import CheckpointError
from unimerge.io import open_checkpoint, read_safetensors_header, sha256_file

MIXED = {
    "f32": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7,
    "f16": torch.tensor([[1.5, -2.25]], dtype=torch.float16),
    "bf16": torch.tensor([3.140625, -1.0, 0.5], dtype=torch.bfloat16),
    "i64": torch.tensor([1, -(2**40), 7], dtype=torch.int64),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
}


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b)


def test_folder_headers_match_data(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "m")
    expected = load_all_tensors(path)
    with open_checkpoint(path) as ckpt:
        metas = ckpt.tensors()
        assert list(metas) == list(expected)
        assert ckpt.root == path and ckpt.ref == str(path)
        assert ckpt.files() == [path / "model.safetensors"]
        for name, t in expected.items():
            m = metas[name]
            assert (m.shape, m.dtype, m.nbytes) == (tuple(t.shape), t.dtype, t.numel() * 4)
            _assert_same(ckpt.read(name), t)


def test_mixed_dtypes_single_file(tmp_path: Path) -> None:
    file = tmp_path / "w.safetensors"
    save_file(MIXED, str(file))
    ckpt = open_checkpoint(file)
    assert ckpt.root == tmp_path
    assert ckpt.tensors()["scalar"].shape == ()
    assert ckpt.tensors()["bf16"].nbytes == 6
    for name, t in MIXED.items():
        _assert_same(ckpt.read(name), t)


def test_sharded_folder(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "m", shards=3, dtype=torch.bfloat16)
    expected = load_all_tensors(path)
    ckpt = open_checkpoint(path)
    assert len(ckpt.files()) == 3
    index = json.loads((path / "model.safetensors.index.json").read_text())
    for name, t in expected.items():
        assert ckpt.tensors()[name].file == path / index["weight_map"][name]
        _assert_same(ckpt.read(name), t)


def test_concurrent_reads(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "m", shards=2)
    expected = load_all_tensors(path)
    ckpt = open_checkpoint(path)
    names = list(expected) * 8
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ckpt.read, names))
    for name, t in zip(names, got, strict=True):
        _assert_same(t, expected[name])
    ckpt.close()
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.read(names[0])


def test_unknown_tensor_and_sha(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "m")
    ckpt = open_checkpoint(path)
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        ckpt.read("nope")
    file = path / "model.safetensors"
    assert sha256_file(file) == hashlib.sha256(file.read_bytes()).hexdigest()


def test_tiny_llama_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    path = make_tiny_llama(tmp_path / "m", shards=2)
    model = transformers.LlamaForCausalLM.from_pretrained(path)
    state = model.state_dict()
    for name, t in load_all_tensors(path).items():
        assert torch.equal(state[name], t), name
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


# --- corrupt safetensors files -------------------------------------------------------------------


def _raw(header: dict, data: bytes) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


GOOD = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
CORRUPT = {
    "length beyond file": struct.pack("<Q", 10**6) + b"{}",
    "too short": b"\x01\x02",
    "bad json": struct.pack("<Q", 5) + b"{nope" + bytes(8),
    "not an object": _raw([1, 2], b""),  # type: ignore[arg-type]
    "unknown dtype": _raw({"w": {"dtype": "F13", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    "offsets vs shape": _raw({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
    "negative shape": _raw({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)),
    "truncated": _raw(GOOD, bytes(5)),
    "trailing bytes": _raw(GOOD, bytes(12)),
    "overlap": _raw(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        bytes(12),
    ),
    "missing field": _raw({"w": {"dtype": "F32", "shape": [2]}}, bytes(8)),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_safetensors(tmp_path: Path, case: str) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(CORRUPT[case])
    with pytest.raises(CheckpointError, match="re-download or re-save") as err:
        open_checkpoint(tmp_path)
    assert str(file) in str(err.value)


def test_truncated_real_file_names_tensor_count(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "m")
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"claims \d+ bytes .* truncated"):
        open_checkpoint(path)


def test_good_raw_header(tmp_path: Path) -> None:
    file = tmp_path / "x.safetensors"
    file.write_bytes(_raw({"__metadata__": {"format": "pt"}, **GOOD}, struct.pack("<2f", 1.0, 2.0)))
    metas, meta = read_safetensors_header(file)
    assert meta == {"format": "pt"} and metas["w"].shape == (2,)
    assert open_checkpoint(file).read("w").tolist() == [1.0, 2.0]


# --- folders and indexes -------------------------------------------------------------------------


def _index(folder: Path, weight_map: dict[str, str]) -> None:
    body = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(body))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_escaping_folder(tmp_path: Path, shard: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    _index(folder, {"w": shard})
    with pytest.raises(CheckpointError, match="outside"):
        open_checkpoint(folder)


def test_index_missing_shard(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "m", shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors, which is missing"):
        open_checkpoint(path)


def test_index_names_tensor_absent_from_shard(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    save_sharded({"a": torch.ones(2)}, folder)
    _index(folder, {"a": "model.safetensors", "ghost": "model.safetensors"})
    with pytest.raises(CheckpointError, match="'ghost'"):
        open_checkpoint(folder)


def test_index_bad_json(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match="Cannot parse"):
        open_checkpoint(folder)


def test_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found.*model.safetensors"):
        open_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"No model weights .*config.json.*Expected model.safetensors"):
        open_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        open_checkpoint(tmp_path / "empty" / "config.json")


def test_plus_syntax_with_missing_parts(tmp_path: Path) -> None:
    base = make_tiny_llama(tmp_path / "base")
    with pytest.raises(CheckpointError, match="BASE\\+ADAPTER"):
        open_checkpoint(f"{base}+{tmp_path / 'no_adapter'}")


# --- pickle ----------------------------------------------------------------------------------------


def test_pickle_needs_opt_in(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    torch.save(dict(MIXED), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle") as err:
        open_checkpoint(folder)
    assert "arbitrary code" in str(err.value)
    ckpt = open_checkpoint(folder, allow_pickle=True)
    assert ckpt.tensors()["scalar"].shape == ()
    for name, t in MIXED.items():
        _assert_same(ckpt.read(name), t)


def test_sharded_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    torch.save({"a": torch.ones(2)}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.arange(3)}, folder / "pytorch_model-00002-of-00002.bin")
    wmap = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wmap}))
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(folder)
    ckpt = open_checkpoint(folder, allow_pickle=True)
    assert ckpt.read("b").tolist() == [0, 1, 2]
    assert [f.name for f in ckpt.files()] == sorted(wmap.values())


def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(1), "obj": Path("x")}, file)
    with pytest.raises(CheckpointError, match="weights_only"):
        open_checkpoint(file, allow_pickle=True)


def test_read_into_a_stacked_buffer_converts_dtypes(tmp_path: Path) -> None:
    file = tmp_path / "w.safetensors"
    save_file(MIXED, str(file))
    ckpt = open_checkpoint(file)
    stack = torch.full((3, 2, 3), -1.0)
    ckpt.read_into("f32", stack[1])  # straight into the buffer
    assert torch.equal(stack[1], MIXED["f32"]) and torch.equal(stack[0], torch.full((2, 3), -1.0))
    wide = torch.empty(3, dtype=torch.float64)
    ckpt.read_into("bf16", wide)  # converted on the way
    assert torch.equal(wide, MIXED["bf16"].double())
    ckpt.close()
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.read("f32")


def test_file_truncated_after_planning_names_tensor(tmp_path: Path) -> None:
    file = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4), "b": torch.arange(1000.0)}, str(file))
    ckpt = open_checkpoint(file)  # header checked while the file was whole
    with file.open("r+b") as fh:
        fh.truncate(file.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"(?i)'b'.*ended 100 bytes early.*re-download"):
        ckpt.read("b")
