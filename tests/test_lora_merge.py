"""Update-level merging of LoRA adapters: hand-computed cases, the exact adapter, SVD truncation, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _fixtures import load_all_tensors, make_peft_lora, make_tiny_llama
from _lora_fixtures import peft_merged_state
from unimerge import merge_state_dicts
from unimerge.errors import ConfigError, PlanError
from unimerge.io import open_checkpoint
from unimerge.lora import merge_adapters, open_adapter

M, N = "layer.q", "layer.k"


def _lora(folder: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], **config: object) -> Path:
    """A PEFT folder: module -> (A (r, in), B (out, r)); r taken from the first module."""
    folder.mkdir(parents=True)
    r = next(iter(modules.values()))[0].shape[0]
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["q", "k"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = {}
    for m, (a, b) in modules.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _col(*v: float) -> torch.Tensor:
    return torch.tensor(v)[:, None]


def _row(*v: float) -> torch.Tensor:
    return torch.tensor(v)[None, :]


@pytest.fixture()
def rank_one(tmp_path: Path) -> tuple[Path, Path]:
    """Adapter 1: dW = 2 * [1,2]^T [1,0,1] (alpha 2, r 1); adapter 2: dW = 1 * [0,1]^T [0,1,0] on M, and N."""
    one = _lora(tmp_path / "one", {M: (_row(1, 0, 1), _col(1, 2))}, lora_alpha=2)
    two = _lora(tmp_path / "two", {M: (_row(0, 1, 0), _col(0, 1)), N: (_row(1, 1, 1), _col(1, 1))})
    return one, two


def test_task_arithmetic_by_hand_and_exact_adapter(rank_one: tuple[Path, Path]) -> None:
    dense = merge_adapters("task_arithmetic", rank_one, weight=[1.0, 0.5], **{"lambda": 2.0})
    # M: 2 * (1 * 2 * [[1,0,1],[2,0,2]] + 0.5 * [[0,0,0],[0,1,0]]); N only in adapter 2: 2 * 0.5 * ones
    assert torch.equal(dense.deltas[M], torch.tensor([[4.0, 0.0, 4.0], [8.0, 1.0, 8.0]]))
    assert torch.equal(dense.deltas[N], torch.ones(2, 3))
    lora = merge_adapters(
        "task_arithmetic", rank_one, output="peft_lora", weight=[1.0, 0.5], **{"lambda": 2.0}
    )
    assert lora.exact and lora.errors == {M: 0.0, N: 0.0}
    assert lora.factors[M].rank == 2 and lora.factors[N].rank == 1  # sum of the ranks present
    for m in (M, N):
        assert torch.equal(lora.factors[m].delta(), dense.deltas[m])


def test_linear_averages_updates_with_zero_for_a_missing_module(rank_one: tuple[Path, Path]) -> None:
    got = merge_adapters("linear", rank_one)  # normalize: (dW_1 + dW_2) / 2; adapter 1 lacks N
    assert torch.equal(got.deltas[M], torch.tensor([[1.0, 0.0, 1.0], [2.0, 0.5, 2.0]]))
    assert torch.equal(got.deltas[N], torch.full((2, 3), 0.5))
    exact = merge_adapters("linear", rank_one, output="peft_lora")
    assert torch.equal(exact.factors[N].delta(), got.deltas[N])


def test_truncation_error_is_the_dropped_energy(tmp_path: Path) -> None:
    """dW = U diag(3, 2, 1) V^T: rank 2 leaves sqrt(1 / 14); energy 0.9 keeps 2 (13/14), 0.5 keeps 1 (9/14)."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(5, 3, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(4, 3, generator=g, dtype=torch.float64))
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    ad = _lora(tmp_path / "ad", {M: ((s[:, None] * v.T).float(), u.float())})  # B A = U S V^T, scale 1
    r2 = merge_adapters("ties", [ad], output="peft_lora", rank=2, density=1.0)
    assert r2.factors[M].rank == 2 and not r2.exact
    assert r2.errors[M] == pytest.approx(math.sqrt(1 / 14), rel=1e-5)
    assert merge_adapters("ties", [ad], output="peft_lora", energy=0.9, density=1.0).factors[M].rank == 2
    e5 = merge_adapters("ties", [ad], output="peft_lora", energy=0.5, density=1.0)
    assert e5.factors[M].rank == 1 and e5.errors[M] == pytest.approx(math.sqrt(5 / 14), rel=1e-5)
    ta = merge_adapters("task_arithmetic", [ad], output="peft_lora", rank=1)  # a rank forces SVD
    assert not ta.exact and ta.errors[M] == pytest.approx(math.sqrt(5 / 14), rel=1e-5)


def test_methods_see_the_updates_as_task_vectors(tmp_path: Path) -> None:
    """ties / dare_ties on adapters = merge_state_dicts on the updates over a zero base (same code path)."""
    base = make_tiny_llama(tmp_path / "base")
    a = make_peft_lora(tmp_path / "a", base, r=2, alpha=4, seed=1)
    b = make_peft_lora(tmp_path / "b", base, r=3, alpha=3, targets=("q_proj", "k_proj"), seed=2, rslora=True)
    deltas = []
    for path in (a, b):
        with open_adapter(path) as ad:
            deltas.append({f"{m}.weight": ad.factors(m).delta() for m in ad.modules})
    shapes = {n: t.shape for d in deltas for n, t in d.items()}
    names = sorted(shapes)
    assert len(names) == 6  # q and v from a, q and k from b, two layers: k only in b, v only in a
    zero = {n: torch.zeros(shapes[n]) for n in names}
    experts = [{n: d.get(n, zero[n]) for n in names} for d in deltas]
    for method, params in (("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5}), ("multislerp", {})):
        want = merge_state_dicts(method, experts, zero, seed=3, **params)
        got = merge_adapters(method, [a, b], seed=3, **params)
        assert sorted(f"{m}.weight" for m in got.deltas) == names
        for m, t in got.deltas.items():
            assert torch.equal(t, want[f"{m}.weight"]), (method, m)


def test_weight_methods_need_the_base(tmp_path: Path) -> None:
    base = make_tiny_llama(tmp_path / "base")
    a = make_peft_lora(tmp_path / "a", base, seed=1)
    with pytest.raises(ConfigError, match="'slerp' interpolates whole weights.*needs their base model"):
        merge_adapters("slerp", [a], output="peft_lora")
    w = load_all_tensors(base)
    got = merge_adapters("slerp", [a], base=base, t=0.5)
    with open_checkpoint(f"{base}+{a}") as full:
        want = merge_state_dicts("slerp", [{n: full.read(n) for n in w}], w, t=0.5)
    for m, t in got.deltas.items():
        torch.testing.assert_close(t, want[f"{m}.weight"] - w[f"{m}.weight"], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="'regmean' is data-aware"):
        merge_adapters("regmean", [a])


def test_dense_output_folder(tmp_path: Path) -> None:
    """One adapter, task arithmetic with lambda 1: the folder is BASE+ADAPTER, untouched tensors bitwise."""
    base = make_tiny_llama(tmp_path / "base")
    a = make_peft_lora(tmp_path / "a", base, seed=1)
    merge_adapters("task_arithmetic", [a], base=base, out=tmp_path / "out")
    got, w = load_all_tensors(tmp_path / "out"), load_all_tensors(base)
    assert set(got) == set(w) and (tmp_path / "out" / "config.json").is_file()
    with open_checkpoint(f"{base}+{a}") as full:
        for n, t in w.items():
            if "q_proj" in n or "v_proj" in n:
                torch.testing.assert_close(got[n], full.read(n), rtol=0, atol=1e-7)
            else:
                assert torch.equal(got[n], t), n


def test_merged_adapter_loads_in_peft(tmp_path: Path) -> None:
    base = make_tiny_llama(tmp_path / "base")
    a = make_peft_lora(tmp_path / "a", base, r=2, seed=1)
    b = make_peft_lora(tmp_path / "b", base, r=4, alpha=2, targets=("q_proj", "o_proj"), seed=2)
    res = merge_adapters("ties", [a, b], output="peft_lora", rank=3, density=0.7, out=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert {r["module"]: r["relative_error"] for r in report["modules"]} == pytest.approx(res.errors)
    got, w = peft_merged_state(base, tmp_path / "out"), load_all_tensors(base)
    for m, f in res.factors.items():
        torch.testing.assert_close(got[f"{m}.weight"], w[f"{m}.weight"] + f.delta(), rtol=1e-5, atol=1e-6)


def _nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_adapter_for_another_base(tmp_path: Path) -> None:
    base = make_tiny_llama(tmp_path / "base")
    other = make_tiny_llama(tmp_path / "other", hidden=8, intermediate=16, n_heads=2, n_kv_heads=1)
    a = make_peft_lora(tmp_path / "a", other, seed=1)
    with pytest.raises(
        PlanError, match=r"q_proj' with an update of shape \[8, 8\].*\[16, 16\].*another base"
    ):
        merge_adapters("task_arithmetic", [a], base=base, out=tmp_path / "out")
    b = make_peft_lora(tmp_path / "b", base, seed=1)
    with pytest.raises(PlanError, match=r"Module 'model.layers.0.self_attn.q_proj'.*\[8, 8\].*\[16, 16\]"):
        merge_adapters("task_arithmetic", [a, b], output="peft_lora", out=tmp_path / "out")
    _nothing_written(tmp_path)


def test_rank_larger_than_the_matrix(tmp_path: Path) -> None:
    base = make_tiny_llama(tmp_path / "base")
    a = make_peft_lora(tmp_path / "a", base, seed=1, targets=("k_proj",))
    with pytest.raises(
        ConfigError, match=r"Rank 9 .*'model.layers.0.self_attn.k_proj'.*\[8, 16\].*at most 8"
    ):
        merge_adapters("ties", [a], output="peft_lora", rank=9, out=tmp_path / "out", density=0.5)
    _nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 2, "energy": 0.5, "output": "peft_lora"}, "not both"),
        ({"rank": 2}, "use them with output='peft_lora'"),
        ({"energy": 1.5, "output": "peft_lora"}, r"in \(0, 1\]"),
        ({"output": "dense", "out": "OUT"}, "needs the base model"),
    ],
)
def test_bad_requests(tmp_path: Path, kwargs: dict, match: str) -> None:
    a = _lora(tmp_path / "a", {M: (_row(1, 0, 1), _col(1, 2))})
    if kwargs.get("out") == "OUT":
        kwargs = {**kwargs, "out": tmp_path / "out"}
    with pytest.raises(ConfigError, match=match):
        merge_adapters("task_arithmetic", [a], **kwargs)
    _nothing_written(tmp_path)


def _dense_updates(paths: list[Path]) -> list[dict[str, torch.Tensor]]:
    """Each adapter's updates ``s B A`` by base tensor name, zero where it lacks a module."""
    deltas = []
    for path in paths:
        with open_adapter(path) as ad:
            deltas.append({f"{m}.weight": ad.factors(m).delta() for m in ad.modules})
    shapes = {n: t.shape for d in deltas for n, t in d.items()}
    return [{n: d.get(n, torch.zeros(shapes[n])) for n in sorted(shapes)} for d in deltas]


def test_knots_on_adapter_updates(tmp_path: Path) -> None:
    """KnOTS (Stoica et al. 2025) on real adapters: with inner task_arithmetic nothing is dropped (the
    concatenation [dW_a dW_b] has rank <= 5, its other singular values are 0), so the merge is
    lambda * sum_i w_i dW_i; with inner ties / dare_ties it is `knots` on the dense updates, seeds included."""
    base = make_tiny_llama(tmp_path / "base")
    a = make_peft_lora(tmp_path / "a", base, r=2, alpha=4, seed=1)
    b = make_peft_lora(tmp_path / "b", base, r=3, alpha=3, targets=("q_proj", "k_proj"), seed=2)
    experts = _dense_updates([a, b])
    zero = {n: torch.zeros_like(t) for n, t in experts[0].items()}
    got = merge_adapters("knots", [a, b], inner="task_arithmetic", weight=[1.0, 0.6], **{"lambda": 0.8})
    assert sorted(f"{m}.weight" for m in got.deltas) == sorted(zero)
    for m, t in got.deltas.items():
        want = 0.8 * (experts[0][f"{m}.weight"] + 0.6 * experts[1][f"{m}.weight"])
        torch.testing.assert_close(t, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    for inner in ("ties", "dare_ties"):
        want_sd = merge_state_dicts("knots", experts, zero, seed=3, inner=inner, density=0.5)
        got = merge_adapters("knots", [a, b], seed=3, inner=inner, density=0.5)
        for m, t in got.deltas.items():
            assert torch.equal(t, want_sd[f"{m}.weight"]), (inner, m)
        ties = merge_adapters("ties", [a, b], seed=3, density=0.5)  # KnOTS-TIES is not TIES on the updates
        assert any(not torch.allclose(t, ties.deltas[m]) for m, t in got.deltas.items())


def test_progress_reports_each_finished_module_in_every_output(tmp_path: Path) -> None:
    """progress(k, 6) after the k-th of the 6 modules (q, v of a; q, k of b; two layers), in order, for
    updates in memory, an exact adapter, an SVD adapter, an adapter folder and a dense folder."""
    base = make_tiny_llama(tmp_path / "base")
    a = make_peft_lora(tmp_path / "a", base, seed=1)
    b = make_peft_lora(tmp_path / "b", base, targets=("q_proj", "k_proj"), seed=2)
    outputs: list[tuple[str, dict]] = [
        ("task_arithmetic", {}),
        ("task_arithmetic", {"output": "peft_lora"}),
        ("ties", {"output": "peft_lora", "rank": 1, "density": 0.5}),
        ("ties", {"output": "peft_lora", "density": 0.5, "out": tmp_path / "adapter"}),
        ("ties", {"base": base, "density": 0.5, "out": tmp_path / "dense"}),
    ]
    calls: list[tuple[int, int]] = []
    for method, kwargs in outputs:
        calls.clear()
        res = merge_adapters(method, [a, b], progress=lambda d, t: calls.append((d, t)), **kwargs)
        assert calls == [(k, 6) for k in range(1, 7)], (method, kwargs)
        assert len(res.modules) == 6
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    with_base = merge_adapters("ties", [a, b], base=base, density=0.5)  # the dense folder is base + update
    got, w = load_all_tensors(tmp_path / "dense"), load_all_tensors(base)
    for m, t in with_base.deltas.items():
        torch.testing.assert_close(got[f"{m}.weight"], w[f"{m}.weight"] + t, rtol=0, atol=1e-6)
