"""One error hierarchy for everything unimerge raises on bad input.

```
UnimergeError                  base: a message a user can act on (file, tensor, fix)
├── ConfigError                the YAML / parameters are wrong (also a ValueError)
├── CheckpointError            an input file is missing, unreadable, corrupt or unsafe
├── PlanError                  inputs disagree: names, shapes, dtypes, vocabulary
├── MergeError                 a merge failed while running (disk full, NaN policy, ...)
└── AlignError                 a model's permutation groups cannot be derived or applied (align/)
```

The CLI prints ``str(error)`` as one paragraph and exits non-zero; no traceback.
"""

from __future__ import annotations

from pydantic import ValidationError

__all__ = [
    "AlignError",
    "CheckpointError",
    "ConfigError",
    "MergeError",
    "PlanError",
    "UnimergeError",
    "describe_invalid",
]


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


class AlignError(UnimergeError):
    """A model's permutation spec cannot be derived (untraceable model) or does not fit its tensors."""


def describe_invalid(err: ValidationError, where: str, kind: str, docs: str) -> str:
    """One paragraph for a config pydantic rejected: ``{where}invalid {kind}: loc: message; ...``,
    with value errors' own message and unknown keys pointed at ``docs``."""
    msgs = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = str(e.get("ctx", {}).get("error", e["msg"])) if e["type"] == "value_error" else e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown key (check its spelling; see {docs} for every key)"
        msgs.append(f"{loc}: {msg}" if loc else msg)
    return f"{where}invalid {kind}: " + "; ".join(msgs)
