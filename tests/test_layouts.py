"""Non-Llama layouts merge too: the engine goes by tensor names, not by architecture.

Tiny GPT-2, Qwen2 and BERT models from transformers (random weights, ``AutoModel.from_config``, saved
with ``save_pretrained``) are merged by ``unimerge merge`` with TIES and with SLERP over a gradient
(``t: [0, 0.5, 1]``: layer ``i`` of 3 gets ``t = i / 2``, every tensor outside the layers ``t = 0``, as
mergekit 0.1.5). The folder loads with ``AutoModel.from_pretrained`` with no missing or unexpected
weights, and every tensor equals the in-memory ``merge_state_dicts`` result (SLERP to float rounding).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from _fixtures import load_all_tensors
from unimerge import merge_state_dicts
from unimerge.cli import app

transformers = pytest.importorskip("transformers")

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h)\.(\d+)\.")  # Qwen2 / BERT / GPT-2 layer stacks


def _config(family: str) -> Any:
    """A 3-layer config of ``family`` with hidden size 16."""
    if family == "gpt2":
        return transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    if family == "qwen2":
        return transformers.Qwen2Config(
            num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=64, max_position_embeddings=32,
        )  # fmt: skip
    return transformers.BertConfig(
        num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2, vocab_size=64,
        max_position_embeddings=32,
    )  # fmt: skip


@pytest.fixture(scope="module", params=["gpt2", "qwen2", "bert"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base and two experts (the base's weights plus noise), saved by transformers."""
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(_config(request.param))
    model.save_pretrained(root / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i in (1, 2):
        gen = torch.Generator().manual_seed(i)
        noisy = {
            k: v + 0.01 * i * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in base.items()
        }
        model.load_state_dict(noisy)
        model.save_pretrained(root / f"e{i}")
    return {"root": root, "base": root / "base", "e1": root / "e1", "e2": root / "e2"}


def _merge_cli(family: dict[str, Path], name: str, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``unimerge merge`` on ``cfg``; the output loads with AutoModel and its weights are returned."""
    path, out = family["root"] / f"{name}.yaml", family["root"] / name
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["merge", str(path), str(out), "--threads", "1", "--force"])
    assert res.exit_code == 0, res.output
    model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    loaded = model.state_dict()
    written = load_all_tensors(out)
    assert all(torch.equal(loaded[k], v) for k, v in written.items())
    return written


def test_ties_merges_any_layout(family: dict[str, Path]) -> None:
    models = [(family["e1"], 1.0), (family["e2"], 0.5)]
    cfg = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [{"model": str(m), "parameters": {"weight": w, "density": 0.5}} for m, w in models],
    }
    got = _merge_cli(family, "ties", cfg)
    base, e1, e2 = (load_all_tensors(family[k]) for k in ("base", "e1", "e2"))
    want = merge_state_dicts("ties", [e1, e2], base, density=0.5, weight=[1.0, 0.5])
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0, msg=k)
    changed = [k for k in want if want[k].is_floating_point() and not torch.equal(want[k], base[k])]
    assert len(changed) > len(want) // 2  # the merge did something to most tensors


def test_slerp_gradient_over_any_layer_stack(family: dict[str, Path]) -> None:
    cfg = {
        "merge_method": "slerp",
        "base_model": str(family["base"]),
        "models": [{"model": str(family["base"])}, {"model": str(family["e1"])}],
        "parameters": {"t": [0, 0.5, 1]},
    }
    got = _merge_cli(family, "slerp", cfg)
    base, e1 = load_all_tensors(family["base"]), load_all_tensors(family["e1"])
    assert set(got) == set(base)
    layers = {k: int(m.group(1)) for k in base if (m := _LAYER.search(k))}
    assert sorted(set(layers.values())) == [0, 1, 2]
    for k in base:
        t = layers[k] / 2 if k in layers else 0.0
        want = merge_state_dicts("slerp", [{k: e1[k]}], {k: base[k]}, t=t)[k]
        # to rounding: the angle's dot product is a BLAS reduction whose last bits follow memory alignment
        torch.testing.assert_close(got[k], want, atol=1e-7, rtol=1e-6, msg=k)
    last = next(k for k in base if layers.get(k) == 2 and base[k].is_floating_point())
    assert torch.equal(got[last], e1[last]) and not torch.equal(got[last], base[last])  # t = 1: the expert
