"""SurgeryV2: block matching, the deep forward (hand-composed), identity at the start, training reduces the distance.

The toy MLP (``_modelmerge_a_toy``) is ``Linear(6, 8) -> ReLU -> Linear(8, 8)``; its "blocks" are the
three children ``0``, ``1``, ``2`` (``layers=(r"^\\d+$",)``), each 8 wide.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _modelmerge_a_toy import mlp, mlp_problem
from unimerge.errors import MergeError
from unimerge.methods import MergeProblem
from unimerge.modelmerge.surgery import SurgeryAdapter, SurgeryModule
from unimerge.modelmerge.surgery_v2 import (
    DeepSurgery,
    Row,
    SurgeryV2Params,
    block_names,
    deep_distance,
    expert_targets,
    surgery_v2,
    task_module,
    token_mean,
    train_deep,
)

TOY = (r"^\d+$",)


def _fast(**kw: object) -> SurgeryV2Params:
    return SurgeryV2Params.model_validate({"rank": 2, "layers": TOY, "bf16": False, **kw})


def test_default_layers_match_transformer_blocks_only() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.Linear(2, 2)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList(Block() for _ in range(3))

    model = nn.Module()
    model.encoder = Encoder()
    model.pooler = nn.Linear(2, 2)
    assert block_names(model, SurgeryV2Params().layers) == [
        "encoder.layer.0",
        "encoder.layer.1",
        "encoder.layer.2",
    ]
    with pytest.raises(MergeError, match="no submodule matches layers"):
        block_names(model, (r"resblocks\.\d+$",))


def test_token_mean_skips_padding() -> None:
    h = torch.arange(12.0).reshape(1, 3, 4)  # tokens (0..3), (4..7), (8..11)
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(token_mean(h, mask), torch.tensor([[2.0, 3.0, 4.0, 5.0]]))
    torch.testing.assert_close(token_mean(h, None), torch.tensor([[4.0, 5.0, 6.0, 7.0]]))
    assert torch.equal(token_mean(h[:, 0], mask), h[:, 0])  # (b, d): already one vector per example


def _set(adapter: nn.Module, seed: int) -> None:
    assert isinstance(adapter, SurgeryAdapter)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.down.weight.copy_(torch.randn(adapter.down.weight.shape, generator=g))
        adapter.up.weight.copy_(torch.randn(adapter.up.weight.shape, generator=g))


def _fix(adapter: nn.Module, z: Tensor) -> Tensor:
    """``z - W_up ReLU(W_down z)`` by hand."""
    assert isinstance(adapter, SurgeryAdapter)
    return z - F.relu(z @ adapter.down.weight.T) @ adapter.up.weight.T


def test_deep_forward_feeds_each_corrected_block_into_the_next() -> None:
    model = mlp()
    deep = DeepSurgery(model, ["0", "1", "2"], [8, 8, 8], rank=2)
    module = SurgeryModule(deep, 8, 2)
    for i, a in enumerate([*deep.adapters, module.adapter]):
        _set(a, i)
    x = torch.randn(5, 6)
    with torch.no_grad():
        z0 = _fix(deep.adapters[0], model[0](x))
        z1 = _fix(deep.adapters[1], F.relu(z0))
        z2 = _fix(deep.adapters[2], model[2](z1))
        want = _fix(module.adapter, z2)
        torch.testing.assert_close(module(x), want)
        torch.testing.assert_close(torch.stack(deep.means), torch.stack([z0, z1, z2]))  # (b, d): no tokens
        torch.testing.assert_close(model(x), model[2](F.relu(model[0](x))))  # the hooks are gone


def _fresh(p: MergeProblem, steps: int) -> tuple[SurgeryModule, list[Row]]:
    """Task 0's deep surgery of the problem's task-arithmetic merge, trained ``steps`` steps from seed 0."""
    params = _fast(steps=steps, lr=1e-2)
    merged = surgery_v2(p, _fast(steps=0)).module
    rows = expert_targets(p, 0, ["0", "1", "2"], params)
    torch.manual_seed(0)
    module = task_module(p, merged, ["0", "1", "2"], rows, params.rank)
    train_deep(p, rows, module, params)
    return module, rows


def test_untrained_surgery_is_the_identity() -> None:
    p = mlp_problem(n=3, budget=16)
    merged = surgery_v2(p, _fast(steps=0))
    x = torch.randn(5, 6)
    with torch.no_grad():
        for t in p.tasks:
            torch.testing.assert_close(merged.for_task(t.name)(x), merged.module(x), atol=0, rtol=0)


def test_training_reduces_the_feature_distance_monotonically() -> None:
    p = mlp_problem(n=3, scale=0.5, budget=16)
    distances = []
    for steps in (0, 10, 20, 40, 80):
        module, rows = _fresh(p, steps)
        distances.append(deep_distance(p, rows, module))
    assert all(a > b for a, b in zip(distances, distances[1:], strict=False)), distances
    assert distances[-1] < 0.6 * distances[0], distances
    deep = module.model
    assert isinstance(deep, DeepSurgery)
    for a in [*deep.adapters, module.adapter]:  # every block's module learned, not only the last
        assert isinstance(a, SurgeryAdapter) and float(a.up.weight.abs().sum()) > 0


def test_result_counts_the_shared_model_once_and_every_task_adapters() -> None:
    p = mlp_problem(n=3, budget=16)
    merged = surgery_v2(p, _fast(steps=2))
    per_task = 4 * 2 * (8 * 2)  # blocks 0, 1, 2 and the final one: down (2, 8) + up (8, 2)
    assert merged.params_total == 128 + 3 * per_task
    assert merged.examples_used == 16 and merged.labeled is False
    assert sorted(merged.task_modules) == ["t0", "t1", "t2"]
    with pytest.raises(MergeError, match="no submodule matches layers"):
        surgery_v2(p, SurgeryV2Params(steps=0))  # the default (transformer blocks) misses the MLP
