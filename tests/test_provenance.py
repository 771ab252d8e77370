"""``unimerge provenance``: exact recovery of a known task-arithmetic merge, the closed-form residual
of a merge with an expert outside the candidates, the blocked statistics against a direct computation,
and bad input through the CLI (one clear paragraph, non-zero exit, nothing written)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _fixtures import save_sharded
from unimerge import merge_state_dicts
from unimerge.cli import app
from unimerge.diagnose import provenance
from unimerge.diagnose.lineage import Normal, present_mask, solve_weights, tensor_normal

runner = CliRunner()
SHAPES = {"layer.0.weight": (8, 16), "layer.0.bias": (16,), "layer.1.weight": (16, 12), "emb": (10, 4)}


def _random(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for n, s in SHAPES.items()}


def _save(tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    save_sharded(tensors, folder)
    return folder


@pytest.fixture()
def world(tmp_path: Path) -> dict[str, Path]:
    """A base, three candidates (base + a random task vector; ``emb`` frozen) and a 0.3 / 0.7 / 0 merge
    made by the task_arithmetic method itself; an int64 buffer that provenance skips."""
    base = _random(0)
    cands = []
    for i in (1, 2, 3):
        tau = _random(10 + i)
        tau["emb"] = torch.zeros(SHAPES["emb"])
        cands.append({n: base[n] + 0.1 * tau[n] for n in SHAPES})
    merged = merge_state_dicts("task_arithmetic", cands, base, weight=[0.3, 0.7, 0.0])
    paths = {"root": tmp_path, "base": _save({**base, "ids": torch.arange(5)}, tmp_path / "base")}
    for i, c in enumerate(cands, 1):
        paths[f"c{i}"] = _save(c, tmp_path / f"c{i}")
    paths["merged"] = _save(merged, tmp_path / "merged")
    return paths


def test_recovers_a_task_arithmetic_merge(world) -> None:
    doc = provenance(world["merged"], world["base"], [world["c1"], world["c2"], world["c3"]])
    weights = [c["weight"] for c in doc["components"]]
    assert weights == pytest.approx([0.3, 0.7, 0.0], abs=1e-6)
    assert [c["present"] for c in doc["components"]] == [True, True, False]
    assert doc["residual"] == pytest.approx(0.0, abs=1e-10)
    assert [c["model"] for c in doc["components"]] == [str(world[k]) for k in ("c1", "c2", "c3")]
    by_name = {t["name"]: t for t in doc["tensors"]}
    assert set(by_name) == set(SHAPES)  # the int64 buffer is skipped
    assert by_name["emb"]["norm"] == 0.0 and by_name["emb"]["residual"] is None  # frozen: contributes 0
    assert by_name["layer.1.weight"]["weights"] == pytest.approx([0.3, 0.7, 0.0], abs=1e-5)
    assert by_name["layer.1.weight"]["shape"] == [16, 12]
    assert doc["warnings"] == []


def _on(lo: int, hi: int, value: float) -> torch.Tensor:
    """A float64 vector of length 60: ``value`` with alternating signs on ``[lo, hi)``, zero elsewhere."""
    t = torch.zeros(60, dtype=torch.float64)
    t[lo:hi] = value * torch.tensor([(-1.0) ** i for i in range(hi - lo)], dtype=torch.float64)
    return t


def test_a_non_candidate_expert_leaves_the_closed_form_residual(tmp_path: Path) -> None:
    """Task vectors on disjoint supports are orthogonal: merging 0.5 t1 + 0.5 tx with tx outside the
    candidates gives weights (0.5, 0) and residual |0.5 tx|² / |0.5 t1 + 0.5 tx|² = |tx|² / (|t1|² + |tx|²)
    = 20·9 / (20·1 + 20·9) = 0.9 for t1 = ±1 and tx = ±3 on 20 entries each."""
    base = torch.randn(60, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t1, t2, tx = _on(0, 20, 1.0), _on(20, 40, 2.0), _on(40, 60, 3.0)
    f = {k: _save({"w": v}, tmp_path / k) for k, v in
         {"base": base, "c1": base + t1, "c2": base + t2, "m": base + 0.5 * t1 + 0.5 * tx}.items()}  # fmt: skip
    doc = provenance(f["m"], f["base"], [f["c1"], f["c2"]])
    assert doc["residual"] == pytest.approx(0.9, rel=1e-9)
    assert [c["weight"] for c in doc["components"]] == pytest.approx([0.5, 0.0], abs=1e-12)
    assert [c["present"] for c in doc["components"]] == [True, False]
    assert doc["merged_zero_fraction"] == 0.0 and "dense" in doc["note"]
    assert doc["merged_norm"] == pytest.approx(0.5 * 200**0.5)


def test_blocked_statistics_equal_the_direct_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(5)
    b, m = torch.randn(7, 9, generator=g), torch.randn(7, 9, generator=g)
    cs = [torch.randn(7, 9, generator=g).to(torch.bfloat16) for _ in range(3)]
    # 63 entries in 7 blocks; the module by its import path (the package's attribute is the function)
    monkeypatch.setattr(importlib.import_module("unimerge.diagnose.lineage"), "BLOCK", 10)
    st = tensor_normal(b, m, cs)
    t = torch.stack([c.double().reshape(-1) - b.double().reshape(-1) for c in cs], dim=1)
    dm = m.double().reshape(-1) - b.double().reshape(-1)
    np.testing.assert_allclose(st.gram, (t.T @ t).numpy(), rtol=1e-12)
    np.testing.assert_allclose(st.cross, (t.T @ dm).numpy(), rtol=1e-12)
    assert st.energy == pytest.approx(float(dm @ dm), rel=1e-12)
    assert st.base_sq == pytest.approx(float(b.double().pow(2).sum()), rel=1e-12)
    b[0, :3] = cs[1][0, :3].float()  # candidate 1 equals the base on 3 entries: not active there
    m[1, :4] = b[1, :4]  # the merge leaves 4 entries at the base's value
    st = tensor_normal(b, m, cs)
    assert st.counts("active").tolist() == [63, 60, 63]
    assert st.counts("dropped").tolist() == [4, 4, 4]
    assert st.dropped_fraction(np.array([True, True, False])) == pytest.approx(8 / 123)
    t = torch.stack([c.double().reshape(-1) - b.double().reshape(-1) for c in cs], dim=1)
    dm = m.double().reshape(-1) - b.double().reshape(-1)
    # the residual from the statistics equals the residual of the fitted vectors
    w = solve_weights(st)
    direct = float((dm - t @ torch.from_numpy(w)).pow(2).sum() / (dm @ dm))
    assert st.residual(w) == pytest.approx(direct, rel=1e-9)


def test_singular_gram_gets_the_minimum_norm_weights() -> None:
    # candidate 2 equals the base (zero column) and candidate 3 repeats candidate 1
    t = np.array([[1.0, 0.0, 1.0], [2.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    m = np.array([2.0, 4.0, 1.0])
    st = Normal(t.T @ t, t.T @ m, float(m @ m), 1.0)
    w = solve_weights(st)
    assert w == pytest.approx([1.0, 0.0, 1.0])  # the total 2 split evenly, nothing on the zero column
    assert st.residual(w) == pytest.approx(1.0 / 21.0)  # the third entry (1) of |m|² = 21


def test_present_rule_by_hand() -> None:
    assert present_mask(np.array([1.0, -0.5, 0.09, 0.1])).tolist() == [True, True, False, True]
    assert present_mask(np.array([0.0, 0.0])).tolist() == [False, False]  # merged == base
    assert present_mask(np.array([1e-4, 0.0])).tolist() == [False, False]  # below the absolute floor
    assert present_mask(np.array([1.0, 0.3]), relative=0.5).tolist() == [True, False]


def test_a_candidate_from_another_base_is_warned_about(world) -> None:
    other = _save(_random(99), world["root"] / "other")  # same shapes, unrelated weights
    doc = provenance(world["merged"], world["base"], [world["c1"], world["c2"], other])
    assert any(str(other) in w and "another base" in w for w in doc["warnings"])
    assert doc["components"][2]["relative_update"] > 1.0


def test_repeated_candidate_is_refused(world) -> None:
    from unimerge.errors import ConfigError

    with pytest.raises(ConfigError, match="given twice"):
        provenance(world["merged"], world["base"], [world["c1"], world["c1"]])


# ----------------------------------------------------------------------------- the CLI


def _cli(world, *cands: str, out: Path | None = None, extra: tuple[str, ...] = ()):
    out = out or world["root"] / "prov.json"
    args = ["provenance", str(world["merged"]), "--base", str(world["base"]), "--candidates",
            *(str(world.get(c, c)) for c in cands), "--out", str(out), *extra]  # fmt: skip
    return runner.invoke(app, args), out


def test_cli_writes_the_json_and_prints_the_table(world) -> None:
    res, out = _cli(world, "c1", "c2", "c3")
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert [round(c["weight"], 6) for c in doc["components"]] == [0.3, 0.7, 0.0]
    assert {"components", "residual", "tensors"} <= set(doc)
    assert "c3" in res.output and "residual" in res.output
    again, _ = _cli(world, "c1", "c2", "c3")  # the file exists now
    assert again.exit_code != 0 and "--force" in again.output
    assert json.loads(out.read_text()) == doc
    forced, _ = _cli(world, "c1", "c2", extra=("--force",))
    assert forced.exit_code == 0, forced.output
    assert len(json.loads(out.read_text())["components"]) == 2


def test_cli_missing_candidate(world) -> None:
    missing = str(world["root"] / "nope")
    res, out = _cli(world, "c1", missing)
    assert res.exit_code == 2
    assert "nope" in res.output and "not found" in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_cli_shape_mismatch_names_the_tensor(world) -> None:
    bad = _random(7)
    bad["layer.1.weight"] = torch.zeros(16, 13)
    _save(bad, world["root"] / "wide")
    res, out = _cli(world, "c1", str(world["root"] / "wide"))
    assert res.exit_code == 2
    assert "'layer.1.weight'" in res.output and "[16, 13]" in res.output and "[16, 12]" in res.output
    assert "wide" in res.output and not out.exists()


def test_cli_missing_tensor_names_it(world) -> None:
    short = {k: v for k, v in _random(8).items() if k != "layer.0.bias"}
    _save(short, world["root"] / "short")
    res, out = _cli(world, str(world["root"] / "short"), "c2")
    assert res.exit_code == 2
    assert "'layer.0.bias'" in res.output and "short" in res.output and not out.exists()


def test_cli_needs_a_candidate(world) -> None:
    res, out = _cli(world)
    assert res.exit_code != 0 and not out.exists()


def test_tensors_outside_the_base_are_ignored_with_a_warning(world) -> None:
    from _fixtures import load_all_tensors

    extra = {**load_all_tensors(world["c2"]), "head.weight": torch.ones(3, 4)}
    _save(extra, world["root"] / "c2head")
    doc = provenance(world["merged"], world["base"], [world["c1"], world["root"] / "c2head", world["c3"]])
    assert [c["weight"] for c in doc["components"]] == pytest.approx([0.3, 0.7, 0.0], abs=1e-6)
    assert (
        len(doc["warnings"]) == 1 and "'head.weight'" in doc["warnings"][0] and "c2head" in doc["warnings"][0]
    )


def test_a_sparsified_merge_is_told_apart_by_its_dropped_entries(tmp_path: Path) -> None:
    """0.5·t1 + 0.5·t2 with the first half of t1's entries dropped (as TIES and DARE drop): 10 of the
    members' 40 changed entries stay at the base. By hand: w1 = <t1, m>/|t1|² = 0.5·10/20 = 0.25,
    w2 = 0.5; the residual is ±0.25 on t1's 20 entries, 20·0.0625 = 1.25, of |m|² = 10·0.25 + 20·1
    = 22.5, so 1/18."""
    base = torch.randn(60, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t1, t2 = _on(0, 20, 1.0), _on(20, 40, 2.0)
    kept = t1.clone()
    kept[:10] = 0.0
    m = 0.5 * kept + 0.5 * t2
    f = {k: _save({"w": v}, tmp_path / k) for k, v in
         {"base": base, "c1": base + t1, "c2": base + t2, "m": base + m}.items()}  # fmt: skip
    doc = provenance(f["m"], f["base"], [f["c1"], f["c2"]])
    assert [c["weight"] for c in doc["components"]] == pytest.approx([0.25, 0.5], abs=1e-12)
    assert doc["residual"] == pytest.approx(1 / 18, rel=1e-9)
    assert doc["merged_zero_fraction"] == pytest.approx(10 / 40)
    assert "sparsifying" in doc["note"]
