"""``align:`` in a merge config: transformers models permuted into the reference's basis, then merged.

Each model is built with transformers from a tiny config and saved in the test; its "permuted copy"
reorders the MLP hidden units and attention heads by hand (written here, independently of
unimerge.align), so it computes the same function with differently ordered weights. Merging a model
with its permuted copy after alignment must give the model back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from _fixtures import load_all_tensors
from unimerge.align.run import run_aligned_merge
from unimerge.cli import app
from unimerge.errors import ConfigError

pytest.importorskip("scipy")
transformers = pytest.importorskip("transformers")
runner = CliRunner()
Perm = Callable[[dict[str, torch.Tensor], torch.Generator], dict[str, torch.Tensor]]


def _rows(t: torch.Tensor, order: torch.Tensor, block: int, axis: int = 0) -> torch.Tensor:
    """``t`` with blocks of ``block`` entries along ``axis`` reordered: block i becomes block order[i]."""
    idx = (order[:, None] * block + torch.arange(block)[None, :]).reshape(-1)
    return t.index_select(axis, idx)


def _perm_llama(sd: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = dict(sd)
    for i in range(2):
        p = f"model.layers.{i}."
        units, groups = torch.randperm(64, generator=gen), torch.tensor([1, 0])  # 2 kv heads: swap them
        for n in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            out[p + n] = sd[p + n][units]
        out[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][:, units]
        # 4 query heads sharing 2 key/value heads (head_dim 8): a unit is one kv head and its 2 query heads
        out[p + "self_attn.q_proj.weight"] = _rows(sd[p + "self_attn.q_proj.weight"], groups, 16)
        for n in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            out[p + n] = _rows(sd[p + n], groups, 8)
        out[p + "self_attn.o_proj.weight"] = _rows(sd[p + "self_attn.o_proj.weight"], groups, 16, axis=1)
    return out


def _perm_bert(sd: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = dict(sd)
    for i in range(2):
        p = f"encoder.layer.{i}."
        units, heads = torch.randperm(64, generator=gen), torch.randperm(4, generator=gen)
        for n in ("intermediate.dense.weight", "intermediate.dense.bias"):
            out[p + n] = sd[p + n][units]
        out[p + "output.dense.weight"] = sd[p + "output.dense.weight"][:, units]
        for n in ("query", "key", "value"):
            for kind in ("weight", "bias"):
                name = f"{p}attention.self.{n}.{kind}"
                out[name] = _rows(sd[name], heads, 8)
        name = p + "attention.output.dense.weight"
        out[name] = _rows(sd[name], heads, 8, axis=1)
    return out


def _perm_gpt2(sd: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = dict(sd)
    for i in range(2):
        p = f"h.{i}."
        units, heads = torch.randperm(128, generator=gen), torch.randperm(4, generator=gen)
        out[p + "mlp.c_fc.weight"] = sd[p + "mlp.c_fc.weight"][:, units]  # Conv1D: (in, out)
        out[p + "mlp.c_fc.bias"] = sd[p + "mlp.c_fc.bias"][units]
        out[p + "mlp.c_proj.weight"] = sd[p + "mlp.c_proj.weight"][units]
        qkv = torch.cat([heads + 4 * s for s in range(3)])  # the same head order in q, k and v
        out[p + "attn.c_attn.weight"] = _rows(sd[p + "attn.c_attn.weight"], qkv, 8, axis=1)
        out[p + "attn.c_attn.bias"] = _rows(sd[p + "attn.c_attn.bias"], qkv, 8)
        out[p + "attn.c_proj.weight"] = _rows(sd[p + "attn.c_proj.weight"], heads, 8)
    return out


def _configs() -> dict[str, tuple[object, Perm]]:
    return {
        "llama": (
            transformers.LlamaConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2,
            ),
            _perm_llama,
        ),
        "bert": (
            transformers.BertConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=64, max_position_embeddings=64,
            ),
            _perm_bert,
        ),
        "gpt2": (
            transformers.GPT2Config(
                n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, bos_token_id=1, eos_token_id=2
            ),
            _perm_gpt2,
        ),
    }  # fmt: skip


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).last_hidden_state if hasattr(model(x), "last_hidden_state") else model(x).logits


def _pair(tmp_path: Path, arch: str) -> tuple[Path, Path, torch.nn.Module]:
    """A model saved in ``a/`` and its hand-permuted copy in ``b/`` (checked to compute the same)."""
    config, perm = _configs()[arch]
    torch.manual_seed(0)
    model = (
        transformers.LlamaForCausalLM(config)
        if arch == "llama"
        else transformers.AutoModel.from_config(config)
    )
    model = model.eval()
    with torch.no_grad():  # a trained-looking spread, so no two units have equal weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "a")
    copy = type(model)(config).eval()
    copy.load_state_dict(perm(model.state_dict(), torch.Generator().manual_seed(1)))
    x = torch.randint(3, 64, (2, 10))
    torch.testing.assert_close(_outputs(copy, x), _outputs(model, x), atol=1e-5, rtol=1e-5)
    copy.save_pretrained(tmp_path / "b")
    return tmp_path / "a", tmp_path / "b", model


def _config(tmp_path: Path, align: dict | None, **extra: object) -> Path:
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": "a", "parameters": {"weight": 0.5}},
            {"model": "b", "parameters": {"weight": 0.5}},
        ],
        **({"align": align} if align is not None else {}),
        **extra,
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_merge_with_own_permuted_copy_gives_the_model(tmp_path: Path, arch: str) -> None:
    a, b, _ = _pair(tmp_path, arch)
    run_aligned_merge(_config(tmp_path, {"method": "weight_matching"}), tmp_path / "out")
    merged, want = load_all_tensors(tmp_path / "out"), load_all_tensors(a)
    assert set(merged) == set(want)
    for name, t in want.items():
        torch.testing.assert_close(merged[name], t, atol=1e-5, rtol=0, msg=name)
    # without alignment the same merge averages unrelated units: far from the model
    naive = {n: 0.5 * (t + load_all_tensors(b)[n]) for n, t in want.items()}
    assert max((naive[n] - want[n]).abs().max().item() for n in want) > 0.05


def test_cli_merge_with_align_and_validate(tmp_path: Path) -> None:
    a, _, model = _pair(tmp_path, "llama")
    cfg = _config(tmp_path, {"method": "weight_matching", "reference": "a", "seed": 3})
    res = runner.invoke(app, ["validate", str(cfg), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "2 MLP groups, 2 head groups" in " ".join(res.output.split())
    res = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    merged = load_all_tensors(out)
    for name, t in load_all_tensors(a).items():
        torch.testing.assert_close(merged[name], t, atol=1e-5, rtol=0, msg=name)
    assert (out / "config.json").is_file()
    assert "align" in yaml.safe_load((out / "unimerge_config.yaml").read_text())
    # the merged folder loads in transformers and computes what the model does
    again = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    x = torch.randint(3, 64, (2, 10))
    torch.testing.assert_close(_outputs(again, x), _outputs(model, x), atol=1e-4, rtol=1e-4)


def test_reference_b_moves_a_into_bs_basis(tmp_path: Path) -> None:
    _, b, _ = _pair(tmp_path, "bert")
    run_aligned_merge(_config(tmp_path, {"reference": "b"}), tmp_path / "out")
    merged, want = load_all_tensors(tmp_path / "out"), load_all_tensors(b)
    for name, t in want.items():
        torch.testing.assert_close(merged[name], t, atol=1e-5, rtol=0, msg=name)


def _fails(tmp_path: Path, cfg: Path, match: str, command: str = "merge") -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    res = runner.invoke(app, [command, str(cfg), str(tmp_path / "out")])
    text = " ".join(res.output.split())
    assert res.exit_code != 0, text
    assert match in text, text
    assert "Traceback" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp folder left


@pytest.mark.parametrize(
    ("align", "match"),
    [
        ({"method": "nonsense"}, "unknown alignment method 'nonsense'; use `weight_matching`"),
        ({"method": "activation_matching"}, "activation_matching needs data and runs only in Python"),
        ({"reference": "c"}, "align.reference 'c' is not one of the config's models ['a', 'b']"),
        ({"inputs": {"shape": [1, 3], "text": "hi"}}, "give exactly one of `shape"),
        ({"colour": "red"}, "align.colour: unknown key"),
        ({"inputs": {"text": "w3 w4"}}, "Cannot tokenize align.inputs.text with the tokenizer in"),
        ({"inputs": {"shape": [2, 8]}}, "Cannot run"),  # float inputs where the model wants token ids
    ],
)
def test_bad_align_section(tmp_path: Path, align: dict, match: str) -> None:
    _pair(tmp_path, "llama")
    _fails(tmp_path, _config(tmp_path, align), match)


def test_align_refuses_slices(tmp_path: Path) -> None:
    _pair(tmp_path, "llama")
    src = [{"model": m, "layer_range": [0, 2]} for m in ("a", "b")]
    cfg = {"merge_method": "linear", "slices": [{"sources": src}], "parameters": {"weight": 0.5}, "align": {}}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _fails(tmp_path, path, "`align:` works with `models:` only")


def test_not_buildable_model_is_refused(tmp_path: Path) -> None:
    a, b, _ = _pair(tmp_path, "llama")
    for folder in (a, b):  # a model type transformers does not know (and no remote code is trusted)
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(model_type="mystery_net", architectures=["MysteryNetModel"])
        (folder / "config.json").write_text(json.dumps(cfg))
    _fails(tmp_path, _config(tmp_path, {}), "Cannot align")
    _fails(tmp_path, _config(tmp_path, {}), "transformers cannot build it from config.json (ValueError")
    _fails(tmp_path, _config(tmp_path, {}), "mystery_net")
    _fails(tmp_path, _config(tmp_path, {}), "unimerge.align.declare_spec")


def test_model_without_config_is_refused(tmp_path: Path) -> None:
    a, b, _ = _pair(tmp_path, "llama")
    cfg = {
        "merge_method": "linear",
        "models": [{"model": f"{m}/model.safetensors", "parameters": {"weight": 0.5}} for m in ("a", "b")],
        "align": {},
    }
    for m in ("a", "b"):
        (tmp_path / m / "config.json").unlink()
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _fails(tmp_path, path, "it has no config.json")


def test_engine_alone_refuses_align(tmp_path: Path) -> None:
    from unimerge.execute import run_merge

    _pair(tmp_path, "llama")
    with pytest.raises(ConfigError, match="would merge the models unaligned"):
        run_merge(_config(tmp_path, {}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_permutation_that_changes_the_function_is_refused(tmp_path: Path) -> None:
    """The function check: a spec that forgets ``up_proj`` moves gate rows without their up rows."""
    from unimerge.align import declare_spec
    from unimerge.align.run import align_checkpoint, load_model
    from unimerge.alignconfig import AlignSpec
    from unimerge.errors import AlignError
    from unimerge.io import open_checkpoint

    a, b, _ = _pair(tmp_path, "llama")
    ref, ck = open_checkpoint(str(b)), open_checkpoint(str(a))
    reference = load_model(ref).state_dict()
    p = "model.layers.0.mlp."
    spec = declare_spec({"mlp": [(p + "gate_proj.weight", 0), (p + "down_proj.weight", 1)]}, reference)
    with pytest.raises(AlignError, match="changes what its LlamaForCausalLM computes"):
        align_checkpoint(ck, reference, spec, (torch.randint(3, 64, (2, 10)),), AlignSpec())
    ck.close()
    ref.close()
