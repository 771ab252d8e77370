"""Loss barrier against width: small ResNets with BatchNorm on Fashion-MNIST, x1 to x8.

Git Re-basin (Ainsworth et al., ICLR 2023, Fig. 4) and REPAIR (Jordan et al., ICLR 2023, Fig. 5)
report that the barrier between two aligned networks shrinks as the networks get wider. For each
width multiplier this script trains two small ResNets from different seeds (and data orders) on a
fixed subset of Fashion-MNIST and evaluates 11 points of the linear path between them on test images:

- ``naive``: plain interpolation, BatchNorm running statistics interpolated too;
- ``weight matching``: the second model aligned to the first with :func:`weight_matching`;
- ``weight matching + BN reset``: the same, with :func:`reset_batchnorm` on training images at every
  point of the path (REPAIR's variant for networks with BatchNorm);
- ``naive + BN reset``: the reset without alignment (a control).

The network: a 3x3 stem conv (1 -> 8m channels) + BN at 28x28, then two stages of ``--blocks`` basic
blocks (two 3x3 convs with BN, identity shortcut or 1x1 conv + BN where the shape changes) of 8m and
16m channels, each stage halving the resolution (14x14, 7x7), global average pooling and a Linear
head. Models are trained in ``--jobs`` processes of one thread each. It prints a markdown table and
writes ``results.json`` and ``barrier_vs_width.png`` to --out.

Data: Fashion-MNIST idx files in ``--fashion-dir`` (Debian's ``dataset-fashion-mnist`` installs them
in /usr/share/datasets/fashion-mnist); the training subset is the first ``--train-examples`` images
after a fixed shuffle, the test set the first ``--test-examples`` test images.

    nice -n 19 python benchmarks/align_width.py --fashion-dir /usr/share/datasets/fashion-mnist --bf16 \\
        --out /tmp/align_width
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from align_speed import BasicBlock
from torch import Tensor, nn

from unimerge.align import LinearPath, PathPoint, linear_path, reset_batchnorm, weight_matching
from unimerge.io.atomic import atomic_file, atomic_write_text

PATHS = ("naive", "weight matching", "weight matching + BN reset", "naive + BN reset")
State = dict[str, Tensor]


class SmallResNet(nn.Module):
    def __init__(self, width: int, blocks: int, base: int = 8, classes: int = 10) -> None:
        super().__init__()
        w = [base * width, 2 * base * width]
        self.conv1, self.bn1 = nn.Conv2d(1, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0])
        layers: list[nn.Module] = []
        cin = w[0]
        for cout in w:
            for j in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if j == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.linear = nn.Linear(w[-1], classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def read_idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * data[3]).reshape(dims)


def load_fashion(folder: Path, n_train: int, n_test: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    def part(prefix: str) -> tuple[Tensor, Tensor]:
        x = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
        y = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        return (torch.from_numpy(x).unsqueeze(1) - 0.286) / 0.353, torch.from_numpy(y)

    xtr, ytr = part("train")
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(xtr))[:n_train])
    xte, yte = part("t10k")
    return xtr[order].contiguous(), ytr[order].contiguous(), xte[:n_test], yte[:n_test]


def init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def train_job(
    width: int, blocks: int, seed: int, xtr: Tensor, ytr: Tensor, args: dict
) -> tuple[State, float]:
    """Train one model (Adam, batch 128, optional bf16 autocast); returns its state dict and seconds."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = SmallResNet(width, blocks)
    opt = torch.optim.Adam(model.parameters(), lr=args["lr"])
    gen = torch.Generator().manual_seed(100 + seed)
    model.train()
    for _ in range(args["epochs"]):
        for idx in torch.randperm(len(xtr), generator=gen).split(128):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args["bf16"]):
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
    return model.state_dict(), time.perf_counter() - t0


def path_job(
    width: int, blocks: int, path: str, a: State, b: State, test: list, reset: list
) -> tuple[list[tuple[float, float, float]], float]:
    """Evaluate one path of one width; returns its (t, loss, accuracy) points and seconds."""
    t0 = time.perf_counter()
    model_a, model_b = SmallResNet(width, blocks), SmallResNet(width, blocks)
    model_a.load_state_dict(a)
    model_b.load_state_dict(b)
    fix = (lambda m, t: reset_batchnorm(m, reset)) if path.endswith("BN reset") else None
    lp = linear_path(model_a.eval(), model_b.eval(), test, fix=fix)
    return [(p.t, p.loss, p.accuracy) for p in lp.points], time.perf_counter() - t0


def align(width: int, blocks: int, a: State, b: State, x: Tensor) -> tuple[State, float, bool]:
    """Weight-match model b to model a; returns the aligned state dict, seconds, and whether the
    aligned copy computes what b does (on ``x``)."""
    model_a, model_b = SmallResNet(width, blocks).eval(), SmallResNet(width, blocks).eval()
    model_a.load_state_dict(a)
    model_b.load_state_dict(b)
    t0 = time.perf_counter()
    aligned = weight_matching(model_a, model_b, [x[:2]], seed=0)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        same = torch.allclose(aligned(x), model_b(x), atol=1e-4, rtol=1e-4)
    return aligned.state_dict(), seconds, same


def summarise(width: int, blocks: int, curves: dict[str, list], seconds: dict[str, float]) -> dict:
    paths = {k: LinearPath(tuple(PathPoint(*p) for p in v)) for k, v in curves.items()}
    a, b = paths["naive"].points[0], paths["naive"].points[-1]
    return {
        "width": width,
        "channels": [8 * width, 16 * width],
        "params": sum(p.numel() for p in SmallResNet(width, blocks).parameters()),
        "endpoint_accuracy": [a.accuracy, b.accuracy],
        "endpoint_loss": [a.loss, b.loss],
        "loss_barrier": {k: p.loss_barrier for k, p in paths.items()},
        "accuracy_barrier": {k: p.accuracy_barrier for k, p in paths.items()},
        "midpoint_accuracy": {k: p.midpoint.accuracy for k, p in paths.items()},
        "seconds": seconds,
        "curves": curves,
    }


def print_table(rows: list[dict]) -> None:
    print("| width | channels | params | endpoint acc (A / B) | " + " | ".join(PATHS) + " |")
    print("|---|---|---|---|" + "---|" * len(PATHS))
    for r in rows:
        cells = [f"{r['loss_barrier'][k]:.3f} ({100 * r['accuracy_barrier'][k]:.1f} pt)" for k in PATHS]
        acc = r["endpoint_accuracy"]
        print(
            f"| x{r['width']} | {r['channels'][0]}/{r['channels'][1]} | {r['params'] / 1e3:.0f}k | "
            f"{100 * acc[0]:.1f}% / {100 * acc[1]:.1f}% | " + " | ".join(cells) + " |"
        )
    print("cells: test loss barrier (test accuracy barrier, points)")


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    widths = [r["width"] for r in rows]
    for key, ax, scale in (("loss_barrier", axes[0], 1.0), ("accuracy_barrier", axes[1], 100.0)):
        for k in PATHS:
            ax.plot(widths, [scale * r[key][k] for r in rows], marker="o", label=k)
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [f"x{w}" for w in widths])
        ax.set(xlabel="width multiplier", ylabel=key.replace("_", " ") + (" (pt)" if scale > 1 else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fashion-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--blocks", type=int, default=2, help="basic blocks per stage")
    ap.add_argument("--train-examples", type=int, default=10000)
    ap.add_argument("--test-examples", type=int, default=5000)
    ap.add_argument("--reset-examples", type=int, default=2000, help="training images for the BN reset")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--bf16", action="store_true", help="train under bf16 autocast")
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/align_width"))
    return ap.parse_args()


def run_all(
    args: argparse.Namespace, data: tuple[Tensor, Tensor, Tensor, Tensor]
) -> tuple[list[dict], float]:
    """Train every model, align, evaluate every path; returns the rows (by width) and training seconds."""
    xtr, ytr, xte, yte = data
    test = list(zip(xte.split(1000), yte.split(1000), strict=True))
    reset = list(xtr[: args.reset_examples].split(500))
    hp = {"epochs": args.epochs, "lr": args.lr, "bf16": args.bf16}
    widths, seeds, blocks = sorted(args.widths, reverse=True), args.seeds, args.blocks  # biggest first
    ctx = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=init_worker, initargs=(1,)) as pool:
        futs = {(w, s): pool.submit(train_job, w, blocks, s, xtr, ytr, hp) for w in widths for s in seeds}
        trained = {k: f.result() for k, f in futs.items()}
        train_s = time.perf_counter() - t0
        ends, seconds = {}, {}
        for w in widths:
            a, b = trained[(w, seeds[0])][0], trained[(w, seeds[1])][0]
            wm, wm_s, same = align(w, blocks, a, b, xte[:200])
            print(f"x{w}: weight matching {wm_s:.1f} s, aligned copy computes the same function: {same}")
            ends[w] = {"naive": (a, b), "weight matching": (a, wm)}
            seconds[w] = {"train": [trained[(w, s)][1] for s in seeds], "align": wm_s}
        jobs = {
            (w, p): pool.submit(path_job, w, blocks, p, *ends[w][p.removesuffix(" + BN reset")], test, reset)
            for w in widths
            for p in PATHS
        }
        done = {k: f.result() for k, f in jobs.items()}
    rows = [
        summarise(
            w,
            blocks,
            {p: done[(w, p)][0] for p in PATHS},
            {**seconds[w], **{p: done[(w, p)][1] for p in PATHS}},
        )
        for w in sorted(widths)
    ]
    return rows, train_s


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    data = load_fashion(args.fashion_dir, args.train_examples, args.test_examples)
    t0 = time.perf_counter()
    rows, train_s = run_all(args, data)
    total_s = time.perf_counter() - t0
    print(
        f"train={len(data[0])} test={len(data[2])} epochs={args.epochs} train_s={train_s:.0f} total_s={total_s:.0f}"
    )
    print_table(rows)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "seconds": [train_s, total_s], "rows": rows}
    atomic_write_text(args.out / "results.json", json.dumps(result, indent=1))
    title = f"Fashion-MNIST, ResNet with 2 stages x {args.blocks} blocks, seeds {args.seeds[0]} vs {args.seeds[1]}"
    plot(rows, args.out / "barrier_vs_width.png", title)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'barrier_vs_width.png'}")


if __name__ == "__main__":
    main()
