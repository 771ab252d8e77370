"""Checkpoint I/O: lazy checked readers (safetensors, sharded, PEFT LoRA, opt-in pickle) and an atomic sharded writer.

io/ knows files; it never does merge math. See ``checkpoint.py``, ``adapters.py`` and ``writer.py``.
"""

from unimerge.io.adapters import LoraCheckpoint, open_lora_checkpoint, read_adapter_config
from unimerge.io.checkpoint import (
    Checkpoint,
    TensorMeta,
    open_checkpoint,
    read_safetensors_header,
    sha256_file,
)
from unimerge.io.writer import OutTensor, ShardedWriter, copy_model_files, parse_size

__all__ = [
    "Checkpoint",
    "LoraCheckpoint",
    "OutTensor",
    "ShardedWriter",
    "TensorMeta",
    "copy_model_files",
    "open_checkpoint",
    "open_lora_checkpoint",
    "parse_size",
    "read_adapter_config",
    "read_safetensors_header",
    "sha256_file",
]
