"""Files: lazy checked readers, an atomic sharded writer, atomic writes, the user cache.

io/ knows files; it never does merge math.

- :mod:`~unimerge.io.atomic`: the one all-or-nothing write (folders and files, normal permissions).
- :mod:`~unimerge.io.cache`: the user cache folder and cached file hashes.
- :mod:`~unimerge.io.checkpoint`: safetensors (sharded) and opt-in pickle checkpoints, headers checked.
- :mod:`~unimerge.io.adapters`: PEFT LoRA adapters materialised onto their base.
- :mod:`~unimerge.io.resolve`: model references (paths, ``BASE+ADAPTER``, cached hub ids) -> checkpoints.
- :mod:`~unimerge.io.writer`: sharded safetensors output and a model folder's other files.
- :mod:`~unimerge.io.placed`: tensor bytes at a writer's planned offsets, from any process.
"""

from unimerge.io.adapters import LoraCheckpoint, open_lora_checkpoint, read_adapter_config
from unimerge.io.atomic import atomic_dir, atomic_file, atomic_write_text
from unimerge.io.cache import cache_root, sha256_file
from unimerge.io.checkpoint import Checkpoint, TensorMeta, read_safetensors_header
from unimerge.io.placed import PlacedWriter, Placement
from unimerge.io.resolve import check_output_outside, open_checkpoint, resolve_ref
from unimerge.io.writer import OutTensor, ShardedWriter, copy_model_files, parse_size

__all__ = [
    "Checkpoint",
    "LoraCheckpoint",
    "OutTensor",
    "PlacedWriter",
    "Placement",
    "ShardedWriter",
    "TensorMeta",
    "atomic_dir",
    "atomic_file",
    "atomic_write_text",
    "cache_root",
    "check_output_outside",
    "copy_model_files",
    "open_checkpoint",
    "open_lora_checkpoint",
    "parse_size",
    "read_adapter_config",
    "read_safetensors_header",
    "resolve_ref",
    "sha256_file",
]
