"""Update-level merging of PEFT LoRA adapters, adapter output, and extraction of adapters.

- :func:`merge_adapters`: any data-free method on the adapters' updates ``dW = s * B @ A``, module by
  module, to merged updates, a dense model (``base + dW``) or a PEFT adapter (exact where the method
  is linear in the updates, else truncated SVD with a per-module error).
- :func:`combine_adapters`: PEFT's ``add_weighted_adapter`` combination types (``cat``, ``svd``,
  ``ties_svd``, ...) by name on adapter folders, the same updates PEFT gives (:mod:`.weighted`).
- :func:`run_adapter_merge` / :func:`check_adapter_merge`: configs of either kind (:mod:`.run`).
- :func:`open_adapter` / :func:`save_peft_adapter`: PEFT folders as :class:`LoraFactors`, no base needed.
- :func:`extract_lora`: an adapter from a full fine-tune (truncated SVD of ``finetuned - base``).
"""

from unimerge.lora.adapter import LoraAdapter, LoraFactors, open_adapter, save_peft_adapter
from unimerge.lora.combine import COMBINATION_TYPES
from unimerge.lora.extract import ExtractResult, extract_lora
from unimerge.lora.merge import LINEAR_IN_UPDATES, LoraMergeResult, merge_adapters
from unimerge.lora.run import check_adapter_merge, is_adapter_config, run_adapter_merge
from unimerge.lora.weighted import CombineResult, combine_adapters

__all__ = [
    "COMBINATION_TYPES",
    "LINEAR_IN_UPDATES",
    "CombineResult",
    "ExtractResult",
    "LoraAdapter",
    "LoraFactors",
    "LoraMergeResult",
    "check_adapter_merge",
    "combine_adapters",
    "extract_lora",
    "is_adapter_config",
    "merge_adapters",
    "open_adapter",
    "run_adapter_merge",
    "save_peft_adapter",
]
