"""`unimerge search` on causal LMs: choice files scored by the log-likelihood of each answer.

A tiny Llama (tied embeddings, as SmolLM2's) with a word-level tokenizer, two experts (base plus
noise) and two choice tasks; trials run in this process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from unimerge.bench.causal import choice_accuracy
from unimerge.core import merge_state_dicts
from unimerge.data.choices import read_choice_jsonl
from unimerge.errors import ConfigError
from unimerge.tune import search

transformers = pytest.importorskip("transformers")

WORDS = [
    "the",
    "movie",
    "was",
    "good",
    "bad",
    "great",
    "awful",
    "car",
    "is",
    "fast",
    "slow",
    "yes",
    "no",
    "answer",
    "review",
    "question",
]


def _llama(seed: int, std: float, base: torch.nn.Module | None = None) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=len(WORDS) + 2, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=64, initializer_range=0.5, pad_token_id=0,
                                      tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    if base is not None:
        with torch.no_grad():
            for p, q in zip(model.parameters(), base.parameters(), strict=True):
                p.copy_(q + std * torch.randn_like(q))
    return model


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(["[PAD]", "[UNK]", *WORDS])}, unk_token="[UNK]")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]"
    )


def _choices(path: Path, seed: int, n: int) -> None:
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        words = [WORDS[int(i)] for i in torch.randint(0, 11, (4,), generator=g)]
        lines.append({"prompt": "review " + " ".join(words) + " answer", "choices": [" yes", " no", " great"],
                      "answer": int(torch.randint(0, 3, (1,), generator=g))})  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("causal")
    base = _llama(0, 0.0)
    base.save_pretrained(root / "base")
    _tokenizer().save_pretrained(root / "base")
    for k in (1, 2):
        _llama(k, 0.2, base).save_pretrained(root / f"e{k}")
        _choices(root / f"val{k}.jsonl", 10 * k, 12)
        _choices(root / f"test{k}.jsonl", 10 * k + 1, 12)
    return root


def _config(world: Path, name: str = "s.yaml", methods: Any = None, **over: Any) -> Path:
    cfg = {
        "base_model": "base",
        "models": [{"model": "e1", "task": "sent"}, {"model": "e2", "task": "topic"}],
        "search": {"methods": methods or ["task_arithmetic", {"name": "ties", "params": {"density": [0.3, 0.9]}}],
                   "budget": 3, "strategy": "random", "seed": 1,
                   "validation": ["val1.jsonl", "val2.jsonl"], "test": ["test1.jsonl", "test2.jsonl"]},
        **over,
    }  # fmt: skip
    path = world / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _accuracy(world: Path, state: dict[str, torch.Tensor], split: str) -> dict[str, float]:
    model = _llama(0, 0.0).eval()
    model.load_state_dict(state, strict=False)
    tok = _tokenizer()
    files = {"sent": f"{split}1.jsonl", "topic": f"{split}2.jsonl"}
    return {n: choice_accuracy(model, tok, read_choice_jsonl(world / f, f, n)) for n, f in files.items()}


def test_each_trial_is_the_merge_scored_by_choice_loglikelihood(world: Path, tmp_path: Path) -> None:
    result = search(_config(world), tmp_path / "o", workers=0)
    doc = json.loads((tmp_path / "o" / "search.json").read_text())
    assert doc["tasks"] == ["sent", "topic"] and len(doc["trials"]) == 3
    base, experts = _state(world / "base"), [_state(world / f"e{k}") for k in (1, 2)]
    for rec in doc["trials"]:
        assert rec["status"] == "ok", rec
        merged = merge_state_dicts(rec["method"], experts, base, seed=0, **rec["params"])
        assert rec["scores"] == pytest.approx(_accuracy(world, merged, "val"), abs=1e-12)
    # best/ is the chosen merge written by the streaming engine: its test scores are the search's
    assert result.test == pytest.approx(_accuracy(world, _state(tmp_path / "o" / "best" / "model"), "test"))


def test_streamed_trials_score_as_the_in_memory_ones(world: Path, tmp_path: Path) -> None:
    docs = []
    for mode in ("memory", "stream"):
        cfg = yaml.safe_load(_config(world).read_text())
        cfg["search"]["merge"] = mode
        (world / f"{mode}.yaml").write_text(yaml.safe_dump(cfg))
        search(world / f"{mode}.yaml", tmp_path / mode, workers=0)
        docs.append(json.loads((tmp_path / mode / "search.json").read_text()))
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in d["trials"]] for d in docs]
    assert strip[0] == strip[1] and docs[0]["best"] == docs[1]["best"]


def test_data_aware_methods_and_mixed_files_are_refused(world: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"data-free methods only; drop the data-aware methods \['regmean'\]"
    ):
        search(_config(world, methods=["task_arithmetic", "regmean"]), tmp_path / "a", workers=0)
    (world / "text.jsonl").write_text(json.dumps({"text": "the car is fast", "label": 0}) + "\n")
    cfg = yaml.safe_load(_config(world).read_text())
    cfg["search"]["validation"] = ["val1.jsonl", "text.jsonl"]
    (world / "mixed.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="mix choice files"):
        search(world / "mixed.yaml", tmp_path / "b", workers=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
