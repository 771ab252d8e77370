"""Weight matching speed on a ResNet-20-style CNN (issue 14's target: at most 60 s at width x4).

The CNN is the CIFAR ResNet-20 of Git Re-basin (Ainsworth et al., ICLR 2023): a 3x3 stem conv with
BatchNorm, three stages of three basic blocks (two 3x3 convs with BatchNorm each) of widths 16, 32
and 64 times ``--width``, a 1x1 conv + BatchNorm shortcut where a stage halves the resolution,
global average pooling and a Linear head. Two models are built from different seeds (random
initialisation: the time does not depend on training) and the second is aligned to the first with
:func:`unimerge.align.weight_matching`, which traces the model, derives the spec and runs the
coordinate descent; the wall time of the whole call is reported, with the number of groups and of
sweeps-worth of work done.

    nice -n 19 python benchmarks/align_speed.py --width 4 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unimerge.align import permutation_spec, weight_matching


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, width: int = 1, classes: int = 10) -> None:
        super().__init__()
        w = [16 * width, 32 * width, 64 * width]
        self.conv1, self.bn1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0])
        blocks: list[nn.Module] = []
        cin = w[0]
        for i, cout in enumerate(w):
            for j in range(3):
                blocks.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(w[2], classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    a = ResNet20(args.width).eval()
    torch.manual_seed(1)
    b = ResNet20(args.width).eval()
    x = torch.randn(2, 3, 32, 32)
    spec = permutation_spec(a, [x])
    params = sum(p.numel() for p in a.parameters())
    print(f"ResNet-20 x{args.width}: {params / 1e6:.2f}M parameters, {len(spec.groups)} permutation groups")
    print(f"sizes: {sorted(spec.sizes.values())}")
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        aligned = weight_matching(a, b, [x])
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        same = torch.allclose(aligned(x), b(x), atol=1e-4, rtol=1e-4)
    print(
        f"weight_matching seconds: {', '.join(f'{t:.1f}' for t in times)} (median {statistics.median(times):.1f})"
    )
    print(f"aligned model computes the same function as b: {same}")
    print(f"threads={args.threads} torch={torch.__version__} python={platform.python_version()}")


if __name__ == "__main__":
    main()
