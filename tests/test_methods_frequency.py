"""FR-Merging / FREE-Merging: the high-pass filter by hand and against numpy.fft, coefficients, experts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from _fixtures import load_all_tensors, make_tiny_llama
from unimerge import merge_state_dicts
from unimerge.cli import app
from unimerge.errors import CheckpointError, ConfigError
from unimerge.methods.frequency import fr_coefficients, free_expert, high_pass
from unimerge.taskmodels import (
    compute_task_experts,
    is_task_experts_file,
    load_expert_model,
    load_task_experts,
    save_task_experts,
    task_experts_state_dict,
)


def _checker(rows: int, cols: int) -> torch.Tensor:
    """``(-1)^(r + c)``: the single frequency ``(rows/2, cols/2)``, the highest there is."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return (-1.0) ** (r + c).float()


def _numpy_high_pass(m: np.ndarray, d0: float) -> np.ndarray:
    """The paper's filter written out: full fft2, centred frequencies, keep sqrt(eta^2 + gamma^2) >= D0."""
    spec = np.fft.fftshift(np.fft.fft2(m))
    rows, cols = m.shape
    eta = np.arange(rows) - rows // 2  # centred signed frequency index of each shifted row
    gamma = np.arange(cols) - cols // 2
    keep = np.sqrt(eta[:, None] ** 2 + gamma[None, :] ** 2) >= d0
    out = np.fft.ifft2(np.fft.ifftshift(spec * keep))
    assert np.abs(out.imag).max() < 1e-9  # a symmetric mask keeps the signal real
    return out.real


def test_low_frequency_patterns_are_removed_entirely() -> None:
    rows, cols = 8, 8  # D0 = 0.25 * 8 = 2: removes |(eta, gamma)| < 2
    r, c = torch.meshgrid(torch.arange(rows).double(), torch.arange(cols).double(), indexing="ij")
    dc = torch.full((rows, cols), 3.0, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * r / rows) + torch.sin(2 * math.pi * (r + c) / rows)  # (1, 0) and (1, 1)
    for low in (dc, wave, dc - 2 * wave):
        torch.testing.assert_close(high_pass(low, 0.25), torch.zeros_like(low), atol=1e-12, rtol=0)


def test_high_frequency_patterns_pass_unchanged() -> None:
    checker = _checker(8, 8).double()  # frequency (4, 4), |.| = 5.66
    wave = torch.cos(2 * math.pi * 3 * torch.arange(8).double() / 8)[:, None].expand(8, 8)  # (3, 0)
    for high in (checker, wave, checker - 0.5 * wave):
        torch.testing.assert_close(high_pass(high, 0.25), high, atol=1e-12, rtol=0)
    # a mix: only the high part survives
    mix = checker + 7.0
    torch.testing.assert_close(high_pass(mix, 0.25), checker, atol=1e-12, rtol=0)


def test_cutoff_zero_is_identity_and_large_cutoff_removes_everything() -> None:
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(high_pass(x, 0.0), x)
    torch.testing.assert_close(high_pass(x, 1.0), torch.zeros_like(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(6, 10), (7, 5), (9, 9), (1, 12), (16, 3)])
@pytest.mark.parametrize("cutoff", [0.1, 0.3, 0.5])
def test_high_pass_matches_numpy_fft(shape: tuple[int, int], cutoff: float) -> None:
    m = np.random.default_rng(sum(shape)).standard_normal(shape)
    want = _numpy_high_pass(m, cutoff * min(shape))
    got = high_pass(torch.from_numpy(m), cutoff)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
    # float32 in, float32 out
    got32 = high_pass(torch.from_numpy(m).float(), cutoff)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), want, atol=1e-5)


def test_conv_kernels_are_filtered_as_matrices_and_vectors_pass() -> None:
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = _numpy_high_pass(x.reshape(4, 12).numpy(), 0.5 * 4).reshape(4, 3, 2, 2)
    np.testing.assert_allclose(high_pass(x, 0.5).numpy(), want, atol=1e-12)
    bias = torch.tensor([1.0, -2.0, 3.0])
    assert high_pass(bias, 0.5) is bias
    scalar = torch.tensor(2.0)
    assert high_pass(scalar, 0.5) is scalar


def test_coefficients_are_mean_magnitude_shares() -> None:
    x = torch.stack([torch.tensor([3.0, -3.0, 0.0, 2.0]), torch.tensor([1.0, 0.0, 0.0, -1.0])])
    torch.testing.assert_close(fr_coefficients(x), torch.tensor([0.8, 0.2], dtype=torch.float64))
    assert fr_coefficients(torch.zeros(3, 5)).tolist() == [0.0, 0.0, 0.0]


def test_fr_merging_by_hand() -> None:
    """v1 = C + 3, v2 = 2C - 1 (C the 4x4 checkerboard): mean|v| = 3 and 2, so lambda = (0.6, 0.4);
    the filter (D0 = 1) drops the constants, so merged = lambda * (0.6 C + 0.4 * 2C) = 1.4 lambda C."""
    c = _checker(4, 4)
    base = {"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(2)), "b": torch.zeros(3)}
    e1 = {"w": base["w"] + c + 3.0, "b": torch.tensor([1.0, 2.0, 3.0])}
    e2 = {"w": base["w"] + 2 * c - 1.0, "b": torch.tensor([-1.0, 0.0, 1.0])}
    out = merge_state_dicts("fr_merging", [e1, e2], base, cutoff=0.25, **{"lambda": 2.0})
    torch.testing.assert_close(out["w"], base["w"] + 2.8 * c)
    # 1-D: unfiltered, lambda_b = (2, 2/3) / (8/3) = (0.75, 0.25)
    torch.testing.assert_close(out["b"], 2.0 * (0.75 * e1["b"] + 0.25 * e2["b"]))
    # per-model weights multiply lambda_i: 0.6 C - 0.4 * 2C = -0.2 C
    neg = merge_state_dicts("fr_merging", [e1, e2], base, cutoff=0.25, weight=[1.0, -1.0])
    torch.testing.assert_close(neg["w"], base["w"] - 0.2 * c)


def test_fr_merging_without_filter_is_a_magnitude_weighted_sum() -> None:
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(5, 7, generator=g)}
    experts = [{"w": base["w"] + s * torch.randn(5, 7, generator=g)} for s in (1.0, 0.5, 2.0)]
    out = merge_state_dicts("fr_merging", experts, base, cutoff=0.0)
    x = torch.stack([e["w"] - base["w"] for e in experts])
    lam = x.abs().mean(dim=(1, 2)) / x.abs().mean(dim=(1, 2)).sum()
    torch.testing.assert_close(out["w"], base["w"] + (lam[:, None, None] * x).sum(0))


def test_free_expert_by_hand() -> None:
    v = torch.tensor([4.0, -1.0, 0.5, 0.0, 2.0, -3.0, 1.0, 0.5, 0.0, 0.0])  # sum|v| = 12
    idx, val = free_expert(v, lam=0.5, density=0.2)  # k = 2: entries 4 and -3 (mass 7)
    mu = -math.log(0.2) * (7 / 10) / (0.5 * 12 / 10)
    assert idx.tolist() == [0, 5]
    torch.testing.assert_close(val, torch.tensor([4.0, -3.0]) * mu)
    assert free_expert(v, lam=0.5, density=0.05)[0].numel() == 0  # k = int(0.5) = 0
    assert free_expert(torch.zeros(10), lam=0.5, density=0.2)[0].numel() == 0
    with pytest.raises(ValueError, match="density"):
        free_expert(v, lam=0.5, density=1.0)


def _experts(n: int = 3, seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    base = {
        "a.weight": torch.randn(16, 12, generator=g),
        "a.bias": torch.randn(16, generator=g),
        "step": torch.tensor(3),
    }
    experts = {
        f"t{i}": {
            k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
            for k, v in base.items()
        }
        for i in range(n)
    }
    return experts, base


def test_task_experts_rebuild_by_hand_and_round_trip(tmp_path) -> None:
    experts, base = _experts()
    te = compute_task_experts(experts, base, cutoff=0.1, lambda_=2.0, density=0.1)
    assert te.tasks == ("t0", "t1", "t2") and set(te.vector) == {"a.weight", "a.bias"}  # int skipped
    merged = merge_state_dicts("fr_merging", list(experts.values()), base, cutoff=0.1, **{"lambda": 2.0})
    for k, v in te.vector.items():
        torch.testing.assert_close(base[k] + v, merged[k])
    # expert of t1 on a.weight: top 10% (19 of 192) of its task vector, times mu
    x = torch.stack([experts[t]["a.weight"] - base["a.weight"] for t in te.tasks])
    lam = float(fr_coefficients(x)[1])
    idx, val = te.experts["a.weight"][1]
    assert idx.numel() == 19
    assert set(idx.tolist()) == set(x[1].abs().reshape(-1).topk(19).indices.tolist())
    mu = -math.log(0.1) * float(x[1].reshape(-1)[idx].abs().sum()) / (lam * float(x[1].abs().sum()))
    torch.testing.assert_close(val, x[1].reshape(-1)[idx] * mu)
    want = merged["a.weight"].clone().reshape(-1)
    want[idx] += val
    rebuilt = task_experts_state_dict(base, te, "t1")
    torch.testing.assert_close(rebuilt["a.weight"], want.reshape(16, 12))
    assert torch.equal(rebuilt["step"], base["step"])
    # the file: same tensors back, only the chosen task read, merged state accepted
    path = tmp_path / "free.safetensors"
    save_task_experts(path, te)
    assert is_task_experts_file(path) and not is_task_experts_file(tmp_path / "missing")
    back = load_task_experts(path)
    assert back.tasks == te.tasks and back.params["density"] == 0.1
    for k in te.vector:
        assert torch.equal(back.vector[k], te.vector[k])
        for (i1, v1), (i2, v2) in zip(back.experts[k], te.experts[k], strict=True):
            assert torch.equal(i1, i2) and torch.equal(v1, v2)
    from_file = load_expert_model(base, path, 1)
    from_merged = load_expert_model(merged, path, "t1", state_is="merged")
    for k in rebuilt:
        torch.testing.assert_close(from_file[k], rebuilt[k])
        torch.testing.assert_close(from_merged[k], rebuilt[k])
    assert torch.equal(
        merged["a.weight"],
        merge_state_dicts("fr_merging", list(experts.values()), base, cutoff=0.1, **{"lambda": 2.0})[
            "a.weight"
        ],
    )  # not mutated


def test_task_experts_bad_input(tmp_path) -> None:
    experts, base = _experts(2)
    with pytest.raises(ConfigError, match="density"):
        compute_task_experts(experts, base, density=1.0)
    with pytest.raises(ConfigError, match="weights"):
        compute_task_experts(experts, base, weights=[1.0])
    te = compute_task_experts(experts, base)
    with pytest.raises(ConfigError, match="nope"):
        te.index("nope")
    (tmp_path / "x.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="not a unimerge task expert file"):
        load_task_experts(tmp_path / "x.safetensors")


def test_cli_free_merging_masks_then_task(tmp_path) -> None:
    runner = CliRunner()
    base = make_tiny_llama(tmp_path / "base")
    e1 = make_tiny_llama(tmp_path / "math", perturb_from=base, seed=1)
    e2 = make_tiny_llama(tmp_path / "code", perturb_from=base, seed=2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": "fr_merging",
                "base_model": str(base),
                "parameters": {"cutoff": 0.2, "lambda": 1.5},
                "models": [{"model": str(e1)}, {"model": str(e2), "parameters": {"weight": 0.5}}],
            }
        )
    )
    out = tmp_path / "free.safetensors"
    res = runner.invoke(app, ["masks", str(cfg), str(out), "--kind", "free_merging", "--density", "0.05"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["task", str(out), str(base), str(tmp_path / "out"), "--task", "code"])
    assert res.exit_code == 0, res.output
    got, b = load_all_tensors(tmp_path / "out"), load_all_tensors(base)
    te = compute_task_experts(
        {"math": load_all_tensors(e1), "code": load_all_tensors(e2)},
        b,
        cutoff=0.2,
        lambda_=1.5,
        density=0.05,
        weights=[1.0, 0.5],
    )
    want = task_experts_state_dict(b, te, "code")
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    # the expert moves the merged model toward its own task
    merged = merge_state_dicts(
        "fr_merging",
        [load_all_tensors(e1), load_all_tensors(e2)],
        b,
        cutoff=0.2,
        weight=[1.0, 0.5],
        **{"lambda": 1.5},
    )
    e2sd = load_all_tensors(e2)
    err = sum(float((got[k].float() - e2sd[k].float()).norm()) for k in te.vector)
    err0 = sum(float((merged[k].float() - e2sd[k].float()).norm()) for k in te.vector)
    assert err < err0
    # a config of another method is refused with the fix
    cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(base),
                "models": [{"model": str(e1)}, {"model": str(e2)}],
            }
        )
    )
    res = runner.invoke(app, ["masks", str(cfg), str(out), "--kind", "free_merging"])
    assert res.exit_code != 0 and "fr_merging" in res.output and "Traceback" not in res.output
