"""Sparse mixtures of experts upcycled from dense models (mergekit-moe's YAML, a Mixtral output).

- :mod:`~unimerge.moe.config`: the mergekit-moe YAML, checked when read.
- :mod:`~unimerge.moe.layout`: the Mixtral tensor names and the header checks of every input.
- :mod:`~unimerge.moe.gates`: router weights from prompts (hidden states, embeddings) or random.
- :mod:`~unimerge.moe.hf`: the transformers side (tokenizer, config, forward pass; the ``hf`` extra).
- :mod:`~unimerge.moe.build`: :func:`build_moe`, streaming the inputs into the output folder.
"""

from unimerge.moe.build import MoEOptions, build_moe
from unimerge.moe.config import MoEConfig, MoEExpert, load_moe_config, parse_moe_config
from unimerge.moe.layout import LAYOUTS, Layout

__all__ = [
    "LAYOUTS",
    "Layout",
    "MoEConfig",
    "MoEExpert",
    "MoEOptions",
    "build_moe",
    "load_moe_config",
    "parse_moe_config",
]
