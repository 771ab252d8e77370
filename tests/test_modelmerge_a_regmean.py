"""RegMean / RegMean++ and the shared statistics helpers (Gram hooks, sidecars)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _modelmerge_a_toy import FakeTask, heads, mlp, mlp_problem, perturbed, problem
from unimerge.errors import CheckpointError
from unimerge.methods import ModelMethod, get_method
from unimerge.modelmerge.regmean import (
    RegMeanParams,
    find_blocks,
    regmean,
    regmean_merge,
    regmean_plusplus,
    scale_off_diagonal,
)
from unimerge.modelmerge.stats import collect_grams, load_stats, save_sidecars, save_stats, sidecar_path

EXACT = RegMeanParams(alpha=1.0, bf16=False)


def test_regmean_merge_hand_computed() -> None:
    # Each expert only sees "its" input direction: the merge keeps each one's column.
    w = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (2, 1, 2)
    g = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])  # (2, 2, 2)
    torch.testing.assert_close(regmean_merge(w, g), torch.tensor([[1.0, 1.0]]))
    # Overlapping inputs: sum G = [[3, 1], [1, 2]].
    g2 = torch.tensor([[[2.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    # sum_i W_i G_i = [2, 1] + [0, 1] = [2, 2]; (sum G)^-1 = [[2, -1], [-1, 3]] / 5 -> [2/5, 4/5]
    torch.testing.assert_close(regmean_merge(w, g2), torch.tensor([[0.4, 0.8]]))


def test_scale_off_diagonal() -> None:
    g = torch.tensor([[4.0, 2.0], [2.0, 1.0]])
    torch.testing.assert_close(scale_off_diagonal(g, 0.5), torch.tensor([[4.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(scale_off_diagonal(g, 0.0), torch.diag(torch.tensor([4.0, 1.0])))


def test_identical_experts_and_singular_grams_return_the_expert() -> None:
    w = torch.randn(1, 3, 4).repeat(3, 1, 1)  # (3, 3, 4): three copies
    x = torch.randn(2, 4)  # rank-2 inputs: every Gram is singular
    g = (x.T @ x).expand(3, 4, 4)
    torch.testing.assert_close(regmean_merge(w, g, alpha=1.0), w[0], atol=1e-5, rtol=1e-5)


def test_single_linear_layer_equals_least_squares_on_concatenated_data() -> None:
    torch.manual_seed(0)
    base = nn.Linear(5, 3, bias=False).eval()
    experts = [{"weight": torch.randn(3, 5)} for _ in range(3)]
    tasks = [FakeTask(f"t{i}", 5, i, shift=0.3 * i) for i in range(3)]
    p = problem(base, experts, tasks, {f"t{i}": nn.Identity() for i in range(3)}, budget=20)
    merged = regmean(p, EXACT).module.weight.detach()
    x = [t.inputs(20, 0) for t in tasks]  # the data the method drew
    lhs = torch.cat(x)  # (60, 5)
    rhs = torch.cat([xi @ e["weight"].T for xi, e in zip(x, experts, strict=True)])  # (60, 3)
    expected = torch.linalg.lstsq(lhs.double(), rhs.double()).solution.T.float()
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


def test_regmean_averages_biases_and_reports_budget() -> None:
    p = mlp_problem(n=3, budget=24)
    out = regmean(p, EXACT)
    bias = torch.stack([e["0.bias"] for e in p.experts]).mean(0)
    torch.testing.assert_close(out.module.state_dict()["0.bias"], bias)
    assert out.examples_used == 24 and out.labeled is False
    assert get_method("regmean").data == "unlabeled" and isinstance(get_method("regmean"), ModelMethod)


def test_copies_of_one_expert_return_it() -> None:
    p = mlp_problem(n=1)
    p.experts = [p.experts[0]] * 3
    p.tasks = [p.tasks[0]] * 3
    for fn in (regmean, regmean_plusplus):
        sd = fn(p, RegMeanParams()).module.state_dict()
        for k, v in p.experts[0].items():
            torch.testing.assert_close(sd[k], v, atol=1e-5, rtol=1e-5)


def test_gram_hook_drops_padded_tokens() -> None:
    lin = nn.Linear(2, 1)
    x = torch.tensor([[[1.0, 2.0], [9.0, 9.0]], [[3.0, 0.0], [0.0, 1.0]]])  # (b=2, t=2, d=2)
    mask = torch.tensor([[1, 0], [1, 1]])  # the (9, 9) token is padding
    grams = collect_grams(lin, [{"x": x, "attention_mask": mask}], lambda m, b: m(b["x"]), bf16=False)
    rows = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(grams["weight"], rows.T @ rows / 3)  # [[10, 2], [2, 5]] / 3


def test_regmean_plusplus_uses_merged_activations_block_by_block() -> None:
    p = mlp_problem(n=2, budget=16)
    prefix, blocks = find_blocks(p.base)
    assert prefix == "" and len(blocks) == 3
    sd = regmean_plusplus(p, EXACT).module.state_dict()
    xs = [t.inputs(16, 0) for t in p.tasks]
    w0 = torch.stack([e["0.weight"] for e in p.experts])
    g0 = torch.stack([x.T @ x / 16 for x in xs])
    torch.testing.assert_close(sd["0.weight"], regmean_merge(w0, g0), atol=1e-5, rtol=1e-5)  # first block
    h = [torch.relu(x @ sd["0.weight"].T + sd["0.bias"]) for x in xs]  # merged block-0 outputs
    w2 = torch.stack([e["2.weight"] for e in p.experts])
    g2 = torch.stack([hi.T @ hi / 16 for hi in h])
    torch.testing.assert_close(sd["2.weight"], regmean_merge(w2, g2), atol=1e-5, rtol=1e-5)
    plain = regmean(p, EXACT).module.state_dict()
    assert not torch.allclose(plain["2.weight"], sd["2.weight"], atol=1e-4)  # RegMean uses each expert's own


def test_sidecar_round_trip(tmp_path) -> None:
    stats = {"a.weight": torch.randn(4, 4), "b.bias": torch.rand(3)}
    path = save_stats(sidecar_path(tmp_path / "expert", "gram"), stats, kind="gram", examples=64)
    assert path.name == "unimerge_gram.safetensors"
    loaded = load_stats(path, kind="gram")
    assert loaded.kind == "gram" and loaded.examples == 64 and set(loaded.tensors) == set(stats)
    for k, v in stats.items():
        assert torch.equal(loaded.tensors[k], v)
    with pytest.raises(CheckpointError, match="expected 'fisher'"):
        load_stats(path, kind="fisher")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_stats(tmp_path / "missing.safetensors")
    paths = save_sidecars([tmp_path / "a", tmp_path / "b"], [stats, stats], kind="fisher", examples=8)
    assert paths[1] == tmp_path / "b" / "unimerge_fisher.safetensors" and load_stats(paths[1]).examples == 8


def test_mismatched_expert_is_a_clear_error() -> None:
    base = mlp()
    bad = perturbed(base, 0.1, 1)
    bad.pop("2.bias")
    p = problem(base, [bad], [FakeTask("t0", 6, 0)], heads(1))
    with pytest.raises(Exception, match=r"Expert 0 .*missing \['2.bias'\]"):
        regmean(p, RegMeanParams())
