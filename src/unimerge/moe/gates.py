"""Router weights from prompts, as mergekit-moe computes them (``mergekit/moe/router.py``, 0.1.5).

For each expert ``e`` and layer ``l``, the router row ``gate[l, e]`` is a unit vector:

- ``hidden`` / ``hidden_last``: the base model (bfloat16) runs on the expert's positive prompts, each
  prefixed with the BOS token and left-padded; the input of layer ``l`` (``hidden_states[l]``, the
  embeddings for ``l = 0``) at the last position is averaged over the prompts. ``hidden_avg`` averages
  over all positions (padding included, as mergekit does) instead of taking the last.
- ``cheap_embed``: the sum of the prompts' token embeddings (padding masked), normalised; the same
  vector in every layer.
- Negative prompts: their vector (computed the same way) is subtracted before normalising.
- ``random``: ``N(0, 1)`` entries; ``uniform_random``: ``U(-1/sqrt(H), 1/sqrt(H))`` (``nn.Linear``'s init).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from unimerge.moe.config import GateMode, MoEExpert

__all__ = [
    "cheap_embedding",
    "degenerate_layers",
    "hidden_state_vector",
    "prompt_gates",
    "random_gates",
    "tokenize_prompts",
]

Encode = Callable[[Any], Tensor]  # tokenized prompts -> (n_layers, hidden)


def random_gates(
    mode: GateMode, n_layers: int, n_experts: int, hidden: int, generator: torch.Generator
) -> Tensor:
    """``(n_layers, n_experts, hidden)`` float32 router weights for ``random`` or ``uniform_random``."""
    shape = (n_layers, n_experts, hidden)
    if mode == "random":
        return torch.randn(shape, generator=generator)
    scale = math.sqrt(1.0 / hidden)
    return torch.rand(shape, generator=generator) * 2 * scale - scale


def tokenize_prompts(prompts: Sequence[str], tokenizer: Any) -> Any:
    """A padded batch of ``BOS + prompt`` (no other special tokens), as mergekit tokenises prompts."""
    return tokenizer(
        [(tokenizer.bos_token or "") + p for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )


def hidden_state_vector(model: torch.nn.Module, tokenized: Any, average: bool) -> Tensor:
    """``(n_layers, hidden)``: each layer's input at the last position (or averaged over positions),
    averaged over the prompts, in the model's dtype."""
    device = next(model.parameters()).device
    with torch.no_grad():
        output = model(**tokenized.to(device), output_hidden_states=True, return_dict=True)
    states = torch.stack(output.hidden_states[:-1])  # (n_layers, batch, seq, hidden)
    # (n_layers, batch, hidden): averaged over positions, or the last position
    states = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
    return (states.sum(dim=1) / states.shape[1]).cpu()  # (n_layers, hidden)


def cheap_embedding(embed: Tensor, tokenized: Any, n_layers: int) -> Tensor:
    """``(n_layers, hidden)``: the unit-norm sum of the prompts' token embeddings, repeated per layer."""
    ids: Tensor = tokenized["input_ids"]
    mask: Tensor = tokenized["attention_mask"]
    h = embed.float()[ids]  # (batch, seq, hidden); mergekit's one_hot @ embed, exactly
    summed = (h * mask.unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)  # (1, hidden)
    norm: Tensor = summed.norm(dim=-1, keepdim=True)
    unit = summed / norm.clamp(min=1e-8)
    return unit.repeat(n_layers, 1)


def prompt_gates(experts: Sequence[MoEExpert], encode: Encode, tokenizer: Any) -> Tensor:
    """``(n_layers, n_experts, hidden)``: per expert, encode(positive) - encode(negative), unit-normalised."""
    vecs = []
    for expert in experts:
        vec = encode(tokenize_prompts(expert.positive_prompts or [], tokenizer))
        if expert.negative_prompts:
            vec -= encode(tokenize_prompts(expert.negative_prompts, tokenizer))
        vec /= vec.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        vecs.append(vec)
    return torch.stack(vecs, dim=0).permute(1, 0, 2)  # (n_layers, n_experts, hidden)


def degenerate_layers(gates: Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly dependent (condition number above ``threshold``), as mergekit
    warns: the prompts are too alike and some experts will rarely be chosen."""
    return [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].float())) > threshold]
