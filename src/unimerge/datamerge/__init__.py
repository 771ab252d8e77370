"""Data-aware merges from a config: ``unimerge merge CONFIG OUT`` with a ``data:`` section.

```
config (data: suite | files)  ->  data.py      one TaskSource per merged model (tokenised on the fly)
HF folders                    ->  models.py    body module, heads, features (transformers, lazily)
regmean / fisher              ->  sidecars.py  per-expert statistics, computed once, kept next to each expert
                              ->  stream.py    merged tensor by tensor from checkpoints + sidecars
other data-aware methods      ->  run.py       in memory on a MergeProblem, written with save_merged
```

:func:`run_data_merge` runs one; :func:`unimerge.run_merge` (which the CLI calls) hands every
data-aware method's config to :class:`DataAware`.
"""

from __future__ import annotations

from unimerge.datamerge.run import DataAware, run_data_merge

__all__ = ["DataAware", "run_data_merge"]
