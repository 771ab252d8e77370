"""PEFT LoRA adapters as factors, read and written without the base model.

A LoRA adapter (Hu et al. 2021, https://arxiv.org/abs/2106.09685) stores, per adapted module, ``A``
``(r, in)`` and ``B`` ``(out, r)``; the module's update is ``dW = s * B @ A`` with ``s = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023, https://arxiv.org/abs/2312.03732). PEFT's file
layout (names, ``rank_pattern``/``alpha_pattern``, ``fan_in_fan_out`` and embeddings, whose update is
stored transposed) is read by :mod:`unimerge.io.adapters`; this module turns it into
:class:`LoraFactors` (:func:`open_adapter`) and writes factors back as a PEFT folder
(:func:`save_peft_adapter`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from unimerge.errors import CheckpointError, MergeError
from unimerge.io.adapters import (
    PEFT_PREFIX,
    LoraPair,
    LoraSettings,
    match_lora_tensors,
    open_adapter_weights,
    read_adapter_config,
)
from unimerge.io.atomic import ExistsPolicy, atomic_dir
from unimerge.io.checkpoint import Checkpoint, TensorMeta
from unimerge.io.writer import write_safetensors

__all__ = ["LoraAdapter", "LoraFactors", "LoraModule", "open_adapter", "peft_config", "save_peft_adapter"]


@dataclass(frozen=True, eq=False)
class LoraFactors:
    """One module's low-rank update ``scale * B @ A`` (transposed when the weight is stored ``(in, out)``)."""

    a: Tensor  # (r, in), PEFT's lora_A.weight
    b: Tensor  # (out, r), PEFT's lora_B.weight
    scale: float = 1.0
    transpose: bool = False  # the base weight is (in, out): fan_in_fan_out layers and embeddings
    embedding: bool = False  # saved as lora_embedding_A/B (an nn.Embedding)

    @property
    def rank(self) -> int:
        """Number of rank-one terms (rows of ``a``)."""
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of :meth:`delta`: the base weight's."""
        out, inp = int(self.b.shape[0]), int(self.a.shape[1])
        return (inp, out) if self.transpose else (out, inp)

    def delta(self) -> Tensor:
        """The update in the base weight's layout, float32: ``scale * B @ A`` (its transpose if ``transpose``)."""
        d = self.scale * (self.b.float() @ self.a.float())  # (out, in)
        return d.T if self.transpose else d


@dataclass(frozen=True)
class LoraModule:
    """What an adapter's headers say about one module (no data)."""

    name: str  # module path, e.g. model.layers.0.self_attn.q_proj
    pair: LoraPair
    rank: int
    scale: float
    transpose: bool

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the update (and of the base weight ``<name>.weight``)."""
        out, inp = self.pair.b.shape[0], self.pair.a.shape[1]
        return (inp, out) if self.transpose else (out, inp)


class LoraAdapter:
    """A PEFT LoRA folder opened as factors: headers only until :meth:`factors` reads a module."""

    def __init__(
        self,
        folder: Path,
        settings: LoraSettings,
        weights: Checkpoint,
        modules: dict[str, LoraModule],
        saved: dict[str, TensorMeta],
    ) -> None:
        self.folder, self.settings, self.modules = folder, settings, modules
        self.saved = saved  # modules_to_save copies: base tensor name -> adapter tensor
        self._weights = weights

    def factors(self, module: str) -> LoraFactors:
        """The factors of one module, as stored (float32 or the adapter's dtype)."""
        m = self.modules[module]
        a, b = self._weights.read(m.pair.a.name), self._weights.read(m.pair.b.name)
        return LoraFactors(a, b, m.scale, m.transpose, m.pair.embedding)

    def read_saved(self, name: str) -> Tensor:
        """A ``modules_to_save`` tensor by the base tensor name it replaces."""
        return self._weights.read(self.saved[name].name)

    def close(self) -> None:
        """Close the adapter's weight file."""
        self._weights.close()

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.folder)!r}, {len(self.modules)} modules)"


def _module(name: str, pair: LoraPair, settings: LoraSettings, where: str) -> LoraModule:
    r, scale = settings.rank_and_scale(name)
    a, b = pair.a.shape, pair.b.shape
    if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
        raise CheckpointError(
            f"{where}: {pair.a.name} {list(a)} and {pair.b.name} {list(b)} are not rank-{r} LoRA factors "
            f"(expected A [{r}, in] and B [out, {r}] from r/rank_pattern in adapter_config.json); re-save the adapter."
        )
    return LoraModule(name, pair, r, scale, pair.embedding or settings.fan_in_fan_out)


def open_adapter(folder: str | Path, *, allow_pickle: bool = False) -> LoraAdapter:
    """Open a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    No base model is needed: shapes come from the factors. Close it (or use ``with``) when done.

    Raises:
        CheckpointError: Not a folder, no ``adapter_config.json``, not plain LoRA (DoRA, other PEFT
            types), or factors that do not match the config's ranks.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"Adapter {folder} is not a folder; give the PEFT adapter folder holding adapter_config.json "
            "and adapter_model.safetensors."
        )
    settings = read_adapter_config(folder)
    weights = open_adapter_weights(folder, allow_pickle)
    where = f"Adapter {folder}"
    try:
        pairs, saved = match_lora_tensors(weights.tensors(), where)
        modules = {name: _module(name, pair, settings, where) for name, pair in sorted(pairs.items())}
        if not modules:
            raise CheckpointError(f"{where} has no lora_A/lora_B tensors; is it a LoRA adapter?")
    except CheckpointError:
        weights.close()
        raise
    return LoraAdapter(folder, settings, weights, modules, saved)


def _most_common(values: list[float]) -> float:
    """The most frequent value (the smallest among equally frequent ones)."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def peft_config(factors: Mapping[str, LoraFactors], base_model_name_or_path: str | None) -> dict[str, object]:
    """``adapter_config.json`` for ``factors``: the most common rank and alpha, patterns for the rest.

    ``lora_alpha`` of a module is ``scale * rank`` (plain LoRA scaling, no rsLoRA), so PEFT rebuilds
    exactly each module's ``scale``.

    Raises:
        MergeError: No modules, or linear modules in both layouts (``fan_in_fan_out`` is one flag).
    """
    if not factors:
        raise MergeError("No modules to write: the adapter would be empty.")
    flips = {f.transpose for f in factors.values() if not f.embedding}
    if len(flips) > 1:
        raise MergeError(
            "Some linear modules store their weight (in, out) and others (out, in); a PEFT adapter has one "
            "fan_in_fan_out flag. Merge adapters of one base model."
        )
    ranks = {m: f.rank for m, f in factors.items()}
    alphas = {m: f.scale * f.rank for m, f in factors.items()}
    r = int(_most_common([float(v) for v in ranks.values()]))
    alpha = _most_common(list(alphas.values()))
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "target_modules": sorted(factors),
        "fan_in_fan_out": bool(flips and flips.pop()),
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
    }


def _tensors(factors: Mapping[str, LoraFactors], dtype: torch.dtype) -> dict[str, Tensor]:
    out = {}
    for module, f in factors.items():
        a_name, b_name = (
            ("lora_embedding_A", "lora_embedding_B") if f.embedding else ("lora_A.weight", "lora_B.weight")
        )
        out[f"{PEFT_PREFIX}{module}.{a_name}"] = f.a.detach().to("cpu", dtype).contiguous()
        out[f"{PEFT_PREFIX}{module}.{b_name}"] = f.b.detach().to("cpu", dtype).contiguous()
    return out


def save_peft_adapter(
    folder: str | Path,
    factors: Mapping[str, LoraFactors],
    base_model_name_or_path: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    exists: ExistsPolicy = "error",
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``factors`` (module path -> factors) as a PEFT LoRA folder that ``PeftModel.from_pretrained`` loads.

    ``adapter_config.json`` (see :func:`peft_config`) and ``adapter_model.safetensors`` with PEFT's
    names (``base_model.model.<module>.lora_A.weight``), plus ``extra_files`` (name -> text), all
    renamed into place together when complete.

    Raises:
        MergeError: ``folder`` exists (with ``exists="error"``), no modules, or mixed layouts.
    """
    folder = Path(folder)
    config = peft_config(factors, base_model_name_or_path)
    tensors = _tensors(factors, dtype)
    with atomic_dir(folder, exists=exists) as tmp:
        write_safetensors(tmp / "adapter_model.safetensors", tensors, {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / Path(name).name).write_text(text, encoding="utf-8")
    return folder
