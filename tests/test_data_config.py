"""Data-aware merges from a config (`data:` section): validation, sidecars, streaming RegMean/Fisher.

Tiny BERTs (hidden 32, 2 layers, a 23-word WordPiece vocabulary written to the folder) built in
fixtures: a base encoder, sequence-classification experts perturbed from it, plain encoders, and an
expert in ``unimerge bench``'s layout (``encoder/`` + ``head.safetensors`` + ``meta.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from _fixtures import load_all_tensors
from unimerge.cli import app
from unimerge.config import parse_config
from unimerge.errors import ConfigError
from unimerge.execute import RunOptions, run_merge
from unimerge.modelmerge.fisher import fisher_merge
from unimerge.modelmerge.stats import load_stats, sidecar_path

transformers = pytest.importorskip("transformers")

WORDS = ["the", "a", "movie", "car", "good", "bad", "great", "engine", "fast", "slow", "plot"]
WORDS += ["actor", "wheel", "is", "was", "not", "very"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
QUERY = "encoder.layer.0.attention.self.query"
runner = CliRunner()


def _bert_config(num_labels: int = 2) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
    )  # fmt: skip


def _save(model: torch.nn.Module, folder: Path, tokenizer: bool = True) -> Path:
    model.save_pretrained(folder)
    if tokenizer:
        transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(folder)
    return folder


def _perturb(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


def _expert(base: transformers.BertModel, folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(_bert_config())
    model.bert.load_state_dict(base.state_dict())
    return _save(_perturb(model, seed).eval(), folder, tokenizer=False)


def _write_jsonl(path: Path, n: int, seed: int, labels: bool = True) -> Path:
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        idx = torch.randint(0, len(WORDS), (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        row = {"text": " ".join(WORDS[j] for j in idx.tolist())}
        if labels:
            row["label"] = i % 2
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def world(tmp_path: Path) -> dict[str, Path]:
    """base (BertModel + tokenizer), seq-cls experts e1/e2, plain encoders p1/p2, data a/b/u."""
    torch.manual_seed(0)
    base = transformers.BertModel(_bert_config()).eval()
    out = {"root": tmp_path, "base": _save(base, tmp_path / "base")}
    out["e1"], out["e2"] = _expert(base, tmp_path / "e1", 1), _expert(base, tmp_path / "e2", 2)
    for k, seed in (("p1", 3), ("p2", 4)):
        out[k] = _save(_perturb(transformers.BertModel(_bert_config()), seed).eval(), tmp_path / k, False)
    out["a"] = _write_jsonl(tmp_path / "a.jsonl", 20, 1)
    out["b"] = _write_jsonl(tmp_path / "b.jsonl", 20, 2)
    out["u"] = _write_jsonl(tmp_path / "u.jsonl", 20, 3, labels=False)
    return out


def _cfg(
    world: dict[str, Path], method: str, models=("e1", "e2"), files=("a.jsonl", "b.jsonl"), **data
) -> Path:
    cfg = {
        "merge_method": method,
        "base_model": "base",
        "models": [{"model": m} for m in models],
        "data": {"files": list(files), "budget": 12, "batch_size": 4, **data},
    }
    path = world["root"] / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _merge(cfg: Path, out: Path, *extra: str) -> str:
    res = runner.invoke(app, ["merge", str(cfg), str(out), *extra])
    assert res.exit_code == 0, res.output
    return res.output


def _fails(cfg: Path, out: Path, match: str) -> str:
    res = runner.invoke(app, ["merge", str(cfg), str(out)])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, text
    assert "Traceback" not in res.output
    assert match.lower() in text.lower(), text
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]
    return text


# --- config validation ------------------------------------------------------------------------------


def _parse(method: str = "regmean", **over) -> None:
    cfg = {"merge_method": method, "base_model": "base", "models": [{"model": "e1"}, {"model": "e2"}],
           "data": {"suite": "smoke"}, **over}  # fmt: skip
    parse_config({k: v for k, v in cfg.items() if v is not None})


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"data": None}, "needs unlabeled examples: add a `data:` section"),
        ({"merge_method": "ties", "parameters": {"density": 0.5}}, "`data:` is only for data-aware methods"),
        ({"data": {"suite": "smoke", "files": ["a", "b"]}}, "exactly one data source"),
        ({"data": {"budget": 3}}, "exactly one data source"),
        ({"data": {"suite": "nope"}}, "unknown suite 'nope'"),
        ({"data": {"files": ["a.jsonl"]}}, "lists 1 files but 2 models"),
        ({"data": {"suite": "smoke", "bugdet": 3}}, "data.bugdet: unknown key"),
        ({"data": {"suite": "smoke", "budget": 0}}, "data.budget"),
        ({"data": {"files": ["../a.jsonl", "b.jsonl"]}}, "outside the config file's folder"),
        ({"data": {"files": ["/etc/passwd", "b.jsonl"]}}, "outside the config file's folder"),
        ({"models": [{"model": "e1", "task": "mnist"}, {"model": "e2"}]}, "not a task of suite 'smoke'"),
        (
            {"data": {"suite": "smoke", "batch_size": 8}, "parameters": {"batch_size": 4}},
            "batch_size is set twice",
        ),
        ({"parameters": {"alpah": 0.5}}, "has no parameter 'alpah'"),
        ({"merge_method": "tsv_c"}, "builds one model per task"),
        (
            {"slices": [{"sources": [{"model": "e1", "layer_range": [0, 1]}]}], "models": None},
            "not `slices:`",
        ),
    ],
)
def test_config_errors(over: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        _parse(**over)
    assert match.lower() in str(err.value).lower(), str(err.value)


def test_task_key_needs_a_data_aware_method() -> None:
    with pytest.raises(ConfigError, match="only used by data-aware methods"):
        parse_config({"merge_method": "linear", "models": [{"model": "a", "task": "x"}, {"model": "b"}]})


def test_data_files_are_checked_against_the_config_folder(world) -> None:
    outside = _write_jsonl(world["root"].parent / f"{world['root'].name}-outside.jsonl", 4, 0)
    (world["root"] / "link.jsonl").symlink_to(outside)
    cfg = _cfg(world, "regmean", files=("link.jsonl", "b.jsonl"))
    text = _fails(cfg, world["root"] / "out", "outside")
    assert "link.jsonl" in text
    _fails(_cfg(world, "regmean", files=("missing.jsonl", "b.jsonl")), world["root"] / "out", "not found")
    _fails(
        _cfg(world, "regmean", files=("../x.jsonl", "b.jsonl")), world["root"] / "out", "outside the config"
    )


# --- regmean: sidecars and the closed form ----------------------------------------------------------


def test_regmean_from_config_is_the_closed_form_on_the_sidecar_grams(world) -> None:
    out = world["root"] / "out"
    _merge(_cfg(world, "regmean"), out)
    merged = load_all_tensors(out)
    grams = [load_stats(sidecar_path(world[e], "gram"), "gram") for e in ("e1", "e2")]
    assert all(g.examples == 12 for g in grams)
    assert grams[0].metadata["data_source"] == "file:a.jsonl" and grams[0].metadata["budget"] == "12"
    experts = [load_all_tensors(world[e]) for e in ("e1", "e2")]
    # By hand: W = (sum_i W_i G_i') (sum_i G_i')^-1 with G' = a G + (1 - a) diag(G), a = 0.95 (default).
    w = [e[f"bert.{QUERY}.weight"].double() for e in experts]  # (out, in)
    g = [s.tensors[f"{QUERY}.weight"].double() for s in grams]  # (in, in)
    g = [0.95 * gi + 0.05 * torch.diag(torch.diagonal(gi)) for gi in g]
    expected = torch.linalg.solve((g[0] + g[1]).T, (w[0] @ g[0] + w[1] @ g[1]).T).T
    torch.testing.assert_close(merged[f"{QUERY}.weight"].double(), expected, atol=1e-5, rtol=1e-5)
    # Everything else (biases, norms, embeddings) is the average; the base's own tensors are kept.
    bias = f"{QUERY}.bias"
    torch.testing.assert_close(merged[bias], (experts[0][f"bert.{bias}"] + experts[1][f"bert.{bias}"]) / 2)
    assert set(merged) == set(load_all_tensors(world["base"]))


def test_streaming_regmean_equals_the_in_memory_method(world) -> None:
    from unimerge.config import load_config
    from unimerge.datamerge.run import prepare
    from unimerge.modelmerge import MergeProblem
    from unimerge.modelmerge.regmean import RegMeanParams, regmean

    cfg_path = _cfg(world, "regmean")
    out = world["root"] / "out"
    _merge(cfg_path, out)
    merged = load_all_tensors(out)
    s = prepare(load_config(cfg_path), world["root"] / "other", RunOptions(), world["root"])
    experts = [
        {k: e.checkpoint.read(n) for k, n in mp.items()} for e, mp in zip(s.experts, s.maps, strict=True)
    ]
    # RegMean reads only the experts and their data (the base is the architecture).
    problem = MergeProblem(s.body.module, experts, s.tasks, s.heads or {}, s.features, budget=12, seed=0)
    ref = regmean(problem, RegMeanParams(batch_size=4)).module.state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=1e-5, msg=k)


def test_sidecar_is_reused_and_recomputed_when_the_data_changes(world) -> None:
    cfg = _cfg(world, "regmean")
    _merge(cfg, world["root"] / "out1")
    side = sidecar_path(world["e1"], "gram")
    first = side.stat().st_mtime_ns
    digest = load_stats(side).metadata["data_hash"]
    os.utime(side, ns=(first - 10**9, first - 10**9))  # an older mtime: a rewrite would change it
    _merge(cfg, world["root"] / "out2")
    assert side.stat().st_mtime_ns == first - 10**9
    assert torch.equal(load_all_tensors(world["root"] / "out1")[f"{QUERY}.weight"],
                       load_all_tensors(world["root"] / "out2")[f"{QUERY}.weight"])  # fmt: skip
    _merge(_cfg(world, "regmean", budget=8), world["root"] / "out3")
    stats = load_stats(side)
    assert side.stat().st_mtime_ns != first - 10**9
    assert stats.metadata["data_hash"] != digest and stats.metadata["budget"] == "8" and stats.examples == 8


def test_output_loads_with_transformers(world) -> None:
    out = world["root"] / "out"
    _merge(_cfg(world, "regmean"), out)
    model = transformers.AutoModel.from_pretrained(out).eval()
    merged = load_all_tensors(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, merged[k]), k
    tok = transformers.AutoTokenizer.from_pretrained(out)
    with torch.inference_mode():
        h = model(**tok(["the movie was good"], return_tensors="pt")).last_hidden_state
    assert torch.isfinite(h).all()
    assert "regmean" in (out / "README.md").read_text() and (out / "unimerge_config.yaml").is_file()


# --- fisher -----------------------------------------------------------------------------------------


def test_fisher_on_identical_experts_with_equal_data_returns_the_expert(world) -> None:
    twin = world["root"] / "e1b"
    twin.mkdir()
    for f in world["e1"].iterdir():
        (twin / f.name).write_bytes(f.read_bytes())
    out = world["root"] / "out"
    _merge(_cfg(world, "fisher", models=("e1", "e1b"), files=("a.jsonl", "a.jsonl")), out)
    merged, expert = load_all_tensors(out), load_all_tensors(world["e1"])
    for k, v in merged.items():
        torch.testing.assert_close(
            v, expert[f"bert.{k}"] if f"bert.{k}" in expert else load_all_tensors(world["base"])[k]
        )


def test_fisher_merges_each_tensor_with_the_sidecar_fishers(world) -> None:
    out = world["root"] / "out"
    _merge(_cfg(world, "fisher"), out)
    merged = load_all_tensors(out)
    fishers = [load_stats(sidecar_path(world[e], "fisher"), "fisher") for e in ("e1", "e2")]
    assert fishers[0].tensors[f"{QUERY}.weight"].abs().sum() > 0
    experts = [load_all_tensors(world[e]) for e in ("e1", "e2")]
    for name in (f"{QUERY}.weight", "encoder.layer.1.output.LayerNorm.bias"):
        x = torch.stack([e[f"bert.{name}"] for e in experts])  # (2, *shape)
        f = torch.stack([s.tensors[name] for s in fishers])
        torch.testing.assert_close(merged[name], fisher_merge(x, f, eps=1e-6))


def test_fisher_needs_labels_naming_the_file(world) -> None:
    text = _fails(_cfg(world, "fisher", files=("u.jsonl", "b.jsonl")), world["root"] / "out", "u.jsonl")
    assert "label" in text and "mode: sampled" in text
    cfg = yaml.safe_load(_cfg(world, "fisher", files=("u.jsonl", "b.jsonl")).read_text())
    cfg["parameters"] = {"mode": "sampled"}
    (world["root"] / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    _merge(world["root"] / "cfg.yaml", world["root"] / "out")


def test_methods_that_need_heads_fail_clearly_without_them(world) -> None:
    for method in ("fisher", "task_wise_adamerging"):
        text = _fails(_cfg(world, method, models=("p1", "p2")), world["root"] / "out", "needs task heads")
        assert "RegMean and RegMean++ need only inputs" in text
    out = world["root"] / "out"
    _merge(_cfg(world, "regmean", models=("p1", "p2"), files=("u.jsonl", "u.jsonl")), out)
    assert transformers.AutoModel.from_pretrained(out) is not None


# --- in-memory methods and benchmark experts ---------------------------------------------------------


def test_in_memory_method_writes_a_folder_unimerge_load_reads(world) -> None:
    import unimerge

    out = world["root"] / "out"
    cfg = yaml.safe_load(_cfg(world, "wemoe").read_text())
    cfg["parameters"] = {"steps": 2, "bf16": False}
    (world["root"] / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = run_merge(world["root"] / "cfg.yaml", out)
    assert res.tensors > 0
    module = unimerge.load(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)  # the tokenizer travels with the model
    with torch.inference_mode():
        h = module(**tok(["a fast car"], return_tensors="pt")).last_hidden_state
    assert h.shape == (1, 5, 32) and torch.isfinite(h).all()


def _bench_expert(world: dict[str, Path], name: str, task: str, seed: int) -> Path:
    folder = world["root"] / name
    _save(_perturb(transformers.BertModel(_bert_config()), seed).eval(), folder / "encoder")
    g = torch.Generator().manual_seed(seed)
    save_file(
        {"weight": torch.randn(2, 32, generator=g), "bias": torch.zeros(2)}, str(folder / "head.safetensors")
    )
    (folder / "meta.json").write_text(json.dumps({"recipe": {"tasks": [task]}}))
    return folder


def test_suite_data_and_benchmark_experts(world, monkeypatch) -> None:
    from unimerge.data import RawDataset
    from unimerge.datamerge import data

    def fake(name: str, root=None) -> RawDataset:
        texts = tuple(f"{' '.join(WORDS[(i + j) % len(WORDS)] for j in range(4))} {i}" for i in range(150))
        return RawDataset(name, texts, tuple(i % 2 for i in range(150)), ("neg", "pos"))

    monkeypatch.setattr(data, "load_dataset", fake)  # where suite_task looks it up
    _bench_expert(world, "x1", "autos_electronics", 5)  # listed first, but trained on the suite's 2nd task
    _bench_expert(world, "x2", "rt_sentiment", 6)
    cfg = {
        "merge_method": "fisher",
        "base_model": "base",
        "models": [{"model": "x1"}, {"model": "x2/encoder"}],
        "data": {"suite": "smoke", "budget": 10},
    }
    (world["root"] / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    _merge(world["root"] / "cfg.yaml", world["root"] / "out")
    meta = load_stats(sidecar_path(world["root"] / "x1", "fisher")).metadata
    assert meta["data_source"] == "suite:smoke/autos_electronics"
    assert load_stats(sidecar_path(world["root"] / "x2" / "encoder", "fisher")).examples == 10
    assert transformers.AutoModel.from_pretrained(world["root"] / "out") is not None


def test_validate_reports_tasks_and_sidecars(world) -> None:
    cfg = _cfg(world, "regmean")
    res = runner.invoke(app, ["validate", str(cfg), str(world["root"] / "out")])
    text = " ".join(res.output.split())
    assert res.exit_code == 0, text
    assert "task a" in text and "file:a.jsonl" in text and "to compute" in text
    _merge(cfg, world["root"] / "out")
    res = runner.invoke(app, ["validate", str(cfg), str(world["root"] / "out2")])
    assert res.exit_code == 0 and "up to date" in " ".join(res.output.split())


def test_deep_surgery_is_refused_before_any_forward_pass(world) -> None:
    _fails(_cfg(world, "surgery_v2"), world["root"] / "out", "cannot save")
