"""``unimerge moe``: a sparse mixture of experts (Mixtral) upcycled from dense Llama/Mistral models.

Follows mergekit-moe 0.1.5 (``mergekit/scripts/moe.py``, ``mergekit/moe/``): the config is checked,
every input's headers are checked (:mod:`~unimerge.moe.layout`), the routers are computed from the
prompts (:mod:`~unimerge.moe.gates`), then the tensors are streamed into a sharded, atomic output:
the base's non-MLP weights one at a time, then layer by layer each expert's MLP (so at most one
layer's experts are in memory), then the routers. The output folder holds the Mixtral
``config.json``, the base's tokenizer and generation config, and the YAML as ``mergekit_moe_config.yml``.

Randomness (``random`` gates, ``noise_scale``) comes from one ``torch.Generator`` seeded with
``seed``, drawn in mergekit's order, so ``seed=N`` matches ``mergekit-moe --random-seed N``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from unimerge.errors import ConfigError
from unimerge.io import (
    Checkpoint,
    ShardedWriter,
    check_output_outside,
    copy_model_files,
    open_checkpoint,
    resolve_ref,
)
from unimerge.io.atomic import exists_error
from unimerge.io.writer import MODEL_FILES
from unimerge.moe.config import RANDOM_MODES, MoEConfig, MoEExpert, load_moe_config
from unimerge.moe.gates import (
    cheap_embedding,
    degenerate_layers,
    hidden_state_vector,
    prompt_gates,
    random_gates,
)
from unimerge.moe.hf import load_base_model, load_tokenizer, mixtral_config_json, read_config
from unimerge.moe.layout import (
    MLP_PROJ,
    Layout,
    MoEShape,
    base_weight_names,
    check_inputs,
    expert_weight_name,
    out_dtype,
    plan_tensors,
    router_name,
)
from unimerge.options import MergeResult, Progress

__all__ = ["MoEOptions", "build_moe", "compute_gates", "noise_and_scale"]


@dataclass(frozen=True)
class MoEOptions:
    """How to build the MoE (what to build is the config).

    Attributes:
        layout: ``fused`` (mergekit 0.1.5 / transformers 5 tensor names) or ``classic`` (Hub Mixtral names).
        seed: seeds random gates and ``noise_scale`` (as ``mergekit-moe --random-seed``).
        device: where the base model runs for ``hidden`` gates (``cpu``, ``cuda``, ``cuda:N``).
        out_shard_size: max bytes per output shard.
        force: replace an existing output folder.
        allow_pickle: read ``pytorch_model.bin`` inputs (``weights_only=True``).
        allow_all_same: permit every expert to be the same model (mergekit's
            ``--i-understand-this-is-not-useful-without-training``).
    """

    layout: Layout = "fused"
    seed: int = 0
    device: str = "cpu"
    out_shard_size: int = 2_000_000_000
    force: bool = False
    allow_pickle: bool = False
    allow_all_same: bool = False


def _check_distinct(cfg: MoEConfig, expert_refs: Sequence[str], allow_all_same: bool, where: Path) -> None:
    """mergekit's refusal of experts that are all one model (unless random gates or the flag)."""
    if cfg.gate_mode in RANDOM_MODES or allow_all_same or len(set(expert_refs)) > 1:
        return
    raise ConfigError(
        f"{where}: every expert is the model {expert_refs[0]}, so the MoE costs more and computes the same as "
        "that model. If you will train it after merging, pass --i-understand-this-is-not-useful-without-training "
        "(allow_all_same=True)."
    )


def noise_and_scale(weight: Tensor, expert: MoEExpert, residual: bool, generator: torch.Generator) -> Tensor:
    """``weight`` plus ``noise_scale * N(0, 1)`` noise (in its dtype), times ``residual_scale`` for ``down_proj``."""
    if expert.noise_scale is not None:
        weight = (
            weight + torch.randn(weight.shape, dtype=weight.dtype, generator=generator) * expert.noise_scale
        )
    if residual and expert.residual_scale is not None:
        weight = weight * expert.residual_scale
    return weight


def compute_gates(
    cfg: MoEConfig, shape: MoEShape, base: Checkpoint, generator: torch.Generator, opts: MoEOptions
) -> Tensor:
    """``(n_layers, n_experts, hidden)`` router weights for ``cfg.gate_mode`` (see :mod:`unimerge.moe.gates`)."""
    if cfg.gate_mode in RANDOM_MODES:
        return random_gates(cfg.gate_mode, shape.n_layers, shape.n_experts, shape.hidden, generator)
    tokenizer = load_tokenizer(base.root)
    if cfg.gate_mode == "cheap_embed":
        embed = base.read("model.embed_tokens.weight")
        return prompt_gates(cfg.experts, lambda tok: cheap_embedding(embed, tok, shape.n_layers), tokenizer)
    if not Path(base.ref).is_dir():
        raise ConfigError(
            f"gate_mode {cfg.gate_mode!r} runs the base model with transformers, which needs a model folder; "
            f"{base.ref} is not one. Give the base as a folder (merge an adapter into it first)."
        )
    model = load_base_model(base.root, opts.device, opts.allow_pickle)
    average = cfg.gate_mode == "hidden_avg"
    return prompt_gates(cfg.experts, lambda tok: hidden_state_vector(model, tok, average), tokenizer)


def _write_experts(
    writer: ShardedWriter,
    layer: int,
    experts: Sequence[Checkpoint],
    specs: Sequence[MoEExpert],
    layout: Layout,
    dtype: torch.dtype | None,
    generator: torch.Generator,
) -> None:
    """Layer ``layer``'s MLP of every expert, read (and noised) in mergekit's order and written."""
    fused: dict[str, list[Tensor]] = {"gate_proj": [], "down_proj": [], "up_proj": []}
    for e, (ck, spec) in enumerate(zip(experts, specs, strict=True)):
        for proj, w in MLP_PROJ:
            t = noise_and_scale(
                ck.read(expert_weight_name(layer, proj)), spec, proj == "down_proj", generator
            )
            if layout == "classic":
                name = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
                writer.write(name, t.to(dtype or t.dtype))
            else:
                fused[proj].append(t)
    if layout == "fused":
        prefix = f"model.layers.{layer}.mlp.experts"
        gate_up = torch.cat(
            [torch.stack(fused["gate_proj"]), torch.stack(fused["up_proj"])], dim=1
        )  # (E, 2I, H)
        writer.write(f"{prefix}.gate_up_proj", gate_up.to(dtype or gate_up.dtype).contiguous())
        down = torch.stack(fused["down_proj"])  # (E, H, I)
        writer.write(f"{prefix}.down_proj", down.to(dtype or down.dtype).contiguous())


def _write_tensors(
    writer: ShardedWriter,
    base: Checkpoint,
    experts: Sequence[Checkpoint],
    specs: Sequence[MoEExpert],
    gates: Tensor,
    dtype: torch.dtype | None,
    layout: Layout,
    generator: torch.Generator,
    progress: Progress | None,
) -> None:
    """The base's non-MLP weights, each layer's experts, then the routers ``gates`` (n_layers, E, H)."""
    n_layers = gates.shape[0]
    for name in (n for n in base_weight_names(n_layers) if n in base.tensors()):
        writer.write(name, base.read(name).to(dtype or base.tensors()[name].dtype))
    for layer in range(n_layers):
        _write_experts(writer, layer, experts, specs, layout, dtype, generator)
        if progress is not None:
            progress("experts", layer + 1, n_layers)
    for i in range(n_layers):
        writer.write(router_name(i, layout), gates[i].to(dtype or gates.dtype).contiguous())


def _warnings(cfg: MoEConfig, gates: Tensor) -> list[str]:
    out = []
    n = len(cfg.experts)
    if n & (n - 1):
        out.append(f"the model has {n} experts, not a power of two: llama.cpp cannot run it.")
    bad = degenerate_layers(gates)
    if bad:
        out.append(
            f"layers {bad} have nearly dependent router rows: the prompts of some experts are too alike, so "
            "those experts will rarely be chosen."
        )
    if cfg.gate_mode in RANDOM_MODES:
        out.append(f"gate_mode {cfg.gate_mode}: the router is untrained; fine-tune the model before use.")
    return out


def _prepare(config_path: Path, out_dir: Path, opts: MoEOptions) -> tuple[MoEConfig, list[str]]:
    cfg = load_moe_config(config_path)
    cdir = config_path.resolve().parent
    refs = [resolve_ref(r, cdir) for r in cfg.refs()]
    _check_distinct(cfg, refs[1:], opts.allow_all_same, config_path)
    check_output_outside(out_dir, refs)
    if out_dir.exists() and not (opts.force and out_dir.is_dir()):
        raise exists_error(out_dir)
    return cfg, refs


def build_moe(
    config_path: str | Path,
    out_dir: str | Path,
    opts: MoEOptions | None = None,
    progress: Progress | None = None,
) -> MergeResult:
    """Build the Mixtral MoE described by a mergekit-moe YAML file and write it to ``out_dir``, all at once.

    Raises:
        ConfigError: the YAML is invalid (unknown key, gate_mode, missing base_model, ...).
        CheckpointError: an input is missing or unreadable.
        PlanError: the inputs do not fit together (architecture, layers, tensor shapes).
        MergeError: the output exists (without ``force``) or cannot be written.
    """
    start, opts = time.perf_counter(), opts or MoEOptions()
    config_path, out_dir = Path(config_path), Path(out_dir)
    cfg, refs = _prepare(config_path, out_dir, opts)
    with contextlib.ExitStack() as stack:
        cks = [stack.enter_context(open_checkpoint(r, allow_pickle=opts.allow_pickle)) for r in refs]
        base, experts = cks[0], cks[1:]
        base_cfg = read_config(base.root, base.ref)
        shape = check_inputs(base, experts, base_cfg, [read_config(ck.root, ck.ref) for ck in experts])
        dtype = out_dtype(cfg.dtype, base_cfg)
        config_json = mixtral_config_json(base.root, shape.n_experts, cfg.experts_per_token, dtype)
        generator = torch.Generator().manual_seed(opts.seed)
        gates = compute_gates(cfg, shape, base, generator, opts)  # (n_layers, n_experts, hidden)
        plan = plan_tensors(base, experts, shape, opts.layout, dtype, gates.dtype)
        meta = {"unimerge_moe": f"{shape.n_experts} experts, gate_mode {cfg.gate_mode}"}
        with ShardedWriter(
            out_dir, plan, max_shard_bytes=opts.out_shard_size, force=opts.force, metadata=meta
        ) as w:
            _write_tensors(w, base, experts, cfg.experts, gates, dtype, opts.layout, generator, progress)
            w.write_text("config.json", config_json + ("" if config_json.endswith("\n") else "\n"))
            copy_model_files(base.root, w, [n for n in MODEL_FILES if n != "config.json"])
            w.write_text("mergekit_moe_config.yml", config_path.read_text(encoding="utf-8"))
            w.commit()
    written = sum(t.nbytes for t in plan)
    return MergeResult(out_dir, len(plan), written, time.perf_counter() - start, _warnings(cfg, gates))
