"""Tiny data-aware merge problems for the tests of fisher / regmean / adamerging / soup / lorahub.

Models are small ``nn.Sequential`` MLPs (or one ``nn.Linear``); a batch is ``{"x": (b, d)}`` (plus
``"labels"``); ``features(module, batch) = module(batch["x"])``. Each fake task draws seeded Gaussian
inputs (its own stream per task) and labels them with a fixed teacher (module + head).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from unimerge.modelmerge import MergeProblem

Batch = dict[str, Tensor]


def features(module: nn.Module, batch: Batch) -> Tensor:
    return module(batch["x"])


class FakeTask:
    """A task with seeded inputs ``(n, dim)`` (``shift`` moves their mean); labels from ``teacher``."""

    def __init__(
        self,
        name: str,
        dim: int,
        offset: int,
        teacher: Callable[[Tensor], Tensor] | None = None,
        shift: float = 0.0,
    ) -> None:
        self.name, self.dim, self.offset, self.teacher, self.shift = name, dim, offset, teacher, shift

    def inputs(self, n: int, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(1000 * self.offset + seed)
        return torch.randn(n, self.dim, generator=g) + self.shift

    def _batches(self, n: int, batch_size: int, seed: int, labeled: bool) -> Iterator[Batch]:
        x = self.inputs(n, seed)
        for s in range(0, n, batch_size):
            b = {"x": x[s : s + batch_size]}
            if labeled:
                assert self.teacher is not None
                with torch.no_grad():
                    b["labels"] = self.teacher(b["x"]).argmax(-1)
            yield b

    def unlabeled(self, n: int, batch_size: int = 32, seed: int = 0) -> Iterator[Batch]:
        return self._batches(n, batch_size, seed, labeled=False)

    def labeled(self, n: int, batch_size: int = 32, seed: int = 0) -> Iterator[Batch]:
        return self._batches(n, batch_size, seed, labeled=True)


def mlp(dim: int = 6, hidden: int = 8, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden)).eval()


def perturbed(module: nn.Module, scale: float, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}


def heads(n_tasks: int, hidden: int = 8, classes: int = 3, seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {f"t{i}": nn.Linear(hidden, classes).eval() for i in range(n_tasks)}


def teacher_of(base: nn.Module, state: dict[str, Tensor], head: nn.Module) -> Callable[[Tensor], Tensor]:
    """``head(module_with_state(x))``: labels as the model holding ``state`` predicts them."""
    import copy

    m = copy.deepcopy(base)
    m.load_state_dict(state)
    return lambda x: head(m(x))


def problem(
    base: nn.Module,
    experts: Sequence[dict[str, Tensor]],
    tasks: Sequence[FakeTask],
    hs: dict[str, nn.Module],
    budget: int = 32,
    seed: int = 0,
) -> MergeProblem:
    return MergeProblem(
        base=base,
        experts=list(experts),
        tasks=list(tasks),
        heads=hs,
        features=features,
        budget=budget,
        seed=seed,
    )


def mlp_problem(
    n: int = 3, scale: float = 0.3, budget: int = 32, dim: int = 6, hidden: int = 8
) -> MergeProblem:
    """``n`` perturbed experts of one MLP; task ``i``'s labels are expert ``i``'s own predictions."""
    base = mlp(dim, hidden)
    experts = [perturbed(base, scale, seed=i + 1) for i in range(n)]
    hs = heads(n, hidden)
    tasks = [
        FakeTask(f"t{i}", dim, i, teacher_of(base, experts[i], hs[f"t{i}"]), shift=0.5 * i) for i in range(n)
    ]
    return problem(base, experts, tasks, hs, budget)
