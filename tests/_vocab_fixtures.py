"""Tiny Llama checkpoints whose tokenizers differ, for the vocabulary-union tests and parity script.

Every model shares the word-level vocabulary ``<unk> <s> </s> w3 ... w11`` (12 tokens) except where
noted, plus its own added tokens, saved with ``PreTrainedTokenizerFast.save_pretrained``:

- ``base``: the 12 words;
- ``e1``: the 12 words + added ``<x>``, ``<y>`` (ids 12, 13);
- ``e2``: the words without ``w11`` (11) + added ``<y>``, ``<z>`` (ids 11, 12): ``<y>`` has another id
  than in ``e1``, and ``w11`` is in ``base`` and ``e1`` only.

Each model's ``embed_tokens`` / ``lm_head`` have one row per token (``config.json`` ``vocab_size``); every
tensor is random (seeded), so a merged row shows which input rows it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from _fixtures import llama_tensor_shapes, save_sharded

__all__ = ["SIZES", "VOCABS", "make_vocab_llama", "make_vocab_world"]

SIZES = {"n_layers": 2, "hidden": 8, "intermediate": 8, "n_heads": 2, "n_kv_heads": 1}
_WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 12)]
VOCABS: dict[str, tuple[list[str], list[str]]] = {  # name -> (words, added tokens)
    "base": (_WORDS, []),
    "e1": (_WORDS, ["<x>", "<y>"]),
    "e2": (_WORDS[:-1], ["<y>", "<z>"]),
}


def _save_tokenizer(folder: Path, words: list[str], added: list[str]) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_tokens(added)
    fast.save_pretrained(str(folder))


def make_vocab_llama(folder: Path, words: list[str], added: list[str], seed: int) -> Path:
    """A random tiny ``LlamaForCausalLM`` with one embedding row per token of its own tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = len(words) + len(added)
    shapes = llama_tensor_shapes(vocab=vocab, **SIZES)
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": SIZES["hidden"],
        "intermediate_size": SIZES["intermediate"],
        "num_hidden_layers": SIZES["n_layers"],
        "num_attention_heads": SIZES["n_heads"],
        "num_key_value_heads": SIZES["n_kv_heads"],
        "head_dim": SIZES["hidden"] // SIZES["n_heads"],
        "max_position_embeddings": 32,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_sharded(tensors, folder)
    _save_tokenizer(folder, words, added)
    return folder


def make_vocab_world(root: Path) -> dict[str, Path]:
    """``base``, ``e1``, ``e2`` (see the module docstring) under ``root``."""
    return {
        name: make_vocab_llama(Path(root) / name, words, added, seed)
        for seed, (name, (words, added)) in enumerate(VOCABS.items())
    }
