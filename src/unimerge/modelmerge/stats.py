"""Shared pieces of the data-aware methods: statistics, sidecars, and problem plumbing.

Per-tensor statistics are computed once and kept next to each expert as a safetensors *sidecar*,
so the streaming engine can hand them to the pure per-tensor merge functions
(:func:`unimerge.modelmerge.fisher.fisher_merge`, :func:`unimerge.modelmerge.regmean.regmean_merge`):

- ``kind="fisher"``: diagonal Fisher information, one tensor per parameter, same name and shape.
- ``kind="gram"``: mean input Gram matrix ``X^T X / rows`` of a linear layer, ``(in, in)``, stored
  under the name of the layer's weight (``encoder.layer.0.attention.self.query.weight``).

A sidecar's metadata records ``format``, ``kind`` and ``examples`` (the examples it was computed on).
Statistics are collected with forward hooks (Gram matrices) or per-micro-batch gradients (Fisher)
on a private copy of the base module into which each expert is loaded in turn.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from unimerge.errors import CheckpointError, PlanError
from unimerge.io import atomic_file
from unimerge.methods import Batch, MergedModel, MergeProblem

__all__ = [
    "STATS_FORMAT",
    "FisherMode",
    "LogProbs",
    "Stats",
    "autocast",
    "average_state",
    "check_experts",
    "collect_fisher",
    "collect_grams",
    "count",
    "draw",
    "finish",
    "linear_modules",
    "load_state",
    "load_stats",
    "save_sidecars",
    "save_stats",
    "sidecar_path",
    "varying_names",
    "weight_name",
    "work_module",
]

STATS_FORMAT = "unimerge-stats/1"
FisherMode = Literal["empirical", "sampled"]
LogProbs = Callable[[nn.Module, Batch], Tensor]  # (module, batch) -> (b, classes) log-probabilities
ForwardHook = Callable[[nn.Module, tuple[Any, ...], object], None]  # (module, positional inputs, output)


@dataclass(frozen=True)
class Stats:
    """A loaded sidecar: tensors by name, their kind, and the examples they were computed on."""

    tensors: dict[str, Tensor]
    kind: str
    examples: int
    metadata: dict[str, str]


def sidecar_path(expert_dir: str | Path, kind: str) -> Path:
    """Where an expert's statistics of ``kind`` live: ``EXPERT_DIR/unimerge_{kind}.safetensors``."""
    return Path(expert_dir) / f"unimerge_{kind}.safetensors"


def save_stats(
    path: str | Path,
    stats: Mapping[str, Tensor],
    *,
    kind: str,
    examples: int,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Save per-tensor statistics as a safetensors file with ``format``/``kind``/``examples`` metadata
    (all at once: a temporary sibling renamed into place)."""
    meta = {**(extra or {}), "format": STATS_FORMAT, "kind": kind, "examples": str(int(examples))}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in stats.items()}
    path = Path(path)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def save_sidecars(
    expert_dirs: Sequence[str | Path], stats: Sequence[Mapping[str, Tensor]], *, kind: str, examples: int
) -> list[Path]:
    """Save one statistics dict per expert next to it (at :func:`sidecar_path`), in the same order.

    Example:
        >>> fishers, used = compute_fishers(problem, FisherParams())
        >>> save_sidecars(["experts/a", "experts/b"], fishers, kind="fisher", examples=used)
    """
    if len(expert_dirs) != len(stats):
        raise ValueError(f"{len(expert_dirs)} expert folders but {len(stats)} statistics dicts")
    return [
        save_stats(sidecar_path(d, kind), s, kind=kind, examples=examples)
        for d, s in zip(expert_dirs, stats, strict=True)
    ]


def load_stats(path: str | Path, kind: str | None = None) -> Stats:
    """Load a sidecar written by :func:`save_stats`.

    Raises:
        CheckpointError: the file is missing, not a unimerge statistics file, or of another kind.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Statistics sidecar {path} does not exist; compute it first (save_stats).")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if meta.get("format") != STATS_FORMAT:
        raise CheckpointError(
            f"{path} is not a unimerge statistics sidecar (metadata format={meta.get('format')!r})."
        )
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{path} holds {meta.get('kind')!r} statistics, expected {kind!r}.")
    return Stats(tensors, meta["kind"], int(meta.get("examples", "0")), meta)


def autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on ``device`` (CPU or CUDA) when ``enabled``, else a no-op."""
    kind = torch.device(device).type
    if not enabled or kind not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(kind, dtype=torch.bfloat16)


def check_experts(problem: MergeProblem, paired: bool = True) -> None:
    """Every expert has the base's tensor names and shapes; with ``paired``, one task per expert.

    Raises:
        PlanError: naming the expert, the tensors and the fix.
    """
    ref = problem.base.state_dict()
    if not problem.experts:
        raise PlanError("MergeProblem has no experts; pass one state dict per task.")
    if not problem.tasks:
        raise PlanError("MergeProblem has no tasks; pass at least one TaskSource.")
    if paired and len(problem.experts) != len(problem.tasks):
        raise PlanError(
            f"MergeProblem has {len(problem.experts)} experts but {len(problem.tasks)} tasks; "
            "pass one TaskSource per expert, in the same order."
        )
    for i, sd in enumerate(problem.experts):
        missing, extra = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
        if missing or extra:
            raise PlanError(
                f"Expert {i} does not match base.state_dict(): missing {missing[:5]}, unexpected {extra[:5]}."
            )
        bad = [k for k in ref if tuple(sd[k].shape) != tuple(ref[k].shape)]
        if bad:
            k = bad[0]
            raise PlanError(
                f"Expert {i}: tensor {k!r} has shape {tuple(sd[k].shape)}, "
                f"the base has {tuple(ref[k].shape)}."
            )


def work_module(problem: MergeProblem) -> nn.Module:
    """A private copy of the base on ``problem.device``, in eval mode, with gradients off."""
    module = copy.deepcopy(problem.base).to(problem.device).eval()
    module.requires_grad_(False)
    return module


def load_state(module: nn.Module, state: Mapping[str, Tensor], strict: bool = True) -> nn.Module:
    """Copy ``state`` into ``module`` in place (dtypes follow the module)."""
    with torch.no_grad():
        module.load_state_dict(state, strict=strict)
    return module


def varying_names(experts: Sequence[Mapping[str, Tensor]]) -> list[str]:
    """Floating-point tensors on which the experts disagree (the rest merge to themselves)."""
    first = experts[0]
    return [
        k
        for k, v in first.items()
        if v.is_floating_point() and any(not torch.equal(v, sd[k]) for sd in experts[1:])
    ]


def average_state(
    experts: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None
) -> dict[str, Tensor]:
    """Weighted mean of every floating tensor (weights normalised to sum 1; float32, float64 for
    float64 inputs); integer tensors and tensors equal in every expert from expert 0."""
    n = len(experts)
    w = torch.tensor(weights if weights is not None else [1.0] * n, dtype=torch.float64)
    w = w / w.sum()
    out: dict[str, Tensor] = {}
    for k, v in experts[0].items():
        if not v.is_floating_point() or all(sd[k] is v or torch.equal(sd[k], v) for sd in experts[1:]):
            out[k] = v.clone()
            continue
        cdtype = torch.float64 if v.dtype == torch.float64 else torch.float32
        x = torch.stack([sd[k].to(cdtype) for sd in experts])  # (n, *shape)
        out[k] = torch.tensordot(w.to(cdtype), x, dims=1).to(v.dtype)
    return out


def draw(
    problem: MergeProblem, task: int, labeled: bool, batch_size: int, n: int | None = None
) -> list[Batch]:
    """Task ``task``'s data budget (``problem.budget`` examples, seeded) as batches on ``problem.device``."""
    source = problem.tasks[task]
    n = problem.budget if n is None else n
    it = (source.labeled if labeled else source.unlabeled)(n, batch_size, problem.seed)
    return [{k: v.to(problem.device) for k, v in b.items()} for b in it]


def count(batches: Iterable[Batch]) -> int:
    """Examples in a list of batches (the first tensor's leading dimension)."""
    return sum(int(next(iter(b.values())).shape[0]) for b in batches)


def finish(problem: MergeProblem, state: Mapping[str, Tensor], examples: int, labeled: bool) -> MergedModel:
    """Wrap a merged state dict as a :class:`MergedModel` (a fresh copy of the base holding it)."""
    module = load_state(work_module(problem), state)
    return MergedModel(
        module=module,
        examples_used=examples,
        labeled=labeled,
        params_total=sum(p.numel() for p in module.parameters()),
    )


def linear_modules(module: nn.Module, within: nn.Module | None = None) -> dict[str, nn.Linear]:
    """``nn.Linear`` submodules by name (as in ``module.named_modules()``), optionally those inside ``within``."""
    inside = None if within is None else {id(m) for m in within.modules()}
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and (inside is None or id(m) in inside)
    }


def weight_name(layer: str) -> str:
    """State-dict name of linear layer ``layer``'s weight (``""`` is the module itself)."""
    return f"{layer}.weight" if layer else "weight"


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass early (statistics already collected)."""


def _rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """A linear layer's input as rows ``(rows, in)``; padded tokens dropped when ``mask`` fits."""
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()].reshape(-1, x.shape[-1])
    return x.reshape(-1, x.shape[-1])


def collect_grams(
    module: nn.Module,
    batches: Iterable[Batch],
    run: Callable[[nn.Module, Batch], object],
    *,
    layers: Mapping[str, nn.Linear] | None = None,
    stop_after: nn.Module | None = None,
    bf16: bool = True,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Mean input Gram matrix ``X^T X / rows`` of each linear layer over ``batches``.

    Args:
        module: the model (an expert loaded into the work copy); ``run(module, batch)`` does a forward.
        batches: inputs; a batch's ``attention_mask`` ``(b, t)`` drops padded tokens from the rows.
        layers: the linear layers to hook (default: all of ``module``'s).
        stop_after: end each forward pass once this submodule has run (RegMean++ block by block).
        bf16: bf16 autocast for the forward passes (Gram matrices accumulate in float32).

    Returns:
        ``"{layer}.weight"`` -> ``(in, in)`` float32.
    """
    layers = linear_modules(module) if layers is None else layers
    sums: dict[str, Tensor] = {}
    rows: dict[str, int] = {}
    current: dict[str, Tensor | None] = {"mask": None}

    def hook_for(name: str) -> ForwardHook:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: object) -> None:
            x = _rows(args[0].detach(), current["mask"]).float()  # (rows, in)
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]

        return hook

    def stop(mod: nn.Module, args: tuple[Any, ...], out: object) -> None:
        raise _Stop

    handles = [m.register_forward_hook(hook_for(n)) for n, m in layers.items()]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    try:
        with torch.no_grad(), autocast(device, bf16):
            for batch in batches:
                current["mask"] = batch.get("attention_mask")
                with contextlib.suppress(_Stop):
                    run(module, batch)
    finally:
        for h in handles:
            h.remove()
    return {weight_name(n): sums[n] / max(rows[n], 1) for n in sums}


def _split(batch: Batch, size: int) -> Iterator[Batch]:
    """Micro-batches of at most ``size`` examples (every tensor is sliced on its first dimension)."""
    b = int(next(iter(batch.values())).shape[0])
    for start in range(0, b, size):
        yield {k: v[start : start + size] for k, v in batch.items()}


def collect_fisher(
    module: nn.Module,
    batches: Iterable[Batch],
    log_probs: LogProbs,
    *,
    mode: FisherMode = "empirical",
    micro_batch: int = 1,
    names: Iterable[str] | None = None,
    generator: torch.Generator | None = None,
    bf16: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Tensor], int]:
    """Diagonal Fisher information ``E_x[(d/dθ log p(y|x))^2]`` of ``module``'s parameters.

    ``mode="empirical"`` uses the batch's ``labels``; ``mode="sampled"`` draws ``y ~ p(.|x)`` from the
    model's own prediction (no labels needed; the "true" Fisher of Matena & Raffel, one sample per
    example). With ``micro_batch=1`` every example gets its own gradient (the exact diagonal); a
    larger ``micro_batch`` squares the gradient of a micro-batch's summed log-likelihood instead
    (faster; it adds cross terms between examples, which vanish only in expectation).
    The sum of squares is divided by the number of examples.

    Returns:
        (parameter name -> Fisher ``(*shape)`` float32, examples used).
    """
    params = dict(module.named_parameters())
    keep = set(params) if names is None else set(names) & set(params)
    chosen = {k: p for k, p in params.items() if k in keep}
    if not chosen:  # nothing to estimate (e.g. the experts agree everywhere)
        return {}, count(list(batches))
    flags = {k: p.requires_grad for k, p in params.items()}
    for k, p in params.items():
        p.requires_grad_(k in keep)
    fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in chosen.items()}
    seen = 0
    try:
        for batch in batches:
            for mb in _split(batch, micro_batch):
                with autocast(device, bf16):
                    lp = log_probs(module, mb).float()  # (b, k)
                if mode == "empirical":
                    y = mb["labels"].reshape(-1, 1)  # (b, 1)
                else:
                    y = torch.multinomial(lp.detach().exp().cpu(), 1, generator=generator).to(lp.device)
                ll = lp.gather(1, y).sum()
                grads = torch.autograd.grad(ll, list(chosen.values()), allow_unused=True)
                for k, g in zip(chosen, grads, strict=True):
                    if g is not None:
                        fisher[k] += g.float() ** 2
                seen += y.shape[0]
    finally:
        for k, p in params.items():
            p.requires_grad_(flags[k])
    return {k: v / max(seen, 1) for k, v in fisher.items()}, seen
