"""Experts and the multi-task model: the encoder fine-tuned through frozen heads, each cached.

- **Experts** (protocol v2): the whole MiniLM encoder fine-tuned on one task *through that task's
  frozen head* (:mod:`unimerge.bench.heads`), so a merged encoder is read by the same head as the
  pretrained one. The word-embedding matrix (11.7M of the 22.7M parameters) is frozen: it halves the
  optimizer's work on 2 CPU cores, and its task vector is exactly zero, which every merge method
  handles. Training stops early: validation accuracy is measured every ``suite.eval_every`` steps,
  the best encoder is kept, and training ends after ``suite.patience`` evaluations without
  improvement (or at the ``suite.steps`` cap). Saved as a Hugging Face folder ``encoder/`` plus the
  head as ``head.safetensors``, so ``unimerge merge`` consumes the experts directly.
- **Multi-task model**: one encoder trained on batches that alternate over the tasks, each through
  its frozen head, stopped on the mean validation accuracy (the upper reference).

Training uses AdamW, linear warmup over the first 5% of the step cap then linear decay to the cap,
bf16 autocast, and seeded RNGs (the global RNG state is forked, so the caller's is untouched). It
always runs on ``TRAIN_THREADS`` torch threads, whatever ``--threads`` says: float sums depend on
how work is split between threads. Missing experts train in parallel worker processes
(:func:`build_experts`), one thread each, so the bits do not depend on the number of workers.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from unimerge.bench.heads import FrozenHead
from unimerge.bench.model import embed, evaluate, load_encoder
from unimerge.bench.recipes import FROZEN, task_recipe
from unimerge.data import Batch, Suite, TaskData
from unimerge.io.atomic import atomic_dir, atomic_write_text

__all__ = [
    "TRAIN_THREADS",
    "Expert",
    "Tick",
    "expert_recipe",
    "fit_encoder",
    "load_expert",
    "multitask_recipe",
    "torch_threads",
    "train_and_save",
]

TRAIN_THREADS = 1  # the thread count every cached expert and multi-task model is trained on
WARMUP = 0.05  # fraction of the step cap spent warming the learning rate up
Tick = Callable[[int], None]  # progress callback: advance by n steps


@dataclass(frozen=True)
class Expert:
    """A cached fine-tuned encoder (``path/encoder``) with its accuracies and training record."""

    path: Path
    val: dict[str, float]
    test: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def encoder_dir(self) -> Path:
        return self.path / "encoder"


def _train_recipe(kind: str, suite: Suite, tasks: Sequence[TaskData], heads: Sequence[FrozenHead],
                  seed: int, model_sha: str, steps: int, eval_every: int) -> dict[str, Any]:  # fmt: skip
    return task_recipe(kind, tasks, seed, model_sha) | {
        "heads": [h.digest for h in heads],
        "steps": steps,
        "eval_every": eval_every,
        "patience": suite.patience,
        "lr": suite.lr,
        "batch_size": suite.batch_size,
    }


def expert_recipe(
    suite: Suite, task: TaskData, head: FrozenHead, seed: int, model_sha: str
) -> dict[str, Any]:
    """What one expert depends on (its cache folder is named by the hash of this)."""
    return _train_recipe("expert", suite, [task], [head], seed, model_sha, suite.steps, suite.eval_every)


def multitask_recipe(suite: Suite, tasks: Sequence[TaskData], heads: Sequence[FrozenHead], seed: int,
                     model_sha: str) -> dict[str, Any]:  # fmt: skip
    """What the multi-task model depends on."""
    return _train_recipe(
        "multitask", suite, tasks, heads, seed, model_sha, suite.mtl_steps, suite.mtl_eval_every
    )


def _batch_stream(task: TaskData, batch_size: int, g: torch.Generator) -> Iterator[Batch]:
    while True:
        order = torch.randperm(len(task.train), generator=g).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield task.train.collate(order[start : start + batch_size])


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` torch threads, then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _schedule(step: int, total: int) -> float:
    warm = max(1, int(total * WARMUP))
    return (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))


def _frozen_heads(heads: Sequence[FrozenHead]) -> dict[str, nn.Linear]:
    out = {}
    for h in heads:
        k, d = h.state["weight"].shape
        lin = nn.Linear(d, k)
        lin.load_state_dict({"weight": h.state["weight"].float(), "bias": h.state["bias"].float()})
        out[h.task] = lin.eval().requires_grad_(False)
    return out


@dataclass
class _Best:
    """Early stopping: the best encoder seen on validation, when it was seen, and every score."""

    patience: int
    score: float = -1.0
    step: int = 0
    state: dict[str, Tensor] = field(default_factory=dict)
    history: list[tuple[int, float]] = field(default_factory=list)
    waited: int = 0

    def update(self, step: int, score: float, encoder: nn.Module, trainable: Sequence[str]) -> bool:
        """Record ``score`` at ``step`` (keeping the encoder if it is the best so far); returns
        whether training should go on (fewer than ``patience`` evaluations without improvement)."""
        self.history.append((step, score))
        if score > self.score:
            params = dict(encoder.named_parameters())
            self.score, self.step, self.waited = score, step, 0
            self.state = {k: params[k].detach().clone() for k in trainable}
        else:
            self.waited += 1
        return self.waited < self.patience


def _val_score(encoder: nn.Module, tasks: Sequence[TaskData], heads: Sequence[FrozenHead]) -> float:
    acc = evaluate(encoder, tasks, {h.task: h.state for h in heads}, "val")
    encoder.train()
    return sum(acc.values()) / len(acc)


@torch_threads(TRAIN_THREADS)  # a context manager made with contextlib is also a decorator
def fit_encoder(encoder: nn.Module, tasks: Sequence[TaskData], heads: Sequence[FrozenHead], steps: int,
                suite: Suite, seed: int, tick: Tick | None, eval_every: int | None = None) -> _Best:  # fmt: skip
    """Train ``encoder`` through the frozen ``heads`` cycling over ``tasks``, keeping the best
    validation state (restored into ``encoder`` at the end); see the module docstring.

    Only the parameters that require grad train (all but the word embeddings of a plain encoder;
    the adapter factors of one with PEFT LoRA layers injected, ``benchmarks/lora_suite.py``)."""
    encoder.get_parameter(f"{FROZEN}.weight").requires_grad_(False)
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [p for p in encoder.parameters() if p.requires_grad], lr=suite.lr, weight_decay=0.01
    )
    linear = _frozen_heads(heads)
    g = torch.Generator().manual_seed(seed)
    streams = [_batch_stream(t, suite.batch_size, g) for t in tasks]
    best = _Best(suite.patience)
    best.update(0, _val_score(encoder, tasks, heads), encoder, trainable)  # the pretrained point
    for step in range(steps):
        k = step % len(tasks)
        batch = next(streams[k])
        opt.param_groups[0]["lr"] = suite.lr * _schedule(step, steps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = linear[tasks[k].name](embed(encoder, batch))
        loss = nn.functional.cross_entropy(logits.float(), batch["labels"])
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        opt.step()
        if tick:
            tick(1)
        if (step + 1) % (eval_every or suite.eval_every) == 0 and not best.update(
            step + 1, _val_score(encoder, tasks, heads), encoder, trainable
        ):
            break
    with torch.no_grad():
        params = dict(encoder.named_parameters())
        for name, value in best.state.items():
            params[name].copy_(value)
    encoder.eval()
    return best


def train_and_save(final: Path, rec: Mapping[str, Any], pretrained: Path, tasks: Sequence[TaskData],
                   heads: Sequence[FrozenHead], suite: Suite, seed: int,
                   tick: Tick | None = None) -> None:  # fmt: skip
    """Train an encoder through ``heads`` on ``tasks`` for ``rec``'s step cap and validation interval,
    and save it (with its record) at ``final``."""
    from transformers import AutoTokenizer

    encoder = load_encoder(pretrained)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        best = fit_encoder(
            encoder, tasks, heads, int(rec["steps"]), suite, seed, tick, int(rec["eval_every"])
        )
    seconds = time.perf_counter() - start
    states = {h.task: h.state for h in heads}
    val = evaluate(encoder, tasks, states, "val")
    test = evaluate(encoder, tasks, states, "test")
    with atomic_dir(final, exists="keep") as tmp:
        encoder.save_pretrained(tmp / "encoder", safe_serialization=True)
        AutoTokenizer.from_pretrained(pretrained).save_pretrained(tmp / "encoder")
        if len(heads) == 1:  # a bench expert: its head beside the encoder (what `unimerge merge` reads)
            save_file(heads[0].state, str(tmp / "head.safetensors"), metadata={"task": heads[0].task})
        meta = {
            "recipe": dict(rec),
            "val": val,
            "test": test,
            "features": "unit_mean_pool",
            "best_step": best.step,
            "val_history": best.history,
            "train_seconds": round(seconds, 1),
            "classes": {t.name: list(t.classes) for t in tasks},
        }
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))


def load_expert(path: Path) -> Expert:
    """A cached expert or multi-task model."""
    meta = json.loads((path / "meta.json").read_text())
    return Expert(path, meta["val"], meta["test"], meta)
