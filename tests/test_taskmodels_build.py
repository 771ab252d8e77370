"""`unimerge masks` + `unimerge task` (unimerge.taskmodels.build): rebuild a task's model from the base and
compact masks or experts, streaming the base."""

from __future__ import annotations

import inspect
import weakref

import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from _fixtures import load_all_tensors, make_tiny_llama
from unimerge.cli import app
from unimerge.errors import ConfigError, MergeError, PlanError
from unimerge.io import ShardedWriter
from unimerge.taskmodels import (
    build,
    build_task_models,
    compute_task_experts,
    compute_task_masks,
    file_kind,
    rebuild_task,
    task_experts_state_dict,
    task_names,
    task_state_dict,
)

runner = CliRunner()


@pytest.mark.parametrize("kind", ["emr", "tall"])
def test_masks_then_task_rebuilds_the_in_memory_result(tmp_path, kind) -> None:
    base = make_tiny_llama(tmp_path / "base")
    e1 = make_tiny_llama(tmp_path / "math", perturb_from=base, seed=1)
    e2 = make_tiny_llama(tmp_path / "code", perturb_from=base, seed=2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": "emr",
                "base_model": str(base),
                "models": [{"model": str(e1)}, {"model": str(e2)}],
            }
        )
    )
    res = runner.invoke(app, ["masks", str(cfg), str(tmp_path / "m.safetensors"), "--kind", kind])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app, ["task", str(tmp_path / "m.safetensors"), str(base), str(tmp_path / "out"), "--task", "code"]
    )
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
    cfg.write_text(
        yaml.safe_dump({"merge_method": "emr", "base_model": str(base), "models": [{"model": str(e1)}]})
    )
    assert runner.invoke(app, ["masks", str(cfg), str(tmp_path / "m.safetensors")]).exit_code == 0
    res = runner.invoke(
        app, ["task", str(tmp_path / "m.safetensors"), str(base), str(tmp_path / "o"), "--task", "nope"]
    )
    assert res.exit_code != 0 and "nope" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_task_names_come_from_the_folders_that_tell_the_models_apart() -> None:
    assert task_names(["m/math", "m/code"]) == ["math", "code"]
    assert task_names(["x/math/encoder", "x/code/encoder"]) == ["math", "code"]
    assert task_names(["base+loras/math", "base+loras/code"]) == ["math", "code"]
    assert task_names(["a/encoder", "a/encoder", "b/other"]) == ["encoder_0", "encoder_1", "other"]


def _models(tmp_path, method: str = "emr", **params):
    """A tiny base, two experts (math, code) and a config naming them."""
    base = make_tiny_llama(tmp_path / "base", n_layers=3, tokenizer=True)
    e1 = make_tiny_llama(tmp_path / "math", perturb_from=base, seed=1)
    e2 = make_tiny_llama(tmp_path / "code", perturb_from=base, seed=2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": method,
                "base_model": str(base),
                "parameters": params,
                "models": [{"model": str(e1)}, {"model": str(e2)}],
            }
        )
    )
    return cfg, base, e1, e2


def test_rebuild_task_streams_the_base_one_tensor_at_a_time(tmp_path, monkeypatch) -> None:
    cfg, base, _, _ = _models(tmp_path)
    build_task_models(cfg, tmp_path / "m.safetensors", "tall")
    events: list[tuple[str, str]] = []
    alive, peak = [0], [0]

    def gone() -> None:
        alive[0] -= 1

    def spying_open(ref, **kwargs):
        ck = real_open(ref, **kwargs)
        real_read = ck.read

        def read(name: str) -> torch.Tensor:
            t = real_read(name)
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            weakref.finalize(t, gone)
            events.append(("read", name))
            return t

        ck.read = read
        return ck

    def spying_write(self, name, tensor) -> None:
        events.append(("write", name))
        real_write(self, name, tensor)

    real_open, real_write = build.open_checkpoint, ShardedWriter.write
    monkeypatch.setattr(build, "open_checkpoint", spying_open)
    monkeypatch.setattr(ShardedWriter, "write", spying_write)
    n = rebuild_task(tmp_path / "m.safetensors", base, tmp_path / "out", "code")
    names = list(load_all_tensors(base))
    assert n == len(names) > 10
    # each base tensor is read, rebuilt and written before the next is read
    assert sorted(events[0::2]) == sorted(("read", k) for k in names)
    assert events == [e for _, k in events[0::2] for e in (("read", k), ("write", k))]
    assert peak[0] <= 2  # the tensor being read and the one just written, never the model


@pytest.mark.parametrize("kind", ["emr", "tall", "free_merging"])
def test_rebuild_task_equals_the_in_memory_model(tmp_path, kind) -> None:
    method = "fr_merging" if kind == "free_merging" else "emr"
    cfg, base, e1, e2 = _models(tmp_path, method, **({"cutoff": 0.2} if kind == "free_merging" else {}))
    built = build_task_models(cfg, tmp_path / "m.safetensors", kind, density=0.05)
    assert built.tasks == ("math", "code") and built.kind == kind
    assert built.size == (tmp_path / "m.safetensors").stat().st_size
    assert file_kind(built.path) == ("experts" if kind == "free_merging" else "masks")
    b = load_all_tensors(base)
    experts = {"math": load_all_tensors(e1), "code": load_all_tensors(e2)}
    if kind == "free_merging":
        te = compute_task_experts(experts, b, cutoff=0.2, density=0.05)
        want = task_experts_state_dict(b, te, "code")
    else:
        want = task_state_dict(b, compute_task_masks(experts, b, method=kind), "code")
    rebuild_task(built.path, base, tmp_path / "out", "1")  # an index given as digits
    got = load_all_tensors(tmp_path / "out")
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["unimerge_task"] == "1"
    assert {"config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "out").iterdir()}


def test_rebuild_task_checks_the_base_before_writing(tmp_path) -> None:
    cfg, base, _, _ = _models(tmp_path)
    build_task_models(cfg, tmp_path / "m.safetensors", "emr")
    other = make_tiny_llama(tmp_path / "other", hidden=8, n_heads=2, n_kv_heads=1)
    with pytest.raises(PlanError, match="shape"):
        rebuild_task(tmp_path / "m.safetensors", other, tmp_path / "out", "code")
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    with pytest.raises(MergeError, match="already exists"):
        rebuild_task(tmp_path / "m.safetensors", base, tmp_path / "out", "code")
    assert rebuild_task(tmp_path / "m.safetensors", base, tmp_path / "out", "code", force=True) > 0


def test_kind_is_checked(tmp_path) -> None:
    cfg, _, _, _ = _models(tmp_path)
    with pytest.raises(ConfigError, match="free_merging"):
        build_task_models(cfg, tmp_path / "m.safetensors", "ties")
    res = runner.invoke(app, ["masks", str(cfg), str(tmp_path / "m.safetensors"), "--kind", "ties"])
    assert res.exit_code == 2 and "emr" in res.output and "free_merging" in res.output
    assert not (tmp_path / "m.safetensors").exists()
    # a config without fr_merging is refused before any model is read
    with pytest.raises(ConfigError, match="fr_merging"):
        build_task_models(cfg, tmp_path / "m.safetensors", "free_merging")


def test_the_package_exports_one_sorted_api() -> None:
    import unimerge.taskmodels as tm

    assert tm.__all__ == sorted(tm.__all__)
    for name in tm.__all__:
        obj = getattr(tm, name)
        assert not (inspect.isclass(obj) or inspect.isfunction(obj)) or inspect.getdoc(obj), name
    assert {
        "TaskMasks",
        "TaskExperts",
        "compute_task_masks",
        "compute_task_experts",
        "save_task_masks",
        "save_task_experts",
        "load_task_masks",
        "load_task_experts",
        "load_task_model",
        "load_expert_model",
        "task_state_dict",
        "task_experts_state_dict",
        "build_task_models",
        "rebuild_task",
    } <= set(tm.__all__)
