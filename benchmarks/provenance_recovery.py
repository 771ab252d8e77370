"""How well does ``unimerge provenance`` recover known merge recipes? The recovery study of issue 13.

On the text12 benchmark's real experts (MiniLM-L6 encoders fine-tuned one per task, read from the
cache, never written), merges with known recipes are built in memory with
:func:`unimerge.merge_state_dicts`, each written to a temporary safetensors folder and given to
:func:`unimerge.diagnose.provenance` with every expert as a candidate:

- ``task_arithmetic``: random subsets (2-6 experts), random weights in [0.2, 1], lambda 1 or 0.5;
- ``ties`` at density 0.5 and 0.2 (weights 1, disjoint mean);
- ``dare_linear`` at density 0.5, 0.3 and 0.1 (random weights, seeded drops, rescaled by 1/density);
- ``tsv_m`` (weights 1, alpha 1, rank 1/T per task);
- ``task_arithmetic`` with a non-candidate: one member is held out of the candidate list;
- ``task_arithmetic`` saved in bfloat16 (the candidates and the base stay float32).

Per recipe: membership accuracy (``present`` right, over all candidates), false-positive and
false-negative rates, the mean absolute weight error of members (against the nominal effective
coefficient ``lambda * weight``, for the linear recipes only), the residual, the share of the
members' changed entries the merge left at the base (``dropped``), and the relative weights
(``|w| / max |w|``) of the weakest member and the strongest non-member, which is what the
``PRESENT_RELATIVE`` threshold has to separate.

Writes ``OUT/recovery.json`` and prints a markdown table. Runs on one CPU thread at low priority.

Usage::

    nice -n 19 python benchmarks/provenance_recovery.py --cache /tmp/t12cache --out /tmp/provrecovery
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from unimerge import merge_state_dicts
from unimerge.diagnose import provenance
from unimerge.diagnose.lineage import PRESENT_RELATIVE
from unimerge.io.atomic import atomic_write_text

LINEAR = {"task_arithmetic", "dare_linear", "noncandidate", "bf16"}


@dataclass
class Recipe:
    """One merge: its method, members (indices into the experts), per-member weights and parameters."""

    label: str
    method: str
    members: list[int]
    weights: list[float]
    params: dict[str, Any] = field(default_factory=dict)
    held_out: int | None = None  # a member left out of the candidate list
    dtype: torch.dtype = torch.float32  # the merged model's stored dtype

    def nominal(self) -> list[float] | None:
        """The effective coefficient of each member's task vector, where the recipe defines one."""
        if self.label.split(" ")[0] not in LINEAR:
            return None
        lam = float(self.params.get("lambda", 1.0))
        return [lam * w for w in self.weights]


def _recipes(n: int, seed: int) -> list[Recipe]:
    rng = np.random.default_rng(seed)

    def subset(lo: int, hi: int) -> list[int]:
        return sorted(rng.choice(n, size=int(rng.integers(lo, hi + 1)), replace=False).tolist())

    def weights(k: int) -> list[float]:
        return [round(float(x), 3) for x in rng.uniform(0.2, 1.0, size=k)]

    out: list[Recipe] = []
    for i in range(6):
        m = subset(2, 6)
        out.append(
            Recipe(
                "task_arithmetic", "task_arithmetic", m, weights(len(m)), {"lambda": 1.0 if i < 3 else 0.5}
            )
        )
    for density in (0.5, 0.2):
        for _ in range(3):
            m = subset(3, 5)
            out.append(Recipe(f"ties d={density}", "ties", m, [1.0] * len(m), {"density": density}))
    for density, count in ((0.5, 3), (0.3, 3), (0.1, 2)):
        for _ in range(count):
            m = subset(3, 5)
            out.append(
                Recipe(f"dare_linear d={density}", "dare_linear", m, weights(len(m)), {"density": density})
            )
    for _ in range(3):
        m = subset(3, 5)
        out.append(Recipe("tsv_m", "tsv_m", m, [1.0] * len(m)))
    for _ in range(4):
        m = subset(3, 4)
        out.append(
            Recipe("noncandidate (TA)", "task_arithmetic", m, weights(len(m)), held_out=int(rng.choice(m)))
        )
    for _ in range(2):
        m = subset(2, 6)
        out.append(Recipe("bf16 (TA)", "task_arithmetic", m, weights(len(m)), dtype=torch.bfloat16))
    return out


def _merge(
    r: Recipe, experts: Sequence[dict[str, torch.Tensor]], base: dict[str, torch.Tensor], seed: int
) -> dict[str, torch.Tensor]:
    params: dict[str, Any] = {**r.params, "weight": r.weights}
    return merge_state_dicts(r.method, [experts[i] for i in r.members], base, seed=seed, **params)


def _score(r: Recipe, doc: dict[str, Any], candidates: list[int]) -> dict[str, Any]:
    w = np.array([c["weight"] for c in doc["components"]])
    present = np.array([c["present"] for c in doc["components"]])
    truth = np.array([i in r.members for i in candidates])
    rel = np.abs(w) / max(float(np.abs(w).max()), 1e-30)
    nominal = r.nominal()
    mae = None
    if nominal is not None:
        want = dict(zip(r.members, nominal, strict=True))
        errs = [abs(w[j] - want[i]) for j, i in enumerate(candidates) if i in want]
        mae = float(np.mean(errs))
    return {
        "accuracy": float((present == truth).mean()),
        "fp": float((present & ~truth).sum() / max((~truth).sum(), 1)),
        "fn": float((~present & truth).sum() / max(truth.sum(), 1)),
        "mae": mae,
        "residual": doc["residual"],
        "zero_fraction": doc["merged_zero_fraction"],
        "note": doc["note"],
        "weakest_member": float(rel[truth].min()) if truth.any() else None,
        "strongest_nonmember": float(rel[~truth].max()) if (~truth).any() else None,
        "weights": w.tolist(),
        "present": present.tolist(),
    }


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _table(rows: list[dict[str, Any]]) -> str:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    lines = [
        "| recipe | merges | membership acc. | false pos. | false neg. | weight MAE (members) | residual | dropped "
        "| weakest member (rel.) | strongest non-member (rel.) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lab in labels:
        rs = [r for r in rows if r["label"] == lab]
        wm = [r["weakest_member"] for r in rs if r["weakest_member"] is not None]
        sn = [r["strongest_nonmember"] for r in rs if r["strongest_nonmember"] is not None]
        res = [r["residual"] for r in rs]
        lines.append(
            f"| {lab} | {len(rs)} | {_fmt(_mean([r['accuracy'] for r in rs]))} | {_fmt(_mean([r['fp'] for r in rs]))} "
            f"| {_fmt(_mean([r['fn'] for r in rs]))} | {_fmt(_mean([r['mae'] for r in rs]), 4)} "
            f"| {_fmt(min(res))}–{_fmt(max(res))} | {_fmt(_mean([r['zero_fraction'] for r in rs]), 2)} | {_fmt(min(wm) if wm else None)} | {_fmt(max(sn) if sn else None)} |"
        )
    return "\n".join(lines)


def _load(cache: Path) -> tuple[list[str], list[dict[str, torch.Tensor]], Path, list[Path]]:
    folders = sorted(
        p for p in (cache / "experts").iterdir() if (p / "encoder" / "model.safetensors").exists()
    )
    bases = sorted((cache / "models").glob("all-minilm-l6-v2-*"))
    if not folders or not bases:
        raise SystemExit(f"No text12 experts or base encoder under {cache} (nothing is trained here).")
    names = [p.name.rsplit("-", 1)[0] for p in folders]
    encoders = [p / "encoder" for p in folders]
    return names, [load_file(str(e / "model.safetensors")) for e in encoders], bases[0], encoders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/t12cache"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="Run only the first N recipes (smoke test).")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names, experts, base_dir, encoders = _load(args.cache)
    base_all = load_file(str(base_dir / "model.safetensors"))
    base = {k: base_all[k] for k in experts[0]}  # the experts' tensors (the int buffer stays out)
    rows: list[dict[str, Any]] = []
    recipes = _recipes(len(experts), args.seed)[: args.limit]
    with tempfile.TemporaryDirectory(prefix="provrecovery-", dir="/tmp") as tmp:
        for k, r in enumerate(recipes):
            t0 = time.perf_counter()
            merged = _merge(r, experts, base, seed=args.seed + k)
            folder = Path(tmp) / f"m{k}"
            folder.mkdir()
            save_file(
                {n: t.to(r.dtype).contiguous() for n, t in merged.items()}, str(folder / "model.safetensors")
            )
            del merged
            cands = [i for i in range(len(experts)) if i != r.held_out]
            t1 = time.perf_counter()
            doc = provenance(folder, base_dir, [encoders[i] for i in cands])
            t2 = time.perf_counter()
            shutil.rmtree(folder)
            row = {"label": r.label, "method": r.method, "members": [names[i] for i in r.members],
                   "weights_in": r.weights, "params": r.params,
                   "held_out": None if r.held_out is None else names[r.held_out],
                   "candidates": [names[i] for i in cands], **_score(r, doc, cands),
                   "merge_seconds": t1 - t0, "provenance_seconds": t2 - t1}  # fmt: skip
            rows.append(row)
            print(f"[{k + 1}/{len(recipes)}] {r.label}: acc {row['accuracy']:.3f} residual {row['residual']:.4f} "
                  f"({t2 - t1:.1f} s)", flush=True)  # fmt: skip
    table = _table(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.processor() or platform.machine(),
            "torch_threads": 1, "present_relative": PRESENT_RELATIVE, "experts": names, "seed": args.seed}  # fmt: skip
    atomic_write_text(
        args.out / "recovery.json", json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2)
    )
    print(f"wrote {args.out / 'recovery.json'}")


if __name__ == "__main__":
    main()
