"""Data: pinned package archives, dataset loaders, the suites and their tasks.

data/ knows where examples come from and how they are split and tokenised; it knows nothing of
configs, merging or the benchmark's models, and imports only :mod:`unimerge.errors`,
:mod:`unimerge.io` and third-party packages. The config (``data: {suite: NAME}``), data-aware
merges and ``unimerge bench`` all read their examples from here.

- :mod:`~unimerge.data.archives`: pinned, sha256-checked package archives (and the cache layout).
- :mod:`~unimerge.data.datasets`: one loader per dataset, reading straight out of an archive
  (the BIG-bench ones in :mod:`~unimerge.data.datasets_more`; what they share in
  :mod:`~unimerge.data.parsing`).
- :mod:`~unimerge.data.suites`: the benchmark suites and the deterministic split.
- :mod:`~unimerge.data.tasks`: tokenised splits and :class:`TaskData`, what data-aware methods see.
- :mod:`~unimerge.data.choices`: multiple-choice tasks for causal LMs (:class:`ChoiceTask`): checked
  JSONL files and short tasks built from the packaged datasets.
"""

from unimerge.data.archives import Archive, fetch_archive
from unimerge.data.choices import (
    CHOICE_TASKS,
    ChoiceSpec,
    ChoiceTask,
    choice_splits,
    is_choice_jsonl,
    read_choice_jsonl,
    write_choice_jsonl,
)
from unimerge.data.datasets import DATASETS, DatasetSpec, RawDataset, Text, load_dataset
from unimerge.data.suites import SUITES, Suite, TaskSpec, split_indices
from unimerge.data.tasks import Batch, Split, TaskData, batches, make_task

__all__ = [
    "CHOICE_TASKS",
    "DATASETS",
    "SUITES",
    "Archive",
    "Batch",
    "ChoiceSpec",
    "ChoiceTask",
    "DatasetSpec",
    "RawDataset",
    "Split",
    "Suite",
    "TaskData",
    "TaskSpec",
    "Text",
    "batches",
    "choice_splits",
    "fetch_archive",
    "is_choice_jsonl",
    "load_dataset",
    "make_task",
    "read_choice_jsonl",
    "split_indices",
    "write_choice_jsonl",
]
