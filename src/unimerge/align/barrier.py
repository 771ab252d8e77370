"""Loss and accuracy barriers along the linear path between two models.

Following Ainsworth et al. (Git Re-basin, ICLR 2023, Def. 2.1), the loss barrier of two models
``a`` and ``b`` is ``max_t L((1 - t) a + t b) - ((1 - t) L(a) + t L(b))`` over the evaluated ``t``;
the accuracy barrier is the largest drop of accuracy below the straight line between the endpoints'
accuracies. :func:`linear_path` evaluates 11 evenly spaced points by default; :func:`plot_paths`
draws one curve per path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unimerge.align.activations import eval_mode
from unimerge.errors import AlignError
from unimerge.io.atomic import atomic_file

__all__ = ["LinearPath", "PathPoint", "evaluate", "interpolate", "linear_path", "plot_paths"]


@dataclass(frozen=True)
class PathPoint:
    """Mean cross-entropy loss and accuracy of the model at ``t`` on the path."""

    t: float
    loss: float
    accuracy: float


@dataclass(frozen=True)
class LinearPath:
    """The evaluated points of one path, ``t`` from 0 (model ``a``) to 1 (model ``b``)."""

    points: tuple[PathPoint, ...]

    @property
    def loss_barrier(self) -> float:
        """``max_t loss(t) - ((1 - t) loss(0) + t loss(1))``."""
        a, b = self.points[0], self.points[-1]
        return max(p.loss - ((1 - p.t) * a.loss + p.t * b.loss) for p in self.points)

    @property
    def accuracy_barrier(self) -> float:
        """``max_t ((1 - t) acc(0) + t acc(1)) - acc(t)``."""
        a, b = self.points[0], self.points[-1]
        return max((1 - p.t) * a.accuracy + p.t * b.accuracy - p.accuracy for p in self.points)

    @property
    def midpoint(self) -> PathPoint:
        """The point nearest ``t = 0.5``."""
        return min(self.points, key=lambda p: abs(p.t - 0.5))


def interpolate(a: Mapping[str, Tensor], b: Mapping[str, Tensor], t: float) -> dict[str, Tensor]:
    """``(1 - t) * a + t * b`` for floating tensors; integer tensors (BatchNorm's batch count) from ``a``."""
    return {
        k: torch.lerp(v, b[k].to(v.dtype), t) if v.is_floating_point() else v.clone() for k, v in a.items()
    }


def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` (eval mode) over ``(inputs, labels)`` batches."""
    total, loss, correct = 0, 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for x, y in batches:
            logits = model(x)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(-1) == y).sum().item())
            total += int(y.numel())
    return loss / max(total, 1), correct / max(total, 1)


def linear_path(
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    points: int = 11,
    fix: Callable[[nn.Module, float], object] | None = None,
) -> LinearPath:
    """Evaluate ``(1 - t) a + t b`` at ``points`` evenly spaced ``t`` in [0, 1].

    ``fix(model, t)``, if given, runs on every interpolated model (endpoints included, so all points
    are treated alike) before it is evaluated: e.g. a BatchNorm reset or REPAIR.
    """
    batches = list(batches)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    work = copy.deepcopy(model_a)
    out = []
    for t in torch.linspace(0.0, 1.0, points).tolist():
        work.load_state_dict(interpolate(sa, sb, t))
        if fix is not None:
            fix(work, t)
        loss, acc = evaluate(work, batches)
        out.append(PathPoint(t, loss, acc))
    return LinearPath(tuple(out))


def plot_paths(paths: Mapping[str, LinearPath], out: Path, title: str = "") -> Path:
    """Plot each path's loss and accuracy against ``t`` into the PNG ``out`` (written atomically).

    Needs matplotlib (``pip install 'unimerge[bench]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AlignError("Plotting barriers needs matplotlib: pip install 'unimerge[bench]'.") from None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for label, path in paths.items():
        ts = [p.t for p in path.points]
        ax_loss.plot(
            ts, [p.loss for p in path.points], marker="o", label=f"{label} (barrier {path.loss_barrier:.3f})"
        )
        ax_acc.plot(ts, [p.accuracy for p in path.points], marker="o", label=label)
    ax_loss.set(xlabel="t (0: model A, 1: model B)", ylabel="test loss", title=title or "loss along the path")
    ax_acc.set(xlabel="t (0: model A, 1: model B)", ylabel="test accuracy", title="accuracy along the path")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out
