"""Proposing trials: grid, random, CMA-ES and TPE, each deterministic given its seed.

A strategy is asked for a batch of trials (:meth:`Strategy.ask`), then told their objective values in
the same order (:meth:`Strategy.tell`; ``None`` for a failed trial). The search loop always asks and
tells in batches of :attr:`Strategy.batch`, in trial order, whatever order the trials finish in and
however many workers run them. So:

- ``grid``: trial k is the k-th point of the interleaved grid (:meth:`SearchSpace.grid`), so a budget
  smaller than the grid truncates it and a larger one runs it all;
- ``random``: trial k is drawn from a generator seeded with ``(seed, k)``;
- ``cma`` and ``tpe`` adapt to the results: the same seed *and the same results so far* give the
  same trials (a resumed search replays search.json's results into a fresh strategy and so proposes
  what the interrupted one would have).

Random and CMA-ES work in the unit cube: coordinate 0 picks the method, then each method's
dimensions have their own coordinates (:func:`decode`). TPE is optuna's ``TPESampler`` on the same
space, the method as a categorical choice with each method's parameters conditional on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from unimerge.errors import ConfigError
from unimerge.tune.space import ChoiceDim, Dim, FloatDim, IntDim, SearchSpace, Trial

__all__ = [
    "CmaStrategy",
    "GridStrategy",
    "RandomStrategy",
    "Strategy",
    "TpeStrategy",
    "decode",
    "make_strategy",
]


class Strategy(Protocol):
    """Proposes trials in batches of ``batch``; ``tell`` gets one value (or ``None``) per asked trial."""

    batch: int

    def ask(self, n: int) -> list[Trial]: ...

    def tell(self, values: Sequence[float | None]) -> None: ...


def _value(dim: Dim, u: float) -> Any:
    """``dim``'s value at ``u`` in [0, 1]."""
    u = min(max(float(u), 0.0), 1.0)
    if isinstance(dim, ChoiceDim):
        return dim.choices[min(int(u * len(dim.choices)), len(dim.choices) - 1)]
    if isinstance(dim, IntDim):
        return int(round(dim.low + u * (dim.high - dim.low)))
    return round(dim.low + u * (dim.high - dim.low), 6)


def n_coords(space: SearchSpace) -> int:
    """Unit-cube coordinates of ``space``: one for the method, then every method's dimensions."""
    return 1 + sum(len(ms.dims) for ms in space.methods)


def decode(space: SearchSpace, u: Sequence[float]) -> Trial:
    """The trial at point ``u`` of the unit cube (see the module docstring)."""
    m = len(space.methods)
    pick = min(int(min(max(float(u[0]), 0.0), 1.0) * m), m - 1)
    offset = 1 + sum(len(ms.dims) for ms in space.methods[:pick])
    ms = space.methods[pick]
    return ms.trial([_value(d, u[offset + i]) for i, d in enumerate(ms.dims)], space.n_models)


class GridStrategy:
    """Trial k is the grid's k-th point; past the grid's end it proposes nothing (the search ends)."""

    def __init__(self, space: SearchSpace, batch: int) -> None:
        self.points, self.batch, self.k = space.grid(), batch, 0

    def ask(self, n: int) -> list[Trial]:
        out = self.points[self.k : self.k + n]
        self.k += len(out)
        return out

    def tell(self, values: Sequence[float | None]) -> None:
        return None


class RandomStrategy:
    """Trial k is :func:`decode` of a uniform point drawn with seed ``(seed, k)``."""

    def __init__(self, space: SearchSpace, batch: int, seed: int) -> None:
        self.space, self.batch, self.seed, self.k = space, batch, seed, 0

    def ask(self, n: int) -> list[Trial]:
        out = []
        for k in range(self.k, self.k + n):
            u = np.random.Generator(np.random.PCG64([self.seed, k])).random(n_coords(self.space))
            out.append(decode(self.space, u.tolist()))
        self.k += n
        return out

    def tell(self, values: Sequence[float | None]) -> None:
        return None


class CmaStrategy:
    """CMA-ES (the ``cma`` package) in the unit cube; a population is one batch. It minimises, so it is
    told ``-objective`` (a failed trial: ``1 - min`` of the values seen, worse than any)."""

    def __init__(self, space: SearchSpace, batch: int, seed: int) -> None:
        try:
            import cma
        except ImportError:
            raise ConfigError(
                "`strategy: cma` needs the `cma` package: pip install 'unimerge[distributed]'."
            ) from None
        self.space, self.batch = space, max(batch, 2)
        self.dim = max(n_coords(space), 2)  # pycma needs at least two coordinates
        saved = np.random.get_state()
        opts = {"seed": seed + 1, "popsize": self.batch, "bounds": [0.0, 1.0], "verbose": -9}
        self.es = cma.CMAEvolutionStrategy([0.5] * self.dim, 0.3, opts)
        self.rng_state = np.random.get_state()
        self.asked: list[Any] = []  # pycma draws from numpy's global RNG
        np.random.set_state(saved)

    @contextlib.contextmanager
    def _rng(self) -> Iterator[None]:
        saved = np.random.get_state()
        np.random.set_state(self.rng_state)
        try:
            yield
        finally:
            self.rng_state = np.random.get_state()
            np.random.set_state(saved)

    def ask(self, n: int) -> list[Trial]:
        with self._rng():
            self.asked = self.es.ask()
        return [decode(self.space, list(x)) for x in self.asked[:n]]

    def tell(self, values: Sequence[float | None]) -> None:
        if len(values) < self.batch:  # the budget's last, partial population: nothing follows it
            return
        worst = 1.0 - min([v for v in values if v is not None], default=0.0)
        with self._rng():
            self.es.tell(self.asked, [worst if v is None else -v for v in values])


class TpeStrategy:
    """optuna's ``TPESampler(seed=seed)``, asked and told in trial order."""

    def __init__(self, space: SearchSpace, batch: int, seed: int) -> None:
        try:
            import optuna
        except ImportError:
            raise ConfigError("`strategy: tpe` needs optuna: pip install 'unimerge[distributed]'.") from None
        self.optuna, self.space, self.batch = optuna, space, batch
        with self._quiet():
            self.study = optuna.create_study(
                direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed)
            )
        self.pending: list[Any] = []

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """optuna logs every trial at INFO; keep it to warnings while we ask and tell, then restore."""
        before = self.optuna.logging.get_verbosity()
        self.optuna.logging.set_verbosity(self.optuna.logging.WARNING)
        try:
            yield
        finally:
            self.optuna.logging.set_verbosity(before)

    def _suggest(self, trial: Any) -> Trial:
        names = [ms.method for ms in self.space.methods]
        ms = self.space.methods[names.index(trial.suggest_categorical("method", names))]
        values = []
        for d in ms.dims:
            key = f"{ms.method}.{d.name}" + ("" if d.model is None else f"@{d.model}")
            if isinstance(d, FloatDim):
                values.append(round(trial.suggest_float(key, d.low, d.high), 6))
            elif isinstance(d, IntDim):
                values.append(trial.suggest_int(key, d.low, d.high))
            else:
                values.append(d.choices[trial.suggest_categorical(key, list(range(len(d.choices))))])
        return ms.trial(values, self.space.n_models)

    def ask(self, n: int) -> list[Trial]:
        with self._quiet():
            self.pending = [self.study.ask() for _ in range(n)]
            return [self._suggest(t) for t in self.pending]

    def tell(self, values: Sequence[float | None]) -> None:
        state = self.optuna.trial.TrialState
        with self._quiet():
            for t, v in zip(self.pending, values, strict=True):
                self.study.tell(t, v, state=state.FAIL if v is None else state.COMPLETE)


def make_strategy(name: str, space: SearchSpace, batch: int, seed: int) -> Strategy:
    """The strategy ``name`` (grid | random | cma | tpe) over ``space``."""
    if name == "grid":
        return GridStrategy(space, batch)
    if name == "random":
        return RandomStrategy(space, batch, seed)
    if name == "cma":
        return CmaStrategy(space, batch, seed)
    if name == "tpe":
        return TpeStrategy(space, batch, seed)
    raise ConfigError(f"Unknown search strategy {name!r}; use grid, random, cma or tpe.")
