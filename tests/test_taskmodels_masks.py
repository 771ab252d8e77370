"""Task masks (EMR, TALL): hand-computed masks, bit-packed storage round trip, task reconstruction."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unimerge.core import merge_state_dicts
from unimerge.errors import CheckpointError, ConfigError, PlanError
from unimerge.taskmodels import (
    compute_task_masks,
    load_task_masks,
    load_task_model,
    save_task_masks,
    task_state_dict,
)

BASE = {"w": torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0]), "b": torch.tensor([1.0]), "step": torch.tensor(7)}
TVS_W = [[1.0, -2.0, 3.0, 0.0, 0.5], [2.0, 1.0, -1.0, 0.0, -0.5], [-1.0, 1.0, 2.0, 0.0, 0.0]]
TVS_B = [[2.0], [-1.0], [1.0]]


def _experts() -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {
            "w": BASE["w"] + torch.tensor(w),
            "b": BASE["b"] + torch.tensor(b),
            "step": BASE["step"].clone(),
        }
        for name, w, b in zip(["cola", "sst2", "mrpc"], TVS_W, TVS_B, strict=True)
    }


def test_emr_masks_vector_and_rescalers_by_hand():
    tm = compute_task_masks(_experts(), BASE, method="emr")
    assert tm.tasks == ("cola", "sst2", "mrpc") and set(tm.vector) == {"w", "b"}  # int tensor skipped
    torch.testing.assert_close(tm.vector["w"], torch.tensor([2.0, -2.0, 3.0, 0.0, -0.5]))
    torch.testing.assert_close(tm.vector["b"], torch.tensor([2.0]))
    assert tm.masks["w"][1].tolist() == [True, False, False, False, True]
    # lambda_t = sum over tensors of mean|tau_t| / mean|M_t tau_uni|
    expected = torch.tensor([(1.3 + 2) / (1.4 + 2), (0.9 + 1) / (0.5 + 0), (0.8 + 1) / (0.6 + 2)])
    torch.testing.assert_close(tm.rescalers, expected)
    # task sst2: base + 3.8 * [2, 0, 0, 0, -.5] and b: base + 3.8 * 0
    rebuilt = task_state_dict(BASE, tm, "sst2")
    torch.testing.assert_close(rebuilt["w"], BASE["w"] + torch.tensor([7.6, 0.0, 0.0, 0.0, -1.9]))
    torch.testing.assert_close(rebuilt["b"], BASE["b"])
    assert torch.equal(rebuilt["step"], BASE["step"])


def test_tall_masks_and_reconstruction_by_hand():
    tvs = [[1.0, 2.0, 3.0, 0.5], [2.0, 1.0, -1.0, 0.5], [1.0, -1.0, 1.0, 0.0]]
    base = {"w": torch.zeros(4)}
    experts = [{"w": torch.tensor(t)} for t in tvs]
    tm = compute_task_masks(experts, base, method="tall", tall_lambda=0.4)
    assert tm.tasks == ("model_0", "model_1", "model_2")
    torch.testing.assert_close(tm.vector["w"], torch.tensor([4.0, 2.0, 3.0, 1.0]))
    assert tm.masks["w"].tolist() == [
        [False, True, True, True],
        [True, True, False, True],
        [False, False, True, False],
    ]
    torch.testing.assert_close(tm.rescalers, torch.ones(3))
    torch.testing.assert_close(task_state_dict(base, tm, 1)["w"], torch.tensor([4.0, 2.0, 0.0, 1.0]))
    # per-task lambda (chosen on validation data in the paper)
    tm2 = compute_task_masks(experts, base, method="tall", tall_lambda=[0.2, 0.4, 0.4])
    assert tm2.masks["w"][0].tolist() == [True, True, True, True]


def test_round_trip_is_bit_exact_and_packed(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"layer.weight": torch.randn(13, 7, generator=g), "layer.bias": torch.randn(13, generator=g)}
    experts = {
        f"t{i}": {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(5)
    }
    for method in ("emr", "tall"):
        tm = compute_task_masks(experts, base, method=method)
        path = tmp_path / f"{method}.safetensors"
        save_task_masks(path, tm)
        back = load_task_masks(path)
        assert back.method == method and back.tasks == tm.tasks
        torch.testing.assert_close(back.rescalers, tm.rescalers)
        for key in base:
            assert torch.equal(back.vector[key], tm.vector[key])
            assert torch.equal(back.masks[key], tm.masks[key])
        with safe_open(str(path), framework="pt") as f:
            packed = f.get_tensor("mask::0::layer.weight")
            assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(13 * 7 / 8),)
            assert json.loads(f.metadata()["tasks"]) == list(tm.tasks)
        for task in tm.tasks:
            from_file = load_task_model(base, path, task)
            in_memory = task_state_dict(base, tm, task)
            for key in base:
                assert torch.equal(from_file[key], in_memory[key])


def test_single_task_and_disjoint_tasks_rebuild_experts_exactly(tmp_path):
    base = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])}
    # disjoint supports: TALL masks pick exactly each task's own entries of tau_MTL
    experts = {
        "a": {"w": base["w"] + torch.tensor([0.5, -0.25, 0.0, 0.0, 0.0, 0.0])},
        "b": {"w": base["w"] + torch.tensor([0.0, 0.0, 0.75, -1.0, 0.0, 0.0])},
        "c": {"w": base["w"] + torch.tensor([0.0, 0.0, 0.0, 0.0, 0.125, 2.0])},
    }
    tm = compute_task_masks(experts, base, method="tall")
    save_task_masks(tmp_path / "tall.safetensors", tm)
    for name, sd in experts.items():
        assert torch.equal(load_task_model(base, tmp_path / "tall.safetensors", name)["w"], sd["w"])
    # EMR with one task: tau_uni = tau, mask = tau != 0, rescaler 1
    one = compute_task_masks({"a": experts["a"]}, base, method="emr")
    torch.testing.assert_close(one.rescalers, torch.ones(1))
    assert torch.equal(task_state_dict(base, one, "a")["w"], experts["a"]["w"])


def test_merged_state_gives_the_same_task_model(tmp_path):
    tm = compute_task_masks(_experts(), BASE, method="emr")
    path = tmp_path / "emr.safetensors"
    save_task_masks(path, tm)
    merged = merge_state_dicts("emr", list(_experts().values()), BASE)  # base + tau_uni
    for task in tm.tasks:
        a = load_task_model(BASE, path, task)
        b = load_task_model(merged, path, task, state_is="merged")
        for key in ("w", "b"):
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6)


def test_storage_is_smaller_than_the_experts(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(64, 64, generator=g)}
    experts = [{"w": base["w"] + torch.randn(64, 64, generator=g)} for _ in range(8)]
    size = save_task_masks(tmp_path / "m.safetensors", compute_task_masks(experts, base, method="emr"))
    experts_bytes = 8 * 64 * 64 * 4
    # one float32 vector + 8 bits per entry and task + header
    assert 64 * 64 * 4 + 8 * 64 * 64 // 8 <= size < 64 * 64 * 4 + 8 * 64 * 64 // 8 + 2048
    assert size < experts_bytes / 5
    half = save_task_masks(
        tmp_path / "h.safetensors", compute_task_masks(experts, base), vector_dtype=torch.bfloat16
    )
    assert half < size


def test_errors_name_the_problem(tmp_path):
    tm = compute_task_masks(_experts(), BASE, method="emr")
    path = tmp_path / "m.safetensors"
    save_task_masks(path, tm)
    with pytest.raises(ConfigError, match="cola"):
        load_task_model(BASE, path, "qnli")
    with pytest.raises(PlanError, match="'w'"):
        load_task_model({"b": BASE["b"]}, path, "cola")
    with pytest.raises(PlanError, match="shape"):
        load_task_model({**BASE, "w": torch.zeros(3)}, path, "cola")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_task_model(BASE, tmp_path / "missing.safetensors", "cola")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a unimerge task mask file"):
        load_task_model(BASE, tmp_path / "other.safetensors", 0)
    with pytest.raises(PlanError, match="sst2"):
        compute_task_masks({**_experts(), "sst2": {"w": BASE["w"]}}, BASE)
    with pytest.raises(ConfigError, match="tall_lambda"):
        compute_task_masks(_experts(), BASE, method="tall", tall_lambda=[0.2, 0.4])
    with pytest.raises(ConfigError, match="state_is"):
        load_task_model(BASE, path, 0, state_is="expert")
