"""``extract-lora``: a known low-rank difference recovered from bf16 checkpoints, loaded by PEFT; CLI paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from _fixtures import load_all_tensors, make_peft_lora, make_tiny_llama, save_sharded
from _lora_fixtures import peft_merged_state
from unimerge.cli import app
from unimerge.errors import ConfigError
from unimerge.lora import extract_lora, open_adapter

runner = CliRunner()
Q0, K1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj"


def _bf16_pair(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A bf16 base on a grid of 1/8 and a fine-tune adding integer rank-2 (q_proj) and rank-1 (k_proj)
    updates, a changed norm and a changed embedding row: every sum is exact in bf16."""
    base = make_tiny_llama(tmp_path / "base", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    w = {
        n: (torch.randint(-8, 9, t.shape, generator=g) / 8).to(torch.bfloat16)
        for n, t in load_all_tensors(base).items()
    }
    save_sharded(w, base)
    deltas = {
        Q0: torch.randint(-2, 3, (16, 2), generator=g).float()
        @ torch.randint(-2, 3, (2, 16), generator=g).float(),
        K1: torch.randint(1, 3, (8, 1), generator=g).float()
        @ torch.randint(1, 3, (1, 16), generator=g).float(),
    }
    tuned = {n: t.clone() for n, t in w.items()}
    for m, d in deltas.items():
        tuned[f"{m}.weight"] = (w[f"{m}.weight"].float() + d).to(torch.bfloat16)
    tuned["model.norm.weight"] = tuned["model.norm.weight"] + 1
    fin = tmp_path / "tuned"
    fin.mkdir()
    (fin / "config.json").write_text((base / "config.json").read_text())
    save_sharded(tuned, fin)
    return base, fin, deltas


def test_bf16_low_rank_difference_recovered(tmp_path: Path) -> None:
    base, fin, deltas = _bf16_pair(tmp_path)
    res = extract_lora(base, fin, tmp_path / "out", rank=2)
    assert sorted(res.ranks) == sorted(deltas) and res.errors[Q0] < 1e-6 and res.errors[K1] < 1e-6
    assert [e["tensor"] for e in res.left_out] == ["model.norm.weight"]
    report = json.loads((tmp_path / "out" / "extraction.json").read_text())
    assert {r["module"] for r in report["modules"]} == set(deltas) and report["not_extracted"][0][
        "tensor"
    ] == "model.norm.weight"
    with open_adapter(tmp_path / "out") as ad:
        for m, d in deltas.items():
            torch.testing.assert_close(ad.factors(m).delta(), d, rtol=0, atol=1e-4)
    w = {n: t.float() for n, t in load_all_tensors(base).items()}
    got = peft_merged_state(base, tmp_path / "out")  # PEFT loads it; merged = base + recovered update
    for m, d in deltas.items():
        torch.testing.assert_close(got[f"{m}.weight"], w[f"{m}.weight"] + d, rtol=0, atol=1e-4)


def test_rank_one_error_is_eckart_young(tmp_path: Path) -> None:
    base, fin, deltas = _bf16_pair(tmp_path)
    res = extract_lora(base, fin, tmp_path / "out", rank=1)
    s = torch.linalg.svdvals(deltas[Q0].double())
    assert res.errors[Q0] == pytest.approx(math.sqrt(float(s[1] ** 2 / (s**2).sum())), rel=1e-4)
    assert res.errors[K1] < 1e-6  # rank 1 already


def test_embedding_update_is_an_embedding_lora(tmp_path: Path) -> None:
    base = make_tiny_llama(tmp_path / "base")
    w = load_all_tensors(base)
    g = torch.Generator().manual_seed(1)
    d = torch.randn(64, 1, generator=g) @ torch.randn(1, 16, generator=g)  # (vocab, hidden), rank 1
    fin = tmp_path / "tuned"
    fin.mkdir()
    (fin / "config.json").write_text((base / "config.json").read_text())
    save_sharded({**w, "model.embed_tokens.weight": w["model.embed_tokens.weight"] + d}, fin)
    res = extract_lora(base, fin, tmp_path / "out", energy=0.999)
    assert res.ranks == {"model.embed_tokens": 1}
    got = peft_merged_state(base, tmp_path / "out")
    torch.testing.assert_close(
        got["model.embed_tokens.weight"], w["model.embed_tokens.weight"] + d, rtol=1e-5, atol=1e-5
    )


def test_bad_extractions_write_nothing(tmp_path: Path) -> None:
    base, fin, _ = _bf16_pair(tmp_path)
    with pytest.raises(ConfigError, match=r"Rank 9 .*'model.layers.0.self_attn.k_proj'.*\[8, 16\]"):
        extract_lora(base, fin, tmp_path / "out", rank=9)
    with pytest.raises(ConfigError, match="exactly one of --rank R or --energy E"):
        extract_lora(base, fin, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    res = runner.invoke(app, ["extract-lora", str(base), str(fin), str(tmp_path / "out"), "--rank", "9"])
    assert res.exit_code == 2 and "at most 8" in " ".join(res.output.split())
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_cli_extract(tmp_path: Path) -> None:
    base, fin, _ = _bf16_pair(tmp_path)
    res = runner.invoke(app, ["extract-lora", str(base), str(fin), str(tmp_path / "out"), "--rank", "2"])
    assert res.exit_code == 0, res.output
    assert "model.norm.weight" in res.output and (tmp_path / "out" / "adapter_config.json").is_file()


def _config(tmp_path: Path, **extra: object) -> tuple[Path, Path]:
    base = make_tiny_llama(tmp_path / "base")
    make_peft_lora(tmp_path / "a", base, seed=1)
    make_peft_lora(tmp_path / "b", base, r=3, targets=("q_proj", "k_proj"), seed=2)
    cfg = {
        "merge_method": "ties",
        "models": [
            {"model": "a", "parameters": {"weight": 1.0}},
            {"model": "b", "parameters": {"weight": 0.5}},
        ],
        "parameters": {"density": 0.5},
        **extra,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, base


def test_cli_merge_adapters_alone(tmp_path: Path) -> None:
    path, _ = _config(tmp_path, output={"format": "peft_lora", "rank": 2})
    res = runner.invoke(app, ["merge", str(path), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    with open_adapter(tmp_path / "out") as ad:
        assert len(ad.modules) == 6 and {m.rank for m in ad.modules.values()} == {2}
    assert (tmp_path / "out" / "merge_report.json").is_file()


def test_cli_merge_adapters_dense(tmp_path: Path) -> None:
    path, base = _config(tmp_path, base_model="base")
    res = runner.invoke(app, ["merge", str(path), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert set(load_all_tensors(tmp_path / "out")) == set(load_all_tensors(base))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"output": {"format": "peft_lora", "rnak": 2}}, "output.rnak: unknown key"),
        ({"output": {"format": "dense", "rank": 2}}, "use them with `format: peft_lora`"),
        ({"output": {"format": "dense"}}, "needs the base model"),
        ({"output": {"format": "peft_lora"}, "parameters": {"density": [0.1, 0.5]}}, "take plain values"),
    ],
)
def test_cli_merge_bad_adapter_configs(tmp_path: Path, extra: dict, match: str) -> None:
    path, _ = _config(tmp_path, **extra)
    res = runner.invoke(app, ["merge", str(path), str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert match in " ".join(res.output.split())
    assert not (tmp_path / "out").exists()
