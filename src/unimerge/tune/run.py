"""The search loop: propose, run trials as Ray tasks, record each in ``OUT/search.json``, pick the best.

```
strategy.ask(batch) -> trials k..k+b-1 -> Ray tasks (run_job; max_retries=1) -> as each finishes:
    search.json rewritten atomically with its record -> strategy.tell(objectives, in trial order) -> ...
best trial -> OUT/best/ (unimerge_config.yaml + model/, made by `unimerge merge` from that config)
           -> scored once on the test split -> OUT/report.html
```

A record is ``{index, method, params, per_model, status: "ok", scores: {task: accuracy}, objective,
seconds}`` or ``{..., status: "failed", error}`` (a trial that raised, or whose worker died twice: Ray
retries a task once). Resuming: trials already in ``search.json`` are not run again; the strategy is
told their recorded results, so it proposes what the interrupted search would have (the file records
a fingerprint of the config, budget aside, and a different config is refused). ``workers=0`` runs the
trials one after another in this process, without Ray (debugging; tests).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from unimerge.cluster.session import start_ray, task_error
from unimerge.datamerge.models import bench_dirs
from unimerge.errors import ConfigError, MergeError, UnimergeError
from unimerge.io import atomic_dir, atomic_write_text
from unimerge.options import Progress
from unimerge.tune.config import SearchConfig, SearchSpec, load_search_config, parse_search_config
from unimerge.tune.evaluate import Scorer, trial_config
from unimerge.tune.jobs import evaluator, job_for, run_job
from unimerge.tune.report import write_report
from unimerge.tune.space import Trial, build_space
from unimerge.tune.strategies import make_strategy

__all__ = ["SearchResult", "objective", "search"]

TrialFn = Callable[[dict[str, Any]], dict[str, Any]]
Execute = Callable[[list[tuple[int, dict[str, Any]]], Callable[[int, dict[str, Any]], None]], None]
VERSION = 1


@dataclass(frozen=True)
class SearchResult:
    """What a search produced: ``OUT``, every trial's record, the best one and its test scores."""

    out: Path
    trials: list[dict[str, Any]]
    best: dict[str, Any]
    test: dict[str, float]


def objective(scores: Mapping[str, float], spec: SearchSpec) -> float:
    """The search's objective over per-task scores: their mean, min, or ``task_weights``-weighted mean."""
    if spec.objective == "min":
        return min(scores.values())
    weights = {
        t: (spec.task_weights or {}).get(t, 1.0) if spec.objective == "weighted" else 1.0 for t in scores
    }
    return sum(weights[t] * s for t, s in scores.items()) / sum(weights.values())


class _Log:
    """``OUT/search.json``: records by trial index, rewritten atomically after each one."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path, self.header, self.records = path, header, {}
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            if old.get("fingerprint") != header["fingerprint"]:
                raise ConfigError(
                    f"{path} was written by a different search config (methods, data, strategy or seed "
                    "differ; only `budget` may change on resume). Give a new output folder, or delete "
                    f"{path} to start over."
                )
            self.records = {int(r["index"]): r for r in old.get("trials", [])}

    def add(self, record: dict[str, Any]) -> None:
        self.records[int(record["index"])] = record
        self.save()

    def save(self, **extra: Any) -> None:
        trials = [self.records[i] for i in sorted(self.records)]
        atomic_write_text(self.path, json.dumps({**self.header, "trials": trials, **extra}, indent=1) + "\n")


def _fingerprint(cfg: SearchConfig) -> str:
    same = cfg.model_copy(update={"search": cfg.search.model_copy(update={"budget": 1})})
    return hashlib.sha256(same.model_dump_json().encode()).hexdigest()[:16]


def _error_text(err: BaseException) -> str:
    err = task_error(err)
    return f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"


def _nothing() -> None:
    return None


def _inline(fn: TrialFn) -> Execute:
    def execute(todo: list[tuple[int, dict[str, Any]]], done: Callable[[int, dict[str, Any]], None]) -> None:
        for i, job in todo:
            try:
                result = fn(job)
            except Exception as err:  # noqa: BLE001 - a failed trial is recorded, never dropped
                result = {"error": _error_text(err)}
            done(i, result)

    return execute


def _ray(fn: TrialFn, address: str | None, workers: int | None) -> tuple[Execute, Callable[[], None]]:
    """An executor running each job as a Ray task (retried once if its worker dies), and a closer."""
    ray, close = start_ray(address, workers, "The search (--workers 0 runs its trials in this process)")
    remote = ray.remote(max_retries=1, num_cpus=1)(fn)

    def execute(todo: list[tuple[int, dict[str, Any]]], done: Callable[[int, dict[str, Any]], None]) -> None:
        refs = {remote.remote(job): i for i, job in todo}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    result = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - task error or worker died twice: recorded
                    result = {"error": _error_text(err)}
                done(refs[ref], result)

    return execute, close


def _record(index: int, trial: Trial, result: Mapping[str, Any], spec: SearchSpec) -> dict[str, Any]:
    rec: dict[str, Any] = {"index": index, **json.loads(trial.model_dump_json())}
    if "error" in result:
        return rec | {"status": "failed", "error": str(result["error"])}
    scores = {k: float(v) for k, v in result["scores"].items()}
    return rec | {"status": "ok", "scores": scores, "objective": objective(scores, spec),
                  "seconds": result.get("seconds")}  # fmt: skip


def _same(rec: Mapping[str, Any], trial: Trial) -> bool:
    return Trial.model_validate({k: rec[k] for k in ("method", "params", "per_model")}) == trial


def _run_batch(
    batch: dict[int, Trial],
    log: _Log,
    execute: Execute,
    make_job: Callable[[Trial], dict[str, Any]],
    spec: SearchSpec,
    progress: Progress | None,
) -> None:
    """Run the trials of ``batch`` not yet in ``log``; refuse a log whose trials differ from ``batch``'s."""
    for i, t in batch.items():
        if i in log.records and not _same(log.records[i], t):
            raise ConfigError(
                f"{log.path}: trial {i} was {log.records[i]['method']} {log.records[i]['params']}, but the "
                f"search now proposes {t.method} {t.params}; the results it adapts to changed. Give a new "
                "output folder to start over."
            )

    def done(i: int, result: dict[str, Any]) -> None:
        log.add(_record(i, batch[i], result, spec))
        if progress:
            progress("trials", len(log.records), spec.budget)

    execute([(i, make_job(t)) for i, t in batch.items() if i not in log.records], done)


def _loop(
    cfg: SearchConfig,
    log: _Log,
    execute: Execute,
    make_job: Callable[[Trial], dict[str, Any]],
    progress: Progress | None,
) -> None:
    """Ask a batch, run what is not recorded yet, tell the batch's objectives in order; until the budget."""
    spec = cfg.search
    strategy = make_strategy(spec.strategy, build_space(spec, len(cfg.models)), spec.batch, spec.seed)
    k = 0
    while k < spec.budget:
        trials = strategy.ask(min(strategy.batch, spec.budget - k))
        if not trials:
            break
        batch = dict(enumerate(trials, start=k))
        _run_batch(batch, log, execute, make_job, spec, progress)
        strategy.tell([log.records[i].get("objective") for i in batch])
        k += len(trials)


def _best(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        first = records[0]["error"] if records else "no trials ran"
        raise MergeError(f"All {len(records)} trials of the search failed; the first error: {first}")
    return max(ok, key=lambda r: (r["objective"], -r["index"]))


def _local(ref: str, config_dir: Path | None) -> str:
    """``ref`` as an absolute path when it names a local folder or file, else as written (a Hub id).
    A ``unimerge bench`` expert becomes its ``encoder/`` folder: the streaming merge reads weights
    from there, and data-aware merges still find the head beside it."""
    path = (config_dir or Path.cwd()) / ref
    return str(bench_dirs(path.resolve())[0]) if path.exists() else ref


def write_best(cfg: SearchConfig, config_path: Path | None, trial: Trial, out: Path) -> dict[str, Any]:
    """``out`` (replaced): ``unimerge_config.yaml`` (absolute model paths; data files copied to
    ``data/``) and ``model/``, which ``unimerge merge out/unimerge_config.yaml NEW`` reproduces."""
    from unimerge.api import run_merge

    config_dir = config_path.resolve().parent if config_path else None
    conf = trial_config(cfg, trial)
    conf["base_model"] = _local(conf["base_model"], config_dir)
    for m in conf["models"]:
        m["model"] = _local(m["model"], config_dir)
    with atomic_dir(out, exists="replace") as tmp:
        if conf.get("data", {}).get("files"):
            (tmp / "data").mkdir()
            for i, rel in enumerate(conf["data"]["files"]):
                shutil.copyfile((config_dir or Path.cwd()) / rel, tmp / "data" / f"{i}-{Path(rel).name}")
            conf["data"]["files"] = [f"data/{i}-{Path(r).name}" for i, r in enumerate(conf["data"]["files"])]
        (tmp / "unimerge_config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False), encoding="utf-8")
        run_merge(tmp / "unimerge_config.yaml", tmp / "model")
    return conf


def _load(config: str | Path | Mapping[str, Any] | SearchConfig) -> tuple[SearchConfig, Path | None]:
    if isinstance(config, SearchConfig):
        return config, None
    if isinstance(config, Mapping):
        return parse_search_config(dict(config)), None
    return load_search_config(config), Path(config)


def _check(cfg: SearchConfig, path: Path | None, out: Path) -> Scorer:
    """Every check before the first trial: the space's bounds, the models, heads and data, each
    method's merge config, ``task_weights``' names, and ``out`` (new, or a search's folder)."""
    build_space(cfg.search, len(cfg.models))
    ev = evaluator(cfg.model_dump_json(), str(path.resolve()) if path else None)
    for m in cfg.search.methods:
        ev.merge_config(Trial(method=m.name))  # each method's config is valid (data, task names, ...)
    unknown = sorted(set(cfg.search.task_weights or {}) - set(ev.names))
    if unknown:
        raise ConfigError(f"search.task_weights names unknown tasks {unknown}; the tasks are {ev.names}.")
    if out.exists() and not (out / "search.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"{out} exists and is not a search's output folder (no search.json); give a new folder (an "
            "existing search's folder resumes that search)."
        )
    return ev


def search(
    config: str | Path | Mapping[str, Any] | SearchConfig,
    out_dir: str | Path,
    *,
    ray_address: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    trial_fn: TrialFn = run_job,
) -> SearchResult:
    """Search methods and their parameters for the config's models (see :mod:`unimerge.tune`).

    Args:
        config: a search config (YAML path, mapping or :class:`SearchConfig`).
        out_dir: ``OUT``: ``search.json`` (resumed when present), ``best/``, ``report.html``.
        ray_address: a Ray cluster to run on (default: a local Ray with ``workers`` CPUs).
        workers: local Ray CPUs (default: this machine's cores); ``0``: no Ray, one trial at a time.
        progress: called as ``progress("trials", done, budget)``.
        trial_fn: runs one job (default :func:`~unimerge.tune.evaluate.run_job`); it must be
            importable by Ray workers.

    Example:
        >>> result = search("search.yaml", "out/", workers=2)
        >>> result.best["method"], result.test
    """
    cfg, path = _load(config)
    out = Path(out_dir)
    ev = _check(cfg, path, out)
    out.mkdir(parents=True, exist_ok=True)
    spec = cfg.search
    header = {"version": VERSION, "fingerprint": _fingerprint(cfg), "strategy": spec.strategy,
              "objective": spec.objective, "seed": spec.seed, "budget": spec.budget, "tasks": ev.names}  # fmt: skip
    log = _Log(out / "search.json", header)
    if workers == 0:
        execute, close = _inline(trial_fn), _nothing
    else:
        execute, close = _ray(trial_fn, ray_address, workers)
    try:
        _loop(cfg, log, execute, lambda t: job_for(cfg, path, t), progress)
    finally:
        close()
    return _finish(cfg, path, log, out)


def _finish(cfg: SearchConfig, path: Path | None, log: _Log, out: Path) -> SearchResult:
    records = [log.records[i] for i in sorted(log.records)]
    best = _best(records)
    trial = Trial.model_validate({k: best[k] for k in ("method", "params", "per_model")})
    ev = evaluator(cfg.model_dump_json(), str(path.resolve()) if path else None)
    try:
        test = ev.score(trial, "test")
        conf = write_best(cfg, path, trial, out / "best")
    except UnimergeError as err:
        raise MergeError(
            f"Trial {best['index']} scored best, but writing it to {out / 'best'} failed: {err}"
        ) from None
    summary = {"index": best["index"], "objective": best["objective"], "test": test,
               "test_objective": objective(test, cfg.search)}  # fmt: skip
    log.save(best=summary)
    write_report(out / "report.html", records, summary, yaml.safe_dump(conf, sort_keys=False))
    return SearchResult(out, records, best, test)
