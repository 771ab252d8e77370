"""PEFT LoRA adapters materialised onto their base model, one tensor at a time.

``BASE+ADAPTER`` (mergekit's syntax) opens as a checkpoint whose tensors are the base's, with every
adapted linear weight read as ``W + s * B @ A`` (LoRA, Hu et al. 2021, https://arxiv.org/abs/2106.09685),
where ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora`` (rsLoRA, Kalajdzievski
2023, https://arxiv.org/abs/2312.03732). Names, scales and layouts follow PEFT's saved format
(``base_model.model.<module>.lora_A.weight``; ``fan_in_fan_out`` and embeddings store the transpose;
``rank_pattern``/``alpha_pattern`` override r and alpha per module). Every adapter tensor is matched to
a base tensor, with shapes checked, when the checkpoint is opened, before any data is read.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unimerge.errors import CheckpointError
from unimerge.io.checkpoint import Checkpoint, TensorMeta, open_path

__all__ = [
    "PEFT_PREFIX",
    "LoraCheckpoint",
    "LoraPair",
    "LoraSettings",
    "LoraTarget",
    "match_lora_tensors",
    "open_adapter_weights",
    "open_lora_checkpoint",
    "read_adapter_config",
]

PEFT_PREFIX = "base_model.model."  # PEFT saves every adapter tensor under this prefix
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_(?:embedding_)?[AB])(?:\.[^.]+)?(?:\.weight)?$")
_SAVED_MODULE = re.compile(r"\.modules_to_save(\.[^.]+)?(?=\.[^.]+$)")


@dataclass(frozen=True)
class LoraSettings:
    """The parts of ``adapter_config.json`` that change the materialised weights."""

    r: int
    alpha: float
    rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    base_model: str | None = None  # base_model_name_or_path, as the adapter names it

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        """``(r, s)`` for a module path (e.g. ``model.layers.0.self_attn.q_proj``), patterns applied."""
        r = _pattern_value(self.rank_pattern, module, self.r)
        alpha = _pattern_value(self.alpha_pattern, module, self.alpha)
        return int(r), float(alpha) / (math.sqrt(r) if self.rslora else r)


def _pattern_value(patterns: tuple[tuple[str, Any], ...], module: str, default: Any) -> Any:
    """PEFT's pattern lookup: the first key equal to a dotted suffix (or regex) of ``module``."""
    for key, value in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraTarget:
    """How one base tensor is changed: ``W + scale * delta``, delta ``B @ A`` (transposed if asked)."""

    a: str  # adapter tensor names
    b: str
    scale: float
    transpose: bool


def read_adapter_config(folder: Path) -> LoraSettings:
    """Parse and check ``adapter_config.json`` of a PEFT LoRA folder.

    Raises:
        CheckpointError: The file is missing or malformed, or the adapter is not plain LoRA.
    """
    path = Path(folder) / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a PEFT adapter: {path.name} is missing.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Cannot parse {path}: {err}. Re-save the adapter with PEFT.") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-save the adapter with PEFT.")
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(
            f"{path}: peft_type {kind!r} is not supported; only LoRA adapters can be merged."
        )
    if cfg.get("use_dora"):
        raise CheckpointError(
            f"{path}: DoRA adapters (use_dora: true) are not supported; merge it with PEFT first."
        )
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if type(r) is not int or r <= 0 or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise CheckpointError(
            f"{path}: needs a positive integer 'r' and a number 'lora_alpha' (got {r!r}, {alpha!r})."
        )
    return LoraSettings(
        r=r,
        alpha=float(alpha),
        rslora=bool(cfg.get("use_rslora", False)),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        rank_pattern=tuple((cfg.get("rank_pattern") or {}).items()),
        alpha_pattern=tuple((cfg.get("alpha_pattern") or {}).items()),
        base_model=base if isinstance(base := cfg.get("base_model_name_or_path"), str) else None,
    )


def open_adapter_weights(folder: Path, allow_pickle: bool = False) -> Checkpoint:
    """The tensors of a PEFT adapter folder (``adapter_model.safetensors``; headers only).

    Raises:
        CheckpointError: No adapter weights in ``folder``.
    """
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            return open_path(str(folder / name), folder / name, allow_pickle)
    raise CheckpointError(f"No adapter weights in {folder}: expected adapter_model.safetensors.")


def _lora_target(
    module: str, a: TensorMeta, b: TensorMeta, w: TensorMeta, settings: LoraSettings, where: str
) -> LoraTarget:
    """Check A/B shapes against the base weight ``w`` and return how to apply them."""
    embedding = ".lora_embedding_" in a.name
    transpose = embedding or settings.fan_in_fan_out
    r, scale = settings.rank_and_scale(module)
    if len(w.shape) != 2:
        raise CheckpointError(
            f"{where}: LoRA on {w.name} {list(w.shape)} is not supported (only 2-d weights)."
        )
    out_f, in_f = (w.shape[1], w.shape[0]) if transpose else w.shape
    if a.shape != (r, in_f) or b.shape != (out_f, r):
        raise CheckpointError(
            f"{where}: {a.name} {list(a.shape)} and {b.name} {list(b.shape)} do not fit base tensor {w.name} "
            f"{list(w.shape)} with r={r} (expected A {[r, in_f]}, B {[out_f, r]}). Is this the adapter's base model?"
        )
    return LoraTarget(a=a.name, b=b.name, scale=scale, transpose=transpose)


@dataclass(frozen=True)
class LoraPair:
    """The two factor tensors PEFT saved for one adapted module (``lora_embedding_*`` for embeddings)."""

    a: TensorMeta  # (r, in)
    b: TensorMeta  # (out, r)

    @property
    def embedding(self) -> bool:
        """Whether these are ``lora_embedding_A/B`` (the delta is ``(B @ A).T``)."""
        return ".lora_embedding_" in self.a.name


def match_lora_tensors(
    adapter: dict[str, TensorMeta], where: str
) -> tuple[dict[str, LoraPair], dict[str, TensorMeta]]:
    """Sort an adapter's tensors: ``(module path -> LoRA pair, replaced tensor name -> tensor)``.

    Module paths drop PEFT's ``base_model.model.`` prefix (``model.layers.0.self_attn.q_proj``); the
    second map holds ``modules_to_save`` copies under the base tensor name they replace.

    Raises:
        CheckpointError: A DoRA tensor, or a lora_A without its lora_B (or the reverse).
    """
    pairs: dict[str, dict[str, TensorMeta]] = {}
    replace: dict[str, TensorMeta] = {}
    for name, meta in adapter.items():
        short = name.removeprefix(PEFT_PREFIX)
        if "lora_magnitude_vector" in short:
            raise CheckpointError(f"{where}: {name} is a DoRA tensor; DoRA adapters are not supported.")
        m = _LORA_KEY.match(short)
        if m:
            pairs.setdefault(m["module"], {})[m["kind"][-1]] = meta
        else:
            replace[_SAVED_MODULE.sub("", short)] = meta
    out: dict[str, LoraPair] = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            have = next(iter(ab.values())).name
            raise CheckpointError(
                f"{where}: {have} has no matching lora_{'B' if 'A' in ab else 'A'}; re-save the adapter."
            )
        out[module] = LoraPair(ab["A"], ab["B"])
    return out, replace


def _plan(
    base: dict[str, TensorMeta], adapter: dict[str, TensorMeta], settings: LoraSettings, where: str
) -> tuple[dict[str, LoraTarget], dict[str, str]]:
    """Match adapter tensors to base tensors: (LoRA targets, full replacements), by base name."""
    pairs, saved = match_lora_tensors(adapter, where)
    replace: dict[str, str] = {}
    for target, meta in saved.items():
        if target not in base:
            raise CheckpointError(
                f"{where}: adapter tensor {meta.name!r} names {target!r}, which the base model lacks."
            )
        if tuple(meta.shape) != base[target].shape:
            raise CheckpointError(
                f"{where}: {meta.name} {list(meta.shape)} replaces {target} {list(base[target].shape)}: shapes differ "
                "(was the vocabulary resized?). Use the base model the adapter was trained on."
            )
        replace[target] = meta.name
    targets: dict[str, LoraTarget] = {}
    for module, ab in pairs.items():
        weight = f"{module}.weight"
        if weight not in base:
            raise CheckpointError(
                f"{where}: adapter tensor {ab.a.name!r} adapts module {module!r}, but the base model has no "
                f"tensor {weight!r}. Is this the adapter's base model?"
            )
        targets[weight] = _lora_target(module, ab.a, ab.b, base[weight], settings, where)
    return targets, replace


class LoraCheckpoint(Checkpoint):
    """A base checkpoint seen through a LoRA adapter; :meth:`read` materialises ``W + s * B @ A``."""

    def __init__(
        self,
        ref: str,
        base: Checkpoint,
        adapter: Checkpoint,
        targets: dict[str, LoraTarget],
        replace: dict[str, str],
    ) -> None:
        super().__init__(ref, base.root, dict(base.tensors()))
        self._base, self._adapter = base, adapter
        self._targets, self._replace = targets, replace

    def adapted(self) -> list[str]:
        """Names of the base tensors this adapter changes."""
        return sorted({*self._targets, *self._replace})

    def read(self, name: str) -> torch.Tensor:
        """The base tensor with the adapter applied, in the base's dtype."""
        meta = self._meta(name)
        if name in self._replace:
            return self._adapter.read(self._replace[name]).to(meta.dtype)
        w = self._base.read(name)  # (out, in)
        t = self._targets.get(name)
        if t is None:
            return w
        delta = self._adapter.read(t.b).float() @ self._adapter.read(t.a).float()  # (out, r) @ (r, in)
        if t.transpose:
            delta = delta.T
        return (w.float() + t.scale * delta).to(w.dtype)

    def files(self) -> list[Path]:
        """The base's data files and the adapter's."""
        return sorted({*self._base.files(), *self._adapter.files()})

    def close(self) -> None:
        """Close the base and the adapter."""
        self._base.close()
        self._adapter.close()


def open_lora_checkpoint(
    ref: str, base: Checkpoint, adapter_dir: Path, allow_pickle: bool = False
) -> LoraCheckpoint:
    """Open ``adapter_dir`` (a PEFT LoRA folder) on top of ``base``; headers only.

    Raises:
        CheckpointError: The adapter is malformed, unsupported, or does not fit the base.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise CheckpointError(
            f"Adapter {adapter_dir} is not a folder; give the PEFT folder with adapter_config.json."
        )
    settings = read_adapter_config(adapter_dir)
    adapter = open_adapter_weights(adapter_dir, allow_pickle)
    try:
        targets, replace = _plan(base.tensors(), adapter.tensors(), settings, f"Adapter {adapter_dir}")
    except CheckpointError:
        adapter.close()
        base.close()
        raise
    return LoraCheckpoint(ref, base, adapter, targets, replace)
