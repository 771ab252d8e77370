"""``unimerge moe``: a Mixtral MoE upcycled from tiny Llama models, against hand computations and mergekit.

Inputs: a base and three experts (hidden 32, 2 layers, vocab 100) with a word-level tokenizer
(``_fixtures.make_tiny_llama``: ``w<N>`` is token N, ``<s>`` is 1). The golden file
``golden/mergekit-moe-0.1.5.safetensors`` holds smaller inputs and what ``mergekit-moe`` 0.1.5 wrote for
five configs (every gate mode, noise, three dtypes); ``benchmarks/moe_parity.py`` regenerates it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from _fixtures import load_all_tensors, make_tiny_llama, save_sharded
from unimerge.cli import app
from unimerge.errors import CheckpointError, ConfigError, MergeError, PlanError
from unimerge.moe import MoEOptions, build_moe

transformers = pytest.importorskip("transformers")

SIZES = {"n_layers": 2, "hidden": 32, "intermediate": 48, "vocab": 100, "n_heads": 4, "n_kv_heads": 2}
GOLDEN = Path(__file__).parent / "golden" / "mergekit-moe-0.1.5.safetensors"
EXPERTS: list[dict[str, Any]] = [
    {"source_model": "e1", "positive_prompts": ["w5 w6 w7", "w8 w9"], "negative_prompts": ["w20 w21"]},
    {"source_model": "e2", "positive_prompts": ["w30 w31 w32 w33"]},
    {"source_model": "e3", "positive_prompts": ["w50", "w51 w52 w53 w54 w55"], "negative_prompts": ["w60"]},
]
BASE_ONLY = ("self_attn", "layernorm", "embed_tokens", "model.norm", "lm_head")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base (seed 0) and experts e1-e3 (base + 0.05 N(0, 1)), each with the tokenizer."""
    folder = tmp_path_factory.mktemp("moe")
    base = make_tiny_llama(folder / "base", **SIZES, tokenizer=True)
    for i in (1, 2, 3):
        make_tiny_llama(folder / f"e{i}", perturb_from=base, seed=i, scale=0.05, tokenizer=True)
    return folder


def _config(root: Path, name: str, **cfg: Any) -> Path:
    path = root / f"{name}.yml"
    data = {k: v for k, v in {"base_model": "base", "experts": EXPERTS, **cfg}.items() if v is not None}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _build(root: Path, tmp_path: Path, opts: MoEOptions | None = None, **cfg: Any) -> Path:
    out = tmp_path / "moe"
    build_moe(_config(root, tmp_path.name, **cfg), out, opts)
    return out


def _token_ids(prompt: str) -> list[int]:
    """``<s>`` plus the prompt, by hand (the word-level vocabulary: ``w<N>`` is token N)."""
    return [1] + [int(w[1:]) for w in prompt.split()]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------ (a) transformers loads and runs it


@pytest.mark.parametrize("layout", ["fused", "classic"])
def test_transformers_loads_and_generates(root: Path, tmp_path: Path, layout: str) -> None:
    out = _build(root, tmp_path, MoEOptions(layout=layout), gate_mode="cheap_embed", dtype="float32")  # type: ignore[arg-type]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, transformers.MixtralForCausalLM)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("<s>w5 w6", return_tensors="pt", add_special_tokens=False)
    assert ids["input_ids"].tolist() == [_token_ids("w5 w6")]
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (
        "mixtral", ["MixtralForCausalLM"], 3, 2,
    )  # fmt: skip
    assert cfg["sliding_window"] is None and cfg["intermediate_size"] == 48
    assert yaml.safe_load((out / "mergekit_moe_config.yml").read_text())["gate_mode"] == "cheap_embed"


@pytest.mark.parametrize("layout", ["fused", "classic"])
def test_experts_all_equal_to_the_base_give_the_base_model(root: Path, tmp_path: Path, layout: str) -> None:
    """Every expert the base itself: top-k routing weights sum to 1, so the MoE computes the dense model."""
    experts = [{"source_model": "base", "positive_prompts": [p]} for p in ("w5", "w9 w10", "w40")]
    cfg = _config(root, f"same_{layout}", experts=experts, gate_mode="cheap_embed", dtype="float32")
    with pytest.raises(ConfigError, match="i-understand-this-is-not-useful-without-training"):
        build_moe(cfg, tmp_path / "refused")
    build_moe(cfg, tmp_path / "moe", MoEOptions(layout=layout, allow_all_same=True))  # type: ignore[arg-type]
    ids = torch.tensor([_token_ids("w3 w17 w5 w88 w42")])
    dense = transformers.AutoModelForCausalLM.from_pretrained(root / "base")(ids).logits
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")(ids).logits
    torch.testing.assert_close(moe, dense, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ (b) where each tensor comes from


@pytest.mark.parametrize("layout", ["fused", "classic"])
def test_experts_and_base_tensors_are_copied_exactly(root: Path, tmp_path: Path, layout: str) -> None:
    out = _build(root, tmp_path, MoEOptions(layout=layout), gate_mode="random")  # type: ignore[arg-type]
    got = load_all_tensors(out)
    base = load_all_tensors(root / "base")
    experts = [load_all_tensors(root / f"e{i}") for i in (1, 2, 3)]
    for name, t in base.items():
        if any(k in name for k in BASE_ONLY):
            assert torch.equal(got[name], t), name
    inter = SIZES["intermediate"]
    for layer in range(2):
        src = [
            {p: e[f"model.layers.{layer}.mlp.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")}
            for e in experts
        ]
        for e, s in enumerate(src):
            if layout == "fused":
                gate_up = got[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
                assert gate_up.shape == (3, 2 * inter, SIZES["hidden"])
                assert torch.equal(gate_up[e, :inter], s["gate_proj"])
                assert torch.equal(gate_up[e, inter:], s["up_proj"])
                assert torch.equal(got[f"model.layers.{layer}.mlp.experts.down_proj"][e], s["down_proj"])
            else:
                prefix = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
                assert torch.equal(got[f"{prefix}.w1.weight"], s["gate_proj"])
                assert torch.equal(got[f"{prefix}.w2.weight"], s["down_proj"])
                assert torch.equal(got[f"{prefix}.w3.weight"], s["up_proj"])
    n_router = {"fused": "mlp.gate.weight", "classic": "block_sparse_moe.gate.weight"}[layout]
    n_expert = 2 * 2 if layout == "fused" else 2 * 3 * 3  # per layer: gate_up + down, or 3 per expert
    assert len(got) == len([n for n in base if any(k in n for k in BASE_ONLY)]) + n_expert + 2
    assert got[f"model.layers.1.{n_router}"].shape == (3, SIZES["hidden"])


def test_tied_base_has_no_lm_head_and_dtype_is_cast(root: Path, tmp_path: Path) -> None:
    tied = tmp_path / "tied"
    make_tiny_llama(tied, **SIZES, tokenizer=True)
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    tensors = load_all_tensors(tied)
    del tensors["lm_head.weight"]
    save_sharded(tensors, tied)
    experts = [{**e, "source_model": str(root / e["source_model"])} for e in EXPERTS]
    path = tmp_path / "tied.yml"
    path.write_text(
        yaml.safe_dump(
            {"base_model": "tied", "experts": experts, "gate_mode": "cheap_embed", "dtype": "bfloat16"}
        )
    )
    build_moe(path, tmp_path / "moe")
    got = load_all_tensors(tmp_path / "moe")
    assert "lm_head.weight" not in got and {t.dtype for t in got.values()} == {torch.bfloat16}
    assert torch.equal(got["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"].bfloat16())
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


# ------------------------------------------------------------------ (c) gates by hand


def test_cheap_embed_gates_by_hand(root: Path, tmp_path: Path) -> None:
    """Per prompt set: the sum of its tokens' embedding rows, normalised; positive minus negative, normalised."""
    out = _build(root, tmp_path, gate_mode="cheap_embed", dtype="float32")
    embed = load_all_tensors(root / "base")["model.embed_tokens.weight"].double()

    def vec(prompts: list[str]) -> torch.Tensor:
        return _unit(sum(embed[_token_ids(p)].sum(0) for p in prompts))  # type: ignore[arg-type]

    want = []
    for e in EXPERTS:
        v = vec(e["positive_prompts"]) - (vec(e["negative_prompts"]) if "negative_prompts" in e else 0)
        want.append(_unit(v))
    got = load_all_tensors(out)
    for layer in range(2):
        torch.testing.assert_close(
            got[f"model.layers.{layer}.mlp.gate.weight"].double(), torch.stack(want), rtol=0, atol=1e-6
        )


def test_hidden_gates_by_hand(root: Path, tmp_path: Path) -> None:
    """Layer l's row: mean over prompts of layer l's input at the last token (no padding: one prompt at a
    time, float32 here, bfloat16 in mergekit's rule, hence the tolerance); positive minus negative, unit."""
    out = _build(root, tmp_path, gate_mode="hidden", dtype="float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    embed = load_all_tensors(root / "base")["model.embed_tokens.weight"]

    def vec(prompts: list[str]) -> torch.Tensor:  # (n_layers, hidden)
        rows = []
        for p in prompts:
            with torch.no_grad():
                states = model(torch.tensor([_token_ids(p)]), output_hidden_states=True).hidden_states
            assert torch.equal(states[0][0, -1], embed[_token_ids(p)[-1]])  # layer 0's input: the embedding
            rows.append(torch.stack([s[0, -1] for s in states[:2]]))
        return torch.stack(rows).mean(0)

    want = []
    for e in EXPERTS:
        v = vec(e["positive_prompts"]) - (vec(e["negative_prompts"]) if "negative_prompts" in e else 0)
        want.append(_unit(v))
    want_t = torch.stack(want, dim=1)  # (n_layers, n_experts, hidden)
    got = load_all_tensors(out)
    for layer in range(2):
        g = got[f"model.layers.{layer}.mlp.gate.weight"]
        torch.testing.assert_close(g, want_t[layer], rtol=0, atol=2e-2)
        assert float((g * want_t[layer]).sum(-1).min()) > 0.999  # cosine, per expert


# ------------------------------------------------------------------ (d) randomness is seeded


def test_random_gates_are_seeded_normal_draws(root: Path, tmp_path: Path) -> None:
    a = load_all_tensors(
        _build(root, tmp_path / "a", MoEOptions(seed=11), gate_mode="random", dtype="float32")
    )
    b = load_all_tensors(
        _build(root, tmp_path / "b", MoEOptions(seed=11), gate_mode="random", dtype="float32")
    )
    c = load_all_tensors(
        _build(root, tmp_path / "c", MoEOptions(seed=12), gate_mode="random", dtype="float32")
    )
    want = torch.randn((2, 3, SIZES["hidden"]), generator=torch.Generator().manual_seed(11))
    for layer in range(2):
        name = f"model.layers.{layer}.mlp.gate.weight"
        assert torch.equal(a[name], want[layer]) and torch.equal(a[name], b[name])
        assert not torch.equal(a[name], c[name])


def test_uniform_random_gates_and_noise(root: Path, tmp_path: Path) -> None:
    experts = [{**EXPERTS[0], "noise_scale": 0.1, "residual_scale": 0.5}, *EXPERTS[1:]]
    out = _build(
        root, tmp_path, MoEOptions(seed=3), gate_mode="uniform_random", dtype="float32", experts=experts
    )
    got = load_all_tensors(out)
    gen = torch.Generator().manual_seed(3)
    bound = SIZES["hidden"] ** -0.5
    gates = torch.rand((2, 3, SIZES["hidden"]), generator=gen) * 2 * bound - bound
    e1 = load_all_tensors(root / "e1")
    noise = {
        p: torch.randn(e1[f"model.layers.0.mlp.{p}.weight"].shape, generator=gen) * 0.1
        for p in ("gate_proj", "down_proj")
    }
    assert torch.equal(got["model.layers.0.mlp.gate.weight"], gates[0])
    gate_up = got["model.layers.0.mlp.experts.gate_up_proj"]
    assert torch.equal(gate_up[0, :48], e1["model.layers.0.mlp.gate_proj.weight"] + noise["gate_proj"])
    down = (e1["model.layers.0.mlp.down_proj.weight"] + noise["down_proj"]) * 0.5
    assert torch.equal(got["model.layers.0.mlp.experts.down_proj"][0], down)


# ------------------------------------------------------------------ (e) mergekit-moe 0.1.5's own outputs

with safe_open(GOLDEN, framework="pt") as _f:
    GOLDEN_META: dict[str, str] = _f.metadata()
GOLDEN_CASES: dict[str, dict[str, Any]] = json.loads(GOLDEN_META["cases"])


@pytest.fixture(scope="module")
def golden_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The golden inputs as model folders (config.json from the fixture, tokenizer files from the golden)."""
    folder = tmp_path_factory.mktemp("moe_golden")
    sizes = json.loads(GOLDEN_META["sizes"])
    with safe_open(GOLDEN, framework="pt") as f:
        names = [k for k in f.keys() if k.startswith("in/")]  # noqa: SIM118 (safe_open is not a Mapping)
        for model in sorted({k.split("/")[1] for k in names}):
            make_tiny_llama(folder / model, **sizes)
            save_sharded(
                {k.split("/", 2)[2]: f.get_tensor(k) for k in names if k.split("/")[1] == model},
                folder / model,
            )
            for file, text in json.loads(GOLDEN_META["tokenizer"]).items():
                (folder / model / file).write_text(text)
    return folder


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_same_tensors_and_config_as_mergekit_moe(golden_root: Path, tmp_path: Path, case: str) -> None:
    spec = GOLDEN_CASES[case]
    cfg = golden_root / f"{case}.yml"
    cfg.write_text(yaml.safe_dump(spec["config"]))
    build_moe(cfg, tmp_path / "out", MoEOptions(seed=spec["seed"]))
    got = load_all_tensors(tmp_path / "out")
    with safe_open(GOLDEN, framework="pt") as f:
        prefix = f"out/{case}/"
        want = {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype and got[name].shape == w.shape, name
        err = float((got[name].double() - w.double()).abs().max())
        assert err <= 1e-5 * float(w.double().abs().max()), f"{case}: {name} differs by {err:.3g}"
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(spec["config_json"])


# ------------------------------------------------------------------ (f) bad input


def _expect(root: Path, tmp_path: Path, error: type[Exception], match: str, **cfg: Any) -> None:
    with pytest.raises(error, match=match):
        _build(root, tmp_path, **cfg)
    assert not (tmp_path / "moe").exists() and not list(tmp_path.glob(".moe*"))


def test_expert_with_other_shapes_is_refused(root: Path, tmp_path: Path) -> None:
    make_tiny_llama(tmp_path / "wide", **{**SIZES, "intermediate": 64}, tokenizer=True)
    experts = [EXPERTS[0], {**EXPERTS[1], "source_model": str(tmp_path / "wide")}]
    _expect(
        root,
        tmp_path,
        PlanError,
        r"wide has intermediate_size = 64 but the base model has 48",
        experts=experts,
    )
    cfg = json.loads((tmp_path / "wide" / "config.json").read_text())
    (tmp_path / "wide" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    _expect(
        root,
        tmp_path,
        PlanError,
        r"'model.layers.0.mlp.gate_proj.weight' is \[64, 32\] but the base model's MLP is \[48, 32\]",
        experts=experts,
    )


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"base_model": None}, r"base_model: Field required"),
        ({"gate_mode": "hiden"}, r"gate_mode: Input should be 'hidden', .*'uniform_random'"),
        ({"experts_per_token": 4}, r"experts_per_token is 4 but there are only 3 experts"),
        ({"shared_experts": [EXPERTS[0]]}, r"shared_experts: .*no shared experts"),
        ({"architecture": "qwen"}, r"output architecture 'qwen' is not supported"),
        ({"gate_mod": "random"}, r"gate_mod: unknown key"),
        (
            {"experts": [{"source_model": "e1"}, {"source_model": "e2"}]},
            r"experts\[0\] \(e1\) has no positive_prompts",
        ),
        (
            {"experts": [{**e, "positive_prompts": ["w1"], "negative_prompts": None} for e in EXPERTS]},
            "same positive and negative prompts",
        ),
    ],
)
def test_bad_config_is_refused(root: Path, tmp_path: Path, cfg: dict[str, Any], match: str) -> None:
    path = _config(root, tmp_path.name, **cfg)  # a key set to None is left out
    with pytest.raises(ConfigError, match=match) as err:
        build_moe(path, tmp_path / "moe")
    assert str(path) in str(err.value)
    assert not (tmp_path / "moe").exists()


def test_base_without_tokenizer_is_refused_for_prompt_gates(root: Path, tmp_path: Path) -> None:
    make_tiny_llama(tmp_path / "notok", **SIZES)
    experts = [{**e, "source_model": str(root / e["source_model"])} for e in EXPERTS]
    path = tmp_path / "notok.yml"
    path.write_text(yaml.safe_dump({"base_model": "notok", "experts": experts, "gate_mode": "cheap_embed"}))
    with pytest.raises(CheckpointError, match=r"Cannot load the tokenizer in .*notok"):
        build_moe(path, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()


def test_random_gates_need_no_prompts_and_output_is_not_overwritten(root: Path, tmp_path: Path) -> None:
    experts = [{"source_model": "e1"}, {"source_model": "e2"}]
    out = _build(root, tmp_path, gate_mode="random", experts=experts)
    with pytest.raises(MergeError, match="already exists"):
        _build(root, tmp_path, gate_mode="random", experts=experts)
    build_moe(root / f"{tmp_path.name}.yml", out, MoEOptions(force=True))
    with pytest.raises(ConfigError, match="overlaps input"):
        build_moe(root / f"{tmp_path.name}.yml", root / "e1" / "moe")


def test_cli_builds_and_reports_bad_input_without_traceback(root: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    cfg = _config(root, "cli", gate_mode="random")
    result = runner.invoke(
        app, ["moe", str(cfg), str(tmp_path / "moe"), "--seed", "1", "--layout", "classic"]
    )
    assert result.exit_code == 0, result.output
    assert "model.layers.0.block_sparse_moe.experts.2.w3.weight" in load_all_tensors(tmp_path / "moe")
    bad = _config(root, "cli_bad", gate_mode="router")
    result = runner.invoke(app, ["moe", str(bad), str(tmp_path / "bad")])
    assert result.exit_code == 2
    assert "gate_mode" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "bad").exists()
