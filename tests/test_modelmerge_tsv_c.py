"""TSV-C as a registered row: per-task rank-k truncations (closed form), one model per task, stored counts.

The toy MLP (``_modelmerge_a_toy``, input 6, hidden 8) has ``0.weight (8, 6)``, ``0.bias (8,)``,
``2.weight (8, 8)``, ``2.bias (8,)``: 128 numbers. With 3 tasks TSV-C keeps ``max(1, int(q / 3))`` = 2
singular triplets of each matrix (``q = min(m, n)`` = 6 and 8) and the biases dense.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from _modelmerge_a_toy import mlp_problem
from unimerge.errors import ConfigError
from unimerge.methods import ModelMethod, TensorMethod, get_method
from unimerge.modelmerge.tsv_c import CompressedTask, TsvCParams, tsv_c


def _truncate(tau: Tensor, k: int) -> Tensor:
    """The best rank-``k`` approximation of ``tau`` ``(m, n)``, by hand from its SVD."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def test_each_task_model_is_the_base_plus_its_rank_k_truncation() -> None:
    p = mlp_problem(n=3)
    merged = tsv_c(p, TsvCParams())
    base = p.base.state_dict()
    for i, task in enumerate(p.tasks):
        module = merged.task_modules[task.name]
        assert isinstance(module, CompressedTask)
        got = module.tensors()
        assert sorted(got) == ["0.bias", "0.weight", "2.bias", "2.weight"]
        for k in ("0.weight", "2.weight"):
            want = base[k] + _truncate(p.experts[i][k] - base[k], 2)
            torch.testing.assert_close(got[k], want, atol=1e-5, rtol=1e-5, msg=f"{task.name} {k}")
        for k in ("0.bias", "2.bias"):  # not matrices: the whole task vector
            torch.testing.assert_close(got[k], p.experts[i][k], atol=1e-6, rtol=0)
        dense = copy.deepcopy(p.base)
        dense.load_state_dict({**base, **got})
        x = torch.randn(5, 6)
        with torch.no_grad():
            torch.testing.assert_close(merged.for_task(task.name)(x), dense(x))


def test_params_total_counts_the_base_once_and_every_task_factors() -> None:
    p = mlp_problem(n=3)
    merged = tsv_c(p, TsvCParams())
    per_task = 2 * (8 + 6 + 1) + 8 + 2 * (8 + 8 + 1) + 8  # r (m + n + 1) per matrix, biases dense
    assert merged.params_total == 128 + 3 * per_task == 368
    assert merged.details["storage_ratio"] == pytest.approx(per_task / 128)  # 80 of 128 per task
    assert merged.details["rank_range"] == [2, 2]
    assert merged.module.state_dict().keys() == p.base.state_dict().keys()
    for k, v in p.base.state_dict().items():  # the shared module is the pretrained model
        assert torch.equal(merged.module.state_dict()[k], v), k
    assert merged.examples_used == 0 and merged.labeled is False


def test_full_rank_reproduces_every_expert() -> None:
    p = mlp_problem(n=3)
    merged = tsv_c(p, TsvCParams(rank_fraction=1.0))
    x = torch.randn(7, 6)
    for i, task in enumerate(p.tasks):
        expert = copy.deepcopy(p.base)
        expert.load_state_dict(p.experts[i])
        with torch.no_grad():
            torch.testing.assert_close(merged.for_task(task.name)(x), expert(x), atol=1e-5, rtol=1e-5)


def test_tensors_no_expert_changed_are_not_stored() -> None:
    p = mlp_problem(n=2)
    base = p.base.state_dict()
    p.experts = [{**e, "2.weight": base["2.weight"].clone()} for e in p.experts]
    merged = tsv_c(p, TsvCParams(rank_fraction=0.5))  # 0.weight keeps int(6 / 2) = 3 triplets
    assert merged.params_total == 128 + 2 * (3 * (8 + 6 + 1) + 8 + 8)
    module = merged.task_modules["t0"]
    assert isinstance(module, CompressedTask) and "2.weight" not in module.tensors()


def test_registered_as_a_data_free_model_method() -> None:
    info = get_method("tsv_c", ModelMethod)
    assert (info.data, info.family, info.needs_base) == ("none", "subspace", True)
    with pytest.raises(ConfigError, match="is a model method"):
        get_method("tsv_c", TensorMethod)
