"""One trial as a job: what a Ray task (or the search's own process) runs.

:func:`evaluator` opens a search's models and data once per process (a Ray worker keeps them
between trials): heads and labelled text (:class:`~unimerge.tune.evaluate.Evaluator`), or causal LMs
and choice files (:class:`~unimerge.tune.causal.CausalEvaluator`). :func:`job_for` packs a trial as
plain data and :func:`run_job` scores it on validation.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

from unimerge.tune.causal import build_causal_evaluator, is_causal
from unimerge.tune.config import SearchConfig
from unimerge.tune.evaluate import Scorer, build_evaluator
from unimerge.tune.space import Trial

__all__ = ["evaluator", "job_for", "run_job"]


@functools.lru_cache(maxsize=1)
def evaluator(config_json: str, config_path: str | None) -> Scorer:
    """The search's evaluator, once per process for the same config."""
    path = Path(config_path) if config_path else None
    cfg = SearchConfig.model_validate_json(config_json, context={"config_dir": path.parent if path else None})
    if is_causal(cfg, path.resolve().parent if path else None):
        return build_causal_evaluator(cfg, path)
    return build_evaluator(cfg, path)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One trial (``job``: ``config`` JSON, ``config_path``, ``trial``): ``{"scores", "seconds"}``.

    This is what a Ray task runs; errors propagate (the search records the trial as failed).
    """
    ev = evaluator(job["config"], job["config_path"])
    start = time.perf_counter()
    scores = ev.score(Trial.model_validate(job["trial"]), "validation")
    return {"scores": scores, "seconds": round(time.perf_counter() - start, 3)}


def job_for(cfg: SearchConfig, config_path: Path | None, trial: Trial) -> dict[str, Any]:
    """The job :func:`run_job` runs for ``trial`` (plain data: it travels to Ray workers)."""
    return {
        "config": cfg.model_dump_json(),
        "config_path": str(config_path.resolve()) if config_path else None,
        "trial": json.loads(trial.model_dump_json()),
    }
