"""Where TIES's time goes, per element, against the budget an I/O-floor target leaves.

``merge_speed.py`` compares a merge with an I/O floor (read every input, write one output). In bf16
the floor moves 2 bytes per parameter, while TIES computes on float32 task vectors: this measures the
cost of one plain memory pass over those task vectors and of each TIES step, in ns per task-vector
element, on one TinyLlama MLP weight (5632 x 2048) of 3 experts, with 1 and 2 torch threads.
Multiply by the number of task-vector elements (3 x 1.1B for TinyLlama, base + 3) for seconds.

Usage::

    python benchmarks/ties_budget.py --repeats 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from unimerge.core import stack_per_model, validate_params
from unimerge.methods import get_method
from unimerge.methods.primitives import consensus_sums, sparsify_magnitude

SHAPE = (5632, 2048)  # TinyLlama-1.1B's gate/up projection
N = 3  # experts


def _steps(x0: torch.Tensor) -> dict[str, Callable[[torch.Tensor], object]]:
    """Each step as a function of a fresh copy of the task vectors ``x`` (n, *shape)."""
    density = torch.full((N,), 0.5)
    scores = torch.empty_like(x0[0])
    bf16 = x0.to(torch.bfloat16)
    ties = get_method("ties")
    params, models = validate_params(ties, {"normalize": True}, [{"weight": 1.0, "density": 0.5}] * N)
    per_model = stack_per_model(models)
    return {
        "bf16 -> fp32 (reading)": lambda x: x.copy_(bf16),
        "one fp32 pass (x *= 1)": lambda x: torch.mul(x, 1.0, out=x),
        "abs (trim scores)": lambda x: [torch.abs(x[i], out=scores) for i in range(N)],
        "trim (abs, select k-th, mask)": lambda x: sparsify_magnitude(x, density, inplace=True),
        "elect sign + disjoint mean": lambda x: consensus_sums(x, torch.ones(N), "sum", normalize=True),
        "ties (the registered method)": lambda x: ties.fn(x, params, per_model, base=None, generator=None),
    }


def measure(threads: int, repeats: int) -> dict[str, float]:
    """Median ns per task-vector element of each step with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x0 = 0.002 * torch.randn((N, *SHAPE), generator=g)
    numel = x0.numel()
    out: dict[str, float] = {}
    for name, step in _steps(x0).items():
        times = []
        for _ in range(repeats):
            x = x0.clone()
            start = time.perf_counter()
            step(x)
            times.append(time.perf_counter() - start)
        out[name] = 1e9 * sorted(times)[len(times) // 2] / numel
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rows = {t: measure(t, args.repeats) for t in (1, 2)}
    print(f"ns per task-vector element, {N} x {SHAPE[0]}x{SHAPE[1]} float32, median of {args.repeats}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}\n")  # fmt: skip
    print("| step | 1 thread | 2 threads |\n|---|---|---|")
    for name in rows[1]:
        print(f"| {name} | {rows[1][name]:.2f} | {rows[2][name]:.2f} |")


if __name__ == "__main__":
    main()
