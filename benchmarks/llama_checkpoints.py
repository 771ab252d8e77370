"""Llama-shaped fp32 checkpoints for ``merge_speed.py``: a base and experts (base + small noise).

Built once under ``$UNIMERGE_CACHE/bench-speed/<size>`` (default ``~/.cache/unimerge``), atomically,
then reused; sharded at ``SHARD_BYTES`` like the merges that read them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MB = 1_000_000
SHARD_BYTES = 1_000_000_000  # input and output shard size (same for unimerge and mergekit)
VOCAB = 32000


@dataclass(frozen=True)
class LlamaShape:
    """Sizes of a Llama decoder (no GQA, untied embeddings)."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, in the order a Hugging Face Llama checkpoint stores them."""
        h, i = self.hidden, self.intermediate
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for k in range(self.layers):
            p = f"model.layers.{k}."
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                shapes[f"{p}self_attn.{proj}.weight"] = (h, h)
            shapes[f"{p}mlp.gate_proj.weight"] = (i, h)
            shapes[f"{p}mlp.up_proj.weight"] = (i, h)
            shapes[f"{p}mlp.down_proj.weight"] = (h, i)
            shapes[f"{p}input_layernorm.weight"] = (h,)
            shapes[f"{p}post_attention_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (self.vocab, h)
        return shapes

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.tensors().values())

    @property
    def largest_bytes(self) -> int:
        """Bytes of the largest tensor in fp32."""
        return 4 * max(math.prod(s) for s in self.tensors().values())

    def config(self) -> dict[str, Any]:
        """A ``LlamaConfig`` as ``config.json``."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab,
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads, "hidden_act": "silu", "max_position_embeddings": 2048,
            "initializer_range": 0.02, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
        }  # fmt: skip


def parse_count(text: str) -> int:
    """``"220M"`` -> 220_000_000 (K, M, B suffixes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbBgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read parameter count {text!r}; write e.g. 220M or 1.1B")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m[2].lower()]
    return int(float(m[1]) * scale)


def shape_for(params: int) -> LlamaShape:
    """A Llama shape with about ``params`` parameters: width from the size, depth to fill the rest."""
    hidden = 256 if params < 30 * MB else 512 if params < 100 * MB else 1024 if params < 600 * MB else 2048
    vocab = VOCAB if params >= 30 * MB else 4096
    inter = 64 * round(2.75 * hidden / 64)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden - hidden) / per_layer))
    return LlamaShape(layers, hidden, inter, vocab, hidden // 64)


def _tensor(shape: tuple[int, ...], seed: int, name: str, scale: float, offset: float) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    base = 1.0 if name.endswith("norm.weight") else 0.0
    return (offset * base + scale * torch.randn(shape, generator=g)).contiguous()


def _write_model(folder: Path, shape: LlamaShape, model: int) -> None:
    """Model 0 is the base; model k > 0 is the base plus 0.002 * N(0, 1) noise. Sharded at SHARD_BYTES."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(shape.config(), indent=2))
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for idx, (name, s) in enumerate(shape.tensors().items()):
        t = _tensor(s, 1000 * idx, name, 0.02, 1.0)
        if model:
            t += _tensor(s, 1000 * idx + model, name, 0.002, 0.0)
        if shards[-1] and size + t.numel() * 4 > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * 4
    n = len(shards)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": 4 * shape.params}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_checkpoints(root: Path, shape: LlamaShape, n_models: int = 4) -> list[Path]:
    """Base + experts under ``root`` (``model0`` is the base); built once, atomically, then reused."""
    if (root / "DONE").exists():
        return [root / f"model{k}" for k in range(n_models)]
    if root.exists():
        shutil.rmtree(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=mkdir_p(root.parent)))
    start = time.perf_counter()
    for k in range(n_models):
        _write_model(tmp / f"model{k}", shape, k)
    (tmp / "DONE").write_text(json.dumps(asdict(shape)))
    os.replace(tmp, root)
    print(
        f"built {n_models} checkpoints of {shape.params / 1e6:.1f}M params in {root} "
        f"({time.perf_counter() - start:.0f} s)",
        file=sys.stderr,
    )
    return [root / f"model{k}" for k in range(n_models)]


def mkdir_p(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def cache_dir() -> Path:
    env = os.environ.get("UNIMERGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unimerge"
