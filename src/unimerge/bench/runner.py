"""The benchmark run: data, frozen heads, experts (cached), then every method tuned on validation.

For each method (every registered data-free method by default) the runner merges the experts'
encoders with :func:`unimerge.merge_state_dicts` at each point of the method's documented grid
(``MethodInfo.grid``, the product of its values; no grid means the defaults), evaluates the merged
encoder with each task's frozen head (:mod:`unimerge.bench.heads`) on the *validation* splits, keeps
the point with the best mean validation accuracy (the first in grid order on ties), and reports that
point on the *test* splits, with every test example's correctness kept for the statistics
(:mod:`unimerge.bench.scores`).
A method that rejects this setup (:class:`~unimerge.ConfigError`, e.g. one that needs exactly two
models) is listed under ``skipped`` with the reason. The runner never names a method: a newly
registered one shows up by itself.

``--scaling`` merges random subsets of 2, 4, ... N tasks (``Suite.scaling_subsets`` of each size)
with each scaled method's chosen parameters and reports normalized test accuracy per subset.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor, nn

from unimerge.bench.build import Ticker, build_heads, build_models
from unimerge.bench.data_aware import data_row, make_problem, run_data_method
from unimerge.bench.heads import FrozenHead
from unimerge.bench.model import (
    MINILM,
    encoder_state,
    evaluate,
    evaluate_correct,
    load_encoder,
    load_tokenizer,
    pretrained_dir,
)
from unimerge.bench.scores import correct_row, summarize, unpack_correct
from unimerge.bench.train import Expert, Tick
from unimerge.core import merge_state_dicts
from unimerge.data import DATASETS, SUITES, Suite, TaskData, load_dataset, make_task
from unimerge.errors import ConfigError, MergeError, UnimergeError
from unimerge.io.cache import cache_root
from unimerge.methods import Method, MethodInfo, ModelMethod, TensorMethod, get_method, list_methods

__all__ = [
    "MODEL_NAME",
    "Prepared",
    "baselines",
    "dataset_info",
    "get_suite",
    "grid_points",
    "prepare",
    "rich_progress",
    "REFERENCE_ROWS",
    "run_scaling",
    "scaled_rows",
    "scaling_sizes",
    "scaling_subsets",
    "select_methods",
    "tune_method",
    "unchanged_tensors",
]

MODEL_NAME = f"all-MiniLM-L6-v2 ({MINILM.package}=={MINILM.version})"


@dataclass
class Prepared:
    """Everything a method needs to be benchmarked, built (or loaded from the cache) once."""

    suite: Suite
    seed: int
    tasks: list[TaskData]
    pretrained: Path
    base: dict[str, Tensor]
    frozen: list[FrozenHead]  # each task's head, fitted on the pretrained encoder and frozen
    experts: list[Expert]
    multitask: Expert | None  # None when the suite trains no multi-task model
    states: list[dict[str, Tensor]]  # experts' encoder tensors, in task order
    model: nn.Module  # a working encoder that merged weights are loaded into
    unchanged: set[str]  # tensors equal to the base in every expert
    references: dict[str, dict[str, Tensor]]  # reference row -> task -> test correctness (n,) bool

    @property
    def heads(self) -> dict[str, dict[str, Tensor]]:
        return {h.task: h.state for h in self.frozen}

    @property
    def individual(self) -> dict[str, float]:
        """Each task's own expert's test accuracy (the denominator of normalized accuracy)."""
        return {t: float(c.float().mean()) for t, c in self.references["individual"].items()}


def rich_progress(console: Console) -> Progress:
    """Progress bars that stay on ``console`` when done (one line per phase)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _data_table(tasks: Sequence[TaskData]) -> Table:
    table = Table(title="Tasks (train / val / test sizes; class balance of train)")
    for col in ("task", "classes", "train", "val", "test", "max_len", "train class counts"):
        table.add_column(col)
    for t in tasks:
        counts = torch.bincount(t.train.labels, minlength=t.num_classes).tolist()
        balance = ", ".join(f"{c}: {n}" for c, n in zip(t.classes, counts, strict=True))
        table.add_row(
            t.name,
            str(t.num_classes),
            str(len(t.train)),
            str(len(t.val)),
            str(len(t.test)),
            str(t.max_len),
            balance,
        )
    return table


def prepare(suite: Suite, seed: int, root: Path | None = None, console: Console | None = None,
            jobs: int = 1) -> Prepared:  # fmt: skip
    """Load the data, then fit (or load) the frozen heads and build (or load) every expert
    (``jobs`` at a time) and the multi-task model."""
    console = console or Console()
    root = root or cache_root()
    pdir = pretrained_dir(root)
    tokenizer = load_tokenizer(pdir)
    tasks = [make_task(load_dataset(s.dataset, root), s, suite, tokenizer, seed) for s in suite.tasks]
    console.print(_data_table(tasks))
    pretrained = load_encoder(pdir)
    with rich_progress(console) as progress:
        ticker = _ticker(progress)
        heads = build_heads(root, pretrained, tasks, seed, MINILM.sha256)
        experts, mtl = build_models(
            root, pdir, tasks, heads, suite, seed, MINILM.sha256, jobs=jobs, ticker=ticker
        )
    tasks = [dataclasses.replace(t, head=h.state) for t, h in zip(tasks, heads, strict=True)]
    keys = list(pretrained.state_dict())  # checkpoints may carry extra buffers (position_ids)
    states = [_select(encoder_state(e.encoder_dir), keys) for e in experts]
    base = _select(encoder_state(pdir), keys)
    prep = Prepared(suite, seed, tasks, pdir, base, heads, experts, mtl, states, pretrained,
                    unchanged_tensors(base, states), {})  # fmt: skip
    prep.references.update(_references(prep))
    return prep


def _ticker(progress: Progress) -> Ticker:
    """Bars named by the training code, each advanced by its steps and completed when done."""

    def make(name: str, total: int) -> Tick:
        bar = progress.add_task(name, total=total)
        return lambda n: progress.advance(bar, n)

    return make


def _references(prep: Prepared) -> dict[str, dict[str, Tensor]]:
    """Test correctness of the reference rows: the pretrained encoder and each expert on its task
    (both with the frozen heads), and the multi-task model."""
    out = {"pretrained": evaluate_correct(prep.model, prep.tasks, prep.heads, "test")}
    own: dict[str, Tensor] = {}
    for task, expert in zip(prep.tasks, prep.experts, strict=True):
        own |= evaluate_correct(load_encoder(expert.encoder_dir), [task], prep.heads, "test")
    out["individual"] = own
    if prep.multitask is not None:
        out["multitask"] = evaluate_correct(
            load_encoder(prep.multitask.encoder_dir), prep.tasks, prep.heads, "test"
        )
    return out


def _select(state: dict[str, Tensor], keys: Sequence[str]) -> dict[str, Tensor]:
    return {k: state[k] for k in keys}


def select_methods(suite: Suite, names: Sequence[str] | None) -> list[Method]:
    """The methods to run: ``names`` if given, else the suite's default, else all data-free ones.

    Besides method names, ``names`` may hold the groups ``free`` (every data-free method), ``data``
    (every data-aware one) and ``all``. A suite's own grid for a method (``Suite.grids``) replaces
    the registered one.

    Raises:
        ConfigError: an unknown name.
    """
    if names:  # data-aware methods run only when named (each costs minutes; see bench/data_aware.py)
        groups: dict[str, Sequence[Method]] = {
            "all": list_methods(),
            "free": list_methods(data="none"),
            "data": [m for m in list_methods() if m.data != "none"],
        }
        chosen = [m for n in names for m in (groups[n] if n in groups else [get_method(n)])]
        return [_suite_grid(suite, m) for m in {m.name: m for m in chosen}.values()]  # no repeats
    available: list[Method] = list_methods(data="none")
    if suite.default_methods is not None:
        chosen = [m for m in available if m.name in suite.default_methods]
        if chosen:
            return [_suite_grid(suite, m) for m in chosen]
    return available


def _suite_grid(suite: Suite, info: Method) -> Method:
    grid = suite.grid_for(info.name)
    return info if grid is None else dataclasses.replace(info, grid=grid)


def grid_points(info: MethodInfo) -> list[dict[str, Any]]:
    """Every point of the method's grid (product of the values), in grid order; ``[{}]`` if none."""
    keys = list(info.grid)
    return [
        dict(zip(keys, values, strict=True)) for values in itertools.product(*(info.grid[k] for k in keys))
    ]


def unchanged_tensors(base: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]]) -> set[str]:
    """Names of tensors equal to the base in every expert (the frozen word embeddings)."""
    return {k for k, v in base.items() if all(torch.equal(s[k], v) for s in states)}


def _merge(prep: Prepared, info: TensorMethod, point: Mapping[str, Any], idx: Sequence[int]) -> float:
    """Merge the experts ``idx`` into ``prep.model``; returns the merge's wall time in seconds.

    For per-tensor methods, tensors no expert changed are left at the base without calling the
    method (with identical inputs every method returns that input; this skips half the parameters).
    Whole-model methods (``scope="model"``) get every tensor, since their statistics span the model.
    """
    skip = prep.unchanged if info.scope == "tensor" else set()
    keep = [k for k in prep.base if k not in skip]
    experts = [{k: prep.states[i][k] for k in keep} for i in idx]
    start = time.perf_counter()
    merged = merge_state_dicts(info.name, experts, {k: prep.base[k] for k in keep}, seed=prep.seed, **point)
    seconds = time.perf_counter() - start
    if set(merged) != set(keep):
        raise MergeError(
            f"Method {info.name!r} returned tensors {sorted(set(merged) ^ set(keep))[:5]} that differ "
            "from its inputs'."
        )
    prep.model.load_state_dict(merged, strict=False)  # the skipped tensors stay at the base
    return seconds


def _restore(prep: Prepared) -> None:
    prep.model.load_state_dict(prep.base, strict=True)


def tune_method(prep: Prepared, info: Method, tick: Tick | None = None) -> dict[str, Any]:
    """Search ``info``'s grid on validation, report the best point on test (see the module docstring).

    Returns a row (``method``, ``params``, ``per_task``, ``avg``, ``normalized_avg``, ``seconds``,
    ``val_avg``, ``family``, ``grid``), or ``{"method", "reason"}`` when the method cannot run here.
    """
    if isinstance(info, ModelMethod):  # data-aware: one run at the defaults through MergeProblem
        problem = make_problem(
            load_encoder(prep.pretrained), prep.states, prep.tasks, prep.heads, seed=prep.seed
        )
        row = data_row(info, problem, prep.individual)
        if tick:
            tick(len(grid_points(info)))
        return row
    everyone = list(range(len(prep.tasks)))
    sweep: list[dict[str, Any]] = []
    reasons: list[str] = []
    for point in grid_points(info):
        try:
            seconds = _merge(prep, info, point, everyone)
        except UnimergeError as err:
            reasons.append(str(err))
            continue
        except Exception as err:  # a broken method must not sink an hour-long run; it is reported
            reasons.append(f"failed with {type(err).__name__}: {err}")
            continue
        finally:
            if tick:
                tick(1)
        val = evaluate(prep.model, prep.tasks, prep.heads, "val")
        sweep.append(
            {
                "params": point,
                "val": val,
                "val_avg": sum(val.values()) / len(val),
                "seconds": round(seconds, 3),
            }
        )
    if not sweep:
        _restore(prep)
        return {"method": info.name, "reason": reasons[0] if reasons else "no grid point ran"}
    best = max(sweep, key=lambda r: r["val_avg"])  # max keeps the first of equal scores
    seconds = _merge(prep, info, best["params"], everyone)
    correct = evaluate_correct(prep.model, prep.tasks, prep.heads, "test")
    _restore(prep)
    return correct_row(info.name, correct, prep.individual) | {
        "params": best["params"],
        "seconds": round(seconds, 3),
        "val_avg": best["val_avg"],
        "family": info.family,
        "grid": sweep,
    }


def scaling_sizes(n_tasks: int) -> list[int]:
    """The subset sizes of the scaling study: 2, 4, 6, ... and ``n_tasks`` itself."""
    return sorted({*range(2, n_tasks + 1, 2), n_tasks}) if n_tasks >= 2 else []


def scaling_subsets(n_tasks: int, per_size: int, seed: int) -> list[tuple[int, ...]]:
    """Random distinct task subsets of each size of :func:`scaling_sizes` (at most ``per_size`` each;
    the full set once), in size order."""
    rng = random.Random(seed)
    out: list[tuple[int, ...]] = []
    for k in scaling_sizes(n_tasks):
        combos = list(itertools.combinations(range(n_tasks), k))
        out.extend(sorted(rng.sample(combos, min(per_size, len(combos)))))
    return out


def scaled_rows(suite: Suite, rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows the scaling study follows: the suite's ``scaling_methods`` that ran, and the best
    MoE-style row."""
    chosen = [r for r in rows if r["method"] in suite.scaling_methods]
    moe = [r for r in rows if r.get("family") == "moe"]
    return chosen + ([max(moe, key=lambda r: r["avg"])] if moe else [])


def _subset_accuracy(prep: Prepared, row: Mapping[str, Any], idx: Sequence[int]) -> dict[str, float]:
    """Test accuracy per task (on the suite's ``scaling_test`` examples of each) when only the tasks
    ``idx`` are merged, at the row's parameters."""
    info = get_method(row["method"])
    tasks = [prep.tasks[i].with_test(prep.suite.scaling_test) for i in idx]
    if isinstance(info, ModelMethod):
        states = [prep.states[i] for i in idx]
        problem = make_problem(load_encoder(prep.pretrained), states, tasks, prep.heads, seed=prep.seed)
        return dict(run_data_method(info, problem)["test"])
    _merge(prep, info, row["params"], idx)
    return evaluate(prep.model, tasks, prep.heads, "test")


def _first(correct: Mapping[str, Any], k: int | None) -> dict[str, float]:
    """Task -> accuracy over the first ``k`` examples (all if ``None``) of per-example correctness,
    given as tensors or as :func:`pack_correct` strings."""
    out = {}
    for task, c in correct.items():
        bits = torch.as_tensor(unpack_correct(c) if isinstance(c, str) else c)
        out[task] = float(bits[:k].float().mean())
    return out


def run_scaling(
    prep: Prepared,
    rows: Sequence[Mapping[str, Any]],
    tick: Tick | None = None,
    reuse: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Method -> one record per task subset: ``n_tasks``, ``tasks``, ``avg``, ``normalized_avg`` (test),
    for the rows of :func:`scaled_rows`.

    Every point reads the first ``Suite.scaling_test`` test examples of each task (a seeded random
    sample; all when ``None``), and is normalized by the experts' accuracy on those same examples;
    the full set reads the row's own per-example correctness instead of merging again. ``reuse``
    gives records of an earlier run (method -> records, for rows copied with ``--reuse``): a
    subset found there with the same tasks is not merged again.
    """
    k = prep.suite.scaling_test
    subsets = scaling_subsets(len(prep.tasks), prep.suite.scaling_subsets, prep.seed)
    individual = _first(prep.references["individual"], k)
    out: dict[str, list[dict[str, Any]]] = {}
    for row in scaled_rows(prep.suite, rows):
        earlier = {tuple(r["tasks"]): r for r in (reuse or {}).get(row["method"], [])}
        records = []
        for idx in subsets:
            names = [prep.tasks[i].name for i in idx]
            if tuple(names) in earlier:
                records.append(dict(earlier[tuple(names)]))
            else:
                full = len(idx) == len(prep.tasks)
                per_task = _first(row["correct"], k) if full else _subset_accuracy(prep, row, idx)
                rec = summarize(row["method"], per_task, individual)
                records.append({"n_tasks": len(idx), "tasks": names, "avg": rec["avg"],
                                "normalized_avg": rec["normalized_avg"]})  # fmt: skip
            if tick:
                tick(1)
        out[row["method"]] = records
    _restore(prep)
    return out


def get_suite(name: str) -> Suite:
    """The suite ``name``; unknown names raise :class:`ConfigError` listing the suites."""
    if name not in SUITES:
        raise ConfigError(f"Unknown benchmark suite {name!r}; choose one of: {', '.join(SUITES)}.")
    return SUITES[name]


REFERENCE_ROWS = {
    "pretrained": "pretrained (frozen heads)",
    "individual": "individual experts",
    "multitask": "multi-task (reference)",
}


def baselines(prep: Prepared) -> list[dict[str, Any]]:
    """Reference rows: the pretrained encoder with the frozen heads (every merge's lambda = 0
    point), each task's own expert, and the multi-task model."""
    return [
        correct_row(name, prep.references[key], prep.individual)
        for key, name in REFERENCE_ROWS.items()
        if key in prep.references
    ]


def dataset_info(prep: Prepared) -> dict[str, dict[str, Any]]:
    """Per task: dataset description, classes, split sizes and training class counts."""
    return {
        t.name: {
            "description": DATASETS[t.name].description,
            "classes": list(t.classes),
            "n_train": len(t.train),
            "n_val": len(t.val),
            "n_test": len(t.test),
            "max_len": t.max_len,
            "train_class_counts": torch.bincount(t.train.labels, minlength=t.num_classes).tolist(),
        }
        for t in prep.tasks
    }
