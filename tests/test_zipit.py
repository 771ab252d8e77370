"""ZipIt! (unimerge.align.zipit): greedy feature matching within and across models, merge / unmerge.

A model zipped with a permuted copy of itself must pair every unit with its copy and give back the
original function; the 2-unit cases are worked out by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from test_align import CASES, mlp, scrambled
from unimerge.align import zip_matrices, zipit
from unimerge.align.activations import CorrelationStats
from unimerge.errors import ConfigError

pytest.importorskip("scipy")


@pytest.mark.parametrize("case", ["mlp", "resnet", "transformer"])
def test_zipping_a_model_with_its_permuted_copy_gives_back_the_model(case: str) -> None:
    make, inputs = CASES[case]
    model, x = (mlp(0, nn.Tanh), torch.randn(64, 3, 4)) if case == "mlp" else (make(0), inputs())
    zipped = zipit(model, scrambled(model, x), [x[: len(x) // 2], x[len(x) // 2 :]])
    with torch.no_grad():
        torch.testing.assert_close(zipped(x), model(x), atol=1e-5, rtol=1e-5)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(zipped.state_dict()[k], v, atol=1e-6, rtol=1e-6)


def correlation(features: Tensor) -> Tensor:
    stats = CorrelationStats(features.shape[1])
    stats.update(features, features)
    return stats.correlation()


# columns a0, a1, b0, b1 over 5 samples: a1 follows a0 closely, b0 and b1 are unrelated to them
FEATURES = torch.tensor(
    [
        [1.0, 1.0, 4.0, 2.0],
        [2.0, 2.0, 1.0, 4.0],
        [3.0, 3.0, 3.0, 1.0],
        [4.0, 5.0, 2.0, 3.0],
        [5.0, 5.0, 5.0, 5.0],
    ],
    dtype=torch.float64,
)


def test_greedy_matching_merges_within_a_model_when_that_pair_is_most_correlated() -> None:
    corr = correlation(FEATURES)
    assert corr[0, 1] > corr[:2, 2:].max()  # the premise: a0-a1 beats every cross pair
    z = zip_matrices(corr)
    # a0+a1 -> merged 0, then b0+b1 (the only features left) -> merged 1
    assert torch.equal(
        z.unmerge, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    )
    assert torch.equal(
        z.merge, torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]], dtype=torch.float64)
    )


def test_beta_zero_allows_only_cross_model_merges() -> None:
    corr = torch.tensor(
        [[1.0, 0.9, 0.2, 0.5], [0.9, 1.0, 0.4, 0.1], [0.2, 0.4, 1.0, 0.3], [0.5, 0.1, 0.3, 1.0]],
        dtype=torch.float64,
    )
    plain = zip_matrices(corr)
    assert torch.equal(plain.unmerge, torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.float64))
    cross = zip_matrices(corr, beta=0.0)  # a0-b1 (0.5) first, then a1-b0 (0.4)
    assert torch.equal(cross.unmerge, torch.tensor([[1.0, 0], [0, 1], [0, 1], [1, 0]], dtype=torch.float64))
    assert torch.equal(cross.merge, cross.unmerge.T / 2)


def test_alpha_lets_a_merged_feature_merge_again() -> None:
    corr = torch.tensor(
        [[1.0, 0.9, 0.8, 0.1], [0.9, 1.0, 0.85, 0.0], [0.8, 0.85, 1.0, 0.2], [0.1, 0.0, 0.2, 1.0]],
        dtype=torch.float64,
    )
    # a0+a1 (0.9); the cluster's correlation to b0 is min(0.8, 0.85) * alpha = 0.8 > b0-b1's 0.2
    z = zip_matrices(corr, alpha=1.0)
    assert torch.equal(z.unmerge, torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1]], dtype=torch.float64))
    torch.testing.assert_close(z.merge[0], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0], dtype=torch.float64))
    z0 = zip_matrices(corr, alpha=0.5)  # 0.8 * 0.5 = 0.4 still beats 0.2
    assert torch.equal(z0.unmerge, z.unmerge)
    z1 = zip_matrices(corr, alpha=0.2)  # 0.16 < 0.2: b0 pairs with b1
    assert torch.equal(z1.unmerge, torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.float64))


def tiny(w1: list[float], w2: list[float], b2: float) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(1, 2, bias=False), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(w1).reshape(2, 1))
        model[2].weight.copy_(torch.tensor([w2]))
        model[2].bias.fill_(b2)
    return model


def test_zipit_merges_two_units_of_the_same_model_by_hand() -> None:
    # a's hidden units relu(x), relu(1.1 x) are perfectly correlated, so are b's relu(-x), relu(-2 x);
    # every cross pair is anti-correlated: ZipIt! merges a0 with a1 and b0 with b1.
    a, b = tiny([1.0, 1.1], [2.0, 3.0], 1.0), tiny([-1.0, -2.0], [5.0, 7.0], 3.0)
    x = torch.tensor([[1.0], [2.0], [3.0], [-1.0], [-2.0]])
    zipped = zipit(a, b, [x])
    # fc1 rows: M averages the pair; fc2: U sums the pair's readers, the output is the models' mean
    torch.testing.assert_close(zipped[0].weight, torch.tensor([[1.05], [-1.5]]))
    torch.testing.assert_close(zipped[2].weight, torch.tensor([[(2.0 + 3.0) / 2, (5.0 + 7.0) / 2]]))
    torch.testing.assert_close(zipped[2].bias, torch.tensor([2.0]))


def test_zipit_rejects_missing_data_and_bad_parameters() -> None:
    model = mlp(0)
    with pytest.raises(ConfigError, match="needs data"):
        zipit(model, mlp(1), [])
    with pytest.raises(ConfigError, match="beta"):
        zip_matrices(torch.eye(4), beta=2.0)
    with pytest.raises(ConfigError, match="even size"):
        zip_matrices(torch.eye(3))
