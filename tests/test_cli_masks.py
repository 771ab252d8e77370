"""`unimerge masks` + `unimerge task`: rebuild a task's model from the base and compact masks."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

from _fixtures import load_all_tensors, make_tiny_llama
from unimerge.cli import app
from unimerge.taskmasks import compute_task_masks, task_state_dict

runner = CliRunner()


@pytest.mark.parametrize("kind", ["emr", "tall"])
def test_masks_then_task_rebuilds_the_in_memory_result(tmp_path, kind) -> None:
    base = make_tiny_llama(tmp_path / "base")
    e1 = make_tiny_llama(tmp_path / "math", perturb_from=base, seed=1)
    e2 = make_tiny_llama(tmp_path / "code", perturb_from=base, seed=2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "emr", "base_model": str(base),
                                   "models": [{"model": str(e1)}, {"model": str(e2)}]}))
    res = runner.invoke(app, ["masks", str(cfg), str(tmp_path / "m.safetensors"), "--kind", kind])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["task", str(tmp_path / "m.safetensors"), str(base), str(tmp_path / "out"),
                              "--task", "code"])
    assert res.exit_code == 0, res.output
    got = load_all_tensors(tmp_path / "out")
    b = load_all_tensors(base)
    tm = compute_task_masks({"math": load_all_tensors(e1), "code": load_all_tensors(e2)}, b, method=kind)
    want = task_state_dict(b, tm, "code")
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    assert (tmp_path / "out" / "config.json").is_file()
    # the masked model is closer to its own expert than the base is
    e2sd = load_all_tensors(e2)
    err = sum(float((got[k] - e2sd[k]).norm()) for k in got)
    err0 = sum(float((b[k] - e2sd[k]).norm()) for k in got)
    assert err < err0


def test_unknown_task_is_a_clear_error(tmp_path) -> None:
    base = make_tiny_llama(tmp_path / "base")
    e1 = make_tiny_llama(tmp_path / "a", perturb_from=base, seed=1)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "emr", "base_model": str(base), "models": [{"model": str(e1)}]}))
    assert runner.invoke(app, ["masks", str(cfg), str(tmp_path / "m.safetensors")]).exit_code == 0
    res = runner.invoke(app, ["task", str(tmp_path / "m.safetensors"), str(base), str(tmp_path / "o"),
                              "--task", "nope"])
    assert res.exit_code != 0 and "nope" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_task_names_come_from_the_folders_that_tell_the_models_apart() -> None:
    from unimerge.cli.masks import _task_names

    assert _task_names(["m/math", "m/code"]) == ["math", "code"]
    assert _task_names(["x/math/encoder", "x/code/encoder"]) == ["math", "code"]
    assert _task_names(["base+loras/math", "base+loras/code"]) == ["math", "code"]
    assert _task_names(["a/encoder", "a/encoder", "b/other"]) == ["encoder_0", "encoder_1", "other"]
