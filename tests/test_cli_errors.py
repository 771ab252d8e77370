"""Bad input through the CLI: non-zero exit, one paragraph naming file/tensor/fix, nothing written."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from _fixtures import load_all_tensors, make_tiny_llama, save_sharded
from unimerge.cli import app

runner = CliRunner()


@pytest.fixture()
def world(tmp_path: Path) -> dict[str, Path]:
    base = make_tiny_llama(tmp_path / "base")
    return {
        "root": tmp_path,
        "base": base,
        "e1": make_tiny_llama(tmp_path / "e1", perturb_from=base, seed=1),
        "e2": make_tiny_llama(tmp_path / "e2", perturb_from=base, seed=2),
    }


def _write_cfg(
    world: dict[str, Path], method: str = "ties", params=None, models=("e1", "e2"), **extra
) -> Path:
    cfg = {
        "merge_method": method,
        "base_model": str(world["base"]),
        "models": [{"model": str(world[m]), "parameters": {"weight": 1.0}} for m in models],
        "parameters": params if params is not None else {"density": 0.5},
        **extra,
    }
    path = world["root"] / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def _fails(world: dict[str, Path], *args: str, match: str) -> str:
    before = {k: _digest(v) for k, v in world.items() if k != "root" and v.is_dir()}
    out = world["root"] / "out"
    res = runner.invoke(app, ["merge", *args, str(out)])
    text = " ".join(res.output.split())
    assert res.exit_code != 0, text
    assert "Traceback" not in res.output
    assert match.lower() in text.lower(), text
    assert not out.exists()
    assert not [p for p in world["root"].iterdir() if p.name.startswith(".out.tmp")]
    assert before == {k: _digest(v) for k, v in world.items() if k != "root" and v.is_dir()}
    return text


def _edit(folder: Path, fn) -> None:
    sd = load_all_tensors(folder)
    fn(sd)
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    save_sharded(sd, folder)


def test_merge_succeeds_and_refuses_to_overwrite(world) -> None:
    cfg = _write_cfg(world)
    out = world["root"] / "out"
    res = runner.invoke(app, ["merge", str(cfg), str(out)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["merge", str(cfg), str(out)])
    assert res.exit_code != 0 and "--force" in res.output
    res = runner.invoke(app, ["merge", str(cfg), str(out), "--force", "--seed", "3"])
    assert res.exit_code == 0, res.output


def test_mismatched_shapes(world) -> None:
    _edit(world["e2"], lambda sd: sd.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(31, 16)))
    _fails(world, str(_write_cfg(world)), match="model.layers.0.mlp.up_proj.weight")


def test_missing_tensor(world) -> None:
    _edit(world["e1"], lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    text = _fails(world, str(_write_cfg(world)), match="missing 1")
    assert "model.layers.1.mlp.down_proj.weight" in text and str(world["e1"]) in text


def test_different_vocabulary(world) -> None:
    def grow(sd):
        sd["model.embed_tokens.weight"] = torch.zeros(65, 16)
        sd["lm_head.weight"] = torch.zeros(65, 16)

    _edit(world["e1"], grow)
    text = _fails(world, str(_write_cfg(world)), match="vocabulary")
    assert "embed_tokens" in text and "64" in text and "65" in text


def test_different_architecture(world) -> None:
    cfg = json.loads((world["e1"] / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mistral", ["MistralForCausalLM"]
    (world["e1"] / "config.json").write_text(json.dumps(cfg))
    _fails(world, str(_write_cfg(world)), match="different architectures")


def test_truncated_file(world) -> None:
    f = world["e1"] / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    _fails(world, str(_write_cfg(world)), match="truncated")


def test_header_claims_more_bytes_than_file(world) -> None:
    f = world["e1"] / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data) * 10) + data[8:])
    _fails(world, str(_write_cfg(world)), match=str(f))


def test_corrupt_header(world) -> None:
    f = world["e1"] / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[9:20] = b"\xff" * 11
    f.write_bytes(bytes(data))
    _fails(world, str(_write_cfg(world)), match="corrupt")


def test_nan_input_warns_with_tensor_name(world) -> None:
    def poison(sd):
        sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")

    _edit(world["e1"], poison)
    res = runner.invoke(
        app, ["merge", str(_write_cfg(world, "task_arithmetic", params={})), str(world["root"] / "out")]
    )
    assert res.exit_code == 0, res.output
    assert "NaN" in res.output and "model.layers.0.mlp.up_proj.weight" in res.output


@pytest.mark.parametrize(
    ("method", "params", "match"),
    [
        ("dare-ties", {}, "did you mean 'dare_ties'"),
        ("ties", {"densty": 0.5}, "densty"),
        ("ties", {"density": 1.5}, "density"),
        ("ties", {"density": 0.0}, "density"),
    ],
)
def test_bad_method_or_parameter(world, method, params, match) -> None:
    text = _fails(world, str(_write_cfg(world, method, params=params)), match=match)
    assert str(world["root"] / "cfg.yaml") in text


def test_output_inside_an_input(world) -> None:
    cfg = _write_cfg(world)
    res = runner.invoke(app, ["merge", str(cfg), str(world["e1"] / "merged")])
    assert res.exit_code != 0 and "outside every input" in res.output
    assert not (world["e1"] / "merged").exists()


def test_disk_full_leaves_nothing(world, monkeypatch) -> None:
    real = os.pwrite
    calls = {"n": 0}

    def flaky(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", flaky)
    _fails(world, str(_write_cfg(world)), match="disk full")


def test_index_escaping_the_folder(world) -> None:
    folder = world["e1"]
    sd = load_all_tensors(folder)
    (folder / "model.safetensors").unlink()
    save_sharded(sd, folder, shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../../etc/passwd"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _fails(world, str(_write_cfg(world)), match="outside")


def test_missing_model_and_pickle_without_opt_in(world) -> None:
    _fails(world, str(_missing_cfg(world)), match="not found")
    folder = world["e2"]
    sd = load_all_tensors(folder)
    (folder / "model.safetensors").unlink()
    torch.save(sd, folder / "pytorch_model.bin")
    _fails(world, str(_write_cfg(world)), match="--allow-pickle")
    res = runner.invoke(app, ["merge", str(_write_cfg(world)), str(world["root"] / "out"), "--allow-pickle"])
    assert res.exit_code == 0, res.output


def _missing_cfg(world) -> Path:
    path = _write_cfg(world)
    cfg = yaml.safe_load(path.read_text())
    cfg["models"][1]["model"] = str(world["root"] / "does-not-exist")
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_invalid_yaml_and_unknown_key(world) -> None:
    path = world["root"] / "cfg.yaml"
    path.write_text("merge_method: [unclosed\n")
    _fails(world, str(path), match="not valid YAML")
    cfg = _write_cfg(world, tokenizer_sourc="base")
    _fails(world, str(cfg), match="tokenizer_sourc")


def test_validate_prints_summary_without_writing(world) -> None:
    res = runner.invoke(app, ["validate", str(_write_cfg(world)), str(world["root"] / "out")])
    assert res.exit_code == 0, res.output
    assert "tensors" in res.output and "21" in res.output and "peak memory" in res.output
    assert not (world["root"] / "out").exists()


def test_methods_json_contract() -> None:
    res = runner.invoke(app, ["methods", "--json"])
    assert res.exit_code == 0
    rows = json.loads(res.output)
    names = {r["name"] for r in rows}
    assert {"ties", "slerp", "linear"} <= names
    for r in rows:
        assert {"name", "family", "needs_base", "data", "paper", "params"} <= set(r)
        assert r["data"] in ("none", "unlabeled", "labeled")
        for spec in r["params"].values():
            assert {"type", "default"} <= set(spec)
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0 and "ties" in res.output


def test_killed_run_leaves_no_output(world) -> None:
    """SIGKILL in the middle of writing: OUT never appears, inputs are untouched.

    The child writes one tensor, says so, and then blocks inside the writer until it is killed, so
    the kill always lands mid-write (no sleeps to line the two processes up).
    """
    import select
    import signal
    import subprocess
    import sys

    cfg, out = _write_cfg(world), world["root"] / "out"
    before = _digest(world["e1"])
    script = (
        "import threading\n"
        "from unimerge.io import writer\n"
        "real = writer.ShardedWriter.write\n"
        "def stuck(self, name, t):\n"
        "    real(self, name, t); print('wrote', flush=True); threading.Event().wait()\n"
        "writer.ShardedWriter.write = stuck\n"
        "from unimerge.cli import app\n"
        f"app(['merge', {str(cfg)!r}, {str(out)!r}, '--threads', '1'])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "the child wrote no tensor within 120 s"
        assert proc.stdout.readline().startswith("wrote")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()  # type: ignore[union-attr]
    assert not out.exists()
    assert _digest(world["e1"]) == before


def test_python_m_unimerge_runs_the_command_through_main(world) -> None:
    """The console script's path (`main`: huge pages, GC paused for the torch import, frozen at exit)
    merges, and a bad input still exits 2 with one paragraph and no traceback."""
    import subprocess
    import sys

    cfg, out = _write_cfg(world), world["root"] / "out"
    ok = subprocess.run(
        [sys.executable, "-m", "unimerge", "merge", str(cfg), str(out), "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("wrote ") and (out / "model.safetensors").is_file()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "unimerge",
            "merge",
            str(world["root"] / "missing.yaml"),
            str(world["root"] / "out2"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "missing.yaml" in bad.stderr


def test_device_is_a_checked_choice(world) -> None:
    """An unknown device is a usage error (exit 2) naming the choices, not an internal error."""
    text = _fails(world, str(_write_cfg(world)), "--device", "gpu", match="'gpu' is not a device")
    assert "cpu, cuda" in text and "internal error" not in text
    if not torch.cuda.is_available():
        res = runner.invoke(
            app, ["merge", str(_write_cfg(world)), str(world["root"] / "out"), "--device", "cuda"]
        )
        assert res.exit_code == 2 and "no CUDA device" in " ".join(res.output.split()), res.output
