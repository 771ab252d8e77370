"""Llama-shaped checkpoints for ``merge_speed.py``: a base and experts (base + small noise).

fp32 by default, or bf16 (``dtype="bfloat16"``); sizes from a parameter count (``shape_for``) or
named real shapes (``SHAPES``: TinyLlama-1.1B with grouped-query attention, Llama-2-7B). Built once
under ``$UNIMERGE_CACHE/bench-speed/<label>`` (default ``~/.cache/unimerge``), atomically, then
reused; sharded at ``SHARD_BYTES`` like the merges that read them.
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
    """Sizes of a Llama decoder (untied embeddings; ``kv_heads < heads`` is grouped-query attention)."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int = 0  # 0: as many as ``heads`` (no GQA)

    @property
    def kv_dim(self) -> int:
        return (self.kv_heads or self.heads) * (self.hidden // self.heads)

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, in the order a Hugging Face Llama checkpoint stores them."""
        h, i = self.hidden, self.intermediate
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for k in range(self.layers):
            p = f"model.layers.{k}."
            for proj, rows in (
                ("q_proj", h),
                ("k_proj", self.kv_dim),
                ("v_proj", self.kv_dim),
                ("o_proj", h),
            ):
                shapes[f"{p}self_attn.{proj}.weight"] = (rows, h)
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
    def largest_numel(self) -> int:
        return max(math.prod(s) for s in self.tensors().values())

    @property
    def largest_bytes(self) -> int:
        """Bytes of the largest tensor in fp32."""
        return 4 * self.largest_numel

    def config(self, dtype: str = "float32") -> dict[str, Any]:
        """A ``LlamaConfig`` as ``config.json``."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab,
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads or self.heads, "hidden_act": "silu", "max_position_embeddings": 2048,
            "initializer_range": 0.02, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype,
        }  # fmt: skip


# Real model shapes: TinyLlama-1.1B (TinyLlama/TinyLlama-1.1B-Chat-v1.0's config.json: GQA with 4
# key/value heads) and Llama-2-7B (meta-llama/Llama-2-7b-hf's).
SHAPES = {
    "tinyllama-1.1b": LlamaShape(22, 2048, 5632, 32000, 32, kv_heads=4),
    "llama-7b": LlamaShape(32, 4096, 11008, 32000, 32),
}
BYTES = {"float32": 4, "bfloat16": 2}


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


class _ShardedWriter:
    """Writes one model's tensors in order into shards of at most ``SHARD_BYTES``."""

    def __init__(self, folder: Path, shape: LlamaShape, dtype: str) -> None:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
        self.folder, self.size = folder, 0
        self.shard: dict[str, Any] = {}
        self.files: list[Path] = []
        self.weight_map: dict[str, int] = {}
        self.total = BYTES[dtype] * shape.params

    def add(self, name: str, t: Any) -> None:
        nbytes = t.numel() * t.element_size()
        if self.shard and self.size + nbytes > SHARD_BYTES:
            self._flush()
        self.shard[name] = t
        self.size += nbytes
        self.weight_map[name] = len(self.files)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"part-{len(self.files)}.safetensors"
        save_file(self.shard, str(path), metadata={"format": "pt"})
        self.files.append(path)
        self.shard, self.size = {}, 0

    def close(self) -> None:
        self._flush()
        n = len(self.files)
        names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for path, fname in zip(self.files, names, strict=True):
            path.rename(self.folder / fname)
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {t: names[k] for t, k in self.weight_map.items()}}  # fmt: skip
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_models(folder: Path, shape: LlamaShape, n_models: int, dtype: str) -> None:
    """``model0`` is the base; ``model<k>`` is the base plus 0.002 * N(0, 1) noise, cast to ``dtype``.
    Tensor by tensor for all models at once, so the base is drawn once; sharded at SHARD_BYTES."""
    import torch

    writers = [_ShardedWriter(folder / f"model{k}", shape, dtype) for k in range(n_models)]
    for idx, (name, s) in enumerate(shape.tensors().items()):
        base = _tensor(s, 1000 * idx, name, 0.02, 1.0)
        for k, w in enumerate(writers):
            t = base + _tensor(s, 1000 * idx + k, name, 0.002, 0.0) if k else base
            w.add(name, t.to(getattr(torch, dtype)))
    for w in writers:
        w.close()


def build_checkpoints(root: Path, shape: LlamaShape, n_models: int = 4, dtype: str = "float32") -> list[Path]:
    """Base + experts under ``root`` (``model0`` is the base); built once, atomically, then reused."""
    if (root / "DONE").exists():
        return [root / f"model{k}" for k in range(n_models)]
    if root.exists():
        shutil.rmtree(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=mkdir_p(root.parent)))
    start = time.perf_counter()
    _write_models(tmp, shape, n_models, dtype)
    (tmp / "DONE").write_text(json.dumps({**asdict(shape), "dtype": dtype, "n_models": n_models}))
    os.replace(tmp, root)
    print(
        f"built {n_models} {dtype} checkpoints of {shape.params / 1e6:.1f}M params in {root} "
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
