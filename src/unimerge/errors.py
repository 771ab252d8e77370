"""One error hierarchy for everything unimerge raises on bad input.

```
UnimergeError                  base: a message a user can act on (file, tensor, fix)
├── ConfigError                the YAML / parameters are wrong (also a ValueError)
├── CheckpointError            an input file is missing, unreadable, corrupt or unsafe
├── PlanError                  inputs disagree: names, shapes, dtypes, vocabulary
└── MergeError                 a merge failed while running (disk full, NaN policy, ...)
```

The CLI prints ``str(error)`` as one paragraph and exits non-zero; no traceback.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "MergeError", "PlanError", "UnimergeError"]


class UnimergeError(Exception):
    """Base class: the message says what is wrong, where, and how to fix it."""


class ConfigError(UnimergeError, ValueError):
    """The merge configuration or a method parameter is invalid."""


class CheckpointError(UnimergeError):
    """An input checkpoint cannot be read safely."""


class PlanError(UnimergeError):
    """The inputs cannot be merged together (names, shapes, dtypes disagree)."""


class MergeError(UnimergeError):
    """The merge failed while running; nothing was written to the output path."""
