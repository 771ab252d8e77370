"""Permutation specs of Hugging Face transformers models, found by walking their modules.

``torch.fx`` cannot trace transformers models (item assignment on proxies, cache objects), so
:func:`transformer_spec` reads the structure from module names instead, for the layouts most models
share. Two kinds of groups, each inside one layer, so the residual stream (embeddings, norms, heads)
stays in place:

- **MLP hidden units**: the rows written by ``gate_proj``/``up_proj`` (Llama, Mistral, Qwen, Gemma),
  ``intermediate.dense`` (BERT, RoBERTa, ViT), ``fc1`` (OPT, CLIP, Phi), ``c_fc`` (GPT-2) or
  ``dense_h_to_4h`` (GPT-NeoX), and the matching input columns of the layer that reads them.
- **attention heads**: ``head_dim`` rows of each of q, k and v (``q_proj``/``k_proj``/``v_proj``,
  BERT's ``self.query``/``key``/``value``, GPT-2's fused ``c_attn``) and ``head_dim`` columns of the
  output projection. With grouped-query attention a unit is one key/value head with the query heads
  that share it.

A layout read from names can be wrong for an unusual model (ALiBi slopes are per head), so
:mod:`unimerge.align.run` checks that every permuted model still computes what it did.
GPT-2's ``Conv1D`` stores its weight as ``(in, out)``; that is handled.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from unimerge.align.spec import Axis, PermutationSpec

__all__ = ["ATTENTIONS", "MLPS", "Heads", "transformer_spec"]

MLPS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("gate_proj", "up_proj"), "down_proj"),
    (("intermediate.dense",), "output.dense"),
    (("fc1",), "fc2"),
    (("c_fc",), "c_proj"),
    (("dense_h_to_4h",), "dense_4h_to_h"),
)
"""(layers writing the hidden units, layer reading them), as paths below one module."""

ATTENTIONS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("q_proj", "k_proj", "v_proj"), ("o_proj", "out_proj", "dense")),
    (("self.query", "self.key", "self.value"), ("output.dense",)),
    (("c_attn",), ("c_proj",)),
)
"""(q, k, v projections or one fused qkv, candidate output projections), as paths below one module."""


@dataclass(frozen=True)
class Heads:
    """Attention shape from the model's config: query heads, key/value heads, entries per head."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def _child(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _io_axes(layer: nn.Module) -> tuple[int, int] | None:
    """``(output axis, input axis)`` of a dense layer's weight: Linear ``(out, in)``, Conv1D ``(in, out)``."""
    if isinstance(layer, nn.Linear):
        return 0, 1
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and isinstance(layer.weight, Tensor):
        return 1, 0
    return None


def _width(layer: nn.Module, which: int) -> int | None:
    """The size of the output (``which=0``) or input (``which=1``) axis of a dense layer."""
    axes = _io_axes(layer)
    weight = getattr(layer, "weight", None)
    return int(weight.shape[axes[which]]) if axes is not None and isinstance(weight, Tensor) else None


def _writes(prefix: str, layer: nn.Module, block: int = 1, segments: int = 1) -> list[Axis]:
    """The output axes of a dense layer's weight and bias (``prefix`` ends with the layer's name)."""
    axes = _io_axes(layer)
    assert axes is not None
    out = [Axis(f"{prefix}.weight", axes[0], block, segments)]
    if isinstance(getattr(layer, "bias", None), Tensor):
        out.append(Axis(f"{prefix}.bias", 0, block, segments))
    return out


def _mlp(
    prefix: str, module: nn.Module, writers: tuple[str, ...], reader: str
) -> tuple[list[Axis], int] | None:
    layers = [_child(module, w) for w in writers]
    read = _child(module, reader)
    read_axes = _io_axes(read) if read is not None else None
    if read is None or read_axes is None:
        return None
    size = _width(read, 1)
    if any(m is None or _width(m, 0) != size for m in layers):
        return None
    axes = [a for w, m in zip(writers, layers, strict=True) if m is not None for a in _writes(prefix + w, m)]
    return [*axes, Axis(f"{prefix}{reader}.weight", read_axes[1])], int(size or 0)


def _attention(
    prefix: str, module: nn.Module, qkv: tuple[str, ...], outs: tuple[str, ...], h: Heads
) -> tuple[list[Axis], int] | None:
    out_name = next((o for o in outs if _child(module, o) is not None), None)
    proj = [_child(module, p) for p in qkv]
    if out_name is None or any(m is None or _io_axes(m) is None for m in proj) or hasattr(module, "q_attn"):
        return None  # not this layout (or GPT-2 cross-attention, which reads another sequence)
    out = _child(module, out_name)
    out_axes = _io_axes(out) if out is not None else None
    if out is None or out_axes is None or _width(out, 1) != h.heads * h.head_dim:
        return None
    if len(qkv) == 1:  # fused (3 * heads * head_dim) output
        fused = proj[0]
        assert fused is not None
        if h.kv_heads != h.heads or _width(fused, 0) != 3 * h.heads * h.head_dim:
            return None
        axes = _writes(prefix + qkv[0], fused, h.head_dim, 3)
    else:
        q, k, v = proj
        assert q is not None and k is not None and v is not None
        if _width(q, 0) != h.heads * h.head_dim or {_width(k, 0), _width(v, 0)} != {h.kv_heads * h.head_dim}:
            return None
        axes = _writes(prefix + qkv[0], q, h.group * h.head_dim)
        axes += [a for n, m in ((qkv[1], k), (qkv[2], v)) for a in _writes(prefix + n, m, h.head_dim)]
    return [*axes, Axis(f"{prefix}{out_name}.weight", out_axes[1], h.group * h.head_dim)], h.kv_heads


def transformer_spec(model: nn.Module, heads: Heads | None) -> PermutationSpec:
    """The MLP-unit and attention-head groups of ``model`` (see the module docstring).

    ``heads`` gives the attention shape (from the model's config); without it heads stay in place.
    Groups are named ``"<module>:mlp"`` and ``"<module>:heads"``. A model none of whose modules
    match yields an empty spec (the caller refuses it).
    """
    groups: dict[str, tuple[Axis, ...]] = {}
    sizes: dict[str, int] = {}
    used: set[tuple[str, int]] = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        found = [(f"{name or '(root)'}:mlp", _mlp(prefix, module, w, r)) for w, r in MLPS]
        if heads is not None and heads.heads % heads.kv_heads == 0:
            found += [
                (f"{name or '(root)'}:heads", _attention(prefix, module, q, o, heads)) for q, o in ATTENTIONS
            ]
        for group, hit in found:
            if hit is None or group in groups or any((a.name, a.axis) in used for a in hit[0]):
                continue  # one group per kind and module; an axis belongs to one group
            groups[group], sizes[group] = tuple(hit[0]), hit[1]
            used.update((a.name, a.axis) for a in hit[0])
    return PermutationSpec(groups, sizes)
