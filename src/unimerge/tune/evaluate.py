"""Scoring one trial: merge in memory, then each task's accuracy with its own expert's head.

The models are read once per process (:func:`evaluator`, cached: a Ray worker keeps them between
trials) through :mod:`unimerge.datamerge.models`, which also gives the heads and the features the
heads read. A trial is first written as an ordinary merge config (:func:`trial_config`) and validated
as one; then

- a data-free method merges the experts' body tensors with :func:`unimerge.core.merge_state_dicts`
  (the numbers the streaming engine gives, see :mod:`unimerge.core`);
- a data-aware method runs on a :class:`~unimerge.methods.MergeProblem` over the ``data:`` section's
  training examples, as ``unimerge merge`` runs it in memory.

Task *i* is scored with expert *i*'s head on the merged module: accuracy over every example of the
split (``validation``: the search's files or the suite's val split; ``test``: likewise).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from unimerge.config import MergeConfig, check_data_path, method_params, parse_config
from unimerge.core import merge_state_dicts
from unimerge.datamerge.data import TextTask, load_task, plan_tasks, read_jsonl, suite_task
from unimerge.datamerge.models import (
    Body,
    Features,
    ModelRef,
    build_body,
    check_models,
    check_tensors,
    features_for,
    file_names,
    load_head,
    open_model,
    read_state,
)
from unimerge.errors import CheckpointError, ConfigError
from unimerge.io.writer import TOKENIZER_FILES
from unimerge.methods import MergeProblem, ModelMethod, get_method
from unimerge.modelmerge.stats import load_state
from unimerge.tune.config import SearchConfig
from unimerge.tune.space import Trial

__all__ = [
    "SPLITS",
    "Evaluator",
    "Scorer",
    "build_evaluator",
    "merged_state",
    "search_tokenizer",
    "task_names",
    "trial_config",
]

SPLITS = ("validation", "test")
EVAL_BATCH = 32


def trial_config(cfg: SearchConfig, trial: Trial) -> dict[str, Any]:
    """The merge config (a mapping ``unimerge merge`` accepts) that makes ``trial``'s model."""
    info = get_method(trial.method)
    aware = isinstance(info, ModelMethod)
    models = []
    for i, spec in enumerate(cfg.models):
        entry: dict[str, Any] = {"model": spec.model}
        if i < len(trial.per_model) and trial.per_model[i]:
            entry["parameters"] = dict(trial.per_model[i])
        if aware and spec.task is not None:
            entry["task"] = spec.task
        models.append(entry)
    out: dict[str, Any] = {"merge_method": info.name, "base_model": cfg.base_model, "models": models}
    if trial.params:
        out["parameters"] = dict(trial.params)
    out["seed"] = cfg.seed
    out |= {k: v for k, v in (("dtype", cfg.dtype), ("tokenizer_source", cfg.tokenizer_source)) if v}
    if aware:
        if cfg.data is None:
            raise ConfigError(
                f"search: method {info.name!r} is data-aware ({info.data} examples): add a `data:` section "
                "with its training examples (`suite: NAME` or `files: [...]`), or drop it from search.methods."
            )
        out["data"] = cfg.data.model_dump(exclude_none=True)
    return out


def merged_state(
    cfg: MergeConfig, trial: Trial, experts: Sequence[dict[str, Tensor]], base: dict[str, Tensor]
) -> dict[str, Tensor]:
    """A data-free ``trial`` (as ``cfg``) merged in memory: the numbers the streaming engine writes."""
    lists: dict[str, Any] = {
        k: [pm.get(k) for pm in trial.per_model] for k in (trial.per_model[0] if trial.per_model else {})
    }
    return merge_state_dicts(cfg.method.name, experts, base, seed=cfg.seed, **trial.params, **lists)


class Scorer(Protocol):
    """What the search asks of an evaluator (:class:`Evaluator`; causal LMs:
    :class:`~unimerge.tune.causal.CausalEvaluator`)."""

    names: list[str]

    def merge_config(self, trial: Trial) -> MergeConfig: ...

    def score(self, trial: Trial, split: str) -> dict[str, float]: ...


@dataclass
class Evaluator:
    """The models, heads and data a search scores its trials with (see the module docstring)."""

    config: SearchConfig
    config_path: Path | None
    body: Body
    base_state: dict[str, Tensor]
    experts: list[dict[str, Tensor]]
    heads: dict[str, nn.Module]
    features: Features
    names: list[str]
    splits: dict[str, list[TextTask]]
    train: list[TextTask] | None

    def merge_config(self, trial: Trial) -> MergeConfig:
        """``trial`` as a validated merge config."""
        return parse_config(trial_config(self.config, trial), self.config_path)

    def modules(self, trial: Trial) -> Callable[[str], nn.Module]:
        """Task name -> the merged module that scores it."""
        cfg = self.merge_config(trial)
        info = cfg.method
        if isinstance(info, ModelMethod):
            merged = info.fn(self._problem(), method_params(cfg)[0])
            return lambda name: merged.for_task(name).eval()
        state = merged_state(cfg, trial, self.experts, self.base_state)
        module = load_state(copy.deepcopy(self.body.module).eval(), state)
        return lambda name: module

    def _problem(self) -> MergeProblem:
        data = self.config.data
        assert data is not None and self.train is not None  # trial_config requires `data:`
        base = load_state(copy.deepcopy(self.body.module).eval(), self.base_state)
        seed = data.seed if data.seed is not None else self.config.seed
        return MergeProblem(base=base, experts=self.experts, tasks=self.train, heads=self.heads,
                            features=self.features, budget=data.budget, seed=seed)  # fmt: skip

    def score(self, trial: Trial, split: str) -> dict[str, float]:
        """Task name -> accuracy of ``trial``'s merge on ``split`` (validation or test)."""
        modules = self.modules(trial)
        return {t.name: self._accuracy(modules(t.name), t) for t in self.splits[split]}

    @torch.inference_mode()
    def _accuracy(self, module: nn.Module, task: TextTask) -> float:
        assert task.labels is not None
        right = 0
        for start in range(0, len(task.texts), EVAL_BATCH):
            idx = list(range(start, min(start + EVAL_BATCH, len(task.texts))))
            batch = task.collate(idx, with_labels=True)
            labels = batch.pop("labels")
            logits = self.heads[task.name](self.features(module, batch))
            right += int((logits.argmax(-1) == labels).sum())
        return right / len(task.texts)


def search_tokenizer(cfg: SearchConfig, base: ModelRef, experts: Sequence[ModelRef]) -> Any:
    """The tokenizer of ``tokenizer_source`` (a model of the config), else of the base, else expert 0."""
    from transformers import AutoTokenizer

    named = {e.ref: e.folder for e in (base, *experts)}
    src = cfg.tokenizer_source
    roots = [named[src]] if src in named else [base.folder, *(e.folder for e in experts)]
    for root in roots:
        if any((root / n).is_file() for n in TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    raise CheckpointError(
        f"No tokenizer files in {roots[0]}: the search tokenises its evaluation data; add the tokenizer "
        "to the base folder or set `tokenizer_source:` to a model of the config that has one."
    )


def _eval_tasks(
    cfg: SearchConfig, names: list[str], tok: Any, config_dir: Path | None
) -> dict[str, list[TextTask]]:
    spec, data = cfg.search, cfg.data
    out: dict[str, list[TextTask]] = {}
    for split, files in (("validation", spec.validation), ("test", spec.test)):
        tasks = []
        for i, name in enumerate(names):
            if files is not None:
                path = check_data_path(files[i], config_dir)
                texts, labels = read_jsonl(path, files[i])
                if labels is None:
                    raise ConfigError(
                        f"{files[i]} has no `label` fields; search.{split} files need a label on every line."
                    )
                length, source = (data.max_length if data else None) or 128, files[i]
            else:
                assert data is not None and data.suite is not None
                seed = data.seed if data.seed is not None else cfg.seed
                texts, labels, _, suite_len = suite_task(
                    name, data.suite, seed, "val" if split == "validation" else "test"
                )
                length, source = data.max_length or suite_len, f"suite:{data.suite}/{name} ({split})"
            tasks.append(TextTask(name, texts, labels, tok, length, source))
        out[split] = tasks
    return out


def task_names(cfg: SearchConfig, experts: Sequence[ModelRef], config_dir: Path | None) -> list[str]:
    if cfg.data is not None:
        seed = cfg.data.seed if cfg.data.seed is not None else cfg.seed
        return [
            p.name
            for p in plan_tasks(cfg.data, cfg.models, [e.trained_on for e in experts], config_dir, seed)
        ]
    files = cfg.search.validation or []
    stems = [m.task or Path(f).stem for m, f in zip(cfg.models, files, strict=True)]
    return [f"{s}-{i + 1}" if stems.count(s) > 1 else s for i, s in enumerate(stems)]


def build_evaluator(cfg: SearchConfig, config_path: Path | None) -> Evaluator:
    """Open the models, heads and data of ``cfg`` (every check before any trial runs)."""
    config_dir = config_path.resolve().parent if config_path else None
    base = open_model(cfg.base_model, config_dir)
    experts = [open_model(m.model, config_dir) for m in cfg.models]
    check_models(base, experts)
    body = build_body(experts[0])
    keys = list(body.module.state_dict())
    maps = [file_names(e.checkpoint, keys, body.prefix) for e in experts]
    for e, mp in zip(experts, maps, strict=True):
        check_tensors(e, mp, body.module.state_dict())
    base_map = file_names(base.checkpoint, keys, body.prefix)
    check_tensors(base, base_map, body.module.state_dict())
    names = task_names(cfg, experts, config_dir)
    heads = {n: load_head(e, body) for n, e in zip(names, experts, strict=True)}
    if any(h is None for h in heads.values()):
        raise ConfigError(
            "search scores each task with its own expert's head, but the experts are plain encoders without "
            "one; use sequence-classification folders or `unimerge bench` experts."
        )
    tok = search_tokenizer(cfg, base, experts)
    train = None
    if cfg.data is not None:
        seed = cfg.data.seed if cfg.data.seed is not None else cfg.seed
        plans = plan_tasks(cfg.data, cfg.models, [e.trained_on for e in experts], config_dir, seed)
        train = [load_task(p, tok, cfg.data.max_length)[0] for p in plans]
    return Evaluator(
        cfg, config_path, body, read_state(base, base_map),
        [read_state(e, mp) for e, mp in zip(experts, maps, strict=True)],
        {n: h for n, h in heads.items() if h is not None}, features_for(experts[0], body)[0], names,
        _eval_tasks(cfg, names, tok, config_dir), train,
    )  # fmt: skip
