"""The public entry points that take any merge config: :func:`run_merge` and :func:`check_merge`.

A config whose models are PEFT LoRA adapters (or that has ``output:`` or ``combination_type:``) is
merged at the update level by :mod:`unimerge.lora`; every other config goes to
:mod:`unimerge.execute` (the streaming engine, or forward passes for a data-aware method). The choice
is made here, one level above both, because :mod:`unimerge.lora` builds on the pieces below
:mod:`unimerge.execute` (config, core, io, the method registry) and a lower package must not import a
higher one. So ``unimerge.run_merge``, ``unimerge.check_merge`` and the ``unimerge merge`` /
``unimerge validate`` commands behave the same for every config; ``unimerge.execute.run_merge`` is
the whole-model engine alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unimerge import execute
from unimerge.align.run import check_aligned_merge, has_align, run_aligned_merge
from unimerge.config import MergeConfig
from unimerge.lora.run import check_adapter_merge, is_adapter_config, run_adapter_merge
from unimerge.options import Check, MergeResult, Progress, RunOptions

__all__ = ["check_merge", "run_merge"]

ConfigLike = MergeConfig | str | Path | Mapping[str, Any]


def check_merge(config: ConfigLike, out_dir: str | Path, options: RunOptions = RunOptions()) -> Check:
    """Every check a merge makes before reading tensor data (or running a forward pass), as rows.

    For an adapter config the rows are its plan: adapters, modules, ranks and each module's output rank.

    Example:
        >>> for label, value in check_merge("ties.yaml", "out/").rows: print(label, value)
    """
    if is_adapter_config(config):  # first: a `combination_type:` config is no MergeConfig
        return check_adapter_merge(config, out_dir, options)
    if has_align(config):  # `align:` permutes whole models into one basis first (unimerge.align.run)
        return check_aligned_merge(config, out_dir, options)
    return execute.check_merge(config, out_dir, options)


def run_merge(
    config: ConfigLike,
    out_dir: str | Path,
    options: RunOptions = RunOptions(),
    progress: Progress | None = None,
) -> MergeResult:
    """Check and run a merge config (a path to YAML, a mapping, or a :class:`MergeConfig`).

    Whole models: planned from the inputs' headers and streamed tensor by tensor (a data-aware method,
    a config with ``data:``, runs forward passes); ``progress`` is called as ``progress(what, done,
    total)``. PEFT adapters: merged module by module at the update level (:mod:`unimerge.lora`),
    writing a PEFT adapter or a dense folder (``progress`` called per module); its per-module report
    is ``merge_report.json``.

    Example:
        >>> run_merge("ties.yaml", "out/", RunOptions(threads=4))
    """
    if is_adapter_config(config):
        return run_adapter_merge(config, out_dir, options, progress)[0]
    if has_align(config):
        return run_aligned_merge(config, out_dir, options, progress)
    return execute.run_merge(config, out_dir, options, progress)
