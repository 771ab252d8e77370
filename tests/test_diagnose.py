"""``unimerge diagnose``: every statistic against a hand-computed case, sums against the concatenated
computation, the CLI on tiny checkpoints, and bad input (clear error, nothing written)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from _fixtures import load_all_tensors, make_tiny_llama
from unimerge.cli import app
from unimerge.diagnose import DiagnoseOptions, SubspaceSettings, diagnose, diagnose_models, summary_scores
from unimerge.diagnose.stats import (
    chance_overlap,
    effective_rank,
    energy_rank,
    power_tail,
    subspace_overlap,
    summarize,
    tensor_stats,
    top_singular,
)
from unimerge.diagnose.verdict import verdict

runner = CliRunner()


def A(x: object) -> np.ndarray:
    """A nested list as a float array (``None`` -> NaN), for ``pytest.approx``."""
    return np.array(x, dtype=float)


def _summary(
    tau: list[list[float]] | torch.Tensor, base: torch.Tensor | None = None, top_k: float = 1.0
) -> dict:
    t = torch.as_tensor(tau, dtype=torch.float32).clone()
    b = torch.ones(t.shape[1:]) if base is None else base
    return summarize(tensor_stats(t, b, top_k=top_k))


# ----------------------------------------------------------------------------- direction


def test_cosine_by_hand() -> None:
    s = _summary([[1, 0, 0, 1], [1, 1, 0, 0]])
    assert A(s["cosine"]) == pytest.approx(A([[1.0, 0.5], [0.5, 1.0]]))
    assert s["norms"] == pytest.approx([math.sqrt(2), math.sqrt(2)])
    assert s["cosine"][0][0] == 1.0
    assert _summary([[1, 2], [-2, -4]])["cosine"][0][1] == pytest.approx(-1.0)


TAU3 = [[1.0, -1.0, 2.0, 0.0], [-2.0, -1.0, 1.0, 0.0], [0.5, 3.0, 0.0, 0.0]]


def test_sign_conflicts_by_hand() -> None:
    s = _summary(TAU3)
    # pairs: (1,2) both non-zero at 0,1,2, opposite at 0; (1,3) at 0,1, opposite at 1; (2,3) at 0,1, opposite at both
    assert A(s["sign_conflict"]) == pytest.approx(A([[0, 1 / 3, 1 / 2], [1 / 3, 0, 1.0], [1 / 2, 1.0, 0]]))
    assert s["sign_conflict_all"] == s["sign_conflict"]
    # sums [-0.5, 1, 3, 0] elect [-, +, +, +]: entry 0 (tau1, tau3 disagree) and 1 (tau1, tau2) conflict;
    # entry 2 agrees; entry 3 is zero everywhere, so not decided
    assert s["sign_conflict_rate"] == pytest.approx(2 / 3)


def test_sign_conflicts_of_the_top_half_by_hand() -> None:
    s = _summary(TAU3, top_k=0.5)
    # top 2 by magnitude (ties keep the lower index): [1,0,2,0], [-2,-1,0,0], [0.5,3,0,0]
    assert A(s["sign_conflict"]) == pytest.approx(A([[0, 1.0, 0.0], [1.0, 0, 1.0], [0.0, 1.0, 0]]))
    assert s["sign_conflict_all"][0][1] == pytest.approx(1 / 3)  # unrestricted, as before
    # sums [-0.5, 2, 2, 0]: entry 0 (tau1, tau3 disagree with -) and entry 1 (tau2) conflict, of 3 decided
    assert s["sign_conflict_rate"] == pytest.approx(2 / 3)


def test_pairs_with_no_common_entries_have_no_rate() -> None:
    s = _summary([[1.0, 0.0], [0.0, -1.0]])
    assert s["sign_conflict"][0][1] is None
    assert s["sign_conflict_rate"] == 0.0
    assert s["cosine"][0][1] == 0.0


# ----------------------------------------------------------------------------- scale


def test_norms_ratio_relative_update_and_sensitivity_by_hand() -> None:
    s = _summary([[3.0, 0.0], [0.0, 1.0]], base=torch.tensor([3.0, 4.0]))
    assert s["norms"] == pytest.approx([3.0, 1.0])
    assert s["norm_ratio"] == pytest.approx(3.0)
    assert s["base_norm"] == pytest.approx(5.0)
    assert s["relative_update"] == pytest.approx([0.6, 0.2])
    # TA = (3, 1); rescaled to the mean norm 2: (2, 2); ||(1, -1)|| / ||(3, 1)||
    assert s["normalization_sensitivity"] == pytest.approx(math.sqrt(2) / math.sqrt(10))
    assert _summary([[3.0, 0.0], [0.0, 3.0]])["normalization_sensitivity"] == pytest.approx(0.0)


def test_a_zero_task_vector_has_no_ratio() -> None:
    s = _summary([[0.0, 0.0], [1.0, 1.0]])
    assert s["norm_ratio"] is None
    assert s["cosine"][0][1] is None
    assert s["normalization_sensitivity"] == pytest.approx(0.0)  # the zero one is left as it is


# ----------------------------------------------------------------------------- entanglement


def _outer(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.outer(u, v)


def test_subspace_overlap_of_shared_and_orthogonal_subspaces() -> None:
    e = torch.eye(6)
    f = torch.eye(5)
    shared_a = 2.0 * _outer(e[0], f[0])
    shared_b = -5.0 * _outer(e[0], f[0])
    orthogonal = 3.0 * _outer(e[1], f[1])
    s = _summary(torch.stack([shared_a, shared_b, orthogonal]))
    assert A(s["subspace_overlap"]) == pytest.approx(A([[1, 1, 0], [1, 1, 0], [0, 0, 1]]), abs=1e-6)
    assert s["effective_rank"] == pytest.approx([1.0, 1.0, 1.0])
    # rank 1 each: chance is 1 * (1/6 + 1/5) / 2
    assert s["subspace_overlap_chance"][0][1] == pytest.approx(0.5 * (1 / 6 + 1 / 5))


def test_half_shared_subspaces_overlap_by_half() -> None:
    e, f = torch.eye(6), torch.eye(6)
    a = _outer(e[0], f[0]) + _outer(e[1], f[1])  # span {e0, e1}
    b = _outer(e[0], f[0]) + _outer(e[2], f[2])  # span {e0, e2}
    s = summarize(tensor_stats(torch.stack([a, b]), torch.ones(6, 6), top_k=1.0,
                               settings=SubspaceSettings(energy=1.0)))  # fmt: skip
    assert s["subspace_overlap"][0][1] == pytest.approx(0.5, abs=1e-6)


def test_effective_rank_by_hand() -> None:
    assert effective_rank(torch.tensor([2.0])) == pytest.approx(1.0)
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    p = torch.tensor([0.75, 0.25])
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(-float((p * p.log()).sum())))
    # a truncated spectrum [2, 1]: the missing energy 4 over 4 values below 1 can only be flat (1 each)
    q = torch.tensor([2.0, 1, 1, 1, 1, 1]) / 7
    assert effective_rank(torch.tensor([2.0, 1.0]), dim=6, energy_total=9.0) == pytest.approx(
        math.exp(-float((q * q.log()).sum()))
    )
    # energy below the flat level: a power-law tail 1 * (i / 2) ** -alpha, i = 3..6, holding it
    tail = power_tail(1.0, 2, 6, 1.0)
    alpha = -math.log(float(tail[0])) / math.log(1.5)
    assert float(tail.square().sum()) == pytest.approx(1.0)
    assert tail.numpy() == pytest.approx([(i / 2) ** -alpha for i in (3, 4, 5, 6)])
    assert effective_rank(torch.zeros(3)) == 0.0


def test_rank_one_matrix_has_effective_rank_one() -> None:
    g = torch.Generator().manual_seed(0)
    m = _outer(torch.randn(20, generator=g), torch.randn(12, generator=g))
    s = _summary(m[None])
    assert s["effective_rank"][0] == pytest.approx(1.0, abs=1e-3)
    assert s["effective_rank_fraction"][0] == pytest.approx(1 / 12, abs=1e-4)


def test_energy_rank_by_hand() -> None:
    s = torch.tensor([3.0, 1.0])
    assert energy_rank(s, 10.0, 0.8, 16) == 1  # 9 of 10 >= 8
    assert energy_rank(s, 10.0, 0.95, 16) == 2
    assert energy_rank(s, 10.0, 0.95, 1) == 1  # capped


def test_chance_overlap_matches_random_subspaces() -> None:
    assert chance_overlap(2, 3, 10, 20) == pytest.approx(0.5 * 3 * (1 / 10 + 1 / 20))
    g = torch.Generator().manual_seed(0)
    a = torch.linalg.qr(torch.randn(400, 50, 5, generator=g, dtype=torch.float64)).Q  # 400 random subspaces
    b = torch.linalg.qr(torch.randn(400, 50, 3, generator=g, dtype=torch.float64)).Q
    draws = (a.mT @ b).square().sum(dim=(1, 2)) / 3  # subspace_overlap of each pair
    assert float(draws[0]) == pytest.approx(subspace_overlap(a[0], b[0]))
    assert float(draws.mean()) == pytest.approx(5 / 50, rel=0.1)  # one side of chance_overlap(5, 3, 50, 50)


def _low_rank(seed: int, m: int, k: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=g)).Q
    v = torch.linalg.qr(torch.randn(k, rank, generator=g)).Q
    return u, v, torch.tensor([5.0, 3.0, 1.0][:rank])


def test_randomized_svd_is_deterministic_and_finds_a_low_rank_spectrum() -> None:
    u, v, s = _low_rank(1, 60, 40, 3)
    a = u @ torch.diag(s) @ v.T
    settings = SubspaceSettings(exact_max_dim=4)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    u1, s1, v1 = top_singular(a, 3, settings, g1)
    u2, s2, v2 = top_singular(a, 3, settings, g2)
    assert torch.equal(s1, s2) and torch.equal(u1, u2) and torch.equal(v1, v2)
    assert s1[:3] == pytest.approx(s, rel=1e-4)
    assert subspace_overlap(u1[:, :3], u) == pytest.approx(1.0, abs=1e-4)
    exact = effective_rank(torch.linalg.svdvals(a))
    assert effective_rank(s1, 40, float(a.square().sum())) == pytest.approx(exact, rel=1e-3)


def test_truncated_effective_rank_is_exact_for_a_power_law_spectrum() -> None:
    s = torch.arange(1, 201, dtype=torch.float64) ** -1.0
    exact = effective_rank(s)
    assert effective_rank(s[:24], 200, float(s.square().sum())) == pytest.approx(exact, rel=1e-6)


def test_randomized_path_overlap_of_shared_and_disjoint_subspaces() -> None:
    u, v, s = _low_rank(2, 60, 40, 3)
    a, b = u @ torch.diag(s) @ v.T, u @ torch.diag(s.flip(0)) @ v.T  # same subspaces, other spectrum
    c = torch.zeros(60, 40)
    c[:, :] = (torch.eye(60) - u @ u.T)[:, :40] @ (torch.eye(40) - v @ v.T)  # orthogonal to both sides
    settings = SubspaceSettings(exact_max_dim=4, energy=0.99, max_rank=3)
    st = tensor_stats(torch.stack([a, b, c]), torch.ones(60, 40), top_k=1.0, settings=settings,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    ov = summarize(st)["subspace_overlap"]
    assert ov[0][1] == pytest.approx(1.0, abs=1e-4)
    assert ov[0][2] == pytest.approx(0.0, abs=1e-4)
    assert st.extra["subspace_rank"] == [3, 3, 3]


# ----------------------------------------------------------------------------- sums


def test_sum_over_tensors_equals_the_concatenated_computation() -> None:
    g = torch.Generator().manual_seed(3)
    t1, t2 = torch.randn(3, 4, 5, generator=g), torch.randn(3, 7, generator=g)
    b1, b2 = torch.randn(4, 5, generator=g), torch.randn(7, generator=g)
    total = tensor_stats(t1.clone(), b1, top_k=1.0) + tensor_stats(t2.clone(), b2, top_k=1.0)
    cat = torch.cat([t1.reshape(3, -1), t2], dim=1)
    whole = summarize(tensor_stats(cat.clone(), torch.cat([b1.reshape(-1), b2]), top_k=1.0))
    parts = summarize(total)
    for key in ("cosine", "sign_conflict", "sign_conflict_all", "sign_conflict_rate", "norms", "base_norm",
                "relative_update", "norm_ratio", "normalization_sensitivity"):  # fmt: skip
        assert A(parts[key]) == pytest.approx(A(whole[key]), rel=1e-6), key
    cos = torch.nn.functional.cosine_similarity(cat[0].double(), cat[1].double(), dim=0)
    assert parts["cosine"][0][1] == pytest.approx(float(cos), rel=1e-6)
    # subspace numbers: the 2-D tensor's alone (the only matrix), weighted by its 20 parameters
    alone = summarize(tensor_stats(t1.clone(), b1, top_k=1.0))
    assert A(parts["subspace_overlap"]) == pytest.approx(A(alone["subspace_overlap"]))
    assert total.matrix_numel == 20


def test_subspace_numbers_average_by_parameter_count() -> None:
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 6, 5, generator=g)
    sa, sb = (summarize(tensor_stats(t.clone(), torch.ones(t.shape[1:]), top_k=1.0)) for t in (a, b))
    both = summarize(tensor_stats(a.clone(), torch.ones(3, 4), top_k=1.0)
                     + tensor_stats(b.clone(), torch.ones(6, 5), top_k=1.0))  # fmt: skip
    want = (12 * sa["subspace_overlap"][0][1] + 30 * sb["subspace_overlap"][0][1]) / 42
    assert both["subspace_overlap"][0][1] == pytest.approx(want)
    assert both["effective_rank"][1] == pytest.approx(
        (12 * sa["effective_rank"][1] + 30 * sb["effective_rank"][1]) / 42
    )


# ----------------------------------------------------------------------------- verdict


def _overall(conflict: float, ratio: float, sens: float, overlap: float, cos: float = 0.0) -> dict:
    return {
        "cosine": [[1, cos], [cos, 1]],
        "sign_conflict": [[0, conflict], [conflict, 0]],
        "norm_ratio": ratio,
        "normalization_sensitivity": sens,
        "subspace_overlap": [[1, overlap], [overlap, 1]],
        "subspace_overlap_chance": [[1, 0.0], [0.0, 1]],
    }


def test_verdict_names_the_dominant_cause_and_its_methods() -> None:
    v = verdict(_overall(0.3, 4.0, 0.1, 0.05))
    assert v["dominant"] == "scale_mismatch"
    assert v["severity"] == pytest.approx(2.0)  # log 4 / log 2
    assert "iso_c" in v["text"] and "norm_ratio 4" in v["text"]
    v = verdict(_overall(0.9, 1.0, 0.0, 0.05))
    assert v["dominant"] == "directional_conflict" and "ties" in v["text"]
    assert v["severity"] == pytest.approx(1.8)  # 0.9 / 0.5
    assert verdict(_overall(0.48, 1.0, 0.0, 0.05))["dominant"] == "none"  # below chance: text12's 0.476-0.490
    assert verdict(_overall(0.1, 1.0, 0.0, 0.05, cos=-0.5))["dominant"] == "directional_conflict"
    v = verdict(_overall(0.1, 1.0, 0.0, 0.9))
    assert v["dominant"] == "task_entanglement" and "tsv_m" in v["text"]
    assert verdict(_overall(0.1, 1.1, 0.05, 0.05))["dominant"] == "none"


def test_summary_scores_are_pair_means() -> None:
    o = _overall(0.4, 1.5, 0.2, 0.6)
    o["subspace_overlap_chance"] = [[1, 0.2], [0.2, 1]]
    s = summary_scores(o)
    assert s["mean_sign_conflict"] == pytest.approx(0.4)
    assert s["mean_subspace_overlap_above_chance"] == pytest.approx((0.6 - 0.2) / 0.8)
    assert s["scale_mismatch_severity"] == pytest.approx(max(math.log(1.5) / math.log(2), 0.2 / 0.3))


# ----------------------------------------------------------------------------- files and the CLI


@pytest.fixture()
def world(tmp_path: Path) -> dict[str, Path]:
    base = make_tiny_llama(tmp_path / "base")
    return {
        "root": tmp_path,
        "base": base,
        "e1": make_tiny_llama(tmp_path / "e1", perturb_from=base, seed=1),
        "e2": make_tiny_llama(tmp_path / "e2", perturb_from=base, seed=2, scale=0.03),
    }


def _config(world: dict[str, Path], models=("e1", "e2"), method: str = "ties", base: bool = True) -> Path:
    cfg = {
        "merge_method": method,
        "models": [{"model": str(world[m]), "parameters": {"weight": 1.0}} for m in models],
        "parameters": {"density": 0.5} if method == "ties" else {},
        "dtype": "float32",
    }
    if base:
        cfg["base_model"] = str(world["base"])
    path = world["root"] / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


OVERALL_KEYS = {"cosine", "sign_conflict", "sign_conflict_rate", "norms", "norm_ratio",
                "normalization_sensitivity", "subspace_overlap", "effective_rank"}  # fmt: skip


def test_cli_writes_the_json_and_the_html(world) -> None:
    out = world["root"] / "diag"
    res = runner.invoke(app, ["diagnose", str(_config(world)), "--out", str(out), "--top-k", "30"])
    assert res.exit_code == 0, res.output
    assert "verdict" in res.output
    doc = json.loads((out / "diagnosis.json").read_text())
    assert {"models", "overall", "tensors", "verdict"} <= set(doc)
    assert doc["models"] == [str(world["e1"]), str(world["e2"])]
    assert set(doc["overall"]) >= OVERALL_KEYS
    assert doc["settings"]["top_k"] == pytest.approx(0.3)
    # the whole-model cosine and norms are those of the concatenated task vectors
    base, e1, e2 = (load_all_tensors(world[k]) for k in ("base", "e1", "e2"))
    tau = [torch.cat([(e[n].double() - base[n].double()).reshape(-1) for n in base]) for e in (e1, e2)]
    assert doc["overall"]["norms"] == pytest.approx([float(t.norm()) for t in tau], rel=1e-5)
    cos = float(tau[0] @ tau[1] / (tau[0].norm() * tau[1].norm()))
    assert doc["overall"]["cosine"][0][1] == pytest.approx(cos, rel=1e-4, abs=1e-6)
    assert doc["overall"]["norm_ratio"] == pytest.approx(float(tau[1].norm() / tau[0].norm()), rel=1e-5)
    names = {t["name"]: t for t in doc["tensors"]}
    assert set(names) == set(base)
    assert "subspace_overlap" in names["model.layers.0.self_attn.q_proj.weight"]
    assert "subspace_overlap" not in names["model.norm.weight"]
    assert [row["layer"] for row in doc["layers"]] == [0, 1]
    assert doc["verdict"]["dominant"] in {
        "none",
        "directional_conflict",
        "scale_mismatch",
        "task_entanglement",
    }
    page = (out / "diagnosis.html").read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "Verdict" in page
    assert "subspace overlap" in page


def test_library_matches_the_cli_and_threads_do_not_change_results(world) -> None:
    opts = DiagnoseOptions(subspace=SubspaceSettings(exact_max_dim=4))  # the randomized SVD path
    one = diagnose(_config(world), None, DiagnoseOptions(threads=1, subspace=opts.subspace))
    three = diagnose(_config(world), None, DiagnoseOptions(threads=3, subspace=opts.subspace))
    assert one.overall == three.overall and one.tensors == three.tensors
    by_folder = diagnose_models(world["base"], [world["e1"], world["e2"]], opts)
    assert A(by_folder.overall["cosine"]) == pytest.approx(A(one.overall["cosine"]))
    assert A(by_folder.overall["sign_conflict"]) == pytest.approx(A(one.overall["sign_conflict"]))


def _fails(world: dict[str, Path], args: list[str], match: str) -> None:
    out = world["root"] / "diag"
    res = runner.invoke(app, ["diagnose", *args, "--out", str(out)])
    text = " ".join(res.output.split())
    assert res.exit_code != 0, text
    assert "Traceback" not in res.output
    assert match.lower() in text.lower(), text
    assert not out.exists()
    assert not [p for p in world["root"].iterdir() if p.name.startswith(".diag")]


def test_missing_model_is_a_clear_error(world) -> None:
    cfg = _config(world)
    cfg.write_text(cfg.read_text().replace(str(world["e2"]), str(world["root"] / "nope")))
    _fails(world, [str(cfg)], "not found")


def test_shape_mismatch_is_a_clear_error(world) -> None:
    make_tiny_llama(world["root"] / "wide", intermediate=48)
    world["wide"] = world["root"] / "wide"
    _fails(world, [str(_config(world, models=("e1", "wide")))], "differ between the inputs")


def test_a_config_without_a_base_is_a_clear_error(world) -> None:
    _fails(world, [str(_config(world, method="linear", base=False))], "needs a base model")


def test_an_existing_output_is_kept_without_force(world) -> None:
    out = world["root"] / "diag"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = runner.invoke(app, ["diagnose", str(_config(world)), "--out", str(out)])
    assert res.exit_code != 0 and "already exists" in " ".join(res.output.split())
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    res = runner.invoke(app, ["diagnose", str(_config(world)), "--out", str(out), "--force"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["diagnosis.html", "diagnosis.json"]


def test_slices_and_a_listed_base_diagnose_the_same_task_vectors(world) -> None:
    want = diagnose(_config(world), None)
    linear = {  # mergekit's linear lists the base among the models: it is no task vector
        "merge_method": "linear",
        "base_model": str(world["base"]),
        "models": [{"model": str(world[m]), "parameters": {"weight": 1.0}} for m in ("base", "e1", "e2")],
    }
    sliced = {
        "merge_method": "ties",
        "base_model": str(world["base"]),
        "slices": [{"sources": [{"model": str(world[m]), "layer_range": [0, 2], "parameters": {"density": 0.5}}
                                for m in ("base", "e1", "e2")]}],
    }  # fmt: skip
    for cfg in (linear, sliced):
        got = diagnose(cfg, None)
        assert got.models == want.models
        assert A(got.overall["cosine"]) == pytest.approx(A(want.overall["cosine"]))
        assert A(got.overall["norms"]) == pytest.approx(A(want.overall["norms"]))
