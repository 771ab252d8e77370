"""The streaming engine: configs on tiny sharded checkpoints give exactly the in-memory merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from _fixtures import load_all_tensors, make_peft_lora, make_tiny_family
from unimerge import ConfigError, PlanError, merge_state_dicts
from unimerge.config import evaluate_setting
from unimerge.execute import RunOptions, plan_config, run_merge


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_family(tmp_path_factory.mktemp("models"))


def _cfg(method: str, models: dict[str, Path], names=("e1", "e2"), params=None, per_model=None, **extra):
    per_model = per_model or [{} for _ in names]
    return {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(models[n]), "parameters": p} for n, p in zip(names, per_model, strict=True)],
        "parameters": params or {},
        **extra,
    }


@pytest.mark.parametrize(
    ("method", "params", "per_model"),
    [
        ("linear", {}, [{"weight": 0.3}, {"weight": 0.7}]),
        ("task_arithmetic", {"lambda": 0.5}, [{"weight": 1.0}, {"weight": -0.5}]),
        ("ties", {"normalize": True}, [{"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": 0.7}]),
        ("dare_ties", {}, [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]),
        ("tsv_m", {}, [{}, {}]),
    ],
)
def test_streamed_merge_equals_in_memory(models, tmp_path, method, params, per_model) -> None:
    out = tmp_path / "out"
    run_merge(
        _cfg(method, models, params=params, per_model=per_model, seed=5), out, RunOptions(out_shard_size=8000)
    )
    got = load_all_tensors(out)
    base = load_all_tensors(models["base"])
    experts = [load_all_tensors(models[n]) for n in ("e1", "e2")]
    kwargs = {**params, **{k: [p[k] for p in per_model] for k in per_model[0]}}
    want = merge_state_dicts(method, experts, base, seed=5, **kwargs)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0, msg=k)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded output
    assert (out / "config.json").is_file() and (out / "README.md").is_file()


def test_thread_count_does_not_change_output(models, tmp_path) -> None:
    cfg = _cfg("dare_ties", models, names=("e1", "e2", "e3"), params={"density": 0.5}, seed=3)
    run_merge(cfg, tmp_path / "a", RunOptions(threads=1))
    run_merge(cfg, tmp_path / "b", RunOptions(threads=4))
    a, b = load_all_tensors(tmp_path / "a"), load_all_tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    run_merge({**cfg, "seed": 4}, tmp_path / "c", RunOptions(threads=2))
    c = load_all_tensors(tmp_path / "c")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_gradient_and_filter_parameters_follow_mergekit(models, tmp_path) -> None:
    weight = [{"filter": "self_attn", "value": 0.25}, {"value": 1.0}]
    cfg = _cfg(
        "task_arithmetic",
        models,
        names=("e1",),
        per_model=[{"weight": weight}],
        params={"lambda": [1.0, 0.0]},
    )
    run_merge(cfg, tmp_path / "o", RunOptions())
    got = load_all_tensors(tmp_path / "o")
    base, e1 = load_all_tensors(models["base"]), load_all_tensors(models["e1"])
    # 2 layers: t = 0 for layer 0 (lambda 1.0), t = 1 for layer 1 (lambda 0.0); every tensor outside the
    # layers has t = 0, embeddings and final norm alike (mergekit 0.1.5 plans both with ConfigReader(t=0))
    q0 = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(got[q0], base[q0] + 0.25 * (e1[q0] - base[q0]))
    up0 = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(got[up0], e1[up0])
    up1 = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(got[up1], base[up1])
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(got[emb], e1[emb])
    torch.testing.assert_close(got["model.norm.weight"], e1["model.norm.weight"])
    torch.testing.assert_close(got["lm_head.weight"], e1["lm_head.weight"])


def test_evaluate_setting_interpolates_like_mergekit() -> None:
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 1.0) == 0.0
    assert evaluate_setting([{"filter": "mlp", "value": 2}, {"value": 3}], "a.mlp.b", 0.0) == 2
    assert evaluate_setting([{"filter": "mlp", "value": 2}, {"value": 3}], "a.attn.b", 0.0) == 3
    assert evaluate_setting(0.7, "x", 0.3) == 0.7
    # mergekit: filter "*" matches every tensor
    assert evaluate_setting([{"filter": "*", "value": 2}, {"value": 3}], "a.attn.b", 0.0) == 2


def test_out_dtype_and_loadable_by_transformers(models, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = _cfg("ties", models, params={"density": 0.5}, out_dtype="bfloat16")
    run_merge(cfg, tmp_path / "o", RunOptions())
    got = load_all_tensors(tmp_path / "o")
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == 64 and torch.isfinite(logits).all()
    assert json.loads((tmp_path / "o" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_lora_adapter_reference(models, tmp_path) -> None:
    lora = make_peft_lora(tmp_path / "lora", models["base"])
    ref = f"{models['base']}+{lora}"
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [{"model": ref, "parameters": {"weight": 1.0}}],
    }
    run_merge(cfg, tmp_path / "o", RunOptions())
    got, base = load_all_tensors(tmp_path / "o"), load_all_tensors(models["base"])
    acfg = json.loads((lora / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    ad = load_file(lora / "adapter_model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    a = ad["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = ad["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(got[name], base[name] + acfg["lora_alpha"] / acfg["r"] * b @ a)
    k = "model.layers.0.self_attn.k_proj.weight"
    torch.testing.assert_close(got[k], base[k])


def test_passthrough_slices_stack_layers(models, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(models["e1"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(models["e2"]), "layer_range": [1, 2]}]},
        ],
    }
    run_merge(cfg, tmp_path / "o", RunOptions())
    got = load_all_tensors(tmp_path / "o")
    e1, e2 = load_all_tensors(models["e1"]), load_all_tensors(models["e2"])
    torch.testing.assert_close(
        got["model.layers.2.mlp.up_proj.weight"], e2["model.layers.1.mlp.up_proj.weight"]
    )
    torch.testing.assert_close(
        got["model.layers.1.mlp.up_proj.weight"], e1["model.layers.1.mlp.up_proj.weight"]
    )
    torch.testing.assert_close(got["model.embed_tokens.weight"], e1["model.embed_tokens.weight"])
    torch.testing.assert_close(got["lm_head.weight"], e2["lm_head.weight"])
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_hidden_layers"] == 3
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert len(model.model.layers) == 3


def test_plan_summary_and_yaml_path(models, tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_cfg("ties", models, params={"density": 0.5})))
    plan = plan_config(path, tmp_path / "o")
    s = plan.summary()
    n = sum(t.numel() for t in load_all_tensors(models["base"]).values())
    assert s["tensors"] == 21 and s["bytes_written"] == 4 * n and s["bytes_read"] == 3 * 4 * n
    # peak: the byte budget of jobs in flight (512 MB floor for these tiny tensors) plus 300 MB
    assert s["peak_memory"] == 812 * 2**20 and plan.summary(2**30)["peak_memory"] == 2**30 + 300 * 2**20
    assert not (tmp_path / "o").exists()  # planning writes nothing


def test_model_card_names_inputs_and_hashes(models, tmp_path) -> None:
    from unimerge.io import sha256_file

    run_merge(_cfg("linear", models), tmp_path / "o", RunOptions())
    card = (tmp_path / "o" / "README.md").read_text()
    assert "linear" in card and str(models["e1"]) in card
    for f in sorted(models["e2"].glob("*.safetensors")):
        assert sha256_file(f) in card
    assert (tmp_path / "o" / "tokenizer.json").is_file() or not (models["base"] / "tokenizer.json").is_file()


def test_jobs_in_flight_stay_within_the_byte_budget(models, tmp_path) -> None:
    """Jobs overlap (forced: each job holds its slot until the next one starts), yet the bytes in
    flight never exceed the budget; with every job over budget they run one at a time."""
    import threading

    from unimerge.execute import _run_pool

    jobs = plan_config(_cfg("linear", models, names=("e1", "e2", "e3")), tmp_path / "out").jobs
    budget = 2 * max(j.working_bytes for j in jobs)  # room for two of the largest jobs, more small ones
    lock, live, peak = threading.Lock(), [0, 0], [0, 0]  # bytes and jobs in flight
    started = [threading.Event() for _ in jobs]  # started[i]: the (i+1)-th job has started
    hold, alone = [10.0], []  # how long a job waits for the next to start; the jobs that waited in vain

    def fn(job) -> None:
        with lock:
            live[0] += job.working_bytes
            live[1] += 1
            peak[0], peak[1] = max(peak[0], live[0]), max(peak[1], live[1])
            order = sum(e.is_set() for e in started)
            started[order].set()
        if order + 1 < len(jobs) and not started[order + 1].wait(timeout=hold[0]):  # until the next starts
            alone.append(order)
            hold[0] = min(hold[0], 0.02)  # a pool that does not overlap jobs fails fast
        with lock:
            live[0] -= job.working_bytes
            live[1] -= 1

    done = []
    _run_pool(jobs, fn, threads=4, progress=lambda i, n: done.append(i), budget=budget)
    assert done[-1] == len(jobs) and all(e.is_set() for e in started)
    assert alone == [] and peak[0] <= budget and 1 < peak[1] <= 8
    peak[:] = [0, 0]
    for e in started:
        e.clear()
    hold[0] = 0.02  # a correct pool starts no job while one runs: each wait times out (20 ms a job)
    _run_pool(jobs, fn, threads=4, progress=None, budget=1)  # every job over budget: one at a time
    assert peak[1] == 1 and len(alone) == len(jobs) - 1


def _with_extra(src: Path, dst: Path, extra: dict[str, torch.Tensor]) -> Path:
    """A copy of the model folder ``src`` whose single weight file also holds ``extra``."""
    import shutil

    from _fixtures import save_sharded

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_sharded({**load_all_tensors(src), **extra}, dst)
    return dst


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_integer_buffer_in_some_models_is_taken_from_the_reference(models, tmp_path, method) -> None:
    """BERT's `embeddings.position_ids`, stored by older saves only: written from the reference
    model (the base) with a warning; one the reference lacks is left out; merged weights are unchanged."""
    ids = torch.arange(16).unsqueeze(0)
    world = {
        **models,
        "base": _with_extra(models["base"], tmp_path / "base", {"embeddings.position_ids": ids}),
        "e2": _with_extra(models["e2"], tmp_path / "e2", {"extra.step": torch.tensor([3])}),
    }
    names = ("e1", "e2")
    result = run_merge(_cfg(method, world, names=names), tmp_path / "out2", RunOptions(seed=0))
    got = load_all_tensors(tmp_path / "out2")
    assert torch.equal(got.pop("embeddings.position_ids"), ids) and "extra.step" not in got
    plain = run_merge(_cfg(method, models, names=names), tmp_path / "plain", RunOptions(seed=0))
    expected = load_all_tensors(tmp_path / "plain")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert any("'embeddings.position_ids' is missing from" in w for w in result.warnings)
    assert any("'extra.step' is not in" in w and "left out" in w for w in result.warnings)
    assert not plain.warnings


def test_float_tensor_missing_from_one_model_is_still_an_error(models, tmp_path) -> None:
    world = {**models, "e1": _with_extra(models["e1"], tmp_path / "e1", {"extra.scale": torch.ones(3)})}
    with pytest.raises(PlanError, match=r"extra 1 \['extra.scale'\]"):
        plan_config(_cfg("ties", world), tmp_path / "out")


@pytest.mark.parametrize("method", ["slerp", "nearswap"])
def test_a_method_given_more_models_than_it_merges_is_refused_by_the_plan(models, tmp_path, method) -> None:
    cfg = _cfg(method, models, params={"t": 0.5})
    with pytest.raises(
        ConfigError, match=f"Method '{method}' merges at most 1 model besides the base, but tensor"
    ):
        plan_config(cfg, tmp_path / "o")  # from headers: before any tensor is read
    assert not (tmp_path / "o").exists()
