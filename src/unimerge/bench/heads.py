"""Each task's frozen head: a linear classifier on the pretrained encoder's unit-norm features.

Protocol v2 fixes every task's head *before* any fine-tuning, as the merging literature does with
CLIP's zero-shot heads (Ilharco et al. 2023, https://arxiv.org/abs/2212.04089; TIES, TSV, Iso): a
multinomial logistic regression on the pretrained encoder's L2-normalised mean-pooled features
(:func:`unimerge.bench.model.embed`), its L2 strength chosen on validation. Experts then fine-tune
the encoder *through* that head, and every merged encoder is evaluated with it, so the pretrained
encoder is the lambda = 0 point of every method. The head's accuracy on the pretrained features is
the benchmark's ``pretrained`` row.

Fitting standardises the features (per dimension, train statistics) for a well-conditioned L-BFGS
and folds the standardisation back into the head, so the saved head applies to the unit-norm
features directly. Cached under ``<cache>/heads/<task>-<recipe hash>/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unimerge.bench.model import features, head_accuracy
from unimerge.bench.recipes import recipe_hash, task_recipe
from unimerge.data import TaskData
from unimerge.io.atomic import atomic_dir, atomic_write_text

__all__ = ["HEAD_L2", "FrozenHead", "build_head", "fit_logistic"]

HEAD_L2 = (1e-5, 1e-4, 1e-3, 1e-2)  # L2 strengths tried on validation (features have unit norm)


@dataclass(frozen=True)
class FrozenHead:
    """A task's frozen head (``weight (k, hidden)``, ``bias (k,)``) and the pretrained encoder's
    accuracy with it (the ``pretrained`` row)."""

    task: str
    path: Path
    state: dict[str, Tensor]
    val: float
    test: float
    meta: dict[str, Any]

    @property
    def digest(self) -> str:
        """The head's cache key: experts trained through it name it in their recipe."""
        return self.path.name


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, l2: float) -> dict[str, Tensor]:
    """Multinomial logistic regression on ``x (n, d)`` by L-BFGS (deterministic): ``weight``, ``bias``."""
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


def _fit_head(encoder: nn.Module, task: TaskData) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The best head on validation over :data:`HEAD_L2`, folded onto the unit-norm features."""
    feats = {s: features(encoder, getattr(task, s)) for s in ("train", "val", "test")}
    mu, sd = feats["train"].mean(0), feats["train"].std(0).clamp_min(1e-6)
    z = {s: (f - mu) / sd for s, f in feats.items()}
    fits = {l2: fit_logistic(z["train"], task.train.labels, task.num_classes, l2) for l2 in HEAD_L2}
    scores = {l2: head_accuracy(z["val"], task.val.labels, h) for l2, h in fits.items()}
    best = max(HEAD_L2, key=lambda l2: (scores[l2], -HEAD_L2.index(l2)))
    w = fits[best]["weight"] / sd  # fold the standardisation into the head
    head = {"weight": w.contiguous(), "bias": fits[best]["bias"] - w @ mu}
    meta = {
        "val": head_accuracy(feats["val"], task.val.labels, head),
        "test": head_accuracy(feats["test"], task.test.labels, head),
        "l2": best,
        "val_by_l2": {str(k): v for k, v in scores.items()},
    }
    return head, meta


def build_head(
    root: Path, pretrained_encoder: nn.Module, task: TaskData, seed: int, model_sha: str
) -> FrozenHead:
    """``task``'s frozen head from the cache, fitted on the pretrained features first if absent."""
    rec = task_recipe("head", [task], seed, model_sha) | {"l2_grid": list(HEAD_L2)}
    final = root / "heads" / f"{task.name}-{recipe_hash(rec)}"
    if not (final / "meta.json").exists():
        head, meta = _fit_head(pretrained_encoder, task)
        with atomic_dir(final, exists="keep") as tmp:
            save_file(head, str(tmp / "head.safetensors"), metadata={"task": task.name})
            atomic_write_text(tmp / "meta.json", json.dumps({"recipe": rec, **meta}, indent=2))
    meta = json.loads((final / "meta.json").read_text())
    state = load_file(final / "head.safetensors")
    return FrozenHead(task.name, final, state, float(meta["val"]), float(meta["test"]), meta)
