"""A LoRA adapter extracted from a full fine-tune: truncated SVD of ``finetuned - base`` per weight.

The idea of mergekit's ``mergekit-extract-lora`` (and of LoRA-SVD extraction generally): for every
2-d weight the fine-tune changed, the best rank-``r`` approximation of the difference (Eckart-Young)
becomes that module's ``B A`` (scale 1, ``lora_alpha = r``). Differences are computed in float32, so
bfloat16 and float16 checkpoints work. Tensors are read one pair at a time; the factors (adapter
sized) are kept until the folder is written. Embeddings (a 2-d weight whose module name holds
``embed``, or GPT-2's ``wte``/``wpe``) become PEFT embedding LoRA (``lora_embedding_A/B``); other
weights are taken as ``nn.Linear`` weights stored ``(out, in)``. What LoRA cannot carry (changed 1-d
tensors such as biases and norms, non-float tensors) is listed in the report, not written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unimerge.errors import ConfigError, PlanError
from unimerge.io.atomic import exists_error
from unimerge.io.checkpoint import Checkpoint, TensorMeta
from unimerge.io.resolve import check_output_outside, open_checkpoint
from unimerge.lora.adapter import LoraFactors, save_peft_adapter
from unimerge.lora.svd import check_rank, truncate

__all__ = ["ExtractResult", "extract_lora", "is_embedding"]

_EMBEDDING_NAMES = frozenset({"wte", "wpe"})


@dataclass
class ExtractResult:
    """What :func:`extract_lora` wrote: per module its rank and relative Frobenius error, and what it left out."""

    out_dir: Path
    ranks: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    unchanged: int = 0
    left_out: list[dict[str, Any]] = field(default_factory=list)  # changed tensors LoRA cannot carry
    seconds: float = 0.0

    def report(self) -> dict[str, Any]:
        """JSON-able summary (written beside the adapter as ``extraction.json``)."""
        rows = [{"module": m, "rank": self.ranks[m], "relative_error": self.errors[m]} for m in self.ranks]
        return {"modules": rows, "unchanged_tensors": self.unchanged, "not_extracted": self.left_out}


def is_embedding(module: str) -> bool:
    """Whether a 2-d weight's module is taken as an embedding (name holds ``embed``, or ``wte``/``wpe``)."""
    last = module.rsplit(".", 1)[-1]
    return "embed" in last or last in _EMBEDDING_NAMES


def _pairs(base: Checkpoint, tuned: Checkpoint) -> list[tuple[TensorMeta, TensorMeta]]:
    """Tensors of both checkpoints, by name, shapes checked (headers only)."""
    b, t = base.tensors(), tuned.tensors()
    missing = sorted(set(b) ^ set(t))
    if missing:
        raise PlanError(
            f"{base.ref} and {tuned.ref} hold different tensors (e.g. {', '.join(missing[:5])}); extract an "
            "adapter from a fine-tune of this very base model."
        )
    for name, meta in b.items():
        if meta.shape != t[name].shape:
            raise PlanError(
                f"Tensor {name!r} is {list(meta.shape)} in {base.ref} but {list(t[name].shape)} in {tuned.ref}: "
                "they are different architectures (or the vocabulary was resized)."
            )
    return [(meta, t[name]) for name, meta in b.items()]


def _candidate(meta: TensorMeta) -> bool:
    return len(meta.shape) == 2 and meta.dtype.is_floating_point and meta.name.endswith(".weight")


def _extract_one(
    result: ExtractResult, factors: dict[str, LoraFactors], b: Checkpoint, t: Checkpoint,
    meta: TensorMeta, rank: int | None, energy: float | None,
) -> None:  # fmt: skip
    w0, w1 = b.read(meta.name), t.read(meta.name)
    if torch.equal(w0, w1):
        result.unchanged += 1
        return
    if not _candidate(meta):
        why = (
            "not a float tensor"
            if not meta.dtype.is_floating_point
            else f"{len(meta.shape)}-d, not a weight matrix"
        )
        result.left_out.append({"tensor": meta.name, "shape": list(meta.shape), "reason": why})
        return
    module = meta.name.removesuffix(".weight")
    emb = is_embedding(module)
    delta = w1.float() - w0.float()  # (out, in); (num, dim) for an embedding
    f, err = truncate(delta, rank, energy, transpose=emb, embedding=emb)
    factors[module], result.ranks[module], result.errors[module] = f, f.rank, err


def _check_request(
    rank: int | None, energy: float | None, out_dir: Path, inputs: list[str], force: bool
) -> None:
    if (rank is None) == (energy is None):
        raise ConfigError("Give exactly one of --rank R or --energy E (a fraction in (0, 1]).")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ConfigError(
            f"--energy is the fraction of squared singular values kept, in (0, 1]; got {energy}."
        )
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be a positive integer, got {rank}.")
    check_output_outside(out_dir, inputs)
    if out_dir.exists() and not force:
        raise exists_error(out_dir)


def extract_lora(
    base: str | Path,
    finetuned: str | Path,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    force: bool = False,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExtractResult:
    """Extract a PEFT LoRA adapter of ``finetuned - base`` into ``out`` (plus ``extraction.json``).

    Exactly one of ``rank`` (every module's rank, at most ``min(out, in)`` of every weight) and
    ``energy`` (per module, the fewest singular values holding that fraction of ``|dW|_F^2``).

    Raises:
        ConfigError: Neither or both of rank/energy, a rank too large for a weight, an output inside an input.
        MergeError: ``out`` exists (without ``force``).
        CheckpointError, PlanError: Unreadable inputs, or checkpoints of different architectures.
    """
    start = time.perf_counter()
    out_dir = Path(out)
    _check_request(rank, energy, out_dir, [str(base), str(finetuned)], force)
    with (
        open_checkpoint(base, allow_pickle=allow_pickle) as b,
        open_checkpoint(finetuned, allow_pickle=allow_pickle) as t,
    ):
        pairs = _pairs(b, t)
        if rank is not None:
            for meta, _ in pairs:
                if _candidate(meta):
                    check_rank(rank, meta.name.removesuffix(".weight"), meta.shape)
        result, factors = ExtractResult(out_dir), dict[str, LoraFactors]()
        for i, (meta, _) in enumerate(pairs):
            _extract_one(result, factors, b, t, meta, rank, energy)
            if progress:
                progress(i + 1, len(pairs))
    if not factors:
        raise PlanError(
            f"{finetuned} differs from {base} in no 2-d weight, so there is no adapter to extract"
            + (
                f" (changed: {', '.join(e['tensor'] for e in result.left_out[:5])})."
                if result.left_out
                else "."
            )
        )
    report = json.dumps(result.report(), indent=2)
    save_peft_adapter(out_dir, factors, str(base), dtype=dtype, exists="replace" if force else "error",
                      extra_files={"extraction.json": report})  # fmt: skip
    result.seconds = time.perf_counter() - start
    return result
