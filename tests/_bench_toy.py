"""A tiny benchmark world for protocol tests: a small BERT folder with a word-level tokenizer, and
tasks made of random token ids (real :class:`~unimerge.data.Split` objects), so heads, experts and
the parallel build run in seconds without the packaged MiniLM."""

from __future__ import annotations

from pathlib import Path

import torch

from unimerge.data import Split, Suite, TaskData, TaskSpec

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(59)]]


def tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BertModel (hidden 32) with its tokenizer, saved as a Hugging Face folder."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    transformers.BertModel(cfg).eval().save_pretrained(folder)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(folder)
    return folder


def _split(n: int, classes: int, seed: int) -> Split:
    """``n`` examples whose label is carried by their first word (a learnable, noisy task)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    rows = []
    for y in labels.tolist():
        words = torch.randint(5, len(VOCAB), (int(torch.randint(4, 12, (1,), generator=g)),), generator=g)
        words[0] = 5 + y if torch.rand(1, generator=g) < 0.8 else words[0]
        rows.append((2, *words.tolist(), 3))
    return Split(tuple("" for _ in rows), labels, tuple(rows), tuple((0,) * len(r) for r in rows))


def toy_task(name: str, classes: int, seed: int) -> TaskData:
    """A task with 96 training, 32 validation and 32 test examples."""
    return TaskData(
        name, tuple(f"c{i}" for i in range(classes)), False, 16,
        _split(96, classes, seed), _split(32, classes, seed + 100), _split(32, classes, seed + 200),
    )  # fmt: skip


TOY_SUITE = Suite(
    "toy", tasks=(TaskSpec("a"), TaskSpec("b")), n_val=32, n_test=32, n_train=96, steps=8, mtl_steps=8,
    batch_size=16, lr=1e-3, eval_every=2, patience=2,
)  # fmt: skip
