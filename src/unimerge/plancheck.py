"""The checks a plan makes on the inputs' headers before any tensor data is read.

One architecture, the same tensor names, agreeing shapes and dtypes (vocabulary mismatches named
first: the most common cause), and no more models than a method merges. Each raises one paragraph
naming the inputs, the tensors and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from unimerge.errors import ConfigError, PlanError
from unimerge.io import Checkpoint, TensorMeta
from unimerge.methods import TensorMethod

__all__ = ["check_architectures", "check_model_count", "check_names", "check_shapes"]

_VOCAB_HINTS = ("embed_tokens", "lm_head", "word_embeddings", "wte", "embed_out", "output.weight")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def check_architectures(refs: Sequence[str], cks: Sequence[Checkpoint]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for ref, ck in zip(refs, cks, strict=True):
        cfg = _read_json(ck.root / "config.json")
        if cfg:
            seen.setdefault((str(cfg.get("model_type")), str(cfg.get("architectures"))), ref)
    if len(seen) > 1:
        kinds = "; ".join(f"{r}: model_type={k[0]}, architectures={k[1]}" for k, r in seen.items())
        raise PlanError(
            f"The inputs are different architectures ({kinds}). Merge only models of one architecture."
        )


def check_names(refs: Sequence[str], metas: Sequence[dict[str, TensorMeta]], ref_idx: int) -> None:
    want = set(metas[ref_idx])
    problems = []
    for ref, m in zip(refs, metas, strict=True):
        missing, extra = sorted(want - set(m)), sorted(set(m) - want)
        if missing or extra:
            problems.append(
                f"{ref}: missing {len(missing)} {missing[:6]}"
                + (f", extra {len(extra)} {extra[:6]}" if extra else "")
            )
    if problems:
        raise PlanError(
            f"Tensor names differ from {refs[ref_idx]}: "
            + "; ".join(problems)
            + ". All models must have the same tensors: check that they share one architecture and size."
        )


def _shape_problem(name: str, entries: Sequence[tuple[str, TensorMeta]], free: bool = False) -> str | None:
    shapes = {m.shape[1:] if free else m.shape for _, m in entries}
    if len(shapes) > 1:
        return f"{name!r} ({', '.join(f'{r}: {list(m.shape)}' for r, m in entries)})"
    floats = {m.dtype.is_floating_point for _, m in entries}
    if len(floats) > 1 or (floats == {False} and len({m.dtype for _, m in entries}) > 1):
        return f"{name!r} has incompatible dtypes {[str(m.dtype) for _, m in entries]}"
    return None


def check_shapes(
    items: Sequence[tuple[str, Sequence[tuple[str, TensorMeta]]]], free: Collection[str] = ()
) -> None:
    """Check every tensor's shapes agree across inputs (but the first dimension of those ``free``:
    vocabulary tensors gathered into one vocabulary); vocabulary mismatches are reported first."""
    problems = [(n, p) for n, e in items if (p := _shape_problem(n, e, n in free)) is not None]
    vocab = [
        (n, e) for n, e in items if any(h in n for h in _VOCAB_HINTS) and _shape_problem(n, e, n in free)
    ]
    if vocab:
        sizes = sorted({m.shape[0] for _, e in vocab for _, m in e if m.shape})
        names = ", ".join(repr(n) for n, _ in vocab)
        raise PlanError(
            f"Tensors {names} have different vocabulary sizes {sizes}: the models use different tokenizers "
            "or resized embeddings. Merge models that share a tokenizer, or resize their embeddings to one "
            "vocabulary first. Details: "
            + "; ".join(p for n, p in problems if any(h in n for h in _VOCAB_HINTS))
        )
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise PlanError(
            "These tensors differ between the inputs, so the models cannot be merged: "
            + "; ".join(p for _, p in problems[:5])
            + more
            + ". Check that all models share one architecture and size."
        )


def check_model_count(info: TensorMethod, sources: Sequence[tuple[str, int]]) -> None:
    """Refuse, before any tensor is read, a method given more models than it merges (slerp: one);
    ``sources``: each output tensor's name and number of merged models."""
    most = info.max_models
    over = next(((name, n) for name, n in sources if most is not None and n > most), None)
    if over is not None:
        raise ConfigError(
            f"Method {info.name!r} merges at most {most} model besides the base, but tensor {over[0]!r} "
            f"has {over[1]}. List one model plus `base_model:` (mergekit: two models, one of "
            "them the base), or use multislerp, karcher or model_stock to merge more."
        )
