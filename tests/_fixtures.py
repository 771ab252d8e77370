"""Tiny Hugging Face-style checkpoints built from raw tensors, for tests.

Plain functions (not pytest fixtures), in the spirit of mergekit's ``tests/common.py::make_picollama``:
call them with a ``tmp_path`` sub-folder. Nothing is downloaded; every file is a few kilobytes.

    base = make_tiny_llama(tmp_path / "base")
    expert = make_tiny_llama(tmp_path / "e1", perturb_from=base, seed=1)
    lora = make_peft_lora(tmp_path / "lora", base)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "llama_tensor_shapes",
    "load_all_tensors",
    "make_peft_lora",
    "make_tiny_family",
    "make_tiny_llama",
    "save_sharded",
]

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def llama_tensor_shapes(
    n_layers: int, hidden: int, intermediate: int, vocab: int, n_heads: int, n_kv_heads: int
) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a ``LlamaForCausalLM`` (untied), in checkpoint order."""
    head_dim = hidden // n_heads
    kv = n_kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _llama_config(
    n_layers: int,
    hidden: int,
    intermediate: int,
    vocab: int,
    n_heads: int,
    n_kv_heads: int,
    dtype: torch.dtype,
) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": hidden // n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 128,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": _DTYPE_NAMES.get(dtype, "float32"),
    }


def load_all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``folder`` (CPU, stored dtype)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                out[name] = f.get_tensor(name)
    return out


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, shards: int = 1) -> list[Path]:
    """Save ``tensors`` (in order) as ``model.safetensors`` or ``shards`` files plus an index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards <= 1:
        path = folder / "model.safetensors"
        save_file({n: tensors[n].contiguous() for n in names}, str(path), metadata={"format": "pt"})
        return [path]
    per = math.ceil(len(names) / shards)
    weight_map: dict[str, str] = {}
    paths: list[Path] = []
    for k in range(shards):
        chunk = names[k * per : (k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in chunk}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
        paths.append(folder / fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def _write_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level ``tokenizer.json`` with ``vocab`` entries plus its config files."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab)]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    special = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def _random_llama(shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[name] = 0.02 * torch.randn(shape, generator=gen)
    return out


def make_tiny_llama(
    path: Path,
    *,
    seed: int = 0,
    n_layers: int = 2,
    hidden: int = 16,
    intermediate: int = 32,
    vocab: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
    perturb_from: Path | None = None,
    scale: float = 0.01,
    tokenizer: bool = False,
) -> Path:
    """Write a tiny, valid ``LlamaForCausalLM`` checkpoint to ``path`` and return ``path``.

    Args:
        path: Folder to create (parents too).
        seed: Seed of the weights (or of the noise, with ``perturb_from``).
        n_layers: Decoder layers. ``hidden``, ``intermediate``, ``vocab``, ``n_heads``, ``n_kv_heads``
            are the usual Llama sizes (``hidden`` must be divisible by ``n_heads``).
        dtype: Stored dtype of every tensor.
        shards: Number of safetensors files; above 1 an index ``model.safetensors.index.json`` is written.
        perturb_from: A folder made by this function: the result is an "expert", its tensors plus
            ``scale * N(0, 1)`` noise (sizes and config are taken from it; other size arguments ignored).
        scale: Noise scale for ``perturb_from``.
        tokenizer: Also write a word-level ``tokenizer.json`` with its config files.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    if perturb_from is not None:
        config = json.loads((Path(perturb_from) / "config.json").read_text())
        base = load_all_tensors(Path(perturb_from))
        tensors = {n: t.float() + scale * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        config["torch_dtype"] = _DTYPE_NAMES.get(dtype, "float32")
        vocab = config["vocab_size"]
    else:
        config = _llama_config(n_layers, hidden, intermediate, vocab, n_heads, n_kv_heads, dtype)
        shapes = llama_tensor_shapes(n_layers, hidden, intermediate, vocab, n_heads, n_kv_heads)
        tensors = _random_llama(shapes, gen)
    tensors = {n: t.to(dtype) for n, t in tensors.items()}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    gen_cfg = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    if tokenizer:
        _write_tokenizer(path, vocab)
    save_sharded(tensors, path, shards)
    return path


def make_tiny_family(root: Path) -> dict[str, Path]:
    """A base (2 shards) and experts e1, e2 (3 shards), e3: the base plus seeded perturbations."""
    base = make_tiny_llama(root / "base", shards=2)
    return {
        "base": base,
        "e1": make_tiny_llama(root / "e1", perturb_from=base, seed=1),
        "e2": make_tiny_llama(root / "e2", perturb_from=base, seed=2, shards=3),
        "e3": make_tiny_llama(root / "e3", perturb_from=base, seed=3),
    }


def make_peft_lora(
    path: Path,
    base_dir: Path,
    *,
    r: int = 2,
    alpha: float = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    rslora: bool = False,
    fan_in_fan_out: bool = False,
    layers: tuple[int, ...] | None = None,
) -> Path:
    """Write a PEFT LoRA adapter folder for the checkpoint in ``base_dir`` and return ``path``.

    Tensors are named as PEFT saves them (``base_model.model.<module>.lora_A.weight``): ``lora_A`` is
    ``(r, in)`` and ``lora_B`` is ``(out, r)``, both nonzero, so ``W + scale * B @ A`` differs from ``W``.
    With ``fan_in_fan_out`` the base weight is read as ``(in, out)`` (GPT-2 ``Conv1D`` layout), so the
    delta is ``(B @ A).T``.

    Args:
        path: Adapter folder to create.
        base_dir: Base checkpoint folder (its tensors give the shapes).
        r: LoRA rank.
        alpha: ``lora_alpha``; scale is ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        targets: Module name suffixes to adapt (every 2-d ``*.{target}.weight`` of the base).
        seed: Seed of A and B.
        rslora: Write ``use_rslora: true``.
        fan_in_fan_out: Write ``fan_in_fan_out: true`` and lay A/B out for a ``(in, out)`` weight.
        layers: Only these layer indices (``layers_to_transform``); all when None.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    adapter: dict[str, torch.Tensor] = {}
    for name, t in load_all_tensors(Path(base_dir)).items():
        module = name.removesuffix(".weight")
        if t.ndim != 2 or module.rsplit(".", 1)[-1] not in targets:
            continue
        if layers is not None and not any(f".layers.{i}." in name for i in layers):
            continue
        out_f, in_f = (t.shape[1], t.shape[0]) if fan_in_fan_out else tuple(t.shape)
        adapter[f"base_model.model.{module}.lora_A.weight"] = 0.1 * torch.randn((r, in_f), generator=gen)
        adapter[f"base_model.model.{module}.lora_B.weight"] = 0.1 * torch.randn((out_f, r), generator=gen)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "use_rslora": rslora,
        "use_dora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "modules_to_save": None,
        "layers_to_transform": list(layers) if layers is not None else None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(adapter, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path
