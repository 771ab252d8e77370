"""Running a data-aware merge config: ``unimerge merge`` with a ``data:`` section.

Order of work, cheapest checks first: the config (already validated) -> the output folder -> every
input's headers and ``config.json`` (one architecture, one kind of expert) -> the data (files read,
labels checked, suite splits built) -> the body architecture and every tensor's name and shape ->
heads -> then the forward passes.

- ``regmean`` and ``fisher`` stream: each expert's statistics are computed once and kept as a
  sidecar next to it (:mod:`~unimerge.datamerge.sidecars`), then the merge reads one tensor at a time
  (:mod:`~unimerge.datamerge.stream`) and writes a Hugging Face folder (``AutoModel.from_pretrained``
  loads it) with the base's config and tokenizer.
- Every other data-aware method runs in memory on a :class:`~unimerge.modelmerge.MergeProblem` and is
  written with :func:`~unimerge.modelmerge.load.save_merged` (``unimerge.load(OUT)`` loads it).

Either way the output appears at ``OUT`` only when complete (a temporary sibling folder is renamed).
"""

from __future__ import annotations

import copy
import functools
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from unimerge.config import MergeConfig, dump_config, method_params
from unimerge.datamerge.data import TaskPlan, TextTask, load_task, plan_tasks
from unimerge.datamerge.models import (
    Body,
    Features,
    MissingHeads,
    ModelRef,
    build_body,
    check_models,
    check_tensors,
    features_for,
    file_names,
    head_classes,
    load_head,
    no_heads_error,
    open_model,
    read_state,
)
from unimerge.datamerge.sidecars import (
    STATS_KINDS,
    StatsJob,
    ensure_sidecars,
    is_current,
    recipe_digest,
    stats_recipe,
)
from unimerge.datamerge.stream import OutputFiles, StreamInputs, layout, stream_merge
from unimerge.errors import CheckpointError, ConfigError
from unimerge.io import atomic_dir, check_output_outside, read_safetensors_header, resolve_ref
from unimerge.io.atomic import exists_error
from unimerge.io.cache import sha256_file
from unimerge.io.writer import TOKENIZER_FILES
from unimerge.methods import MergeProblem, ModelMethod, get_method
from unimerge.modelmerge.load import write_merged
from unimerge.modelmerge.stats import load_state
from unimerge.options import Check, MergeResult, Progress, RunOptions, compute_device

__all__ = ["DataAware", "Setup", "describe", "prepare", "run_data_merge"]


@dataclass
class Setup:
    """Everything checked and loaded before the first forward pass."""

    config: MergeConfig
    info: ModelMethod
    params: BaseModel
    weights: list[float]
    base: ModelRef
    experts: list[ModelRef]
    plans: list[TaskPlan]
    tasks: list[TextTask]
    body: Body
    maps: list[dict[str, str | None]]
    base_map: dict[str, str | None]
    heads: dict[str, nn.Module] | None
    features: Features
    features_name: str
    tokenizer_root: Path
    tokenizer_digest: str
    seed: int
    device: torch.device


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not (force and out.is_dir()):
        raise exists_error(out)


def _tokenizer_root(
    cfg: MergeConfig, base: ModelRef, experts: Sequence[ModelRef], config_dir: Path | None
) -> Path:
    """The folder whose tokenizer tokenises the data: ``tokenizer_source``, else the base, else expert 0."""
    src = cfg.tokenizer_source
    named = {e.ref: e.folder for e in experts}
    if src not in (None, "base"):
        candidates = [named.get(str(src)) or Path(resolve_ref(str(src), config_dir))]
    else:
        candidates = [base.folder, *(e.folder for e in experts)]
    for root in candidates:
        if any((root / n).is_file() for n in TOKENIZER_FILES):
            return root
    raise CheckpointError(
        f"No tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) in {candidates[0]}; the data must be "
        "tokenised: add the tokenizer to the base folder or set `tokenizer_source:` to a folder that has one."
    )


def _tokenizer(root: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    except (ValueError, OSError) as err:
        raise CheckpointError(f"Cannot load the tokenizer in {root}: {err}") from None


def _needs_labels(info: ModelMethod, params: BaseModel) -> bool:
    return info.data == "labeled" and getattr(params, "mode", None) != "sampled"


def _check_labels(
    info: ModelMethod,
    params: BaseModel,
    task: TextTask,
    classes: int | None,
    head: nn.Module | None,
    ref: str,
) -> None:
    """Labelled methods have labels; labels fit the expert's head.

    Raises:
        ConfigError: naming the data file (or suite task), the model and the fix.
    """
    if task.labels is None and _needs_labels(info, params):
        hint = (
            " (or estimate the Fisher without labels: `parameters: {mode: sampled}`)"
            if info.name == "fisher"
            else ""
        )
        raise ConfigError(
            f"{task.source} has no `label` fields, but method {info.name!r} learns from labelled examples: "
            f"add an integer `label` to every line{hint}."
        )
    k = head_classes(head) if head is not None else 0
    if not k or task.labels is None:
        return
    top = max(task.labels)
    if (classes is not None and classes != k) or top >= k:
        got = f"{classes} classes" if classes is not None else f"labels up to {top}"
        raise ConfigError(
            f"{task.source} has {got}, but the head of {ref} has {k} outputs: the model is matched to the "
            "wrong task. Name each model's task with `task:`."
        )


def _heads(
    setup_kind: str, method: ModelMethod, experts: Sequence[ModelRef], body: Body, names: Sequence[str]
) -> dict[str, nn.Module] | None:
    if setup_kind == "plain":
        if STATS_KINDS.get(method.name) == "fisher":
            raise no_heads_error(method.name, [e.ref for e in experts])
        return None
    heads = {n: load_head(e, body) for n, e in zip(names, experts, strict=True)}
    return {n: h for n, h in heads.items() if h is not None}


def _check_surgery(info: ModelMethod, body: Body) -> None:
    """Representation surgery edits the body's hidden states; a classifier on a pooler misses them. Deep
    surgery's per-block modules have no saved form yet."""
    if info.name == "surgery_v2":
        raise ConfigError(
            "Method 'surgery_v2' adds surgery modules inside every block, which `unimerge merge` cannot save "
            "yet; run it in Python on a MergeProblem (unimerge.modelmerge) or benchmark it with "
            "`unimerge bench --methods surgery_v2`. One-layer `surgery` can be saved."
        )
    if info.name == "surgery" and body.shell is not None and getattr(body.module, "pooler", None) is not None:
        raise ConfigError(
            f"Method 'surgery' adapts the last hidden states of the model, but {type(body.shell).__name__} "
            "classifies its pooler output, which would not see the adaptation. Use experts whose heads read "
            "the hidden states (`unimerge bench` experts, plain encoders, RoBERTa-style classifiers)."
        )


def _tokenizer_digest(root: Path) -> str:
    return ",".join(f"{n}={sha256_file(root / n)[:16]}" for n in TOKENIZER_FILES if (root / n).is_file())


def prepare(cfg: MergeConfig, out: Path, options: RunOptions, config_dir: Path | None) -> Setup:
    """Run every check and load what the merge needs (no forward pass yet); see the module docstring."""
    info, (params, per_model) = get_method(cfg.merge_method, ModelMethod), method_params(cfg)
    _check_out(out, options.force)
    device = compute_device(options.device)
    assert cfg.base_model is not None and cfg.data is not None  # checked by MergeConfig
    specs = cfg.merged_specs()
    base = open_model(cfg.base_model, config_dir, options.allow_pickle)
    experts = [open_model(s.model, config_dir, options.allow_pickle) for s in specs]
    check_output_outside(out, [m.checkpoint.ref for m in (base, *experts)])
    check_models(base, experts)
    seed = next(s for s in (cfg.data.seed, options.seed, cfg.seed) if s is not None)
    plans = plan_tasks(cfg.data, specs, [e.trained_on for e in experts], config_dir, seed)
    tok_root = _tokenizer_root(cfg, base, experts, config_dir)
    tokenizer = _tokenizer(tok_root)
    loaded = [load_task(p, tokenizer, cfg.data.max_length) for p in plans]
    body = build_body(experts[0])
    state = body.module.state_dict()
    maps = [file_names(e.checkpoint, list(state), body.prefix) for e in experts]
    for e, mp in zip(experts, maps, strict=True):
        check_tensors(e, mp, state)
    base_map = file_names(base.checkpoint, list(state), body.prefix)
    check_tensors(base, base_map, state, complete=info.name not in STATS_KINDS)
    heads = _heads(experts[0].kind, info, experts, body, [p.name for p in plans])
    for (task, classes), e in zip(loaded, experts, strict=True):
        _check_labels(info, params, task, classes, (heads or {}).get(task.name), e.ref)
    _check_surgery(info, body)
    features, fname = features_for(experts[0], body)
    if body.shell is not None:
        body.shell.to(device)
    return Setup(
        cfg, info, params, [float(getattr(m, "weight", 1.0)) for m in per_model], base, experts, plans,
        [t for t, _ in loaded], body, maps, base_map,
        {n: h.to(device) for n, h in heads.items()} if heads is not None else None,
        features, fname, tok_root, _tokenizer_digest(tok_root), seed, device,
    )  # fmt: skip


def _readme(s: Setup, computed: Sequence[bool]) -> str:
    data = s.config.data
    assert data is not None
    rows = "\n".join(
        f"| `{e.ref}` | {p.describe} | `{p.name}` | {'computed' if c else 'reused'} |"
        for e, p, c in zip(s.experts, s.plans, computed, strict=True)
    )
    return (
        f"# Merged model ({s.info.name})\n\nMade with unimerge's data-aware `{s.info.name}` method "
        f"({s.info.paper}) from base `{s.base.ref}`.\n\n"
        f"- Parameters: `{s.params.model_dump_json(by_alias=True)}`\n"
        f"- Data: {data.budget} examples per task, seed {s.seed}.\n\n"
        f"| expert | data | task | statistics sidecar |\n|---|---|---|---|\n{rows}\n"
    )


def _jobs(s: Setup) -> list[StatsJob]:
    kind = STATS_KINDS[s.info.name]
    return [
        StatsJob(e, t, (s.heads or {}).get(t.name), functools.partial(read_state, e, mp),
                 stats_recipe(kind, p, s.params, e, s.features_name, s.tokenizer_digest), p.describe)
        for e, t, p, mp in zip(s.experts, s.tasks, s.plans, s.maps, strict=True)
    ]  # fmt: skip


def _run_streaming(s: Setup, out: Path, options: RunOptions, report: Progress | None) -> tuple[int, int]:
    data = s.config.data
    assert data is not None
    jobs = _jobs(s)
    computed = ensure_sidecars(
        jobs,
        s.body.module,
        s.features,
        s.params,
        budget=data.budget,
        seed=s.seed,
        device=s.device,
        report=report,
    )
    dtype = s.config.out_dtype or s.config.dtype
    entries = layout(s.base, s.base_map, s.body.module.state_dict(), s.body.prefix, dtype)
    inp = StreamInputs(
        s.info.name, s.params, s.weights, s.experts, s.maps, [j.path for j in jobs], s.base, entries
    )
    files = OutputFiles(s.base.folder, s.tokenizer_root, dump_config(s.config), _readme(s, computed), dtype)
    return stream_merge(
        inp, out, files, shard_bytes=options.out_shard_size, force=options.force, report=report
    )


def _run_in_memory(s: Setup, out: Path, options: RunOptions, report: Progress | None) -> tuple[int, int]:
    data = s.config.data
    assert data is not None
    base = copy.deepcopy(s.body.module).eval()
    load_state(base, read_state(s.base, s.base_map))
    problem = MergeProblem(
        base=base,
        experts=[read_state(e, mp) for e, mp in zip(s.experts, s.maps, strict=True)],
        tasks=s.tasks,
        heads=s.heads if s.heads is not None else MissingHeads(s.info.name, [e.ref for e in s.experts]),
        features=s.features,
        budget=data.budget,
        seed=s.seed,
        device=s.device,
    )
    what = f"running {s.info.name} ({data.budget} examples per task)"
    if report:
        report(what, 0, 1)
    merged = s.info.fn(problem, s.params)
    if report:
        report(what, 1, 1)
    with atomic_dir(out, exists="replace" if options.force else "error") as tmp:
        write_merged(merged, tmp, method=s.info.name, params=s.params.model_dump(mode="json", by_alias=True))
        for name in TOKENIZER_FILES:
            if (s.tokenizer_root / name).is_file():
                shutil.copyfile(s.tokenizer_root / name, tmp / name)
        (tmp / "unimerge_config.yaml").write_text(dump_config(s.config), encoding="utf-8")
    metas, _ = read_safetensors_header(out / "model.safetensors")
    return len(metas), sum(m.nbytes for m in metas.values())


def run_data_merge(
    config: MergeConfig,
    out_dir: str | Path,
    options: RunOptions = RunOptions(),
    *,
    config_dir: Path | None = None,
    progress: Progress | None = None,
) -> MergeResult:
    """Run a config with a ``data:`` section (see the module docstring).

    Args:
        config: a validated config whose method is data-aware.
        out_dir: the output folder (must not exist unless ``options.force``).
        options: device, shard size, force, seed (the sampling seed unless ``data.seed`` is set).
        config_dir: the config file's folder (relative model and data paths; default: cwd).
        progress: called as ``progress(what, done, total)`` during each phase.

    Example:
        >>> run_data_merge(load_config("regmean.yaml"), "out/", config_dir=Path("."))
    """
    start = time.perf_counter()
    out = Path(out_dir)
    setup = prepare(config, out, options, config_dir)
    runner = _run_streaming if setup.info.name in STATS_KINDS else _run_in_memory
    tensors, nbytes = runner(setup, out, options, progress)
    return MergeResult(out, tensors, nbytes, time.perf_counter() - start)


def describe(
    cfg: MergeConfig, config_dir: Path | None, out_dir: str | Path, *, allow_pickle: bool = False
) -> list[tuple[str, str]]:
    """Check a data-aware config as far as a merge would before its first forward pass; returns
    ``(label, value)`` rows: method, base, each model's task and data, each sidecar's state.
    ``config_dir`` resolves the config's relative paths."""
    s = prepare(cfg, Path(out_dir), RunOptions(force=True, allow_pickle=allow_pickle), config_dir)
    assert cfg.data is not None
    rows = [
        ("method", f"{s.info.name} ({s.info.data} data, budget {cfg.data.budget} per task)"),
        ("base", s.base.ref),
    ]
    jobs = _jobs(s) if s.info.name in STATS_KINDS else []
    for i, (e, p, t) in enumerate(zip(s.experts, s.plans, s.tasks, strict=True)):
        state = ""
        if jobs:
            fresh = is_current(jobs[i].path, jobs[i].recipe["kind"], recipe_digest(jobs[i].recipe))
            state = f"; sidecar {'up to date' if fresh else 'to compute'}"
        rows.append(
            (f"model ({e.kind})", f"{e.ref}: task {p.name}, {p.describe}, {len(t.texts)} examples{state}")
        )
    return rows


class DataAware:
    """The engine :func:`unimerge.execute.run_merge` hands data-aware (model) methods to."""

    def check(self, cfg: MergeConfig, config_dir: Path | None, out_dir: Path, options: RunOptions) -> Check:
        """Every check short of a forward pass (:func:`describe`)."""
        return Check(describe(cfg, config_dir, out_dir, allow_pickle=options.allow_pickle))

    def run(
        self,
        cfg: MergeConfig,
        config_dir: Path | None,
        out_dir: Path,
        options: RunOptions,
        progress: Progress | None,
    ) -> MergeResult:
        """:func:`run_data_merge`."""
        return run_data_merge(cfg, out_dir, options, config_dir=config_dir, progress=progress)
