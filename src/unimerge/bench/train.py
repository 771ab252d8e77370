"""Building the benchmark's models, each cached by a hash of its recipe.

- **Experts**: the whole MiniLM encoder fine-tuned on one task with a fresh linear head. The word
  embedding matrix (11.7M of the 22.7M parameters) is frozen: it halves the optimizer's work on
  2 CPU cores, and its task vector is exactly zero, which every merge method handles. Saved as a
  Hugging Face folder ``encoder/`` (``config.json``, ``model.safetensors``, tokenizer files) plus
  ``head.safetensors``, so ``unimerge merge`` can consume the experts directly.
- **Multi-task model**: one encoder with one head per task, trained on batches that alternate over
  the tasks (the upper reference the merging literature reports).
- **Linear probes**: each task's head trained on frozen pretrained features (computed once); the L2
  strength is chosen on validation from ``PROBE_L2``.

Training uses AdamW (head at ``HEAD_LR_MULT`` times the encoder's rate), linear warmup over the
first 10% of steps then linear decay, bf16 autocast, and seeded RNGs (the global RNG state is
forked, so the caller's is left untouched). It always runs on ``TRAIN_THREADS`` torch threads,
whatever ``--threads`` says: float sums depend on how work is split between threads, and over a
hundred steps that difference grows into different experts (and different merge results).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unimerge.bench.model import accuracy, features, head_accuracy, hidden_size, load_encoder, make_head, pool
from unimerge.data import DATASETS, Batch, Suite, TaskData
from unimerge.io.atomic import atomic_dir, atomic_file, atomic_write_text

__all__ = [
    "PROBE_L2",
    "TRAIN_THREADS",
    "Expert",
    "Tick",
    "build_expert",
    "build_multitask",
    "build_probe",
    "load_heads",
    "recipe",
    "recipe_hash",
    "torch_threads",
]

HEAD_LR_MULT = 20.0
PROBE_L2 = (1e-4, 1e-3, 1e-2)
RECIPE_VERSION = 1
FROZEN = "embeddings.word_embeddings"  # the module whose weight experts do not train
TRAIN_THREADS = 1  # the thread count every cached expert and multi-task model is trained on
Tick = Callable[[int], None]  # progress callback: advance by n steps


@dataclass(frozen=True)
class Expert:
    """A cached fine-tuned model: ``path/encoder`` is a Hugging Face folder; per-task heads and accuracies."""

    path: Path
    heads: dict[str, dict[str, Tensor]]
    val: dict[str, float]
    test: dict[str, float]
    meta: dict[str, Any]

    @property
    def encoder_dir(self) -> Path:
        return self.path / "encoder"


def recipe_hash(rec: dict[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable recipe (key order does not matter)."""
    blob = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def recipe(
    kind: str, suite: Suite, tasks: Sequence[TaskData], seed: int, model_sha: str, steps: int
) -> dict[str, Any]:
    """Everything that determines a trained model (its cache key is :func:`recipe_hash` of this)."""
    return {
        "kind": kind,
        "version": RECIPE_VERSION,
        "tasks": [t.name for t in tasks],
        "max_len": [t.max_len for t in tasks],
        "split_seed": seed,
        "n_train": suite.n_train,
        "n_val": suite.n_val,
        "n_test": suite.n_test,
        "steps": steps,
        "lr": suite.lr,
        "batch_size": suite.batch_size,
        "model_sha": model_sha,
        "frozen": FROZEN,
        "data": [f"{DATASETS[t.name].archive.sha256[:12]}-v{DATASETS[t.name].version}" for t in tasks],
    }


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
    warm = max(1, total // 10)
    return (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))


@torch_threads(TRAIN_THREADS)  # a context manager made with contextlib is also a decorator
def _fit(
    encoder: nn.Module,
    heads: nn.ModuleDict,
    tasks: Sequence[TaskData],
    steps: int,
    suite: Suite,
    seed: int,
    tick: Tick | None,
) -> float:
    """Train ``encoder`` + ``heads`` for ``steps`` steps cycling over ``tasks`` on ``TRAIN_THREADS``
    torch threads; returns the last loss."""
    encoder.get_parameter(f"{FROZEN}.weight").requires_grad_(False)
    enc_params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": enc_params, "lr": suite.lr},
            {"params": heads.parameters(), "lr": suite.lr * HEAD_LR_MULT},
        ],
        weight_decay=0.01,
    )
    base_lrs = [grp["lr"] for grp in opt.param_groups]
    g = torch.Generator().manual_seed(seed)
    streams = [_batch_stream(t, suite.batch_size, g) for t in tasks]
    encoder.train()
    loss_val = float("nan")
    for step in range(steps):
        k = step % len(tasks)
        batch = next(streams[k])
        for grp, lr in zip(opt.param_groups, base_lrs, strict=True):
            grp["lr"] = lr * _schedule(step, steps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = heads[tasks[k].name](pool(encoder, batch))
        loss = nn.functional.cross_entropy(logits.float(), batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_val = loss.detach().item()
        if tick:
            tick(1)
    encoder.eval()
    return loss_val


def _head_state(head: nn.Linear) -> dict[str, Tensor]:
    return {"weight": head.weight.detach().clone().contiguous(), "bias": head.bias.detach().clone()}


def _train_and_save(
    final: Path,
    rec: dict[str, Any],
    pretrained: Path,
    tasks: Sequence[TaskData],
    steps: int,
    suite: Suite,
    seed: int,
    tick: Tick | None,
) -> None:
    from transformers import AutoTokenizer

    encoder = load_encoder(pretrained)
    hidden = hidden_size(encoder)
    linear = {t.name: make_head(hidden, t.num_classes, seed + i) for i, t in enumerate(tasks)}
    heads = nn.ModuleDict(linear)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loss = _fit(encoder, heads, tasks, steps, suite, seed, tick)
    seconds = time.perf_counter() - start
    states = {t.name: _head_state(linear[t.name]) for t in tasks}
    val = {t.name: accuracy(encoder, t.val, states[t.name]) for t in tasks}
    test = {t.name: accuracy(encoder, t.test, states[t.name]) for t in tasks}
    with atomic_dir(final, exists="keep") as tmp:
        encoder.save_pretrained(tmp / "encoder", safe_serialization=True)
        AutoTokenizer.from_pretrained(pretrained).save_pretrained(tmp / "encoder")
        (tmp / "heads").mkdir()
        for name, state in states.items():
            save_file(state, str(tmp / "heads" / f"{name}.safetensors"), metadata={"task": name})
        meta = {
            "recipe": rec,
            "val": val,
            "test": test,
            "train_seconds": round(seconds, 1),
            "last_loss": loss,
            "classes": {t.name: list(t.classes) for t in tasks},
        }
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))


def load_heads(path: Path) -> dict[str, dict[str, Tensor]]:
    """Task name -> ``{"weight", "bias"}`` from ``path/heads/*.safetensors``."""
    return {f.stem: load_file(f) for f in sorted((path / "heads").glob("*.safetensors"))}


def _load(path: Path) -> Expert:
    meta = json.loads((path / "meta.json").read_text())
    return Expert(path, load_heads(path), meta["val"], meta["test"], meta)


def build_expert(
    root: Path,
    pretrained: Path,
    task: TaskData,
    suite: Suite,
    seed: int,
    model_sha: str,
    tick: Tick | None = None,
) -> Expert:
    """The expert for ``task`` from the cache, trained first if absent.

    The folder holds ``encoder/`` (Hugging Face), ``heads/<task>.safetensors`` and a copy of the head
    as ``head.safetensors``, and ``meta.json`` (recipe, accuracies, training time).
    """
    rec = recipe("expert", suite, [task], seed, model_sha, suite.steps)
    final = root / "experts" / f"{task.name}-{recipe_hash(rec)}"
    if not (final / "meta.json").exists():
        _train_and_save(final, rec, pretrained, [task], suite.steps, suite, seed, tick)
    head_file = final / "head.safetensors"
    if not head_file.exists():
        with atomic_file(head_file) as tmp:
            save_file(load_file(final / "heads" / f"{task.name}.safetensors"), str(tmp))
    return _load(final)


def build_multitask(
    root: Path,
    pretrained: Path,
    tasks: Sequence[TaskData],
    suite: Suite,
    seed: int,
    model_sha: str,
    tick: Tick | None = None,
) -> Expert:
    """The multi-task model (one encoder, one head per task) from the cache, trained first if absent."""
    rec = recipe("multitask", suite, tasks, seed, model_sha, suite.mtl_steps)
    final = root / "multitask" / recipe_hash(rec)
    if not (final / "meta.json").exists():
        _train_and_save(final, rec, pretrained, tasks, suite.mtl_steps, suite, seed, tick)
    return _load(final)


def _fit_probe(x: Tensor, y: Tensor, num_classes: int, l2: float) -> dict[str, Tensor]:
    """Multinomial logistic regression on features ``x (n, d)`` by L-BFGS (deterministic)."""
    w = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w.T + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {"weight": w.detach().clone(), "bias": b.detach().clone()}


def build_probe(
    root: Path, pretrained_encoder: nn.Module, task: TaskData, suite: Suite, seed: int, model_sha: str
) -> Expert:
    """The linear probe of ``task`` on the frozen pretrained encoder (cached)."""
    rec = recipe("probe", suite, [task], seed, model_sha, 0) | {"l2_grid": list(PROBE_L2)}
    final = root / "probes" / f"{task.name}-{recipe_hash(rec)}"
    if not (final / "meta.json").exists():
        feats = {s: features(pretrained_encoder, getattr(task, s)) for s in ("train", "val", "test")}
        mu, sd = feats["train"].mean(0), feats["train"].std(0).clamp_min(1e-6)
        z = {s: (f - mu) / sd for s, f in feats.items()}
        fits = {l2: _fit_probe(z["train"], task.train.labels, task.num_classes, l2) for l2 in PROBE_L2}
        scores = {l2: head_accuracy(z["val"], task.val.labels, h) for l2, h in fits.items()}
        best = max(PROBE_L2, key=lambda l2: (scores[l2], -PROBE_L2.index(l2)))
        # Fold the standardisation into the head so it applies to raw pooled features.
        w = fits[best]["weight"] / sd
        head = {"weight": w.contiguous(), "bias": fits[best]["bias"] - w @ mu}
        val = {task.name: head_accuracy(feats["val"], task.val.labels, head)}
        test = {task.name: head_accuracy(feats["test"], task.test.labels, head)}
        with atomic_dir(final, exists="keep") as tmp:
            (tmp / "heads").mkdir()
            save_file(head, str(tmp / "heads" / f"{task.name}.safetensors"))
            meta = {"recipe": rec, "val": val, "test": test, "l2": best, "val_by_l2": scores}
            atomic_write_text(
                tmp / "meta.json", json.dumps({k: v for k, v in meta.items()}, indent=2, default=str)
            )
    return _load(final)
