"""Scoring trials on causal-LM tasks: multiple-choice JSONL, by the log-likelihood of each choice.

When ``search.validation`` (and ``search.test``) name choice files (one JSON object a line with
``prompt``, ``choices`` and ``answer``; :mod:`unimerge.data.choices`), the models are causal language
models: every trial merges the whole model in memory (:func:`~unimerge.tune.evaluate.merged_state`,
the numbers ``unimerge merge`` writes; or, for models too large to hold together, ``search.merge:
stream`` runs the streaming engine into a temporary folder), loads it into one
``AutoModelForCausalLM`` built from the base's ``config.json``, and scores task *i* by accuracy:
the choice with the highest summed log-probability given the prompt, as lm-evaluation-harness's
``acc``
(:func:`unimerge.bench.causal.choice_accuracy`). Data-free methods only: the data-aware ones score
through task heads, which causal-LM experts do not have.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unimerge.bench.causal import choice_accuracy
from unimerge.config import MergeConfig, check_data_path, parse_config
from unimerge.data.choices import ChoiceTask, is_choice_jsonl, read_choice_jsonl
from unimerge.datamerge.models import ModelRef, open_model
from unimerge.errors import CheckpointError, ConfigError
from unimerge.execute import plan_config, run_plan
from unimerge.io import Checkpoint, open_checkpoint
from unimerge.methods import ModelMethod, get_method
from unimerge.tune.config import SearchConfig
from unimerge.tune.evaluate import merged_state, search_tokenizer, task_names, trial_config
from unimerge.tune.space import Trial

__all__ = ["CausalEvaluator", "build_causal_evaluator", "is_causal"]


def is_causal(cfg: SearchConfig, config_dir: Path | None) -> bool:
    """Whether the search's evaluation files are choice files (all of them, or none: else an error)."""
    files = [*(cfg.search.validation or []), *(cfg.search.test or [])]
    kinds = {f: is_choice_jsonl(check_data_path(f, config_dir)) for f in files}
    if len(set(kinds.values())) > 1:
        choice = sorted(f for f, k in kinds.items() if k)
        raise ConfigError(
            f"search.validation / search.test mix choice files ({choice}: prompt, choices, answer) with "
            "labelled text files ({text, label}); use one kind for every task."
        )
    return any(kinds.values())


@dataclass
class CausalEvaluator:
    """The models, tokenizer and choice tasks a causal-LM search scores its trials with.

    With ``experts`` (``merge: memory``) a trial merges the held state dicts; without (``stream``)
    the streaming engine writes it to a temporary folder, from which it is loaded.
    """

    config: SearchConfig
    config_path: Path | None
    model: nn.Module
    tokenizer: Any
    base_state: dict[str, Tensor] | None
    experts: list[dict[str, Tensor]] | None
    names: list[str]
    splits: dict[str, list[ChoiceTask]]

    def merge_config(self, trial: Trial) -> MergeConfig:
        """``trial`` as a validated merge config."""
        return parse_config(trial_config(self.config, trial), self.config_path)

    @torch.inference_mode()
    def score(self, trial: Trial, split: str) -> dict[str, float]:
        """Task name -> accuracy of ``trial``'s merge on ``split`` (validation or test)."""
        cfg = self.merge_config(trial)
        if self.experts is not None and self.base_state is not None:
            state = merged_state(cfg, trial, self.experts, self.base_state)
        else:
            state = self._streamed(cfg)
        self.model.load_state_dict(state, strict=False)  # every tensor of the checkpoint, tied ones once
        return {t.name: choice_accuracy(self.model, self.tokenizer, t) for t in self.splits[split]}

    def _streamed(self, cfg: MergeConfig) -> dict[str, Tensor]:
        config_dir = self.config_path.resolve().parent if self.config_path else None
        with tempfile.TemporaryDirectory(prefix="unimerge-trial-") as tmp:
            out = Path(tmp) / "merged"
            run_plan(plan_config(cfg, out, config_dir=config_dir), out)
            merged = open_checkpoint(str(out))
            try:
                return _state(merged)
            finally:
                merged.close()


def _memory_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _streams(cfg: SearchConfig, models: list[ModelRef]) -> bool:
    """``merge: auto`` streams when the models, as float32, take over a quarter of the memory."""
    if cfg.search.merge != "auto":
        return cfg.search.merge == "stream"
    held = sum(4 * math.prod(m.shape) for ref in models for m in ref.checkpoint.tensors().values())
    return held > _memory_bytes() // 4


def _state(ck: Checkpoint) -> dict[str, Tensor]:
    return {name: ck.read(name).float() for name in ck.tensors()}


def _check_same(base: ModelRef, states: list[dict[str, Tensor]], refs: list[ModelRef]) -> None:
    ref = states[0]
    for m, sd in zip(refs[1:], states[1:], strict=True):
        for name, t in ref.items():
            if name not in sd or sd[name].shape != t.shape:
                got = list(sd[name].shape) if name in sd else "missing"
                raise CheckpointError(
                    f"{m.ref}: tensor {name!r} is {got} where {base.ref} has {list(t.shape)}; the search "
                    "merges models of one architecture and size."
                )


def _build_model(base: ModelRef, state: dict[str, Tensor]) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base.folder, trust_remote_code=False)
    model: nn.Module = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {
        k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)
    }
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"{base.ref}: its tensors do not fit {type(model).__name__} built from its config.json "
            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})."
        )
    return model.eval()


def _tasks(cfg: SearchConfig, names: list[str], config_dir: Path | None) -> dict[str, list[ChoiceTask]]:
    out: dict[str, list[ChoiceTask]] = {}
    for split, files in (("validation", cfg.search.validation), ("test", cfg.search.test)):
        assert files is not None  # SearchConfig requires both without a suite
        out[split] = [
            read_choice_jsonl(check_data_path(f, config_dir), f, n) for f, n in zip(files, names, strict=True)
        ]
    return out


def build_causal_evaluator(cfg: SearchConfig, config_path: Path | None) -> CausalEvaluator:
    """Open the causal LMs, tokenizer and choice tasks of ``cfg`` (every check before any trial)."""
    aware = [m.name for m in cfg.search.methods if isinstance(get_method(m.name), ModelMethod)]
    if aware or cfg.data is not None:
        raise ConfigError(
            f"causal-LM tasks (choice files) are scored with data-free methods only; drop "
            f"{'the data-aware methods ' + str(aware) if aware else 'the `data:` section'} from the search."
        )
    config_dir = config_path.resolve().parent if config_path else None
    base = open_model(cfg.base_model, config_dir)
    experts = [open_model(m.model, config_dir) for m in cfg.models]
    base_state = _state(base.checkpoint)
    model = _build_model(base, base_state)
    states: list[dict[str, Tensor]] | None = None
    held: dict[str, Tensor] | None = None
    if _streams(cfg, [base, *experts]):
        for m in cfg.search.methods:  # the plan's checks, from headers, before any trial
            merge = parse_config(trial_config(cfg, Trial(method=m.name)), config_path)
            plan_config(merge, Path("unimerge-search-check"), config_dir=config_dir)
    else:
        states = [_state(e.checkpoint) for e in experts]
        _check_same(base, [base_state, *states], [base, *experts])
        held = base_state
    names = task_names(cfg, experts, config_dir)
    tok = search_tokenizer(cfg, base, experts)
    return CausalEvaluator(cfg, config_path, model, tok, held, states, names, _tasks(cfg, names, config_dir))
