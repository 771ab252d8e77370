"""Which candidate experts went into a merged model, and with what weight (data-free).

The model: ``merged - base ≈ Σ_i w_i (candidate_i - base)``. Per tensor, ``T`` holds the candidates'
task vectors as columns and ``m`` is the merged model's task vector; the normal-equation statistics
``G = TᵀT`` (n × n), ``Tᵀm`` (n) and ``mᵀm`` are summed in float64 over the model's floating-point
tensors (they are additive), and ``G w = Tᵀm`` is solved once for the whole model (global least
squares; a singular ``G``, e.g. a candidate equal to the base, gets the minimum-norm solution).
The relative residual ``‖m - T w‖² / ‖m‖²`` is what no weighted sum of the candidates explains:
near 0 for a task-arithmetic or linear merge of candidates, large when an expert outside the list
went in, but also when the merge sparsified or rescaled entries (TIES, DARE) or projected
(TSV-M). To tell these apart, the share of the members' changed entries that the merge leaves at
the base's value exactly is counted: a sparsifying merge drops many, a linear one none
(:func:`interpret`). See ``docs/diagnose.md`` ("Provenance") for the recovery study and where it breaks.

``weight`` is the effective coefficient of the candidate's task vector (task arithmetic with
``lambda`` 0.5 and weights 1 and 1 gives 0.5 and 0.5). ``present`` is the decision rule
``|w_i| >= PRESENT_RELATIVE * max_j |w_j|`` and ``|w_i| >= PRESENT_ABSOLUTE``.

Streaming: one tensor name at a time, each model's tensor read once in its stored dtype and turned
into float64 in blocks of ``BLOCK`` entries, so memory is bounded by ``n + 2`` copies of the
largest tensor plus one block per candidate, never a whole model.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from unimerge.errors import ConfigError, PlanError
from unimerge.io.checkpoint import Checkpoint
from unimerge.io.resolve import open_checkpoint
from unimerge.options import Progress

__all__ = [
    "BLOCK",
    "FOREIGN_BASE_RATIO",
    "PRESENT_ABSOLUTE",
    "PRESENT_RELATIVE",
    "RESIDUAL_NOTABLE",
    "SPARSE_FRACTION",
    "Normal",
    "interpret",
    "check_headers",
    "present_mask",
    "provenance",
    "solve_weights",
    "tensor_normal",
]

# A candidate is present when its weight is at least this fraction of the largest weight (in absolute
# value). In the recovery study on text12 (docs/diagnose.md: task arithmetic, TIES, DARE, TSV-M, an outside
# expert; 29 merges) non-members stayed at or below 0.024 of the largest weight and members at or above
# 0.21; 0.1 sits between the two.
PRESENT_RELATIVE = 0.1
# ... and at least this much in absolute value (a merged model equal to the base has no members).
PRESENT_ABSOLUTE = 1e-3
# ‖candidate - base‖ / ‖base‖ above this suggests the candidate was fine-tuned from another base
# (fine-tuning moves a model by a few percent; a different pretraining moves it by about 1).
FOREIGN_BASE_RATIO = 0.5
# A residual below this is "explained" (linear merges of the candidates left below 1e-6 in the study,
# the same saved in bfloat16 0.016; the smallest with an outside expert was 0.10).
RESIDUAL_NOTABLE = 0.05
# A merge that leaves at least this share of the members' changed entries at the base's value has
# sparsified (TIES, DARE, ...): its residual then mixes dropped entries with any missing expert. In the
# study dense merges left exactly 0, TIES and DARE 0.07 to 0.69.
SPARSE_FRACTION = 0.05
BLOCK = 1 << 18  # entries per float64 block (n rows of 2 MB)


@dataclass
class Normal:
    """Additive least-squares statistics of one tensor (or a sum of tensors), all in float64.

    ``gram`` is ``TᵀT`` (n × n), ``cross`` is ``Tᵀm`` (n), ``energy`` is ``mᵀm`` and ``base_sq`` is
    the base's squared norm, for ``T`` the candidates' task vectors and ``m`` the merged one.
    ``active[i]`` counts the entries where candidate ``i`` differs from the base, ``dropped[i]`` those
    of them where the merged model equals the base exactly (dropped by a sparsifying merge)."""

    gram: np.ndarray
    cross: np.ndarray
    energy: float
    base_sq: float
    dropped: np.ndarray | None = None  # (n,) int64; None: zeros
    active: np.ndarray | None = None

    def __add__(self, other: Normal) -> Normal:
        return Normal(self.gram + other.gram, self.cross + other.cross, self.energy + other.energy,
                      self.base_sq + other.base_sq, self.counts("dropped") + other.counts("dropped"),
                      self.counts("active") + other.counts("active"))  # fmt: skip

    def counts(self, which: Literal["dropped", "active"]) -> np.ndarray:
        c = getattr(self, which)
        return np.zeros(len(self.cross), dtype=np.int64) if c is None else np.asarray(c, dtype=np.int64)

    def dropped_fraction(self, members: np.ndarray) -> float:
        """The share of the ``members``' changed entries that the merged model leaves at the base."""
        active = int(self.counts("active")[members].sum())
        return int(self.counts("dropped")[members].sum()) / active if active else 0.0

    @classmethod
    def zeros(cls, n: int) -> Normal:
        return cls(np.zeros((n, n)), np.zeros(n), 0.0, 0.0)

    def residual(self, weights: np.ndarray) -> float | None:
        """``‖m - T w‖² / ‖m‖²`` (``None`` when ``m`` is zero), clamped to ``[0, 1]``-ish rounding."""
        if self.energy <= 0.0:
            return None
        sq = self.energy - 2.0 * float(weights @ self.cross) + float(weights @ self.gram @ weights)
        return max(sq, 0.0) / self.energy


def tensor_normal(base: Tensor, merged: Tensor, candidates: Sequence[Tensor]) -> Normal:
    """The :class:`Normal` statistics of one tensor, computed in float64 blocks (any stored dtype)."""
    n = len(candidates)
    b, m = base.reshape(-1), merged.reshape(-1)
    cs = [c.reshape(-1) for c in candidates]
    gram, cross = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    buf = torch.empty(n, min(BLOCK, b.numel()), dtype=torch.float64)  # task vectors as rows
    energy, base_sq = 0.0, 0.0
    dropped, active = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    for s in range(0, b.numel(), BLOCK):
        tb = b[s : s + BLOCK].double()
        t = buf[:, : tb.numel()]  # (n, block)
        for i, c in enumerate(cs):
            t[i].copy_(c[s : s + BLOCK]).sub_(tb)
        dm = m[s : s + BLOCK].double() - tb  # (block,)
        gram.addmm_(t, t.T)
        cross.addmv_(t, dm)
        energy += float(dm @ dm)
        base_sq += float(tb @ tb)
        moved = t != 0  # (n, block)
        active += moved.sum(dim=1)
        dropped += (moved & (dm == 0)).sum(dim=1)
    return Normal(gram.numpy(), cross.numpy(), energy, base_sq, dropped.numpy(), active.numpy())


def solve_weights(st: Normal) -> np.ndarray:
    """Least-squares weights from the normal equations, Jacobi-scaled (each candidate's column to unit
    norm) and solved by ``lstsq`` with a relative cut-off, so a singular ``G`` (a zero or repeated task
    vector) gets the minimum-norm solution instead of an error; a zero column gets weight 0."""
    d = np.sqrt(np.diag(st.gram))
    scale = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    g = st.gram * np.outer(scale, scale)
    y = np.linalg.lstsq(g, st.cross * scale, rcond=1e-12)[0]
    return np.asarray(y * scale, dtype=np.float64)


def present_mask(weights: np.ndarray, relative: float = PRESENT_RELATIVE) -> np.ndarray:
    """Which candidates count as members (the rule of the module docstring)."""
    a = np.abs(weights)
    top = float(a.max()) if a.size else 0.0
    return np.asarray((a >= relative * top) & (a >= PRESENT_ABSOLUTE), dtype=bool)


@contextlib.contextmanager
def _opened(refs: Sequence[str | Path], allow_pickle: bool) -> Iterator[list[Checkpoint]]:
    cks: list[Checkpoint] = []
    try:
        for ref in refs:
            cks.append(open_checkpoint(ref, allow_pickle=allow_pickle))
        yield cks
    finally:
        for ck in cks:
            ck.close()


def _mismatch(ck: Checkpoint, role: str, name: str, want: tuple[int, ...], base: Checkpoint) -> PlanError:
    meta = ck.tensors().get(name)
    if meta is None:
        return PlanError(
            f"The {role} {ck.ref} has no tensor {name!r}, which the base {base.ref} has (shape "
            f"{list(want)}). Every candidate and the merged model must share the base's architecture: "
            "check that it was fine-tuned from this base, or pass the right --base."
        )
    if meta.shape != want:
        return PlanError(
            f"Tensor {name!r} has shape {list(meta.shape)} in the {role} {ck.ref} but {list(want)} in the "
            f"base {base.ref}: it was made from another base model. Pass the base it was fine-tuned "
            "from, or leave it out of the candidates."
        )
    return PlanError(
        f"Tensor {name!r} is {meta.dtype} in the {role} {ck.ref} but {base.tensors()[name].dtype} in "
        f"the base {base.ref}: a floating-point tensor is needed in every model."
    )


def check_headers(base: Checkpoint, others: Sequence[tuple[str, Checkpoint]]) -> tuple[list[str], list[str]]:
    """The base's floating-point tensor names (all present with its shape in ``others``, else a
    :class:`PlanError` naming the model, tensor and shapes) and warnings about ignored tensors."""
    names = [n for n, meta in base.tensors().items() if meta.dtype.is_floating_point]
    if not names:
        raise PlanError(f"The base {base.ref} has no floating-point tensors to compare.")
    for role, ck in others:
        metas = ck.tensors()
        for name in names:
            meta, want = metas.get(name), base.tensors()[name].shape
            if meta is None or meta.shape != want or not meta.dtype.is_floating_point:
                raise _mismatch(ck, role, name, want, base)
    warnings = []
    for role, ck in others:
        extra = sorted(set(ck.tensors()) - set(base.tensors()))
        if extra:
            warnings.append(f"{len(extra)} tensors of the {role} {ck.ref} are not in the base and were "
                            f"ignored (first: {extra[0]!r}).")  # fmt: skip
    return names, warnings


def _validate(candidates: Sequence[str | Path], relative: float) -> None:
    if not candidates:
        raise ConfigError("Provenance needs at least one candidate model (--candidates A B ...).")
    seen = [str(c) for c in candidates]
    dup = next((c for i, c in enumerate(seen) if c in seen[:i]), None)
    if dup is not None:
        raise ConfigError(f"Candidate {dup} is given twice; list each candidate once.")
    if not 0.0 < relative <= 1.0:
        raise ConfigError(
            f"present threshold {relative} is outside (0, 1]; the default is {PRESENT_RELATIVE}."
        )


def interpret(residual: float | None, zero_fraction: float) -> str:
    """One sentence on what the residual says, given the share of dropped entries (module constants)."""
    if residual is None:
        return "The merged model equals the base: there is nothing to attribute."
    if residual < RESIDUAL_NOTABLE:
        return "The candidates explain the merge: it is a weighted sum of their task vectors."
    if zero_fraction >= SPARSE_FRACTION:
        return (
            f"The merge left {zero_fraction:.0%} of the entries the candidates changed at the base's value "
            f"(a sparsifying merge: TIES, DARE, ...). Its residual {residual:.2f} comes from the dropped "
            "entries as well as from any expert outside the candidates, so it does not show one."
        )
    return (
        f"The merge is dense, yet {residual:.0%} of it is no weighted sum of the candidates: an expert "
        "outside the candidates, a non-linear method (TSV-M, ...), or rounding to a lower precision."
    )


def _tensor_record(name: str, shape: Sequence[int], st: Normal, global_w: np.ndarray) -> dict[str, Any]:
    w = solve_weights(st)
    return {
        "name": name,
        "shape": list(shape),
        "norm": math.sqrt(st.energy),
        "weights": [float(x) for x in w],
        "residual": st.residual(w),
        "residual_global": st.residual(global_w),
    }


def _warn_foreign(total: Normal, refs: Sequence[str]) -> list[str]:
    out = []
    for ref, sq in zip(refs, np.diag(total.gram), strict=True):
        ratio = math.sqrt(sq / total.base_sq) if total.base_sq > 0 else 0.0
        if ratio > FOREIGN_BASE_RATIO:
            out.append(f"Candidate {ref} differs from the base by {ratio:.2f} of the base's norm: it may "
                       "have been fine-tuned from another base model (same shapes), which makes its "
                       "weight meaningless. Check its base.")  # fmt: skip
    return out


def provenance(
    merged: str | Path,
    base: str | Path,
    candidates: Sequence[str | Path],
    *,
    allow_pickle: bool = False,
    progress: Progress | None = None,
    present_relative: float = PRESENT_RELATIVE,
) -> dict[str, Any]:
    """Estimate which ``candidates`` went into ``merged`` (all fine-tuned from ``base``) and with what
    weight, by least squares of the merged task vector on the candidates' (module docstring).

    Returns ``{merged, base, components: [{model, weight, present, norm, relative_update}], residual,
    note, merged_norm, merged_zero_fraction, tensors: [{name, shape, norm, weights, residual,
    residual_global}], settings, warnings, seconds}``: ``note`` says what the residual means (see
    :func:`interpret`); per tensor, ``weights`` and ``residual`` are that tensor's own fit and
    ``residual_global`` its residual under the model's weights.

    Raises:
        CheckpointError: a model is missing or unreadable.
        PlanError: a tensor of the base is missing, or has another shape, in a candidate or the merged model.
        ConfigError: no candidates, a repeated candidate, or a threshold outside (0, 1].

    Example:
        >>> doc = provenance("merged/", "base/", ["math/", "code/", "chat/"])
        >>> [(c["model"], round(c["weight"], 2), c["present"]) for c in doc["components"]], doc["residual"]
    """
    start = time.perf_counter()
    _validate(candidates, present_relative)
    with _opened([base, merged, *candidates], allow_pickle) as cks:
        b_ck, m_ck, c_cks = cks[0], cks[1], cks[2:]
        roles = [("merged model", m_ck), *(("candidate", c) for c in c_cks)]
        names, warnings = check_headers(b_ck, roles)
        per_tensor = list(_stream(b_ck, m_ck, c_cks, names, progress))
        refs = [c.ref for c in c_cks]
        b_ref, m_ref = b_ck.ref, m_ck.ref
    return _document(per_tensor, refs, (m_ref, b_ref), present_relative,
                     warnings, time.perf_counter() - start)  # fmt: skip


def _stream(
    base: Checkpoint,
    merged: Checkpoint,
    candidates: Sequence[Checkpoint],
    names: Sequence[str],
    progress: Progress | None,
) -> Iterator[tuple[str, tuple[int, ...], Normal]]:
    """Each tensor's :class:`Normal` statistics, one tensor name at a time."""
    for done, name in enumerate(names, 1):
        st = tensor_normal(base.read(name), merged.read(name), [c.read(name) for c in candidates])
        yield name, base.tensors()[name].shape, st
        if progress:
            progress("provenance", done, len(names))


def _document(
    per_tensor: Sequence[tuple[str, tuple[int, ...], Normal]],
    refs: Sequence[str],
    merged_base: tuple[str, str],
    relative: float,
    warnings: list[str],
    seconds: float,
) -> dict[str, Any]:
    total = sum((st for _, _, st in per_tensor), Normal.zeros(len(refs)))
    warnings = warnings + _warn_foreign(total, refs)
    w = solve_weights(total)
    present = present_mask(w, relative)
    norms = np.sqrt(np.diag(total.gram))
    base_norm = math.sqrt(total.base_sq)
    components = [
        {
            "model": ref,
            "weight": float(w[i]),
            "present": bool(present[i]),
            "norm": float(norms[i]),
            "relative_update": float(norms[i] / base_norm) if base_norm > 0 else None,
        }
        for i, ref in enumerate(refs)
    ]
    residual = total.residual(w)
    zero_fraction = total.dropped_fraction(present)
    return {
        "merged": merged_base[0],
        "base": merged_base[1],
        "components": components,
        "residual": residual,
        "note": interpret(residual, zero_fraction),
        "merged_norm": math.sqrt(total.energy),
        "merged_zero_fraction": zero_fraction,
        "tensors": [_tensor_record(name, shape, st, w) for name, shape, st in per_tensor],
        "settings": {
            "present_relative": relative,
            "present_absolute": PRESENT_ABSOLUTE,
            "residual_notable": RESIDUAL_NOTABLE,
            "sparse_fraction": SPARSE_FRACTION,
        },
        "warnings": warnings,
        "seconds": seconds,
    }
