"""PEFT LoRA folders as factors (no base needed), and the PEFT writer checked against real PEFT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _fixtures import load_all_tensors, make_peft_lora, make_tiny_llama
from _lora_fixtures import peft_merged_state
from unimerge.errors import CheckpointError, MergeError
from unimerge.lora import LoraFactors, open_adapter, save_peft_adapter
from unimerge.lora.adapter import peft_config

Q0, V1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"


def _adapter(folder: Path, tensors: dict[str, torch.Tensor], **config: object) -> Path:
    folder.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


A = torch.tensor([[1.0, 0.0, -1.0]])  # (r=1, in=3)
B = torch.tensor([[1.0], [2.0]])  # (out=2, r=1)
LORA = {f"base_model.model.{Q0}.lora_A.weight": A, f"base_model.model.{Q0}.lora_B.weight": B}


def test_factors_delta_by_hand() -> None:
    f = LoraFactors(A, B, 2.0)
    assert f.rank == 1 and f.shape == (2, 3)
    assert torch.equal(f.delta(), torch.tensor([[2.0, 0.0, -2.0], [4.0, 0.0, -4.0]]))
    t = LoraFactors(A, B, 2.0, transpose=True)  # fan_in_fan_out: the weight is (in, out)
    assert t.shape == (3, 2) and torch.equal(t.delta(), f.delta().T)


def test_open_adapter_without_base(tmp_path: Path) -> None:
    plain = open_adapter(_adapter(tmp_path / "plain", LORA))  # scale 2 / 1
    assert list(plain.modules) == [Q0] and plain.modules[Q0].shape == (2, 3)
    assert torch.equal(plain.factors(Q0).delta(), 2 * B @ A)
    a4, b4 = A.repeat(4, 1), B.repeat(1, 4)
    four = {f"base_model.model.{Q0}.lora_A.weight": a4, f"base_model.model.{Q0}.lora_B.weight": b4}
    rs = open_adapter(_adapter(tmp_path / "rs", four, r=4, lora_alpha=4, use_rslora=True))
    assert rs.modules[Q0].scale == 4 / math.sqrt(4)
    pat = open_adapter(
        _adapter(tmp_path / "pat", four, r=1, rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 2})
    )
    assert pat.modules[Q0].rank == 4 and pat.modules[Q0].scale == 2 / 4
    for ad in (plain, rs, pat):
        ad.close()


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "LOHA"}, "peft_type 'LOHA' is not supported"),
        ({"r": 3}, r"lora_A.weight \[1, 3\] .* are not rank-3 LoRA factors"),
    ],
)
def test_unsupported_or_broken_adapters(tmp_path: Path, config: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        open_adapter(_adapter(tmp_path / "x", LORA, **config))


def test_missing_adapter_config(tmp_path: Path) -> None:
    folder = tmp_path / "noconfig"
    folder.mkdir()
    save_file(LORA, str(folder / "adapter_model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"noconfig is not a PEFT adapter: adapter_config.json is missing"
    ):
        open_adapter(folder)


def test_writer_config_patterns_and_round_trip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    factors = {
        "m.a": LoraFactors(torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g), 0.5),
        "m.b": LoraFactors(torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g), 0.5),
        "m.c": LoraFactors(torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g), 2.0),
    }
    cfg = peft_config(factors, "base")
    # most common rank 2 and alpha 0.5 * 2 = 1; m.c differs in both (alpha 2 * 3 = 6)
    assert (cfg["r"], cfg["lora_alpha"]) == (2, 1.0)
    assert cfg["rank_pattern"] == {"m.c": 3} and cfg["alpha_pattern"] == {"m.c": 6.0}
    out = save_peft_adapter(tmp_path / "ad", factors, "base")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with open_adapter(out) as back:
        for m, f in factors.items():
            torch.testing.assert_close(back.factors(m).delta(), f.delta(), rtol=1e-6, atol=1e-6)
    with pytest.raises(MergeError, match="already exists"):
        save_peft_adapter(tmp_path / "ad", factors)
    with pytest.raises(MergeError, match="one fan_in_fan_out flag"):
        save_peft_adapter(
            tmp_path / "mixed", {**factors, "m.d": LoraFactors(factors["m.a"].a, factors["m.a"].b, 1.0, True)}
        )
    assert not (tmp_path / "mixed").exists()


def test_peft_loads_written_adapter(tmp_path: Path) -> None:
    """Different ranks and scales per module (rank_pattern/alpha_pattern), an embedding LoRA too."""
    base = make_tiny_llama(tmp_path / "base")
    w = load_all_tensors(base)
    g = torch.Generator().manual_seed(1)
    factors = {
        Q0: LoraFactors(torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g), 0.1),
        V1: LoraFactors(torch.randn(3, 16, generator=g), torch.randn(8, 3, generator=g), 0.03),
        "model.layers.1.mlp.down_proj": LoraFactors(
            torch.randn(2, 32, generator=g), torch.randn(16, 2, generator=g), 0.1
        ),
        "model.embed_tokens": LoraFactors(
            torch.randn(2, 64, generator=g),
            torch.randn(16, 2, generator=g),
            0.05,
            transpose=True,
            embedding=True,
        ),
    }
    out = save_peft_adapter(tmp_path / "ad", factors, str(base))
    got = peft_merged_state(base, out)
    for name, t in w.items():
        module = name.removesuffix(".weight")
        expected = t + factors[module].delta() if module in factors else t
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_fixture_adapter_matches_base_plus_adapter(tmp_path: Path) -> None:
    """open_adapter's updates are what BASE+ADAPTER materialises (the io/adapters.py reading)."""
    from unimerge.io import open_checkpoint

    base = make_tiny_llama(tmp_path / "base")
    lora = make_peft_lora(tmp_path / "lora", base, r=2, alpha=3, rslora=True)
    w = load_all_tensors(base)
    with open_adapter(lora) as ad, open_checkpoint(f"{base}+{lora}") as ck:
        assert len(ad.modules) == 4
        for m in ad.modules:
            torch.testing.assert_close(ck.read(f"{m}.weight"), w[f"{m}.weight"] + ad.factors(m).delta())
