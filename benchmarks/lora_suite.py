"""LoRA experts of MiniLM on a benchmark suite, merged at the update level (issue 15).

Per task of the suite (``quick``: 4 tasks) a PEFT LoRA expert is trained the way the benchmark's
full fine-tunes are (:mod:`unimerge.bench.train`, protocol v2): through the task's frozen head on
unit-norm mean-pooled features, bf16 autocast, one torch thread, early stopping on validation
(:func:`unimerge.bench.train.fit_encoder`), only the adapter factors trained. Adapters are cached as
PEFT ``save_pretrained`` folders under ``<cache>/lora-experts/<suite>/<task>-<recipe hash>``
(``$UNIMERGE_CACHE``, default ``~/.cache/unimerge``), the hash covering the data, head, budget and
LoRA settings.

The 4 adapters are then merged with :func:`unimerge.lora.merge_adapters` (task arithmetic, TIES,
DARE-TIES seeded, KnOTS with inner TIES, TSV-M) and with PEFT's ``svd`` and ``cat`` combinations
(:func:`unimerge.lora.combine_adapters`, one weight for every adapter). Each method's grid (its
registered one; KnOTS's with ``inner`` fixed to ``ties``; the PEFT types' weight on task arithmetic's
lambda grid; ``--grid wide``: :data:`WIDE`, further lambdas, one grid for TIES and KnOTS-TIES) is
searched on validation with the dense output (base + merged update) and the best
point reported on test. At that point the adapter output (``output="peft_lora"``: exact for task
arithmetic; truncated SVD at the experts' total rank and at rank 16 for the others) is written,
loaded with PEFT and evaluated too, with its mean per-module reconstruction error.

Rows are the bench package's (:func:`unimerge.bench.scores.correct_row`): per-task accuracy, mean,
normalized mean (over the individual LoRA experts), bootstrap 95% interval and paired bootstrap
p-value against task arithmetic. ``--diagnose`` adds the KnOTS-vs-TIES evidence: both on one common
density x lambda grid (validation), and per density the share of each task's update energy the TIES
trim keeps and the share of the kept energy that agrees with the elected sign, on the raw updates
and on KnOTS's shared-basis coefficients.

Usage::

    nice -n 10 python benchmarks/lora_suite.py --suite quick --out lora-bench --jobs 2 --grid wide --diagnose
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unimerge.bench.build import build_heads
from unimerge.bench.heads import FrozenHead
from unimerge.bench.model import (
    MINILM,
    evaluate,
    evaluate_correct,
    load_encoder,
    load_tokenizer,
    pretrained_dir,
)
from unimerge.bench.recipes import recipe_hash
from unimerge.bench.runner import get_suite, grid_points
from unimerge.bench.scores import add_statistics, bootstrap_avgs, correct_row, paired_p, round_floats
from unimerge.bench.train import expert_recipe, fit_encoder, torch_threads
from unimerge.data import Suite, TaskData, load_dataset, make_task
from unimerge.io.atomic import atomic_dir, atomic_write_text
from unimerge.io.cache import cache_root
from unimerge.lora import combine_adapters, merge_adapters, open_adapter
from unimerge.methods import get_method
from unimerge.methods.knots import knots_basis
from unimerge.methods.primitives import sparsify_magnitude

TARGETS = (  # attention (q, k, v, output) and MLP (intermediate, output) linears; not the unused pooler
    r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)
MERGES = {  # row -> (merge_adapters method, grid overrides)
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {}),
    "dare_ties": ("dare_ties", {}),
    "knots_ties": ("knots", {"inner": ("ties",)}),
    "tsv_m": ("tsv_m", {}),
}
COMBINES = {"peft_svd": "svd", "peft_cat": "cat"}  # row -> PEFT combination type
WIDE_LAMBDA = (0.3, 0.5, 0.7, 1.0, 1.5, 2.0)  # task arithmetic and PEFT's weights, --grid wide
WIDE = {  # --grid wide: the registered grids reach further (LoRA updates are small); TIES = KnOTS-TIES
    "task_arithmetic": {"lambda": WIDE_LAMBDA},
    "ties": {"density": (0.2, 0.5, 0.9), "lambda": (0.7, 1.0, 1.5, 2.0, 3.0)},
    "dare_ties": {"density": (0.3, 0.5), "lambda": (0.3, 0.5, 0.7, 1.0, 1.5)},
    "knots_ties": {"inner": ("ties",), "density": (0.2, 0.5, 0.9), "lambda": (0.7, 1.0, 1.5, 2.0, 3.0)},
    "tsv_m": {"alpha": (0.6, 0.8, 1.0, 1.2, 1.5, 2.0)},
}
DIAG_DENSITY = (0.1, 0.2, 0.5, 0.9)  # trim statistics
COMMON = WIDE["ties"]  # KnOTS-TIES and TIES compared point by point on this grid


@dataclass(frozen=True)
class LoraSpec:
    """How each LoRA expert is trained (everything here is part of its cache key)."""

    rank: int = 16
    alpha: float = 32.0
    lr: float = 5e-4
    dropout: float = 0.0
    targets: str = TARGETS

    def config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.targets, bias="none")  # fmt: skip


def lora_recipe(suite: Suite, task: TaskData, head: FrozenHead, seed: int, spec: LoraSpec) -> dict[str, Any]:
    """The full fine-tune's recipe (data, head, budget) with the LoRA settings and learning rate."""
    import peft

    rec = expert_recipe(suite, task, head, seed, MINILM.sha256)
    return rec | {
        "kind": "lora_expert",
        "lr": spec.lr,
        "lora": dataclasses.asdict(spec),
        "peft": peft.__version__,
    }


def train_lora(final: Path, rec: Mapping[str, Any], pretrained: Path, task: TaskData, head: FrozenHead,
               suite: Suite, seed: int, spec: LoraSpec) -> None:  # fmt: skip
    """Train one LoRA expert through ``head`` (early stopping as the full fine-tunes) and save its
    PEFT folder with ``meta.json`` at ``final`` (atomically)."""
    from peft import get_peft_model

    encoder = load_encoder(pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(encoder, spec.config())  # injects the LoRA layers into ``encoder``
        steps, every = int(rec["steps"]), int(rec["eval_every"])
        best = fit_encoder(
            encoder, [task], [head], steps, dataclasses.replace(suite, lr=spec.lr), seed, None, every
        )
    heads = {head.task: head.state}
    meta = {"recipe": dict(rec), "val": evaluate(encoder, [task], heads, "val"),
            "test": evaluate(encoder, [task], heads, "test"), "best_step": best.step,
            "val_history": best.history}  # fmt: skip
    with atomic_dir(final, exists="keep") as tmp:
        model.save_pretrained(tmp)
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))


def _train_job(args: tuple[Any, ...]) -> str:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    train_lora(*args)
    return str(args[0])


def build_lora_experts(root: Path, pretrained: Path, tasks: Sequence[TaskData], heads: Sequence[FrozenHead],
                       suite: Suite, seed: int, spec: LoraSpec, jobs: int = 1) -> list[Path]:  # fmt: skip
    """Each task's adapter folder, trained first (``jobs`` processes, one thread each) if not cached."""
    finals, todo = [], []
    for task, head in zip(tasks, heads, strict=True):
        rec = lora_recipe(suite, task, head, seed, spec)
        final = root / "lora-experts" / suite.name / f"{task.name}-{recipe_hash(rec)}"
        finals.append(final)
        if not (final / "meta.json").exists():
            todo.append((final, rec, pretrained, task, head, suite, seed, spec))
    if jobs > 1 and len(todo) > 1:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=ctx) as pool:
            for done in pool.map(_train_job, todo):
                print(f"trained {done}", flush=True)
    else:
        for job in todo:
            print(f"trained {_train_job(job)}", flush=True)
    return finals


@dataclass
class World:
    """The tasks, frozen heads, base encoder (a working copy merges are loaded into) and adapters."""

    tasks: list[TaskData]
    heads: dict[str, dict[str, Tensor]]
    pretrained: Path
    model: nn.Module
    base: dict[str, Tensor]
    adapters: list[Path]
    seed: int
    individual: dict[str, float] = dataclasses.field(default_factory=dict)

    def load(self, deltas: Mapping[str, Tensor]) -> nn.Module:
        """The working encoder set to ``base + deltas`` (module name -> update)."""
        self.model.load_state_dict(self.base)
        with torch.no_grad():
            for module, d in deltas.items():
                self.model.get_parameter(f"{module}.weight").add_(d)
        return self.model

    def val_avg(self, deltas: Mapping[str, Tensor]) -> float:
        acc = evaluate(self.load(deltas), self.tasks, self.heads, "val")
        return sum(acc.values()) / len(acc)

    def test_correct(self, model: nn.Module) -> dict[str, Tensor]:
        return evaluate_correct(model, self.tasks, self.heads, "test")

    def peft_correct(self, folder: Path) -> dict[str, Tensor]:
        """Test correctness of an adapter folder loaded with PEFT onto the pretrained encoder."""
        from peft import PeftModel

        return self.test_correct(PeftModel.from_pretrained(load_encoder(self.pretrained), folder).eval())


def make_world(suite: Suite, seed: int, root: Path, jobs: int, spec: LoraSpec,
               pdir: Path | None = None) -> World:  # fmt: skip
    """Data, heads (the benchmark's cached ones) and the LoRA experts (trained if missing)."""
    pdir = pdir or pretrained_dir(root)
    tokenizer = load_tokenizer(pdir)
    tasks = [make_task(load_dataset(s.dataset, root), s, suite, tokenizer, seed) for s in suite.tasks]
    model = load_encoder(pdir)
    heads = build_heads(root, model, tasks, seed, MINILM.sha256)
    adapters = build_lora_experts(root, pdir, tasks, heads, suite, seed, spec, jobs)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    return World(tasks, {h.task: h.state for h in heads}, pdir, model, base, adapters, seed)


def references(world: World) -> list[dict[str, Any]]:
    """The pretrained row and the individual LoRA experts (each on its own task)."""
    from peft import PeftModel

    pre = world.test_correct(world.load({}))
    own: dict[str, Tensor] = {}
    for task, folder in zip(world.tasks, world.adapters, strict=True):
        model = PeftModel.from_pretrained(load_encoder(world.pretrained), folder).eval()
        own |= evaluate_correct(model, [task], world.heads, "test")
    world.individual = {t: float(c.float().mean()) for t, c in own.items()}
    return [
        correct_row("pretrained", pre, world.individual),
        correct_row("individual LoRA", own, world.individual),
    ]


Merge = Callable[[dict[str, Any]], dict[str, Tensor]]  # grid point -> merged update per module


def merger(world: World, row: str, wide: bool = False) -> tuple[Merge, list[dict[str, Any]]]:
    """The dense merge of ``row`` and its grid points (registered, or :data:`WIDE`)."""
    if row in COMBINES:
        ta = WIDE_LAMBDA if wide else get_method("task_arithmetic").grid["lambda"]
        points = [{"weight": w} for w in ta]

        def combine(p: dict[str, Any]) -> dict[str, Tensor]:
            res = combine_adapters(
                COMBINES[row], world.adapters, [p["weight"]] * len(world.adapters), output="dense"
            )
            return res.deltas

        return combine, points
    method, overrides = MERGES[row]
    info = get_method(method)
    grid = WIDE[row] if wide else {**info.grid, **overrides}
    points = grid_points(dataclasses.replace(info, grid=grid))
    return (lambda p: merge_adapters(method, world.adapters, seed=world.seed, **p).deltas), points


def tune(
    world: World, merge: Merge, points: Sequence[dict[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The grid point with the best mean validation accuracy (the first of ties) and the sweep."""
    sweep = [{"params": p, "val_avg": world.val_avg(merge(p))} for p in points]
    return max(sweep, key=lambda r: r["val_avg"])["params"], sweep


def adapter_rows(world: World, row: str, params: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    """The adapter output at ``params``, loaded with PEFT: exact for task arithmetic, else truncated SVD at
    the experts' total rank and at one expert's rank; each with its mean per-module relative error."""
    total = sum(open_adapter(a).settings.r for a in world.adapters)
    out = []
    if row in COMBINES:
        folder = work / row
        w = [params["weight"]] * len(world.adapters)
        res = combine_adapters(COMBINES[row], world.adapters, w, out=folder, force=True)
        exact = combine_adapters("cat", world.adapters, w, output="dense").deltas  # sum_i w dW_i, exactly
        errs = [float((f.delta() - exact[m]).norm() / exact[m].norm()) for m, f in res.factors.items()]
        out.append((f"{row} [PEFT adapter r{res.rank}]", folder, sum(errs) / len(errs)))
    else:
        method = MERGES[row][0]
        ranks: list[int | None] = (
            [None] if method == "task_arithmetic" else [total, total // len(world.adapters)]
        )
        for r in ranks:
            folder = work / f"{row}-r{r}"
            res = merge_adapters(
                method,
                world.adapters,
                rank=r,
                output="peft_lora",
                seed=world.seed,
                out=folder,
                force=True,
                **params,
            )
            name = f"{row} [adapter {'exact' if r is None else f'SVD r{r}'}]"
            out.append((name, folder, sum(res.errors.values()) / max(1, len(res.errors))))
    return [correct_row(n, world.peft_correct(f), world.individual) | {"recon_error": e} for n, f, e in out]


def run_rows(world: World, rows: Sequence[str], work: Path, wide: bool = False) -> list[dict[str, Any]]:
    """Every method row (dense output, tuned on validation) followed by its adapter outputs."""
    out = []
    for row in rows:
        merge, points = merger(world, row, wide)
        params, sweep = tune(world, merge, points)
        dense = correct_row(row, world.test_correct(world.load(merge(params))), world.individual)
        out.append(dense | {"params": params, "grid": sweep, "output": "dense"})
        for a in adapter_rows(world, row, params, work):
            out.append(a | {"params": params, "output": "peft_lora", "dense_row": row})
        print(f"{row}: {params} test avg {dense['avg']:.4f}", flush=True)
    return out


def trim_stats(world: World, densities: Sequence[float]) -> dict[str, dict[str, float]]:
    """Per density, averaged over modules and tasks: the share of each task's energy the TIES trim keeps,
    and the share of the kept energy agreeing with the elected sign, on the raw updates and on KnOTS's
    shared-basis coefficients ``C_i = U^T dW_i``."""
    ads = [open_adapter(a) for a in world.adapters]
    sums: dict[str, dict[str, float]] = {}
    modules = sorted(ads[0].modules)
    for module in modules:
        x = torch.stack([a.factors(module).delta() for a in ads])  # (n, out, in)
        _, c = knots_basis(x)  # (n, r, in)
        for kind, t in (("raw", x), ("knots", c)):
            for d in densities:
                kept = sparsify_magnitude(t.clone(), torch.full((len(ads),), d))
                sign = torch.sign(kept.sum(0))
                e = kept.pow(2)
                agree = float((e * (torch.sign(kept) == sign)).sum() / e.sum())
                key = f"{kind}@{d}"
                acc = sums.setdefault(key, {"energy_kept": 0.0, "sign_agreeing": 0.0})
                total = t.pow(2).flatten(1).sum(1)  # (n,); a task that never left step 0 has none
                acc["energy_kept"] += float((e.flatten(1).sum(1)[total > 0] / total[total > 0]).mean())
                acc["sign_agreeing"] += agree
    for a in ads:
        a.close()
    return {k: {m: v / len(modules) for m, v in s.items()} for k, s in sums.items()}


def diagnose(world: World, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """TIES and KnOTS-TIES on the common grid :data:`COMMON` (mean validation accuracy; points the
    rows' sweeps already hold are not merged again), and the trim statistics."""
    common: dict[str, list[dict[str, float]]] = {}
    for row, method, extra in (("ties", "ties", {}), ("knots_ties", "knots", {"inner": "ties"})):
        done = {(g["params"]["density"], g["params"]["lambda"]): g["val_avg"]
                for r in rows if r["method"] == row and "grid" in r for g in r["grid"]}  # fmt: skip
        common[row] = []
        for d in COMMON["density"]:
            for lam in COMMON["lambda"]:
                if (d, lam) not in done:
                    point = {"density": d, "lambda": lam, **extra}
                    deltas = merge_adapters(method, world.adapters, seed=world.seed, **point).deltas
                    done[(d, lam)] = world.val_avg(deltas)
                common[row].append({"density": d, "lambda": lam, "val_avg": done[(d, lam)]})
    return {"common_grid_val": common, "trim": trim_stats(world, DIAG_DENSITY)}


def knots_vs_ties(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """KnOTS-TIES minus TIES (mean test accuracy) per output, with the paired bootstrap p-value."""
    by = {r["method"]: r for r in rows if "correct" in r}
    out = []
    for k in [m for m in by if m.startswith("knots_ties")]:
        t = k.replace("knots_ties", "ties", 1)
        if t in by:
            p = paired_p(bootstrap_avgs(by[k]["correct"]), bootstrap_avgs(by[t]["correct"]))
            out.append({"rows": f"{k} - {t}", "delta": by[k]["avg"] - by[t]["avg"], "p": p})
    return out


def _ci(r: Mapping[str, Any]) -> str:
    return f"{100 * r['ci95'][0]:.1f}–{100 * r['ci95'][1]:.1f}" if "ci95" in r else ""


def markdown(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> str:
    """The results table: accuracy (%) per task, mean, normalized mean, interval, p vs task arithmetic."""
    head = ["method", *tasks, "avg", "norm.", "95% CI", "p vs TA", "recon. err."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], *(f"{100 * r['per_task'][t]:.1f}" for t in tasks), f"{100 * r['avg']:.1f}",
                 f"{r['normalized_avg']:.3f}", _ci(r),
                 f"{r['p_vs_task_arithmetic']:.3f}" if "p_vs_task_arithmetic" in r else "",
                 f"{r['recon_error']:.3f}" if "recon_error" in r else ""]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diag_markdown(diag: Mapping[str, Any]) -> str:
    """The diagnosis as two small tables."""
    lines = [
        "| val avg (%) | " + " | ".join(f"λ={lam}" for lam in COMMON["lambda"]) + " |",
        "|" + "---|" * (1 + len(COMMON["lambda"])),
    ]
    for row, recs in diag["common_grid_val"].items():
        for d in COMMON["density"]:
            vals = [f"{100 * r['val_avg']:.1f}" for r in recs if r["density"] == d]
            lines.append(f"| {row} density={d} | " + " | ".join(vals) + " |")
    lines += [
        "",
        "| density | energy kept: raw ΔW | energy kept: KnOTS C "
        "| sign-agreeing: raw | sign-agreeing: KnOTS |",
        "|---|---|---|---|---|",
    ]
    t = diag["trim"]
    for d in DIAG_DENSITY:
        raw, kn = t[f"raw@{d}"], t[f"knots@{d}"]
        lines.append(f"| {d} | {raw['energy_kept']:.3f} | {kn['energy_kept']:.3f} | "
                     f"{raw['sign_agreeing']:.3f} | {kn['sign_agreeing']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    py = platform.python_version()
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB, torch {torch.__version__}, Python {py}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="quick")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="LoRA experts trained at once (one thread each)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for evaluation")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--methods", nargs="*", default=[*MERGES, *COMBINES])
    p.add_argument("--grid", choices=("registered", "wide"), default="registered", help="grids searched")
    p.add_argument("--diagnose", action="store_true", help="KnOTS vs TIES evidence (common grid, trim stats)")
    args = p.parse_args(argv)
    spec = LoraSpec(args.rank, args.alpha, args.lr)
    started = datetime.datetime.now(datetime.UTC)
    world = make_world(get_suite(args.suite), args.seed, cache_root(), args.jobs, spec)
    with torch_threads(args.threads), tempfile.TemporaryDirectory() as work:
        rows = references(world) + run_rows(world, args.methods, Path(work), args.grid == "wide")
        diag = diagnose(world, rows) if args.diagnose else None
    add_statistics(rows)
    names = [t.name for t in world.tasks]
    header = (f"command: {' '.join(['python', *sys.argv])}\ndate: {started:%Y-%m-%d %H:%M} UTC\n"
              f"machine: {machine()}")  # fmt: skip
    versus = knots_vs_ties(rows)
    paired = "\n".join(
        f"{v['rows']}: {100 * v['delta']:+.1f} points, paired p = {v['p']:.3f}" for v in versus
    )
    text = header + "\n\n" + markdown(rows, names) + "\n\n" + paired
    text += ("\n\n" + diag_markdown(diag)) if diag else ""
    print(text)
    result = {
        "suite": args.suite,
        "grid": args.grid,
        "lora": dataclasses.asdict(spec),
        "machine": machine(),
        "date": str(started),
        "command": sys.argv,
        "adapters": [str(a) for a in world.adapters],
        "rows": rows,
        "knots_vs_ties": versus,
        "diagnosis": diag,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "lora_results.json", json.dumps(round_floats(result), indent=2))
    atomic_write_text(args.out / "lora_results.md", text + "\n")


if __name__ == "__main__":
    main()
