"""The README.md model card written next to a merged model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from unimerge.plan import MergePlan

__all__ = ["model_card"]


def model_card(plan: MergePlan, hashes: Mapping[str, str]) -> str:
    """Markdown naming the method, its parameters, the inputs and the sha256 of every input file."""
    cfg = plan.config
    info = plan.method
    n_params = sum(j.numel for j in plan.jobs)
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, unimerge]",
        "---",
        f"# {cfg.name or 'Merged model'}",
        "",
        f"Merged with [unimerge](https://pypi.org/project/unimerge/) using **{info.name}** "
        f"({info.family}; paper: {info.paper}).",
        f"{len(plan.jobs)} tensors, {n_params:,} parameters.",
        "",
        "## Inputs",
        "",
        "| role | model |",
        "|---|---|",
    ]
    base = plan.checkpoints[plan.base].ref if plan.base is not None else None
    for ck in plan.checkpoints:
        lines.append(f"| {'base' if ck.ref == base else 'model'} | `{ck.ref}` |")
    lines += ["", "## Input files (sha256)", "", "| file | sha256 |", "|---|---|"]
    lines += [f"| `{f}` | `{h}` |" for f, h in sorted(hashes.items())]
    dump = cfg.model_dump(exclude_none=True, exclude_defaults=True)
    dump["merge_method"] = cfg.merge_method
    lines += [
        "",
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump(dump, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
