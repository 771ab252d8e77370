"""Merging models whose tokenizers differ (``tokenizer_source`` / ``tokenizer:``), against hand-computed rows
and against mergekit 0.1.5's own outputs (``golden/mergekit-0.1.5-vocab.safetensors``).

The models (``_vocab_fixtures.py``): ``base`` has 12 words; ``e1`` adds ``<x>`` (12) and ``<y>`` (13);
``e2`` lacks ``w11`` and adds ``<y>`` (11) and ``<z>`` (12). mergekit's rules (``vocab.py``'s docstring):
a token every input has is merged from every input's own row; a token some inputs lack is merged after
those inputs take a stand-in row (the one holder's row; else the base's; else the holders' mean).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from _fixtures import load_all_tensors, make_tiny_llama, save_sharded
from _vocab_fixtures import VOCABS, make_vocab_llama, make_vocab_world
from unimerge.errors import CheckpointError, ConfigError, PlanError
from unimerge.execute import RunOptions, run_merge

GOLDEN = Path(__file__).parent / "golden" / "mergekit-0.1.5-vocab.safetensors"
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
BASE_TOKENS = VOCABS["base"][0]
UNION = [*BASE_TOKENS, "<x>", "<y>", "<z>"]  # the base's tokens, then e1's, then e2's new ones


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_vocab_world(tmp_path_factory.mktemp("vocab"))


def _row(world: dict[str, Path], model: str, token: str, name: str = EMB) -> torch.Tensor:
    """``model``'s own row for ``token``."""
    words, added = VOCABS[model]
    return load_all_tensors(world[model])[name][[*words, *added].index(token)]


def _merge(cfg: dict[str, Any], world: dict[str, Path], out: Path) -> dict[str, torch.Tensor]:
    names = {"base_model", "model", "tokenizer_source", "source"}
    resolved = json.loads(json.dumps(cfg), object_hook=lambda d: _resolve(d, world, names))
    run_merge(resolved, out, RunOptions(threads=1))
    return load_all_tensors(out)


def _resolve(d: dict[str, Any], world: dict[str, Path], keys: set[str]) -> dict[str, Any]:
    return {k: str(world[v]) if k in keys and isinstance(v, str) and v in world else v for k, v in d.items()}


def _vocab(folder: Path) -> list[str]:
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    return sorted(vocab, key=vocab.__getitem__)


def _linear(weights: dict[str, float], source: str = "union", **extra: Any) -> dict[str, Any]:
    return {
        "merge_method": "linear",
        "base_model": "base",
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in weights.items()],
        "tokenizer_source": source,
        **extra,
    }


# ------------------------------------------------------------------------------- union: vocab and rows


def test_union_vocabulary_is_the_base_then_each_models_new_tokens(
    world: dict[str, Path], tmp_path: Path
) -> None:
    got = _merge(_linear({"base": 0.5, "e1": 0.3, "e2": 0.2}), world, tmp_path / "out")
    assert _vocab(tmp_path / "out") == UNION
    assert got[EMB].shape == got[HEAD].shape == (len(UNION), 8)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == len(UNION)


@pytest.mark.parametrize("name", [EMB, HEAD])
def test_union_rows_are_the_merge_of_the_rows_holding_each_token(
    world: dict[str, Path], tmp_path: Path, name: str
) -> None:
    w = {"base": 0.5, "e1": 0.3, "e2": 0.2}  # sums to 1: linear's normalisation is a no-op
    got = _merge(_linear(w), world, tmp_path / "out")[name]

    def row(m: str, t: str) -> torch.Tensor:
        return _row(world, m, t, name)

    for i, tok in enumerate(BASE_TOKENS[:-1]):  # in every model, at the same id
        want = sum(w[m] * row(m, tok) for m in w)
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-7)
    # w11: e2 lacks it and takes the base's row
    want = (0.5 + 0.2) * row("base", "w11") + 0.3 * row("e1", "w11")
    torch.testing.assert_close(got[11], want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[12], row("e1", "<x>"), rtol=1e-6, atol=1e-7)  # e1 only: its row
    # <y>: e1 (id 13) and e2 (id 11); the base lacks it and takes their mean
    mean = (row("e1", "<y>") + row("e2", "<y>")) / 2
    want = 0.5 * mean + 0.3 * row("e1", "<y>") + 0.2 * row("e2", "<y>")
    torch.testing.assert_close(got[13], want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[14], row("e2", "<z>"), rtol=1e-6, atol=1e-7)  # e2 only


def test_union_without_a_base_averages_the_holders(world: dict[str, Path], tmp_path: Path) -> None:
    cfg = _linear({"e1": 0.75, "e2": 0.25})
    del cfg["base_model"]
    got = _merge(cfg, world, tmp_path / "out")[EMB]
    assert _vocab(tmp_path / "out") == UNION  # the first model stands in for the base: same words
    torch.testing.assert_close(got[5], 0.75 * _row(world, "e1", "w5") + 0.25 * _row(world, "e2", "w5"))
    torch.testing.assert_close(got[11], _row(world, "e1", "w11"))  # e1 only
    torch.testing.assert_close(got[13], 0.75 * _row(world, "e1", "<y>") + 0.25 * _row(world, "e2", "<y>"))


def test_task_arithmetic_keeps_a_token_only_one_expert_has(world: dict[str, Path], tmp_path: Path) -> None:
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": "e1", "parameters": {"weight": 0.6}},
            {"model": "e2", "parameters": {"weight": 0.4}},
        ],
        "tokenizer_source": "union",
    }
    got = _merge(cfg, world, tmp_path / "out")[HEAD]
    torch.testing.assert_close(got[12], _row(world, "e1", "<x>", HEAD))  # base and e2 take e1's row: delta 0
    b, e1, e2 = (_row(world, m, "w4", HEAD) for m in ("base", "e1", "e2"))
    torch.testing.assert_close(got[4], b + 0.6 * (e1 - b) + 0.4 * (e2 - b), rtol=1e-6, atol=1e-7)


def test_the_written_tokenizer_encodes_the_added_tokens(world: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    _merge(_linear({"base": 1.0, "e1": 1.0, "e2": 1.0}), world, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok("<x> w3 <z> w11 <y>", add_special_tokens=False)["input_ids"] == [12, 3, 14, 11, 13]


# ------------------------------------------------------------------------------- base, a model, tokens


def test_tokenizer_source_base_keeps_the_bases_vocabulary(world: dict[str, Path], tmp_path: Path) -> None:
    got = _merge(_linear({"base": 0.5, "e1": 0.3, "e2": 0.2}, "base"), world, tmp_path / "out")[EMB]
    assert _vocab(tmp_path / "out") == BASE_TOKENS
    assert got.shape == (12, 8)
    want = 0.7 * _row(world, "base", "w11") + 0.3 * _row(world, "e1", "w11")
    torch.testing.assert_close(got[11], want, rtol=1e-6, atol=1e-7)


def test_tokenizer_source_model_takes_its_vocabulary(world: dict[str, Path], tmp_path: Path) -> None:
    got = _merge(_linear({"base": 0.5, "e1": 0.3, "e2": 0.2}, "e2"), world, tmp_path / "out")[EMB]
    assert _vocab(tmp_path / "out") == [*VOCABS["e2"][0], *VOCABS["e2"][1]]  # no w11, no <x>
    torch.testing.assert_close(got[12], _row(world, "e2", "<z>"))  # e2 only
    mean = (_row(world, "e1", "<y>") + _row(world, "e2", "<y>")) / 2  # the base lacks <y>
    want = 0.5 * mean + 0.3 * _row(world, "e1", "<y>") + 0.2 * _row(world, "e2", "<y>")
    torch.testing.assert_close(got[11], want, rtol=1e-6, atol=1e-7)


def test_tokens_section_sets_sources_forces_and_pads(world: dict[str, Path], tmp_path: Path) -> None:
    tokens = {
        "<x>": {"source": {"kind": "zero"}},
        "w3": {"source": "e2", "force": True},
        "<new>": {"source": {"kind": "model_token", "model": "base", "token_id": 4}},
    }
    cfg = _linear({"base": 1.0, "e1": 1.0, "e2": 1.0})
    cfg["tokenizer"] = {"source": cfg.pop("tokenizer_source"), "tokens": tokens, "pad_to_multiple_of": 6}
    got = _merge(cfg, world, tmp_path / "out")[EMB]
    assert _vocab(tmp_path / "out") == [*UNION, "<new>"]
    assert got.shape == (18, 8)  # 16 tokens padded to a multiple of 6
    third = 1 / 3  # linear normalises the weights
    want_x = third * _row(world, "e1", "<x>")  # e1 keeps its own row, base and e2 take zeros
    torch.testing.assert_close(got[12], want_x, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[3], _row(world, "e2", "w3"), rtol=1e-6, atol=1e-7)  # forced everywhere
    torch.testing.assert_close(got[15], _row(world, "base", "w4"), rtol=1e-6, atol=1e-7)  # nobody has it
    torch.testing.assert_close(got[16], got[:16].mean(0), rtol=1e-5, atol=1e-6)  # padding: the mean row
    torch.testing.assert_close(got[17], got[16])


def test_tokenizer_source_on_a_shared_vocabulary_changes_nothing(tmp_path: Path) -> None:
    base = make_tiny_llama(tmp_path / "base", tokenizer=True)
    e1 = make_tiny_llama(tmp_path / "e1", perturb_from=base, seed=1, tokenizer=True)
    cfg: dict[str, Any] = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(e1), "parameters": {"weight": 0.5}}],
    }
    run_merge(cfg, tmp_path / "plain", RunOptions(threads=1))
    run_merge({**cfg, "tokenizer_source": "base"}, tmp_path / "tok", RunOptions(threads=1))
    plain, tok = load_all_tensors(tmp_path / "plain"), load_all_tensors(tmp_path / "tok")
    assert all(torch.equal(plain[n], tok[n]) for n in plain)


# ----------------------------------------------------------------------------------------- bad input


def test_a_model_without_a_tokenizer_is_named(world: dict[str, Path], tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(world["e2"], bare)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bare / f).unlink()
    with pytest.raises(CheckpointError, match=r"no tokenizer files .* Copy the model's tokenizer files"):
        _merge(_linear({"base": 1.0, "e1": 1.0, "bare": 1.0}), {**world, "bare": bare}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("tokenizer", "match"),
    [
        ({"source": "e3"}, r"tokenizer source 'e3' is not `union`, `base`, a model of the config"),
        (
            {"tokens": {"<q>": {"source": "e3"}}},
            r"tokenizer.tokens\['<q>'\]: 'e3' is not a model of the config",
        ),
        ({"tokens": {"<q>": {}}}, r"tokenizer.tokens\['<q>'\]: .* lack the token, and needs a `source:`"),
        ({"tokens": {"<z>": {"source": "e1"}}}, r"source model .* has no token '<z>'"),
        (
            {"tokens": {"<q>": {"source": {"kind": "model_token", "model": "e1", "token_id": 99}}}},
            r"token_id 99",
        ),
    ],
)
def test_bad_tokenizer_sections_are_named(
    world: dict[str, Path], tmp_path: Path, tokenizer: dict, match: str
) -> None:
    cfg = _linear({"base": 1.0, "e1": 1.0, "e2": 1.0})
    del cfg["tokenizer_source"]
    with pytest.raises(ConfigError, match=match):
        _merge({**cfg, "tokenizer": tokenizer}, world, tmp_path / "out")


def test_tokens_need_a_supported_key(world: dict[str, Path], tmp_path: Path) -> None:
    cfg = _linear({"base": 1.0, "e1": 1.0})
    with pytest.raises(ConfigError, match="not both"):
        _merge({**cfg, "tokenizer": {"source": "union"}}, world, tmp_path / "out")
    with pytest.raises(ConfigError, match="exactly one of `token_id` or `token`"):
        _merge(
            {
                **cfg,
                "tokenizer_source": None,
                "tokenizer": {"tokens": {"a": {"source": {"kind": "model_token", "model": "e1"}}}},
            },
            world,
            tmp_path / "o",
        )


def test_unrecognised_vocabulary_tensors_are_listed(tmp_path: Path) -> None:
    world = {}
    for seed, name in enumerate(("base", "e1")):
        folder = make_vocab_llama(tmp_path / name, *VOCABS[name], seed=seed)
        tensors = load_all_tensors(folder)
        tensors["score.weight"] = tensors.pop(HEAD)  # a vocabulary tensor under a name no layout uses
        save_sharded(tensors, folder)
        world[name] = folder
    with pytest.raises(PlanError, match=r"could not identify .* \['score.weight'\]"):
        _merge(_linear({"base": 1.0, "e1": 1.0}), world, tmp_path / "out")


# ---------------------------------------------------------------------------------- mergekit's outputs


def _golden() -> tuple[dict[str, Any], dict[str, list[str]]]:
    with safe_open(GOLDEN, framework="pt") as f:
        meta = f.metadata()
    return json.loads(meta["configs"]), json.loads(meta["vocabs"])


def _prefixed(prefix: str) -> dict[str, torch.Tensor]:
    """The golden tensors under ``prefix``, named without it."""
    with safe_open(GOLDEN, framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith(prefix)]  # noqa: SIM118 (safe_open is not a Mapping)
        return {k.removeprefix(prefix): f.get_tensor(k) for k in keys}


@pytest.fixture(scope="module")
def golden_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The golden file's input models: the fixture's tokenizers with the stored weights."""
    root = tmp_path_factory.mktemp("golden_vocab")
    out = {}
    for name, (words, added) in VOCABS.items():
        out[name] = make_vocab_llama(root / name, words, added, seed=0)
        save_sharded(_prefixed(f"in/{name}/"), out[name])
    return out


@pytest.mark.parametrize("case", sorted(_golden()[0]))
def test_same_rows_as_mergekit(golden_world: dict[str, Path], tmp_path: Path, case: str) -> None:
    configs, vocabs = _golden()
    got = _merge(configs[case], golden_world, tmp_path / "out")
    ours, theirs = _vocab(tmp_path / "out"), vocabs[case]
    assert sorted(ours) == sorted(theirs)
    order = [theirs.index(t) for t in ours]  # mergekit orders the other models' new tokens by a set
    want = _prefixed(f"out/{case}/")
    assert set(got) == set(want)
    for name, w in want.items():
        if name in (EMB, HEAD):
            w = torch.cat([w[order], w[len(theirs) :]])
        assert got[name].shape == w.shape, name
        err = float((got[name].double() - w.double()).abs().max())
        assert err <= 1e-6 * float(w.abs().max()), f"{case}: {name} differs by {err:.3g}"


def test_data_aware_methods_refuse_a_merged_vocabulary() -> None:
    from unimerge.config import parse_config

    cfg = {
        "merge_method": "regmean",
        "base_model": "b",
        "models": [{"model": "e"}],
        "data": {"suite": "quick"},
    }
    with pytest.raises(ConfigError, match="must share one tokenizer"):
        parse_config({**cfg, "tokenizer_source": "union"})


def test_base_tokens_past_its_vocab_size_are_dropped(world: dict[str, Path], tmp_path: Path) -> None:
    base = make_vocab_llama(tmp_path / "base", BASE_TOKENS, ["<extra>"], seed=5)  # 13 tokens ...
    tensors = {n: t[:12] if n in (EMB, HEAD) else t for n, t in load_all_tensors(base).items()}
    save_sharded(tensors, base)  # ... but 12 rows, and config.json says so
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "vocab_size": 12}))
    got = _merge(_linear({"base": 1.0, "e1": 1.0}), {**world, "base": base}, tmp_path / "out")
    assert _vocab(tmp_path / "out") == [*BASE_TOKENS, "<x>", "<y>"]
    torch.testing.assert_close(got[EMB][13], _row(world, "e1", "<y>"))
