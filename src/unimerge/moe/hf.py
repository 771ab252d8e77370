"""The transformers side of MoE upcycling: the tokenizer, the Mixtral config, the base model's forward.

``transformers`` (the ``hf`` extra) is imported here only, when a function runs. Models are read from
local folders, never with ``trust_remote_code``; as mergekit-moe does, the tokenizer pads on the left
with its BOS token (else EOS), and the base model runs in bfloat16 for the ``hidden`` gates.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from unimerge.errors import CheckpointError, ConfigError

__all__ = ["load_base_model", "load_tokenizer", "mixtral_config_json", "read_config", "require_transformers"]


def require_transformers() -> ModuleType:
    """The ``transformers`` module, or a :class:`ConfigError` saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "`unimerge moe` needs the optional package transformers: pip install 'unimerge[hf]'."
        ) from None
    return transformers


def read_config(root: Path, ref: str) -> dict[str, Any]:
    """``root/config.json`` as a mapping.

    Raises:
        CheckpointError: missing or not a JSON object.
    """
    path = root / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"Cannot read {path} (model {ref}): {err}. A model folder needs its config.json."
        ) from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-download the model.")
    return cfg


def load_tokenizer(root: Path) -> Any:
    """The base model's tokenizer, set up as mergekit-moe sets it (left padding, BOS as pad token).

    Raises:
        CheckpointError: no loadable tokenizer in ``root``, or one with neither BOS nor EOS to pad with.
    """
    transformers = require_transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(
            str(root), trust_remote_code=False, local_files_only=True
        )
    except (ValueError, OSError, KeyError) as err:
        raise CheckpointError(
            f"Cannot load the tokenizer in {root}: {err}. Prompt-based gates tokenise the prompts with the base "
            "model's tokenizer; add its files (tokenizer.json, tokenizer_config.json) to that folder."
        ) from None
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.pad_token_id is None:
        raise CheckpointError(
            f"The tokenizer in {root} has neither a BOS nor an EOS token to pad the prompts with."
        )
    return tok


def load_base_model(root: Path, device: str, allow_pickle: bool) -> torch.nn.Module:
    """The base model for the ``hidden`` gates: bfloat16, eval mode, on ``device`` (as mergekit loads it).

    Raises:
        CheckpointError: transformers cannot load the folder.
    """
    transformers = require_transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(root),
            dtype=torch.bfloat16,
            trust_remote_code=False,
            local_files_only=True,
            use_safetensors=None if allow_pickle else True,
        )
    except (ValueError, OSError, KeyError, RuntimeError) as err:
        raise CheckpointError(
            f"transformers cannot load the base model in {root} for the hidden-state gates: {err}"
        ) from None
    module: torch.nn.Module = model.to(device).eval()
    return module


def mixtral_config_json(root: Path, n_experts: int, experts_per_token: int, dtype: torch.dtype | None) -> str:
    """The output ``config.json``: the base's config turned into a Mixtral one, as mergekit's
    ``MixtralMoE._generate_config`` does (through ``MistralConfig``; no sliding window)."""
    transformers = require_transformers()
    try:
        base = transformers.AutoConfig.from_pretrained(
            str(root), trust_remote_code=False, local_files_only=True
        )
    except (ValueError, OSError, KeyError) as err:
        raise CheckpointError(f"transformers cannot read {root}/config.json: {err}") from None
    if not isinstance(base, transformers.MistralConfig):
        mistral = transformers.MistralConfig(**base.to_dict())
        mistral.sliding_window = None
        mistral.max_position_embeddings = base.max_position_embeddings
        base = mistral
    out = transformers.MixtralConfig(**base.to_dict())
    out.architectures = ["MixtralForCausalLM"]
    out.num_local_experts = n_experts
    out.num_experts_per_tok = experts_per_token
    out.sliding_window = None
    out.dtype = dtype
    text: str = out.to_json_string(use_diff=True)
    return text
