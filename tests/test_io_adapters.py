"""PEFT LoRA materialisation (``BASE+ADAPTER``): hand-computed numbers and every mismatch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _fixtures import load_all_tensors, make_peft_lora, make_tiny_llama
from unimerge.errors import CheckpointError
from unimerge.io import LoraCheckpoint, open_checkpoint

Q = "model.layers.0.self_attn.q_proj"


def _adapter(folder: Path, tensors: dict[str, torch.Tensor], **config: object) -> Path:
    folder.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _base(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


W = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 1.0]])  # (out=2, in=3)
A = torch.tensor([[1.0, 0.0, -1.0]])  # (r=1, in=3)
B = torch.tensor([[1.0], [2.0]])  # (out=2, r=1)
LORA = {f"base_model.model.{Q}.lora_A.weight": A, f"base_model.model.{Q}.lora_B.weight": B}


def test_hand_computed_delta(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", {f"{Q}.weight": W, "other": torch.ones(2)})
    adapter = _adapter(tmp_path / "lora", LORA)  # scale = alpha / r = 2
    ckpt = open_checkpoint(f"{base}+{adapter}")
    assert isinstance(ckpt, LoraCheckpoint) and ckpt.adapted() == [f"{Q}.weight"]
    # W + 2 * B @ A = W + 2 * [[1, 0, -1], [2, 0, -2]]
    expected = torch.tensor([[3.0, 2.0, -2.0], [7.0, 4.0, -3.0]])
    assert torch.equal(ckpt.read(f"{Q}.weight"), expected)
    assert torch.equal(ckpt.read("other"), torch.ones(2))
    assert ckpt.tensors() == open_checkpoint(base).tensors()
    assert ckpt.root == base
    assert ckpt.files() == [base / "model.safetensors", adapter / "adapter_model.safetensors"]


def test_rslora_and_alpha_pattern(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", {f"{Q}.weight": W})
    a4 = A.repeat(4, 1)  # (4, 3): B @ A = 4 * [[1, 0, -1], [2, 0, -2]]
    b4 = B.repeat(1, 4)  # (2, 4)
    tensors = {f"base_model.model.{Q}.lora_A.weight": a4, f"base_model.model.{Q}.lora_B.weight": b4}
    delta = torch.tensor([[4.0, 0.0, -4.0], [8.0, 0.0, -8.0]])
    plain = _adapter(tmp_path / "plain", tensors, r=4, lora_alpha=4)  # scale 4 / 4 = 1
    rs = _adapter(tmp_path / "rs", tensors, r=4, lora_alpha=4, use_rslora=True)  # scale 4 / sqrt(4) = 2
    pattern = _adapter(tmp_path / "pat", tensors, r=4, lora_alpha=4, alpha_pattern={"q_proj": 2})  # 2 / 4
    assert torch.equal(open_checkpoint(f"{base}+{plain}").read(f"{Q}.weight"), W + delta)
    assert torch.equal(open_checkpoint(f"{base}+{rs}").read(f"{Q}.weight"), W + 2 * delta)
    assert torch.equal(open_checkpoint(f"{base}+{pattern}").read(f"{Q}.weight"), W + 0.5 * delta)


def test_fan_in_fan_out_transposes(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", {f"{Q}.weight": W.T.contiguous()})  # Conv1D layout (in=3, out=2)
    adapter = _adapter(tmp_path / "lora", LORA, fan_in_fan_out=True)
    got = open_checkpoint(f"{base}+{adapter}").read(f"{Q}.weight")
    assert torch.equal(got, torch.tensor([[3.0, 2.0, -2.0], [7.0, 4.0, -3.0]]).T)


def test_embedding_lora_and_modules_to_save(tmp_path: Path) -> None:
    emb = torch.zeros(3, 2)  # (num_embeddings=3, dim=2)
    base = _base(tmp_path / "base", {"model.embed_tokens.weight": emb, "lm_head.weight": torch.zeros(3, 2)})
    tensors = {
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.tensor([[1.0, 2.0, 3.0]]),  # (r, num)
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.tensor([[1.0], [-1.0]]),  # (dim, r)
        "base_model.model.lm_head.modules_to_save.default.weight": torch.full((3, 2), 5.0),
    }
    ckpt = open_checkpoint(f"{base}+{_adapter(tmp_path / 'lora', tensors)}")
    # (B @ A).T * 2 = 2 * [[1, -1], [2, -2], [3, -3]]
    assert torch.equal(
        ckpt.read("model.embed_tokens.weight"), torch.tensor([[2.0, -2.0], [4.0, -4.0], [6.0, -6.0]])
    )
    assert torch.equal(ckpt.read("lm_head.weight"), torch.full((3, 2), 5.0))


def test_fixture_adapter_on_tiny_llama(tmp_path: Path) -> None:
    base = make_tiny_llama(tmp_path / "base", dtype=torch.bfloat16, shards=2)
    lora = make_peft_lora(tmp_path / "lora", base, r=2, alpha=4, seed=3)
    raw_base, raw_lora = load_all_tensors(base), load_all_tensors(lora)
    ckpt = open_checkpoint(f"{base}+{lora}")
    assert len(ckpt.adapted()) == 4  # q_proj and v_proj in 2 layers
    for name, w in raw_base.items():
        got = ckpt.read(name)
        assert got.dtype == torch.bfloat16
        module = name.removesuffix(".weight")
        key = f"base_model.model.{module}.lora_A.weight"
        if key in raw_lora:
            b = raw_lora[key.replace("lora_A", "lora_B")]
            assert torch.equal(got, (w.float() + 2.0 * b @ raw_lora[key]).to(torch.bfloat16)), name
        else:
            assert torch.equal(got, w), name


def test_fixture_rslora_scale(tmp_path: Path) -> None:
    base = make_tiny_llama(tmp_path / "base")
    lora = make_peft_lora(tmp_path / "lora", base, r=4, alpha=8, rslora=True, targets=("o_proj",))
    raw_base, raw_lora = load_all_tensors(base), load_all_tensors(lora)
    name = "model.layers.1.self_attn.o_proj"
    a, b = (
        raw_lora[f"base_model.model.{name}.lora_A.weight"],
        raw_lora[f"base_model.model.{name}.lora_B.weight"],
    )
    expected = raw_base[f"{name}.weight"] + 8 / math.sqrt(4) * b @ a
    torch.testing.assert_close(open_checkpoint(f"{base}+{lora}").read(f"{name}.weight"), expected)


# --- mismatches and unsupported adapters ---------------------------------------------------------


def test_module_missing_from_base(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", {f"{Q}.weight": W})
    tensors = {**LORA, "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": A.clone()}
    tensors["base_model.model.model.layers.9.mlp.up_proj.lora_B.weight"] = B.clone()
    adapter = _adapter(tmp_path / "lora", tensors)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.9\.mlp\.up_proj'.*no tensor"):
        open_checkpoint(f"{base}+{adapter}")


def test_replacement_missing_from_base(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", {f"{Q}.weight": W})
    adapter = _adapter(tmp_path / "lora", {**LORA, "base_model.model.score.weight": torch.ones(2, 2)})
    with pytest.raises(CheckpointError, match="'score.weight', which the base model lacks"):
        open_checkpoint(f"{base}+{adapter}")


def test_shape_mismatch(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", {f"{Q}.weight": torch.zeros(4, 3)})
    adapter = _adapter(tmp_path / "lora", LORA)
    with pytest.raises(CheckpointError, match=r"do not fit base tensor .*\[4, 3\]"):
        open_checkpoint(f"{base}+{adapter}")


def test_rank_disagrees_with_config(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", {f"{Q}.weight": W})
    adapter = _adapter(tmp_path / "lora", LORA, r=2)
    with pytest.raises(CheckpointError, match="r=2"):
        open_checkpoint(f"{base}+{adapter}")


def test_unpaired_lora_a(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", {f"{Q}.weight": W})
    adapter = _adapter(tmp_path / "lora", {f"base_model.model.{Q}.lora_A.weight": A})
    with pytest.raises(CheckpointError, match="no matching lora_B"):
        open_checkpoint(f"{base}+{adapter}")


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"peft_type": "IA3"}, "only LoRA"),
        ({"use_dora": True}, "DoRA"),
        ({"r": 0}, "positive integer 'r'"),
        ({"lora_alpha": "big"}, "number 'lora_alpha'"),
    ],
)
def test_unsupported_configs(tmp_path: Path, config: dict, match: str) -> None:
    base = _base(tmp_path / "base", {f"{Q}.weight": W})
    adapter = _adapter(tmp_path / "lora", LORA, **config)
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(f"{base}+{adapter}")


def test_adapter_folder_alone_and_missing_weights(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path / "lora", LORA)
    with pytest.raises(CheckpointError, match="PEFT adapter.*BASE\\+ADAPTER"):
        open_checkpoint(adapter)
    base = _base(tmp_path / "base", {f"{Q}.weight": W})
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="No adapter weights"):
        open_checkpoint(f"{base}+{adapter}")
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="adapter_config.json is missing"):
        open_checkpoint(f"{base}+{adapter}")


def test_pickled_adapter_needs_opt_in(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", {f"{Q}.weight": W})
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 1, "lora_alpha": 2}))
    torch.save(LORA, folder / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        open_checkpoint(f"{base}+{folder}")
    got = open_checkpoint(f"{base}+{folder}", allow_pickle=True).read(f"{Q}.weight")
    assert torch.equal(got, torch.tensor([[3.0, 2.0, -2.0], [7.0, 4.0, -3.0]]))
