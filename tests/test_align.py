"""Permutation alignment (unimerge.align): derived specs, weight / activation matching, REPAIR, barriers.

Tiny models on the CPU. A model permuted by a random permutation of every group computes the same
function, and weight matching against the original must undo the permutation exactly (every tensor
equal); the 2-unit cases are scored by hand.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unimerge.align import (
    Axis,
    LinearPath,
    PathPoint,
    activation_matching,
    align_models,
    apply_permutation,
    declare_spec,
    interpolate,
    linear_path,
    merge_aligned,
    permutation_spec,
    plot_paths,
    repair,
    reset_batchnorm,
    weight_matching,
)
from unimerge.align.repair import channel_stats, repairable_layers
from unimerge.errors import AlignError, ConfigError, PlanError

pytest.importorskip("scipy")


def mlp(seed: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), act(), nn.Linear(16, 8), act(), nn.Linear(8, 3))


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class ResNet(nn.Module):
    """Stem conv + BN, two residual blocks sharing one channel group, pooled and flattened head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.blocks = nn.Sequential(Block(6), Block(6))
        self.head = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.head(F.max_pool2d(x, 4).flatten(1))


def resnet(seed: int) -> ResNet:
    torch.manual_seed(seed)
    model = ResNet()
    for m in model.modules():  # non-trivial BN parameters and statistics, so a wrong axis shows
        if isinstance(m, nn.BatchNorm2d):  # (positive shifts: no unit is dead on random inputs)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(0.2, 0.6)
            m.running_mean.normal_(0.0, 0.05)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


class TransformerBlock(nn.Module):
    def __init__(self, d: int = 8, heads: int = 4) -> None:
        super().__init__()
        self.emb, self.ln1 = nn.Linear(5, d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 16), nn.Linear(16, d)
        self.out = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.emb(x)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(torch.relu(self.fc1(self.ln2(x))))
        return self.out(x.mean(1))


def transformer(seed: int) -> TransformerBlock:
    torch.manual_seed(seed)
    return TransformerBlock().eval()


CASES = {
    "mlp": (lambda s: mlp(s), lambda: torch.randn(32, 3, 4)),
    "resnet": (resnet, lambda: torch.randn(8, 3, 8, 8)),
    "transformer": (transformer, lambda: torch.randn(8, 6, 5)),
}


def scrambled(model: nn.Module, x: Tensor, seed: int = 7) -> nn.Module:
    """``model`` with every permutation group of its spec reordered at random."""
    spec = permutation_spec(model, [x])
    gen = torch.Generator().manual_seed(seed)
    perms = {g: torch.randperm(n, generator=gen) for g, n in spec.sizes.items()}
    assert all(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    out = copy.deepcopy(model)
    out.load_state_dict(apply_permutation(spec, model.state_dict(), perms))
    return out


def assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------- derived specs


def test_mlp_spec_has_one_group_per_hidden_layer() -> None:
    spec = permutation_spec(mlp(0), [torch.randn(2, 3, 4)])
    assert dict(spec.groups) == {
        "1.weight:0": (Axis("1.weight", 0), Axis("1.bias", 0), Axis("3.weight", 1)),
        "3.weight:0": (Axis("3.weight", 0), Axis("3.bias", 0), Axis("5.weight", 1)),
    }
    assert dict(spec.sizes) == {"1.weight:0": 16, "3.weight:0": 8}


def test_resnet_residual_stream_is_one_group_and_flatten_keeps_blocks() -> None:
    spec = permutation_spec(resnet(0), [torch.randn(2, 3, 8, 8)])
    assert len(spec.groups) == 3  # the residual stream + each block's inner channels
    stream = {(a.name, a.axis, a.block) for a in spec.groups["stem.weight:0"]}
    for name in ("bn.running_mean", "blocks.0.b2.running_var", "blocks.1.b2.weight"):
        assert (name, 0, 1) in stream
    assert ("blocks.0.c2.weight", 0, 1) in stream and ("blocks.1.c1.weight", 1, 1) in stream
    assert ("head.weight", 1, 4) in stream  # 6 channels x (2 x 2) pooled pixels, channel-major
    inner = {(a.name, a.axis) for a in spec.groups["blocks.0.c1.weight:0"]}
    assert inner == {
        ("blocks.0.c1.weight", 0),
        ("blocks.0.b1.weight", 0),
        ("blocks.0.b1.bias", 0),
        ("blocks.0.b1.running_mean", 0),
        ("blocks.0.b1.running_var", 0),
        ("blocks.0.c2.weight", 1),
    }


def test_attention_heads_are_one_group_of_head_sized_units() -> None:
    spec = permutation_spec(transformer(0), [torch.randn(2, 6, 5)])
    heads = spec.groups["attn.in_proj_weight:0"]
    assert spec.sizes["attn.in_proj_weight:0"] == 4
    assert set(heads) == {
        Axis("attn.in_proj_weight", 0, block=2, segments=3),
        Axis("attn.in_proj_bias", 0, block=2, segments=3),
        Axis("attn.out_proj.weight", 1, block=2),
    }
    stream = {a.name for a in spec.groups["emb.weight:0"]}
    assert {"ln1.weight", "attn.out_proj.bias", "fc2.bias", "out.weight"} <= stream


def test_declared_spec_equals_the_derived_one() -> None:
    model = mlp(0)
    declared = declare_spec(
        {
            "1.weight:0": [("1.weight", 0), ("1.bias", 0), ("3.weight", 1)],
            "3.weight:0": [("3.weight", 0), ("3.bias", 0), ("5.weight", 1)],
        },
        model.state_dict(),
    )
    assert declared == permutation_spec(model, [torch.randn(2, 3, 4)])


# ----------------------------------------------------------------------------- weight matching


@pytest.mark.parametrize("case", sorted(CASES))
def test_weight_matching_undoes_a_random_permutation_exactly(case: str) -> None:
    make, inputs = CASES[case]
    model, x = make(0), inputs()
    permuted = scrambled(model, x)
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=1e-5)
    assert_same_tensors(weight_matching(model, permuted, [x]), model)


@pytest.mark.parametrize("case", sorted(CASES))
def test_aligned_model_computes_the_same_function(case: str) -> None:
    make, inputs = CASES[case]
    reference, model, x = make(0), make(1), inputs()
    aligned = weight_matching(reference, model, [x], seed=3)
    assert not all(
        torch.equal(a, b)
        for a, b in zip(aligned.state_dict().values(), model.state_dict().values(), strict=True)
    )
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), model(x), atol=1e-5, rtol=1e-5)


def two_unit(w1: list[list[float]], w2: list[list[float]]) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    net[0].weight.data, net[2].weight.data = torch.tensor(w1), torch.tensor(w2)
    return net


@pytest.mark.parametrize(
    ("w2", "swapped"),
    [
        # score = W1a W1b^T + W2a^T W2b = [[0.1, 0.8], [0.9, 0.2]] + [[3, 1], [6, 2]]: keep 5.3 < swap 8.7
        ([[3.0, 1.0]], True),
        # [[0.1, 0.8], [0.9, 0.2]] + [[1, 3], [2, 6]]: keep 7.3 > swap 6.7, though layer 1 alone swaps
        ([[1.0, 3.0]], False),
    ],
)
def test_two_unit_weight_matching_by_hand(w2: list[list[float]], swapped: bool) -> None:
    reference = two_unit([[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0]])
    model = two_unit([[0.1, 0.9], [0.8, 0.2]], w2)
    aligned = weight_matching(reference, model, [torch.randn(1, 2)])
    order = [1, 0] if swapped else [0, 1]
    assert torch.equal(aligned[0].weight, model[0].weight[order])
    assert torch.equal(aligned[2].weight, model[2].weight[:, order])


# ----------------------------------------------------------------------------- activation matching


def test_activation_matching_undoes_a_permutation_and_keeps_the_function() -> None:
    model, x = mlp(0, nn.Tanh), torch.randn(64, 3, 4)  # tanh: no dead units, so every unit is distinct
    permuted = scrambled(model, x)
    assert_same_tensors(activation_matching(model, permuted, [x[:32], x[32:]]), model)
    other = mlp(1, nn.Tanh)
    aligned = activation_matching(model, other, [x])
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), other(x), atol=1e-5, rtol=1e-5)


def test_activation_matching_handles_residual_streams_and_heads() -> None:
    for make, inputs in (CASES["resnet"], CASES["transformer"]):
        model, x = make(0), inputs()
        assert_same_tensors(activation_matching(model, scrambled(model, x), [x]), model)


# ----------------------------------------------------------------------------- merging aligned models


def test_merging_a_model_with_its_permuted_copy_returns_the_model() -> None:
    model, x = resnet(0), torch.randn(4, 3, 8, 8)
    merged = merge_aligned("linear", model, [scrambled(model, x)], [x])
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- REPAIR and barriers


def test_reset_batchnorm_averages_the_batch_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).eval()
    batches = [torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)]
    reset_batchnorm(model, batches)
    with torch.no_grad():
        hs = [model[0](b).transpose(0, 1).reshape(3, -1) for b in batches]  # (channels, 36) per batch
    bn = model[1]
    assert isinstance(bn.running_mean, Tensor) and isinstance(bn.running_var, Tensor)
    torch.testing.assert_close(bn.running_mean, torch.cat(hs, 1).mean(1), atol=1e-5, rtol=1e-5)
    want_var = (hs[0].var(1, unbiased=True) + hs[1].var(1, unbiased=True)) / 2
    torch.testing.assert_close(bn.running_var, want_var, atol=1e-5, rtol=1e-5)
    assert not model.training and bn.momentum == 0.1
    with pytest.raises(AlignError, match="no BatchNorm"):
        reset_batchnorm(mlp(0), batches)


def test_repair_sets_hidden_statistics_to_the_endpoints_average() -> None:
    a, x = mlp(0), torch.randn(256, 3, 4)
    b = weight_matching(a, mlp(1), [x])
    mid = copy.deepcopy(a)
    mid.load_state_dict(interpolate(a.state_dict(), b.state_dict(), 0.5))
    layers = repairable_layers(mid, [x])
    assert layers == ["1", "3"]  # the output layer is not repaired
    repair(mid, [a, b], [x])
    got, ends = channel_stats(mid, layers, [x]), [channel_stats(m, layers, [x]) for m in (a, b)]
    for name in layers:
        for i in (0, 1):  # mean, std
            want = (ends[0][name][i] + ends[1][name][i]) / 2
            torch.testing.assert_close(got[name][i], want, atol=1e-4, rtol=1e-4)


def test_barrier_of_a_path_by_hand() -> None:
    pts = (PathPoint(0.0, 1.0, 0.9), PathPoint(0.5, 2.5, 0.5), PathPoint(1.0, 2.0, 0.7))
    path = LinearPath(pts)
    assert path.loss_barrier == pytest.approx(2.5 - 1.5)
    assert path.accuracy_barrier == pytest.approx(0.8 - 0.5)
    a, b = (
        {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)},
        {"w": torch.tensor([4.0, 0.0]), "n": torch.tensor(5)},
    )
    mid = interpolate(a, b, 0.25)
    assert torch.equal(mid["w"], torch.tensor([1.0, 1.5])) and int(mid["n"]) == 3


def test_linear_path_between_a_model_and_its_permuted_copy_is_flat(tmp_path: Path) -> None:
    model, x = mlp(0), torch.randn(16, 3, 4)
    batches = [(x, torch.randint(0, 3, (16,)))]
    naive = linear_path(model, model, batches, points=5)
    assert [p.t for p in naive.points] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert naive.loss_barrier == pytest.approx(0.0, abs=1e-6)
    aligned = linear_path(model, weight_matching(model, scrambled(model, x), [x]), batches)
    assert len(aligned.points) == 11 and aligned.loss_barrier == pytest.approx(0.0, abs=1e-6)
    pytest.importorskip("matplotlib")
    out = plot_paths({"same": naive, "aligned": aligned}, tmp_path / "path.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- bad input


def test_different_architectures_name_the_module_and_shapes() -> None:
    a = mlp(0)
    b = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 9), nn.ReLU(), nn.Linear(9, 3)
    )
    with pytest.raises(PlanError, match=r"module '3'.*'3.weight' has shape \[8, 16\].*\[9, 16\]"):
        weight_matching(a, b, [torch.randn(2, 3, 4)])
    c = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    with pytest.raises(PlanError, match=r"module '2' \(ReLU\).*'2' \(Tanh\)"):
        weight_matching(a, c, [torch.randn(2, 3, 4)])


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) if x.sum() > 0 else x  # data-dependent control flow: fx cannot trace it


def test_untraceable_model_says_how_to_declare_the_spec() -> None:
    with pytest.raises(AlignError, match=r"Cannot trace Branchy.*declare_spec"):
        permutation_spec(Branchy(), [torch.randn(2, 4)])


def test_unknown_module_with_weights_is_named() -> None:
    class WithGRU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(4, 4, batch_first=True)

        def forward(self, x: Tensor) -> Tensor:
            return self.rnn(x)[0]

    with pytest.raises(AlignError, match=r"module 'rnn' \(GRU\).*declare_spec"):
        permutation_spec(WithGRU(), [torch.randn(2, 3, 4)])


def test_declared_spec_with_a_wrong_axis_is_rejected() -> None:
    with pytest.raises(AlignError, match=r"axis 1 of '5.weight' to have length 16.*\[3, 8\]"):
        declare_spec({"h": [("1.weight", 0), ("5.weight", 1)]}, mlp(0).state_dict())


def test_activation_matching_without_data_says_so() -> None:
    with pytest.raises(ConfigError, match="needs data"):
        activation_matching(mlp(0), mlp(1), [])
    with pytest.raises(ConfigError, match="needs data"):
        align_models(mlp(0), [mlp(1)], [torch.randn(2, 3, 4)], method="activation")


class Scaled(nn.Module):
    """A conv whose output is scaled by a per-channel ``(C, 1, 1)`` parameter, then shifted by one
    that varies along a spatial axis (``(1, 1, W)``: not per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 4, 1), nn.Conv2d(4, 3, 1)
        self.gain = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.randn(1, 1, 5))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.conv(x) * self.gain + self.shift))


def test_broadcast_parameters_follow_their_channel_axis() -> None:
    torch.manual_seed(0)
    model, x = Scaled(), torch.randn(2, 2, 5, 5)
    spec = permutation_spec(model, [x])
    (axes,) = spec.groups.values()
    assert Axis("gain", 0) in axes and "shift" not in {a.name for a in axes}
    permuted = scrambled(model, x)
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=1e-5)
    assert_same_tensors(weight_matching(model, permuted, [x]), model)
