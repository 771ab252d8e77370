"""SurgeryV2: deep representation surgery, one surgery module after every block of the merged model.

Yang et al., "SurgeryV2: Bridging the Gap Between Model Merging and Multi-Task Learning with Deep
Representation Surgery", arXiv 2410.14389. Only the abstract of the paper was reachable here; the
algorithm follows the authors' code, github.com/EnnengYang/SurgeryV2: ``src/merging_model.py``
(``ModelWrapper_Surgery_V2.forward``, ``AlphaWrapper_Surgery_V2``, ``l1losses``) and
``src/main_tv_surgery_v2.py``.

The merged model (task arithmetic, ``lambda``) is shared. Each task gets one
:class:`~unimerge.modelmerge.surgery.SurgeryAdapter` (``z -> z - W_up ReLU(W_down z)``, rank ``rank``,
``W_up`` zero at the start) on the output of every block matched by ``layers`` (on every token, so
each block's corrected output feeds the next block), plus the final surgery of
:mod:`unimerge.modelmerge.surgery` on the model's output (:class:`~unimerge.modelmerge.surgery.SurgeryModule`
wraps the deep one). All of a task's adapters are trained together with Adam on that task's unlabelled
batches to minimise the sum over blocks of the L1 distance between the token-mean of the merged
model's corrected block output and the expert's, plus the L1 distance between the final features.

Differences from the reference: blocks are found by name (``layers``: regular expressions on module
names) instead of CLIP's ``resblocks``; the token mean skips padded tokens when the batch has an
``attention_mask`` (ViT inputs have none); training is ``steps`` Adam steps per task cycling over its
batches (the reference runs 500 rounds of two batches of 16 per task, lr 1e-3).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from unimerge.errors import MergeError
from unimerge.methods import Batch, MergedModel, MergeProblem, register_model_method
from unimerge.modelmerge._moe import (
    backward,
    count_params,
    dense_copy,
    record_method,
    task_arithmetic_state,
    task_vectors,
)
from unimerge.modelmerge.stats import autocast, check_experts, count, draw
from unimerge.modelmerge.surgery import SurgeryAdapter, SurgeryModule, SurgeryParams, replace_hidden

__all__ = [
    "BLOCKS",
    "DeepSurgery",
    "Row",
    "SurgeryV2Params",
    "block_names",
    "deep_distance",
    "expert_targets",
    "surgery_v2",
    "task_module",
    "token_mean",
    "train_deep",
]

# Transformer blocks: BERT/RoBERTa ``encoder.layer.N``, Llama/Mistral/Qwen ``layers.N``, GPT-2 ``h.N``,
# ViT ``blocks.N``, CLIP ``resblocks.N``.
BLOCKS: tuple[str, ...] = (r"(^|\.)(layer|layers|h|blocks|resblocks)\.\d+$",)
# (batch, the expert's token-mean (b, d) of each block's output, the expert's features (b, d))
Row = tuple[Batch, list[Tensor], Tensor]


class SurgeryV2Params(SurgeryParams):
    """SurgeryV2's hyperparameters: Surgery's, and which blocks get a surgery module."""

    layers: tuple[str, ...] = Field(
        default=BLOCKS, min_length=1, max_length=32, description="regexes of the block names to operate after"
    )


def block_names(module: nn.Module, layers: Sequence[str]) -> list[str]:
    """Names of ``module``'s submodules matching any of ``layers`` (``re.search``), in module order.

    Raises:
        MergeError: nothing matches (the message lists a few submodule names to pick from).
    """
    patterns = [re.compile(p) for p in layers]
    names = [n for n, _ in module.named_modules() if n and any(p.search(n) for p in patterns)]
    if not names:
        sample = ", ".join(n for n, _ in list(module.named_modules())[1:7]) or "none"
        raise MergeError(
            f"no submodule matches layers {list(layers)}; the model's submodules include: {sample}. "
            "Pass `layers` as regular expressions matching its blocks."
        )
    return names


def token_mean(h: Tensor, mask: Tensor | None) -> Tensor:
    """``(b, *tokens, d) -> (b, d)``: the mean over tokens (real tokens only when ``mask`` ``(b, t)`` fits)."""
    if h.dim() == 2:
        return h
    if mask is not None and h.dim() == 3 and tuple(mask.shape) == tuple(h.shape[:2]):
        w = mask.unsqueeze(-1).to(h.dtype)  # (b, t, 1)
        return (h * w).sum(1) / w.sum(1).clamp_min(1.0)
    return h.reshape(h.shape[0], -1, h.shape[-1]).mean(1)


Hook = Callable[[nn.Module, tuple[Any, ...], Any], Any]


@contextmanager
def _hooks(model: nn.Module, hooks: dict[str, Hook]) -> Iterator[None]:
    """Forward hooks on ``model``'s submodules (by name) while the block runs."""
    handles: list[RemovableHandle] = [
        model.get_submodule(n).register_forward_hook(h) for n, h in hooks.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class DeepSurgery(nn.Module):
    """The shared ``model`` with one :class:`SurgeryAdapter` on the output of each block in ``blocks``.

    After a forward pass, ``means`` holds the token-mean ``(b, d)`` (float32) of each corrected block
    output, in the order the blocks ran; padded tokens are skipped when the call passes an
    ``attention_mask`` keyword.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[str], dims: Sequence[int], rank: int) -> None:
        super().__init__()
        self.model, self.blocks, self.rank = model, tuple(blocks), rank
        self.adapters = nn.ModuleList(SurgeryAdapter(d, rank) for d in dims)
        self.config = getattr(model, "config", None)
        self.means: list[Tensor] = []

    def _hook(self, adapter: nn.Module, mask: Tensor | None) -> Hook:
        def fix(h: Tensor) -> Tensor:
            z: Tensor = adapter(h.float())  # (b, *tokens, d) float32
            self.means.append(token_mean(z, mask))
            return z.to(h.dtype)

        return lambda _m, _a, out: replace_hidden(out, fix)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.means = []
        mask = kwargs.get("attention_mask")
        hooks = {n: self._hook(a, mask) for n, a in zip(self.blocks, self.adapters, strict=True)}
        with _hooks(self.model, hooks):
            return self.model(*args, **kwargs)


def _record(sink: list[Tensor], mask: Tensor | None) -> Hook:
    """A forward hook appending the token-mean ``(b, d)`` of a module's hidden states (float32) to ``sink``."""

    def grab(h: Tensor) -> Tensor:
        sink.append(token_mean(h.float(), mask))
        return h

    def hook(_m: nn.Module, _a: tuple[Any, ...], out: Any) -> None:
        replace_hidden(out, grab)

    return hook


@torch.no_grad()
def expert_targets(
    problem: MergeProblem, task: int, blocks: Sequence[str], params: SurgeryV2Params
) -> list[Row]:
    """(batch, the expert's block token-means, the expert's features) for the task's unlabeled batches."""
    expert = dense_copy(problem.base, {**problem.base.state_dict(), **problem.experts[task]})
    expert = expert.to(problem.device)
    rows: list[Row] = []
    for batch in draw(problem, task, labeled=False, batch_size=params.batch_size):
        means: list[Tensor] = []
        hooks = {n: _record(means, batch.get("attention_mask")) for n in blocks}
        with _hooks(expert, hooks), autocast(problem.device, params.bf16):
            feats = problem.features(expert, batch).float()
        if len(means) != len(blocks):
            raise MergeError(
                f"the {len(blocks)} blocks matched by `layers` produced {len(means)} outputs in one forward "
                "pass; deep surgery needs blocks that run once each (check `layers`)"
            )
        rows.append((batch, means, feats))
    if not rows:
        raise MergeError(
            f"task {problem.tasks[task].name!r} yielded no unlabeled examples (budget {problem.budget})"
        )
    return rows


def _dims(
    problem: MergeProblem, merged: nn.Module, blocks: Sequence[str], batch: Batch
) -> tuple[list[int], int]:
    """Widths of each block's hidden states (in ``blocks`` order) and of the model's output."""
    sinks: dict[str, list[Tensor]] = {n: [] for n in ("", *blocks)}
    with torch.no_grad(), _hooks(merged, {n: _record(s, None) for n, s in sinks.items()}):
        problem.features(merged, batch)
    return [sinks[n][0].shape[-1] for n in blocks], sinks[""][0].shape[-1]


def _loss(problem: MergeProblem, module: SurgeryModule, row: Row, bf16: bool) -> Tensor:
    """Sum over blocks of L1(corrected merged block mean, expert's) + L1(final features, expert's)."""
    batch, targets, feats = row
    with autocast(problem.device, bf16):
        out = problem.features(module, batch).float()
    loss = F.l1_loss(out, feats)
    for got, want in zip(_deep(module).means, targets, strict=True):
        loss = loss + F.l1_loss(got.float(), want)
    return loss


def _deep(module: SurgeryModule) -> DeepSurgery:
    if not isinstance(module.model, DeepSurgery):
        raise TypeError(f"expected a SurgeryModule around a DeepSurgery, got {type(module.model).__name__}")
    return module.model


def train_deep(
    problem: MergeProblem, rows: list[Row], module: SurgeryModule, params: SurgeryV2Params
) -> list[float]:
    """Adam on all of ``module``'s adapters (every block's and the final one); returns the loss per step."""
    trained = [*_deep(module).adapters.parameters(), *module.adapter.parameters()]
    for p in trained:
        p.requires_grad_(True)
    optim = torch.optim.Adam(trained, lr=params.lr)
    losses = []
    for step in range(params.steps):
        loss = _loss(problem, module, rows[step % len(rows)], params.bf16)
        backward(loss)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    for p in trained:
        p.requires_grad_(False)
    _deep(module).means = []
    return losses


def deep_distance(problem: MergeProblem, rows: list[Row], module: SurgeryModule, bf16: bool = False) -> float:
    """The training objective of :func:`train_deep` (summed L1 distances), averaged over ``rows``."""
    with torch.no_grad():
        total = sum(float(_loss(problem, module, row, bf16)) for row in rows)
    _deep(module).means = []
    return total / max(len(rows), 1)


def task_module(
    problem: MergeProblem, merged: nn.Module, blocks: Sequence[str], rows: list[Row], rank: int
) -> SurgeryModule:
    """A fresh (identity) deep surgery of ``merged`` for one task: block adapters inside, the final one outside."""
    dims, final = _dims(problem, merged, blocks, rows[0][0])
    return SurgeryModule(DeepSurgery(merged, blocks, dims, rank), final, rank).to(problem.device)


@register_model_method(
    "surgery_v2",
    params=SurgeryV2Params,
    family="data",
    needs_base=True,
    paper="https://arxiv.org/abs/2410.14389",
    data="unlabeled",
    grid={"lambda": (0.3,)},
)
def surgery_v2(problem: MergeProblem, params: SurgeryV2Params) -> MergedModel:
    """SurgeryV2: task arithmetic plus per-task low-rank fixes of every block's output and of the features."""
    check_experts(problem, paired=True)
    base_sd, tvs = task_vectors(problem)
    merged = dense_copy(problem.base, task_arithmetic_state(base_sd, tvs, params.lambda_)).to(problem.device)
    blocks = block_names(merged, params.layers)
    modules: dict[str, nn.Module] = {}
    used = 0
    with torch.random.fork_rng():  # seeds the adapters' initialisation only
        torch.manual_seed(problem.seed)
        for i, task in enumerate(problem.tasks):
            rows = expert_targets(problem, i, blocks, params)
            used = max(used, count(b for b, _, _ in rows))
            module = task_module(problem, merged, blocks, rows, params.rank)
            train_deep(problem, rows, module, params)
            modules[task.name] = module
    record_method(merged, "surgery_v2", params.model_dump(mode="json", by_alias=True))
    total = count_params(merged, *modules.values())
    return MergedModel(
        module=merged, examples_used=used, labeled=False, task_modules=modules, params_total=total
    )
