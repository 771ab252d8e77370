"""PEFT helpers shared by the LoRA tests: real PEFT models and adapters (tests skip without peft)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

TARGETS = ["emb", "lin1", "lin2"]


class Tiny(nn.Module):
    """An embedding and two linears: PEFT adapts each (embedding LoRA stores its update transposed)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin1 = nn.Linear(6, 8)
        self.lin2 = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.lin1(self.emb(ids)))


def lora_factors(layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of adapter ``name`` in a PEFT LoRA layer, as PEFT stores them."""
    if name in layer.lora_A:
        return layer.lora_A[name].weight.data, layer.lora_B[name].weight.data
    return layer.lora_embedding_A[name].data, layer.lora_embedding_B[name].data


def lora_layers(model: Any) -> list[Any]:
    """The model's PEFT LoRA layers, in PEFT's module order."""
    from peft.tuners.lora import LoraLayer

    return [m for _, m in model.named_modules() if isinstance(m, LoraLayer)]


def tiny_peft_model(configs: dict[str, dict[str, Any]], seed: int = 1) -> Any:
    """A PEFT model of :class:`Tiny` with one adapter per ``configs`` entry (name -> ``LoraConfig``
    keywords; ``target_modules`` defaults to all three), every factor random (no zero ``B``)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = None
    for name, kw in configs.items():
        cfg = peft.LoraConfig(**{"target_modules": TARGETS, "init_lora_weights": False, **kw})
        if model is None:
            model = peft.get_peft_model(Tiny(), cfg, name)
        else:
            model.add_adapter(name, cfg)
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model):
        for name in configs:
            if name in layer.lora_A or name in layer.lora_embedding_A:
                for t in lora_factors(layer, name):
                    t.copy_(torch.randn(t.shape, generator=g))
    return model


def peft_merged_state(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Real PEFT: load ``adapter_dir`` on the transformers model in ``base_dir``, merge, return its weights."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}
