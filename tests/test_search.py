"""`unimerge search`: the space from the registry, deterministic strategies, the loop, resume, Ray.

Tiny BERT sequence classifiers (hidden 32, 2 layers; as tests/test_data_config.py builds them) and
JSONL data with labels, built once for the module. Trials run in-process (``workers=0``) except in
the Ray tests, which share one local Ray with 2 CPUs.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from _fixtures import load_all_tensors
from unimerge.cli import app
from unimerge.core import merge_state_dicts
from unimerge.errors import ConfigError
from unimerge.methods import get_method
from unimerge.tune import SearchSpec, Trial, build_space, parse_search_config, search
from unimerge.tune.jobs import evaluator, run_job
from unimerge.tune.space import ChoiceDim, FloatDim
from unimerge.tune.strategies import make_strategy

transformers = pytest.importorskip("transformers")

WORDS = ["the", "a", "movie", "car", "good", "bad", "great", "engine", "fast", "slow", "plot", "is", "not"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
runner = CliRunner()


def _bert(seed: int, std: float, base: torch.nn.Module | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=2)  # fmt: skip
    model = transformers.BertForSequenceClassification(cfg).eval()
    if base is not None:
        model.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(std * torch.randn(p.shape, generator=g))
    return model


def _jsonl(path: Path, n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        idx = torch.randint(0, len(WORDS), (int(torch.randint(3, 8, (1,), generator=g)),), generator=g)
        rows.append(json.dumps({"text": " ".join(WORDS[j] for j in idx.tolist()), "label": i % 2}))
    path.write_text("\n".join(rows) + "\n")
    return path.name


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base/ (with tokenizer), e1/ e2/ experts, train / validation / test JSONL per expert."""
    root = tmp_path_factory.mktemp("search")
    base = _bert(0, 0.0)
    base.save_pretrained(root / "base")
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(root / "base")
    for k in (1, 2):
        _bert(k, 0.3, base).save_pretrained(root / f"e{k}")
        for split, n in (("train", 12), ("val", 16), ("test", 16)):
            _jsonl(root / f"{split}{k}.jsonl", n, 10 * k + len(split))
    return root


def _config(world: Path, name: str = "search.yaml", **search_over: Any) -> Path:
    cfg = {
        "base_model": "base",
        "models": [{"model": "e1"}, {"model": "e2"}],
        "search": {
            "methods": ["task_arithmetic", {"name": "ties", "params": {"density": [0.2, 0.8]}}],
            "budget": 4,
            "strategy": "random",
            "seed": 3,
            "batch": 2,
            "validation": ["val1.jsonl", "val2.jsonl"],
            "test": ["test1.jsonl", "test2.jsonl"],
            **search_over,
        },
    }
    path = world / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _spec(**over: Any) -> SearchSpec:
    return SearchSpec.model_validate({"methods": ["ties"], "budget": 8, **over})


def _trials(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in doc["trials"]]


# --- the space ---------------------------------------------------------------------------------------


def test_space_comes_from_the_registry_grid() -> None:
    space = build_space(_spec(), n_models=2)
    (ms,) = space.methods
    grid = get_method("ties").grid
    dims = {d.name: d for d in ms.dims}
    assert set(dims) == set(grid)
    for name, values in grid.items():
        d = dims[name]
        assert isinstance(d, FloatDim) and (d.low, d.high) == (min(values), max(values))
        assert d.grid == tuple(sorted(values))


def test_user_ranges_choices_and_per_model_dims() -> None:
    spec = _spec(
        methods=[
            {
                "name": "ties",
                "params": {"lambda": [0.4, 1.2], "trim_scope": ["tensor", "global"], "normalize": False},
            }
        ],
        per_model={"weight": [0.5, 1.5]},
    )
    (ms,) = build_space(spec, n_models=3).methods
    dims = {(d.name, d.model): d for d in ms.dims}
    assert dims[("lambda", None)].grid == (0.5, 0.7, 1.0)  # the registered grid points inside [0.4, 1.2]
    assert isinstance(dims[("trim_scope", None)], ChoiceDim)
    assert [dims[("weight", i)].grid for i in range(3)] == [(0.5, 1.0, 1.5)] * 3
    assert ms.fixed == {"normalize": False}
    trial = ms.trial([d.grid[0] for d in ms.dims], 3)
    assert trial.per_model == [{"weight": 0.5}] * 3 and trial.params["normalize"] is False


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (
            {"lambda": [0.1, 200.0]},
            "method 'ties', parameter 'lambda': the value 200.0 is outside the registered range [-100.0, 100.0]",
        ),
        (
            {"density": [0.0, 0.5]},
            "parameter 'density': the value 0.0 is outside the registered range (0.0, 1.0]",
        ),
        (
            {"trim_scope": ["tensor", "everywhere"]},
            "'everywhere' is not one of the allowed values ['tensor', 'global']",
        ),
        ({"lamda": [0.1, 0.2]}, "parameter 'lamda': the method has no such parameter"),
        ({"lambda": [0.5, 0.1]}, "a range is [low, high] with low < high"),
    ],
)
def test_bad_bounds_name_method_parameter_and_range(params: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_space(_spec(methods=[{"name": "ties", "params": params}]), n_models=2)
    assert match in str(err.value)


def test_a_method_for_one_model_is_refused_in_a_space_of_more() -> None:
    build_space(_spec(methods=["slerp"]), 1)
    with pytest.raises(
        ConfigError, match="'slerp' merges at most 1 model besides the base, and this search has 2"
    ):
        build_space(_spec(methods=["ties", "slerp"]), 2)


def test_per_model_parameter_no_method_has() -> None:
    with pytest.raises(ConfigError, match="none of the methods .* has a per-model parameter 'density'"):
        build_space(_spec(methods=["linear"], per_model={"density": [0.1, 0.9]}), n_models=2)


# --- strategies ---------------------------------------------------------------------------------------


def _drive(strategy_name: str, seed: int, budget: int = 12) -> list[Trial]:
    """Ask and tell in batches of 4 with a fixed objective of the trial (peak at lambda = 0.7)."""
    spec = _spec(methods=["ties", "task_arithmetic"], budget=budget, per_model={"weight": [0.5, 1.5]})
    strategy = make_strategy(strategy_name, build_space(spec, 2), 4, seed)
    out: list[Trial] = []
    while len(out) < budget:
        trials = strategy.ask(4)
        out += trials
        strategy.tell(
            [-((t.params.get("lambda", 1.0) - 0.7) ** 2) + 0.1 * (t.method == "ties") for t in trials]
        )
    return out


@pytest.mark.parametrize("name", ["random", "cma", "tpe"])
def test_strategies_are_deterministic_given_seed_and_results(name: str) -> None:
    pytest.importorskip("optuna") if name == "tpe" else None
    a, b, c = _drive(name, 0), _drive(name, 0), _drive(name, 1)
    assert a == b
    assert a != c
    for t in a:  # every proposal lies in the space
        assert t.method in ("ties", "task_arithmetic")
        assert 0.5 <= t.params["lambda"] <= 1.5 if t.method == "ties" else 0.1 <= t.params["lambda"] <= 1.0
        assert all(0.5 <= pm["weight"] <= 1.5 for pm in t.per_model)


def test_grid_covers_the_registered_grids_interleaved() -> None:
    spec = _spec(methods=["ties", "task_arithmetic"], budget=100)
    strategy = make_strategy("grid", build_space(spec, 2), 4, 0)
    got = strategy.ask(100)
    assert strategy.ask(4) == []  # exhausted: the search stops there
    for name in ("ties", "task_arithmetic"):
        grid = get_method(name).grid
        keys = sorted(grid)
        want = {tuple(v) for v in itertools.product(*(grid[k] for k in keys))}
        assert {tuple(t.params[k] for k in keys) for t in got if t.method == name} == want
    assert len(got) == 8 + 6
    assert [t.method for t in got[:4]] == ["ties", "task_arithmetic"] * 2  # truncation keeps both methods
    truncated = make_strategy("grid", build_space(spec, 2), 4, 0).ask(5)
    assert truncated == got[:5]


# --- the loop (in-process) ----------------------------------------------------------------------------


def test_search_records_trials_and_writes_the_best(world: Path, tmp_path: Path) -> None:
    cfg_path = _config(world)
    out = tmp_path / "out"
    result = search(cfg_path, out, workers=0)
    doc = json.loads((out / "search.json").read_text())
    assert len(doc["trials"]) == 4 and all(r["status"] == "ok" for r in doc["trials"])
    ev = evaluator(
        parse_search_config(yaml.safe_load(cfg_path.read_text()), cfg_path).model_dump_json(),
        str(cfg_path.resolve()),
    )
    for r in doc["trials"]:
        assert r["objective"] == pytest.approx(sum(r["scores"].values()) / 2)  # objective: mean of the tasks
        assert set(r["scores"]) == {"val1", "val2"}
    best = max(doc["trials"], key=lambda r: (r["objective"], -r["index"]))
    assert doc["best"]["index"] == best["index"] == result.best["index"]
    trial = Trial.model_validate({k: best[k] for k in ("method", "params", "per_model")})
    assert ev.score(trial, "validation") == best["scores"]
    assert doc["best"]["test"] == ev.score(trial, "test") == result.test
    # OUT/best/model is the best trial's merge: the same tensors merge_state_dicts gives.
    experts = [load_all_tensors(world / e) for e in ("e1", "e2")]
    want = merge_state_dicts(trial.method, experts, load_all_tensors(world / "base"), **trial.params)
    got = load_all_tensors(out / "best" / "model")
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6)
    # ... and its config reproduces it with `unimerge merge`.
    res = runner.invoke(app, ["merge", str(out / "best" / "unimerge_config.yaml"), str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    again = load_all_tensors(tmp_path / "again")
    assert all(torch.equal(again[k], got[k]) for k in got)
    html = (out / "report.html").read_text()
    assert "<svg" in html and "<polyline" in html and "<script" not in html and trial.method in html


@pytest.mark.parametrize("strategy", ["random", "tpe"])
def test_an_interrupted_search_resumes_to_the_same_trials(world: Path, tmp_path: Path, strategy: str) -> None:
    if strategy == "tpe":
        pytest.importorskip("optuna")
    full = _config(world, "full.yaml", budget=6, strategy=strategy)
    search(full, tmp_path / "full", workers=0)
    part = tmp_path / "part"
    search(_config(world, "p.yaml", budget=3, strategy=strategy), part, workers=0)  # stops mid-batch
    ran: list[dict[str, Any]] = []

    def counting(job: dict[str, Any]) -> dict[str, Any]:
        ran.append(job["trial"])
        return run_job(job)

    search(_config(world, "p.yaml", budget=6, strategy=strategy), part, workers=0, trial_fn=counting)
    assert len(ran) == 3  # the three recorded trials were not run again
    a, b = (json.loads((d / "search.json").read_text()) for d in (tmp_path / "full", part))
    assert _trials(a) == _trials(b)
    assert a["best"] == b["best"]


def test_a_changed_config_is_not_resumed(world: Path, tmp_path: Path) -> None:
    search(_config(world, "c.yaml", budget=2), tmp_path / "o", workers=0)
    with pytest.raises(ConfigError, match="written by a different search config"):
        search(_config(world, "c.yaml", budget=2, seed=4), tmp_path / "o", workers=0)


def _failing(job: dict[str, Any]) -> dict[str, Any]:
    if job["trial"]["method"] == "ties":
        raise RuntimeError("boom in ties")
    return run_job(job)


def test_a_trial_that_raises_is_recorded_as_failed(world: Path, tmp_path: Path) -> None:
    search(_config(world, budget=6), tmp_path / "o", workers=0, trial_fn=_failing)
    doc = json.loads((tmp_path / "o" / "search.json").read_text())
    assert [r["index"] for r in doc["trials"]] == list(range(6))
    failed = [r for r in doc["trials"] if r["status"] == "failed"]
    assert failed and all(
        r["method"] == "ties" and r["error"] == "RuntimeError: boom in ties" for r in failed
    )
    assert doc["best"]["index"] in [r["index"] for r in doc["trials"] if r["status"] == "ok"]


# --- bad input: one paragraph, exit 2 --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"methods": ["tiez"]}, "Unknown merge method 'tiez'. Did you mean 'ties'"),
        (
            {"methods": [{"name": "ties", "params": {"density": [0.5, 1.5]}}]},
            "outside the registered range (0.0, 1.0]",
        ),
        ({"budget": 0}, "search.budget: Input should be greater than or equal to 1"),
        ({"validation": ["missing.jsonl", "val2.jsonl"]}, "data file 'missing.jsonl' not found"),
    ],
)
def test_bad_input_is_one_clear_paragraph(
    world: Path, tmp_path: Path, over: dict[str, Any], match: str
) -> None:
    res = runner.invoke(
        app, ["search", str(_config(world, "bad.yaml", **over)), str(tmp_path / "o"), "--workers", "0"]
    )
    text = " ".join(res.output.split())
    assert res.exit_code == 2, text
    assert "Traceback" not in res.output and match in text, text
    assert not (tmp_path / "o").exists()


# --- on Ray --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local() -> Any:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this file
    yield ray
    ray.shutdown()


def _dies(job: dict[str, Any]) -> dict[str, Any]:
    if job["trial"]["method"] == "ties":
        deaths = Path(job["config_path"]).parent / "deaths"
        deaths.mkdir(exist_ok=True)
        (deaths / f"{os.getpid()}-{len(list(deaths.iterdir()))}").touch()
        os._exit(1)  # the worker process dies mid-trial
    return run_job(job)


def test_ray_runs_the_trials_as_the_process_does(world: Path, tmp_path: Path, ray_local: Any) -> None:
    cfg = _config(world, "r.yaml", budget=4)
    search(cfg, tmp_path / "inline", workers=0)
    search(cfg, tmp_path / "ray", workers=2)
    a, b = (json.loads((tmp_path / d / "search.json").read_text()) for d in ("inline", "ray"))
    assert _trials(a) == _trials(b)


def test_a_worker_that_dies_is_retried_then_recorded_as_failed(
    world: Path, tmp_path: Path, ray_local: Any
) -> None:
    search(_config(world, "d.yaml", budget=4, strategy="grid"), tmp_path / "o", workers=2, trial_fn=_dies)
    doc = json.loads((tmp_path / "o" / "search.json").read_text())
    assert [r["index"] for r in doc["trials"]] == [0, 1, 2, 3]
    dead = [r for r in doc["trials"] if r["method"] == "ties"]
    assert dead and all(r["status"] == "failed" and "died" in r["error"].lower() for r in dead), dead
    assert len(list((world / "deaths").iterdir())) == 2 * len(dead)  # each tried twice: Ray retried it once
    assert all(r["status"] == "ok" for r in doc["trials"] if r["method"] != "ties")


# --- data: suites and data-aware methods; the objective; the Python entry ----------------------------


def test_a_suite_gives_the_validation_and_test_splits(world: Path, tmp_path: Path) -> None:
    from unimerge.datamerge.data import suite_task

    cfg = {"base_model": "base", "models": [{"model": "e1"}, {"model": "e2"}], "data": {"suite": "smoke"},
           "search": {"methods": ["task_arithmetic"], "budget": 2, "strategy": "grid"}}  # fmt: skip
    path = world / "suite.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ev = evaluator(parse_search_config(cfg, path).model_dump_json(), str(path.resolve()))
    assert ev.names == ["rt_sentiment", "autos_electronics"]
    for split, name in (("validation", "val"), ("test", "test")):
        for task in ev.splits[split]:
            texts, labels, _, _ = suite_task(task.name, "smoke", 0, name)
            assert task.texts == texts and task.labels == labels
    val, test = (set(ev.splits[s][0].texts) for s in ("validation", "test"))
    assert not val & test
    result = search(path, tmp_path / "o", workers=0)
    n_val = len(ev.splits["validation"][0].texts)
    assert all(round(s * n_val, 6) == round(s * n_val) for s in result.trials[0]["scores"].values())


def test_a_data_aware_method_runs_on_the_training_files(world: Path, tmp_path: Path) -> None:
    path = _config(world, "regmean.yaml", methods=["regmean"], budget=2, strategy="grid")
    doc = yaml.safe_load(path.read_text())
    doc["data"] = {"files": ["train1.jsonl", "train2.jsonl"], "budget": 8, "batch_size": 4}
    path.write_text(yaml.safe_dump(doc))
    result = search(path, tmp_path / "o", workers=0)
    assert [r["method"] for r in result.trials] == ["regmean"] * 2
    assert all(r["status"] == "ok" for r in result.trials)
    assert result.trials[0]["params"] != result.trials[1]["params"]  # two points of regmean's grid
    best_dir = tmp_path / "o" / "best"
    best = yaml.safe_load((best_dir / "unimerge_config.yaml").read_text())
    assert best["data"]["files"] == ["data/0-train1.jsonl", "data/1-train2.jsonl"]  # copied beside it
    assert (best_dir / "data" / "0-train1.jsonl").read_text() == (world / "train1.jsonl").read_text()
    res = runner.invoke(app, ["merge", str(best_dir / "unimerge_config.yaml"), str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    got, again = load_all_tensors(best_dir / "model"), load_all_tensors(tmp_path / "again")
    assert set(got) == set(again) and all(torch.equal(got[k], again[k]) for k in got)


def test_objectives_by_hand() -> None:
    from unimerge.tune import objective

    scores = {"a": 0.5, "b": 0.9}
    assert objective(scores, _spec()) == pytest.approx(0.7)
    assert objective(scores, _spec(objective="min")) == 0.5
    assert objective(scores, _spec(objective="weighted", task_weights={"a": 3.0})) == pytest.approx(
        (1.5 + 0.9) / 4
    )
    with pytest.raises(ValueError, match="needs `task_weights"):
        _spec(objective="weighted")


def test_unimerge_search_is_callable(world: Path, tmp_path: Path) -> None:
    import unimerge

    result = unimerge.search(_config(world, "call.yaml", budget=1), tmp_path / "o", workers=0)
    assert len(result.trials) == 1 and (tmp_path / "o" / "best" / "model" / "config.json").is_file()


def test_a_search_interrupted_mid_trial_resumes(world: Path, tmp_path: Path) -> None:
    calls: list[int] = []

    def interrupted(job: dict[str, Any]) -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C during the fourth trial
        return run_job(job)

    cfg = _config(world, "i.yaml", budget=6, strategy="tpe")
    with pytest.raises(KeyboardInterrupt):
        search(cfg, tmp_path / "o", workers=0, trial_fn=interrupted)
    assert len(json.loads((tmp_path / "o" / "search.json").read_text())["trials"]) == 3
    assert not (tmp_path / "o" / "best").exists()
    search(cfg, tmp_path / "o", workers=0)
    search(cfg, tmp_path / "fresh", workers=0)
    a, b = (json.loads((tmp_path / d / "search.json").read_text()) for d in ("o", "fresh"))
    assert _trials(a) == _trials(b) and a["best"] == b["best"]


def test_an_output_folder_that_is_not_a_search_is_refused(world: Path, tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "model.safetensors").write_text("x")
    with pytest.raises(ConfigError, match="not a search's output folder"):
        search(_config(world, "f.yaml", budget=1), tmp_path / "o", workers=0)


def test_per_model_dimensions_only_for_data_free_methods() -> None:
    spec = _spec(methods=["regmean", "ties"], per_model={"weight": [0.5, 1.5]})
    regmean, ties = build_space(spec, n_models=2).methods
    assert all(d.model is None for d in regmean.dims)
    assert sorted((d.name, d.model) for d in ties.dims if d.model is not None) == [
        ("weight", 0),
        ("weight", 1),
    ]


def test_cli_search_prints_the_best_trial(world: Path, tmp_path: Path) -> None:
    res = runner.invoke(
        app, ["search", str(_config(world, "cli.yaml", budget=2)), str(tmp_path / "o"), "--workers", "0"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o" / "search.json").read_text())
    assert f"best: trial {doc['best']['index']}" in res.output and "2 trials (0 failed)" in res.output


def test_bench_experts_are_written_as_their_encoder_folders(world: Path, tmp_path: Path) -> None:
    """A `unimerge bench` expert (encoder/ + head.safetensors) is searched as such, and best/'s
    config names its encoder/ folder, which the streaming merge can read."""
    from safetensors.torch import save_file

    root = tmp_path / "benchworld"
    shutil.copytree(world, root)
    base = transformers.BertForSequenceClassification.from_pretrained(root / "base")
    base.bert.save_pretrained(root / "base-enc")
    transformers.BertTokenizer.from_pretrained(root / "base").save_pretrained(root / "base-enc")
    for k in (1, 2):
        model = transformers.BertForSequenceClassification.from_pretrained(root / f"e{k}")
        model.bert.save_pretrained(root / f"x{k}" / "encoder")
        head = {n: t.contiguous() for n, t in model.classifier.state_dict().items()}
        save_file(head, str(root / f"x{k}" / "head.safetensors"))
    cfg = yaml.safe_load(_config(root, budget=1).read_text())
    cfg["base_model"], cfg["models"] = "base-enc", [{"model": "x1"}, {"model": "x2"}]
    (root / "bench.yaml").write_text(yaml.safe_dump(cfg))
    search(root / "bench.yaml", tmp_path / "out", workers=0)
    best = yaml.safe_load((tmp_path / "out" / "best" / "unimerge_config.yaml").read_text())
    assert [Path(m["model"]) for m in best["models"]] == [
        root.resolve() / f"x{k}" / "encoder" for k in (1, 2)
    ]
    assert (tmp_path / "out" / "best" / "model" / "model.safetensors").is_file()
