"""Where each tensor of the Mixtral output comes from, checked from the headers before any data is read.

As mergekit 0.1.5's ``MixtralMoE.write_model`` (``mergekit/moe/mixtral.py``): every non-MLP weight of a
Mistral/Llama decoder (embeddings, attention, norms, ``lm_head`` when present) is copied from the
base model; layer ``i``'s MLP of expert ``e`` (``gate_proj``, ``down_proj``, ``up_proj``) becomes expert
``e`` of layer ``i``'s sparse MoE block; the router of layer ``i`` is ``(n_experts, hidden)``.

Two layouts of the same tensors:

- ``fused`` (mergekit 0.1.5 with transformers 5, transformers 5's own Mixtral layout):
  ``model.layers.i.mlp.experts.gate_up_proj`` ``(E, 2I, H)`` (each expert's ``gate_proj`` rows, then its
  ``up_proj`` rows), ``model.layers.i.mlp.experts.down_proj`` ``(E, H, I)``, ``model.layers.i.mlp.gate.weight``.
- ``classic`` (the Mixtral checkpoints on the Hub; transformers 4 and 5, llama.cpp, vLLM):
  ``model.layers.i.block_sparse_moe.experts.e.{w1,w2,w3}.weight`` (``gate_proj``, ``down_proj``,
  ``up_proj``) and ``model.layers.i.block_sparse_moe.gate.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from unimerge.errors import PlanError
from unimerge.io import Checkpoint, OutTensor

__all__ = [
    "LAYOUTS",
    "MLP_PROJ",
    "Layout",
    "MoEShape",
    "base_weight_names",
    "check_inputs",
    "expert_weight_name",
    "out_dtype",
    "plan_tensors",
    "router_name",
]

Layout = Literal["fused", "classic"]
LAYOUTS: tuple[Layout, ...] = ("fused", "classic")
MLP_PROJ = (
    ("gate_proj", "w1"),
    ("down_proj", "w2"),
    ("up_proj", "w3"),
)  # mergekit's order (its RNG order too)
_MODEL_TYPES = ("llama", "mistral")
_LAYER_WEIGHTS = (
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
)
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class MoEShape:
    """Sizes of the output: layers, experts, hidden and intermediate width."""

    n_layers: int
    n_experts: int
    hidden: int
    intermediate: int


def base_weight_names(n_layers: int) -> list[str]:
    """The non-MLP weights of a Mistral/Llama decoder in mergekit's order (``lm_head`` last; optional)."""
    names = ["model.embed_tokens.weight"]
    for i in range(n_layers):
        names += [f"model.layers.{i}.{w}.weight" for w in _LAYER_WEIGHTS]
    return [*names, "model.norm.weight", "lm_head.weight"]


def expert_weight_name(layer: int, proj: str) -> str:
    """An expert model's MLP weight ``proj`` (``gate_proj``, ``down_proj``, ``up_proj``) of ``layer``."""
    return f"model.layers.{layer}.mlp.{proj}.weight"


def router_name(layer: int, layout: Layout) -> str:
    """The router (gate) weight of ``layer``: ``(n_experts, hidden)``."""
    return f"model.layers.{layer}.{'mlp' if layout == 'fused' else 'block_sparse_moe'}.gate.weight"


def out_dtype(name: str | None, base_config: Mapping[str, Any]) -> torch.dtype | None:
    """The output dtype: the config's ``dtype``, else the base config's (``dtype`` / ``torch_dtype``), else
    None (each tensor keeps its stored dtype), as mergekit's ``select_dtype``."""
    text = name or base_config.get("dtype") or base_config.get("torch_dtype")
    return _DTYPES.get(str(text).removeprefix("torch.")) if text else None


def _config_int(cfg: Mapping[str, Any], key: str, where: str) -> int:
    value = cfg.get(key)
    if type(value) is not int or value < 1:
        raise PlanError(
            f"{where}/config.json has no positive integer {key!r} (got {value!r}); fix the config."
        )
    return value


def _check_config(cfg: Mapping[str, Any], where: str, base: Mapping[str, Any]) -> None:
    kind = cfg.get("model_type")
    if kind not in _MODEL_TYPES:
        raise PlanError(
            f"{where} is a {kind!r} model; the Mixtral output is built from Llama or Mistral models "
            f"(model_type {' or '.join(_MODEL_TYPES)}). Use experts of the base model's architecture."
        )
    if kind != base.get("model_type"):
        raise PlanError(
            f"{where} is a {kind!r} model but the base is {base.get('model_type')!r}; use one architecture."
        )
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size"):
        if cfg.get(key) != base.get(key):
            raise PlanError(
                f"{where} has {key} = {cfg.get(key)!r} but the base model has {base.get(key)!r}. Every expert must "
                "be a fine-tune of the same architecture as the base (same layers and sizes)."
            )


def _check_expert_tensors(ck: Checkpoint, shape: MoEShape) -> None:
    metas = ck.tensors()
    want = {"gate_proj": (shape.intermediate, shape.hidden), "up_proj": (shape.intermediate, shape.hidden)}
    want["down_proj"] = (shape.hidden, shape.intermediate)
    for i in range(shape.n_layers):
        for proj, _ in MLP_PROJ:
            name = expert_weight_name(i, proj)
            if name not in metas:
                raise PlanError(
                    f"Expert {ck.ref} has no tensor {name!r}; an expert must be a Llama/Mistral model."
                )
            if metas[name].shape != want[proj]:
                raise PlanError(
                    f"Expert {ck.ref}: tensor {name!r} is {list(metas[name].shape)} but the base model's MLP is "
                    f"{list(want[proj])}. Every expert must have the base's hidden and intermediate sizes."
                )
    used = {expert_weight_name(i, proj) for i in range(shape.n_layers) for proj, _ in MLP_PROJ}
    extra = sorted(n for n in metas if ".mlp." in n and n not in used)
    if extra:
        raise PlanError(
            f"Expert {ck.ref} has MLP tensors the Mixtral experts have no place for: {extra[:3]}."
        )


def _check_base_tensors(ck: Checkpoint, n_layers: int) -> None:
    metas = ck.tensors()
    names = base_weight_names(n_layers)
    missing = [n for n in names[:-1] if n not in metas]
    if missing:
        raise PlanError(
            f"Base model {ck.ref} has no tensor {missing[0]!r} ({len(missing)} missing); is it a Llama model?"
        )
    used = set(names)
    extra = sorted(
        n for n in metas if n not in used and ".mlp." not in n and not n.endswith("rotary_emb.inv_freq")
    )
    if extra:
        raise PlanError(
            f"Base model {ck.ref} has tensors the Mixtral architecture has no place for (e.g. attention biases): "
            f"{extra[:3]}. Use a base without them."
        )


def check_inputs(
    base: Checkpoint,
    experts: Sequence[Checkpoint],
    base_cfg: Mapping[str, Any],
    expert_cfgs: Sequence[Mapping[str, Any]],
) -> MoEShape:
    """Check architectures, sizes and tensor names/shapes of every input (headers only).

    Raises:
        PlanError: naming the model, the tensor, the shapes and the fix.
    """
    _check_config(base_cfg, f"Base model {base.ref}", base_cfg)
    for ck, cfg in zip(experts, expert_cfgs, strict=True):
        _check_config(cfg, f"Expert {ck.ref}", base_cfg)
    where = f"Base model {base.ref}"
    shape = MoEShape(
        n_layers=_config_int(base_cfg, "num_hidden_layers", where),
        n_experts=len(experts),
        hidden=_config_int(base_cfg, "hidden_size", where),
        intermediate=_config_int(base_cfg, "intermediate_size", where),
    )
    _check_base_tensors(base, shape.n_layers)
    for ck in experts:
        _check_expert_tensors(ck, shape)
    return shape


def _expert_specs(
    layer: int, shape: MoEShape, layout: Layout, dtypes: Sequence[Sequence[torch.dtype]]
) -> list[OutTensor]:
    """Layer ``layer``'s expert tensors; ``dtypes[e][k]`` is the output dtype of expert e's k-th MLP_PROJ."""
    e, h, i = shape.n_experts, shape.hidden, shape.intermediate
    if layout == "fused":
        prefix = f"model.layers.{layer}.mlp.experts"
        gate_up = _promote([d for ds in dtypes for d in (ds[0], ds[2])])
        down = _promote([ds[1] for ds in dtypes])
        return [
            OutTensor(f"{prefix}.gate_up_proj", (e, 2 * i, h), gate_up),
            OutTensor(f"{prefix}.down_proj", (e, h, i), down),
        ]
    sizes = {"gate_proj": (i, h), "down_proj": (h, i), "up_proj": (i, h)}
    return [
        OutTensor(f"model.layers.{layer}.block_sparse_moe.experts.{x}.{w}.weight", sizes[proj], dtypes[x][k])
        for x in range(e)
        for k, (proj, w) in enumerate(MLP_PROJ)
    ]


def _promote(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def plan_tensors(
    base: Checkpoint,
    experts: Sequence[Checkpoint],
    shape: MoEShape,
    layout: Layout,
    dtype: torch.dtype | None,
    router_dtype: torch.dtype,
) -> list[OutTensor]:
    """Every output tensor, in mergekit's order: base weights, each layer's experts, the routers."""
    metas = base.tensors()
    plan = [
        OutTensor(n, metas[n].shape, dtype or metas[n].dtype)
        for n in base_weight_names(shape.n_layers)
        if n in metas
    ]
    for layer in range(shape.n_layers):
        stored = [[ck.tensors()[expert_weight_name(layer, p)].dtype for p, _ in MLP_PROJ] for ck in experts]
        dtypes = [[dtype or d for d in ds] for ds in stored]
        plan += _expert_specs(layer, shape, layout, dtypes)
    plan += [
        OutTensor(router_name(i, layout), (shape.n_experts, shape.hidden), dtype or router_dtype)
        for i in range(shape.n_layers)
    ]
    return plan
