"""benchmarks/lora_suite.py on a tiny BERT: LoRA experts train through frozen heads and are cached,
task arithmetic's exact adapter output scores as its dense output, and the trim statistics keep all
the energy at density 1."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from _bench_toy import TOY_SUITE, tiny_bert, toy_task
from unimerge.bench.build import build_heads
from unimerge.bench.model import load_encoder
from unimerge.lora import open_adapter

pytest.importorskip("transformers")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lora_suite.py"


def _script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("lora_suite", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lora_suite"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    ls = _script()
    root = tmp_path_factory.mktemp("lora")
    pdir = tiny_bert(root / "pretrained")
    tasks = [toy_task("a", 2, 1), toy_task("b", 3, 2)]
    model = load_encoder(pdir)
    heads = build_heads(root / "cache", model, tasks, 0, "sha")
    spec = ls.LoraSpec(rank=4, alpha=8.0, lr=1e-2)
    adapters = ls.build_lora_experts(root / "cache", pdir, tasks, heads, TOY_SUITE, 0, spec)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    w = ls.World(tasks, {h.task: h.state for h in heads}, pdir, model, base, adapters, 0)
    return ls, w, (root / "cache", pdir, tasks, heads, spec)


def test_lora_experts_train_only_adapters_and_are_reused_from_the_cache(world) -> None:
    ls, w, (root, pdir, tasks, heads, spec) = world
    for folder, task in zip(w.adapters, tasks, strict=True):
        assert folder.parent == root / "lora-experts" / "toy" and folder.name.startswith(f"{task.name}-")
        with open_adapter(folder) as ad:
            assert ad.settings.r == 4 and len(ad.modules) == 2 * 6  # 2 layers x (q, k, v, o, up, down)
            moved = any(float(ad.factors(m).delta().abs().max()) > 0 for m in ad.modules)
        best_step = json.loads((folder / "meta.json").read_text())["best_step"]
        assert moved == (best_step > 0)  # the best validation state is saved (step 0: B still zero)
    stamps = [(f / "adapter_model.safetensors").stat().st_mtime_ns for f in w.adapters]
    again = ls.build_lora_experts(root, pdir, tasks, heads, TOY_SUITE, 0, spec)
    assert again == w.adapters
    assert [(f / "adapter_model.safetensors").stat().st_mtime_ns for f in again] == stamps
    other = ls.build_lora_experts(root, pdir, tasks[:1], heads[:1], TOY_SUITE, 0, ls.LoraSpec(4, 8.0, 2e-2))
    assert other[0] != w.adapters[0]  # another learning rate is another expert


def test_exact_adapter_output_of_task_arithmetic_scores_as_the_dense_merge(world, tmp_path: Path) -> None:
    ls, w, _ = world
    rows = ls.references(w) + ls.run_rows(w, ["task_arithmetic"], tmp_path)
    dense, adapter = rows[2], rows[3]
    assert rows[1]["normalized_avg"] == pytest.approx(1.0)  # the individual experts normalize to 1
    assert adapter["recon_error"] == 0.0 and adapter["params"] == dense["params"]
    assert adapter["per_task"] == pytest.approx(dense["per_task"], abs=1 / 32)  # one bf16 flip at most
    assert dense["params"]["lambda"] in ls.get_method("task_arithmetic").grid["lambda"]
    assert len(dense["grid"]) == len(ls.get_method("task_arithmetic").grid["lambda"])


def test_trim_keeps_all_energy_at_density_one_and_less_below(world) -> None:
    ls, w, _ = world
    stats = ls.trim_stats(w, (0.3, 1.0))
    for kind in ("raw", "knots"):
        assert stats[f"{kind}@1.0"]["energy_kept"] == pytest.approx(1.0)
        assert stats[f"{kind}@0.3"]["energy_kept"] < 1.0
        assert 0.0 < stats[f"{kind}@0.3"]["sign_agreeing"] <= 1.0
