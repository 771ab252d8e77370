"""How ``mergekit_parity.py`` compares unimerge's output with mergekit's, per check (see ``parity_cases.py``).

- ``exact``: ``max |u - m| / max |m|`` per tensor (``u``: unimerge, ``m``: mergekit), worst over tensors.
- ``ties``: the same, leaving out the entries whose task-vector magnitude equals a trim boundary value
  of some model. Among equal magnitudes at the boundary mergekit keeps whichever its unstable CPU
  ``argsort`` puts first (an order that depends on the whole tensor, and differs on CUDA); unimerge keeps
  the lowest indices. Those entries are counted, not compared.
- ``bf16``: against mergekit run again on the same inputs with ``dtype: float32`` and the output cast to
  the original dtype: mergekit's algorithm computed in fp32 and rounded once, which is what unimerge
  computes (mergekit's own bf16 run rounds after every step). Every entry within one bf16 ulp.
- ``dare`` / ``della``: the kept fraction (per magnitude-rank quartile for DELLA) within binomial noise.
"""

from __future__ import annotations

import math
from typing import Any

import torch

Tensors = dict[str, torch.Tensor]


def relative_diff(u: torch.Tensor, m: torch.Tensor, skip: torch.Tensor | None = None) -> float:
    """``max |u - m| / max |m|`` in float64 over the entries not in ``skip`` (inf on a NaN)."""
    u64, m64 = u.double(), m.double()
    if bool(torch.isnan(u64).any()) or bool(torch.isnan(m64).any()):
        return math.inf
    scale = float(m64.abs().max()) if m64.numel() else 0.0
    diff = (u64 - m64).abs()
    if skip is not None:
        diff = diff.masked_fill(skip, 0.0)
    worst = float(diff.max()) if diff.numel() else 0.0
    return worst / scale if scale > 0 else worst


def bf16_ulps(u: torch.Tensor, ref: torch.Tensor, skip: torch.Tensor | None = None) -> float:
    """Largest ``|u - ref|`` in units of the bfloat16 spacing at ``ref``, over the entries not in ``skip``.

    The unit is widened by fp32 rounding noise at the tensor's scale (``1e-6 max |ref|``): near 0 the
    bf16 spacing is tiny, and two fp32 computations may leave ``1e-9`` where the exact value is 0.
    """
    if not ref.numel():
        return 0.0
    r = ref.double()
    exponent = torch.floor(torch.log2(r.abs().clamp(min=2.0**-126)))
    unit = 2.0 ** (exponent - 7) + 1e-6 * float(r.abs().max())
    ulps = (u.double() - r).abs() / unit
    return float(ulps.masked_fill(skip, 0.0).max() if skip is not None else ulps.max())


def compare(mk: Tensors, um: Tensors, skip: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Names, shapes, dtypes, the worst relative difference (and its tensor), entries left out."""
    skip = skip or {}
    out: dict[str, Any] = {"max_rel": 0.0, "worst": "", "problems": [], "skipped_differ": 0}
    if set(mk) != set(um):
        out["problems"].append(f"only mergekit: {sorted(set(mk) - set(um))[:6]}")
        out["problems"].append(f"only unimerge: {sorted(set(um) - set(mk))[:6]}")
    for name in sorted(set(mk) & set(um)):
        a, b = um[name], mk[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            out["problems"].append(f"{name}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
            continue
        rel = relative_diff(a, b, skip.get(name))
        if name in skip:
            out["skipped_differ"] += int(((a != b) & skip[name]).sum())
        if rel > out["max_rel"] or not out["worst"]:
            out["max_rel"], out["worst"] = rel, name
    return out


def _boundaries(mag: torch.Tensor, method: str, p: dict[str, Any]) -> list[float]:
    """The magnitudes at which ``method``'s trim of a task vector ``mag`` (flat, float) cuts."""
    n, density = mag.numel(), float(p.get("density", 1.0))
    if density >= 1.0 or n == 0:
        return []
    asc = mag.sort().values
    if method.startswith("breadcrumbs"):
        target, top = int(density * n), int(float(p.get("gamma", 0.01)) * n)
        bot = max(0, n - target - top)
        return [float(asc[i]) for i in {bot - 1, bot, bot + target - 1, bot + target} if 0 <= i < n]
    k = max(1, int(density * n))
    return [float(asc[n - k])]


def trim_tie_entries(
    config: dict[str, Any], base: Tensors, experts: list[Tensors]
) -> dict[str, torch.Tensor]:
    """Per tensor, the entries where some model's ``|task vector|`` equals one of its trim boundaries."""
    method = str(config["merge_method"])
    shared = config.get("parameters") or {}
    out: dict[str, torch.Tensor] = {}
    for name, b in base.items():
        mask = torch.zeros(b.shape, dtype=torch.bool)
        for spec, e in zip(config["models"], experts, strict=True):
            mag = (e[name].float() - b.float()).abs()
            for v in _boundaries(mag.reshape(-1), method, {**shared, **(spec.get("parameters") or {})}):
                mask |= mag == v
        out[name] = mask
    return out


def _z(k: float, n: float, p: float) -> float:
    return (k - n * p) / math.sqrt(max(n * p * (1 - p), 1e-12))


def kept_by_rank(out: Tensors, base: Tensors, expert: Tensors, bins: int) -> dict[str, Any]:
    """Entries kept (``out != base``) per magnitude-rank bin (rank within each row, as DELLA ranks them),
    the sum of normalised ranks per bin, and the worst ``| ||out - base||_1 / ||expert - base||_1 - 1 |``."""
    kept, total, rank_sum = [0.0] * bins, [0.0] * bins, [0.0] * bins
    worst_l1 = 0.0
    for name, b in base.items():
        delta = (expert[name].double() - b.double()).reshape(-1, b.shape[-1])  # (rows, m)
        diff = (out[name].double() - b.double()).reshape(delta.shape)
        rank = delta.abs().argsort(dim=1).argsort(dim=1).double() / max(delta.shape[1] - 1, 1)
        which = (rank * bins).long().clamp(max=bins - 1)
        for k in range(bins):
            sel = (which == k) & (delta != 0)
            kept[k] += float((diff[sel] != 0).sum())
            total[k] += float(sel.sum())
            rank_sum[k] += float(rank[sel].sum())
        l1 = float(delta.abs().sum())
        if l1 > 0:
            worst_l1 = max(worst_l1, abs(float(diff.abs().sum()) / l1 - 1.0))
    return {"kept": kept, "total": total, "rank_sum": rank_sum, "l1_error": worst_l1}


def compare_random(
    check: str, spec: dict[str, Any], mk: Tensors, um: Tensors, base: Tensors, expert: Tensors
) -> tuple[float, dict[str, Any]]:
    """Largest |z| of the kept fractions (each tool against the keep probability, and tool against tool),
    with the per-bin fractions and each tool's L1 rescale error."""
    d = float(spec["density"])
    eps = float(spec.get("epsilon", 0.15)) if check == "della" else 0.0
    bins = 4 if check == "della" else 1
    stats = {tool: kept_by_rank(t, base, expert, bins) for tool, t in (("mergekit", mk), ("unimerge", um))}
    zs, rows = [], []
    for k in range(bins):
        n = stats["mergekit"]["total"][k]
        p = d - eps + 2 * eps * stats["mergekit"]["rank_sum"][k] / n  # mean keep probability in the bin
        km, ku = stats["mergekit"]["kept"][k], stats["unimerge"]["kept"][k]
        zs += [_z(km, n, p), _z(ku, n, p), (ku - km) / math.sqrt(2 * n * p * (1 - p))]
        rows.append(
            {"p": round(p, 4), "mergekit": round(km / n, 4), "unimerge": round(ku / n, 4), "n": int(n)}
        )
    return max(abs(z) for z in zs), {"bins": rows, "l1_error": {t: s["l1_error"] for t, s in stats.items()}}
