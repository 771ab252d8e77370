"""Benchmark training: recipe keys, and trained weights that do not depend on the caller's torch
thread count."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from unimerge.bench.train import TRAIN_THREADS, _fit, recipe_hash, torch_threads


class _Split:
    """Random token ids and labels, collated as the benchmark's splits are."""

    def __init__(self, n: int, seq: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 500, (n, seq), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        ids = self.ids[idx]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids),
            "labels": self.labels[idx],
        }


def _train(outer_threads: int) -> dict[str, torch.Tensor]:
    from transformers import BertConfig, BertModel

    with torch_threads(outer_threads):
        torch.manual_seed(0)
        cfg = BertConfig(
            vocab_size=512,
            hidden_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=512,
            max_position_embeddings=64,
        )
        encoder = BertModel(cfg, add_pooling_layer=False)
        heads = nn.ModuleDict({"t": nn.Linear(256, 3)})
        task = SimpleNamespace(name="t", train=_Split(64, 64, seed=1))
        _fit(encoder, heads, [task], 6, SimpleNamespace(lr=1e-3, batch_size=16), 0, None)  # type: ignore[arg-type]
        assert torch.get_num_threads() == outer_threads  # restored
    return {k: v.clone() for k, v in encoder.state_dict().items()}


def test_training_is_bit_identical_whatever_the_callers_thread_count() -> None:
    """Tensors this size are split between threads, so without the pinned count the weights differ
    (by about 2e-3 after 6 steps)."""
    one, other = _train(1), _train(TRAIN_THREADS + 1)
    assert all(torch.equal(one[k], other[k]) for k in one)


def test_recipe_hash_ignores_key_order_but_not_values():
    assert recipe_hash({"a": 1, "b": 2}) == recipe_hash({"b": 2, "a": 1})
    assert recipe_hash({"a": 1, "b": 2}) != recipe_hash({"a": 1, "b": 3})
