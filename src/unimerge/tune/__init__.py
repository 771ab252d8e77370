"""Method and hyperparameter search: ``unimerge search CONFIG OUT``, trials on Ray.

```
config.py      SearchConfig: models, data:, search: {methods, budget, strategy, objective, seed, ...}
space.py       the space from the registry: method choice, parameters within their bounds, per model
strategies.py  grid | random | cma | tpe, asked and told in batches, deterministic given the seed
evaluate.py    one trial: a merge config, merged in memory, scored per task with each expert's head
causal.py      or, for causal LMs, by the log-likelihood of each answer choice (choice JSONL files)
jobs.py        a trial as plain data for a Ray task, and the evaluator each process keeps
run.py         the loop (Ray tasks), OUT/search.json (resumable), OUT/best/, OUT/report.html
```

This package sits above :mod:`unimerge.execute`, :mod:`unimerge.datamerge` and :mod:`unimerge.methods`;
nothing below imports it.

``unimerge.search(CONFIG, OUT, ...)`` is :func:`unimerge.tune.search`. The package is not named
``search``: importing a subpackage ``unimerge.search`` would replace that function on the parent package.
"""

from __future__ import annotations

from unimerge.tune.config import SearchConfig, SearchSpec, load_search_config, parse_search_config
from unimerge.tune.run import SearchResult, objective, search
from unimerge.tune.space import SearchSpace, Trial, build_space

__all__ = [
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "SearchSpec",
    "Trial",
    "build_space",
    "load_search_config",
    "objective",
    "parse_search_config",
    "search",
]
