"""Shared merge primitives: hand-computed cases, references and invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unimerge.methods.primitives import (
    breadcrumbs_mask,
    consensus_sums,
    disjoint_mean,
    elect_sign,
    expand_like,
    fraction,
    generator_for,
    kth_largest,
    masked_sums,
    rank_magnitude_probs,
    rescale_to_norm,
    sparsify_breadcrumbs,
    sparsify_magnitude,
    sparsify_random,
    sparsify_rank_magnitude,
    topk_mask,
    variance_over_models,
    weighted_sum,
)


def _reference_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k by a full stable sort: largest values first, lowest index first among equals."""
    order = torch.argsort(-scores.reshape(-1), stable=True)[:k]
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.reshape(scores.shape)


def test_expand_like_and_weighted_sum():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    w = torch.tensor([1.0, -1.0, 0.5])
    assert expand_like(w, torch.zeros(3, 2, 2)).shape == (3, 1, 1)
    torch.testing.assert_close(weighted_sum(x, w), torch.tensor([0.5, 1.0]))  # 1-3+2.5, 2-4+3


def test_fraction_restores_the_decimal_written():
    stored = torch.tensor([0.7, 0.29, 0.01], dtype=torch.float32)
    assert [fraction(v) for v in stored] == [0.7, 0.29, 0.01]
    assert int(fraction(stored[0]) * 10) == 7  # int(float32(0.7) * 10) would be 6
    assert fraction(torch.tensor(0.3, dtype=torch.float64)) == 0.3


def test_topk_mask_keeps_lowest_indices_among_ties():
    scores = torch.tensor([1.0, 3.0, 3.0, 3.0, 2.0])
    assert topk_mask(scores, 2).tolist() == [False, True, True, False, False]
    assert topk_mask(scores, 4).tolist() == [False, True, True, True, True]
    assert topk_mask(scores, 0).sum() == 0 and topk_mask(scores, 9).all()
    out = torch.empty(5)
    assert topk_mask(scores, 2, out=out).tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("kind", ["continuous", "ties"])
@pytest.mark.parametrize("frac", [0.001, 0.2, 0.5, 0.97])
def test_topk_mask_matches_full_sort_on_large_tensors(kind, frac):
    g = torch.Generator().manual_seed(1)
    n = 1_500_000  # large enough for the sampled-bracket path
    scores = (
        torch.randn(n, generator=g)
        if kind == "continuous"
        else torch.randint(0, 500, (n,), generator=g).float()
    )
    k = int(frac * n)
    mask = topk_mask(scores.reshape(1000, 1500), k).reshape(-1)
    assert int(mask.sum()) == k
    assert torch.equal(mask, _reference_topk(scores, k))
    assert kth_largest(scores, k) == torch.sort(scores, descending=True).values[k - 1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=30), st.integers(0, 31))
def test_topk_mask_property(values, k):
    scores = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(topk_mask(scores, k), _reference_topk(scores, min(k, len(values))))


def test_sparsify_magnitude_hand_case():
    x = torch.tensor([[1.0, -2.0, 3.0, -0.5, 0.1], [-1.5, 1.0, 2.0, 0.2, -4.0]])
    out = sparsify_magnitude(x, torch.tensor([0.6, 0.4]))  # k = int(0.6*5) = 3 and int(0.4*5) = 2
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 3.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0, -4.0]]))
    # L1 rescale: model 0 keeps |1|+|2|+|3| = 6 of 6.6 -> factor 1.1
    scaled = sparsify_magnitude(x, torch.tensor([0.6, 1.0]), rescale=True, norm="l1")
    torch.testing.assert_close(scaled[0], torch.tensor([1.1, -2.2, 3.3, 0.0, 0.0]))
    torch.testing.assert_close(scaled[1], x[1])  # density 1: untouched, not rescaled
    assert torch.equal(x[0], torch.tensor([1.0, -2.0, 3.0, -0.5, 0.1]))  # input not modified


def test_breadcrumbs_mask_drops_largest_and_smallest():
    x = torch.tensor([0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -1.0])
    # target int(0.5*10) = 5 kept, n_top = int(0.1*10) = 1 largest dropped, 4 smallest dropped
    assert breadcrumbs_mask(x, 0.5, 0.1).nonzero().reshape(-1).tolist() == [4, 5, 6, 7, 8]
    # gamma too large: only 10 - 5 = 5 largest can go, keeping the 5 smallest
    assert breadcrumbs_mask(x, 0.5, 0.6).nonzero().reshape(-1).tolist() == [0, 1, 2, 3, 4]
    # gamma 0: plain magnitude top-k
    assert breadcrumbs_mask(x, 0.3, 0.0).nonzero().reshape(-1).tolist() == [7, 8, 9]
    out = sparsify_breadcrumbs(x[None], torch.tensor([0.5]), torch.tensor([0.1]), rescale=True)
    factor = 5.5 / 3.5  # L1 before / after
    torch.testing.assert_close(out[0, 4:9], x[4:9] * factor)
    assert out[0, :4].abs().sum() == 0 and out[0, 9] == 0


def test_rescale_to_norm_variants():
    orig = torch.tensor([3.0, -4.0, 1.0])
    masked = torch.tensor([3.0, 0.0, 0.0])
    torch.testing.assert_close(
        rescale_to_norm(masked.clone(), orig, "l1", 0.5), torch.tensor([8.0, 0.0, 0.0])
    )
    l2 = math.sqrt(26.0) / 3.0
    torch.testing.assert_close(
        rescale_to_norm(masked.clone(), orig, "l2", 0.5), torch.tensor([3.0 * l2, 0.0, 0.0])
    )
    torch.testing.assert_close(
        rescale_to_norm(masked.clone(), orig, "linf", 0.5), torch.tensor([4.0, 0.0, 0.0])
    )
    torch.testing.assert_close(
        rescale_to_norm(masked.clone(), orig, "density", 0.5), torch.tensor([6.0, 0.0, 0.0])
    )
    zero = torch.zeros(3)
    assert torch.equal(rescale_to_norm(zero.clone(), orig, "l1", 0.5), zero)  # nothing kept: no division


def test_sparsify_random_same_seed_and_expectation():
    x = torch.linspace(0.5, 1.5, 200_000)[None]
    d = torch.tensor([0.3])
    a = sparsify_random(x, d, rescale=True, generator=torch.Generator().manual_seed(7))
    b = sparsify_random(x, d, rescale=True, generator=torch.Generator().manual_seed(7))
    c = sparsify_random(x, d, rescale=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = a[0] != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005  # Bernoulli(0.3): sd 0.001
    torch.testing.assert_close(a[0][kept], x[0][kept] / 0.3)  # norm="density": divide by density
    assert abs(a.mean().item() - x.mean().item()) < 0.01  # E[out] = x
    assert torch.equal(sparsify_random(x, torch.tensor([1.0]), rescale=True, generator=None), x)


def test_rank_magnitude_probs_hand_case():
    probs = rank_magnitude_probs(torch.tensor([3.0, -1.0, 2.0, 0.5]), 0.5, 0.2)
    # ranks by |x|: 3, 1, 2, 0 of 0..3 -> 0.3 + rank/3 * 0.4
    torch.testing.assert_close(probs, torch.tensor([0.7, 0.3 + 0.4 / 3, 0.3 + 0.8 / 3, 0.3]))
    rows = rank_magnitude_probs(torch.tensor([[1.0, 2.0], [5.0, -4.0]]), 0.5, 0.1)  # ranked per row
    torch.testing.assert_close(rows, torch.tensor([[0.4, 0.6], [0.6, 0.4]]))
    torch.testing.assert_close(
        rank_magnitude_probs(torch.tensor([[2.0], [3.0]]), 0.5, 0.1), torch.full((2, 1), 0.5)
    )


def test_sparsify_rank_magnitude_keep_frequencies():
    row = torch.tensor([0.1, -0.4, 0.3, 0.2, -0.5])
    x = row.repeat(20_000, 1)[None]  # (1, 20000, 5)
    out = sparsify_rank_magnitude(
        x, torch.tensor([0.5]), torch.tensor([0.2]), rescale=False, generator=torch.Generator().manual_seed(0)
    )
    freq = (out[0] != 0).float().mean(dim=0)
    expected = torch.tensor([0.3, 0.6, 0.5, 0.4, 0.7])  # ranks 0, 3, 2, 1, 4 -> 0.3 + rank * 0.1
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)  # sd <= 0.0036


def test_elect_sign_sum_count_ties_and_zeros():
    x = torch.tensor([[1.0, -2.0, 0.0, 1.0], [-1.0, 1.0, 0.0, 1.0], [0.5, 0.5, 0.0, -3.0]])
    # sums: 0.5, -0.5, 0, -1 -> + - + - ; zeros never agree
    assert elect_sign(x, "sum").tolist() == [
        [True, True, False, False],
        [False, False, False, False],
        [True, False, False, True],
    ]
    # votes: (2+,1-), (2+,1-), none -> +, (2+,1-)
    assert elect_sign(x, "count").tolist() == [
        [True, False, False, True],
        [False, True, False, True],
        [True, True, False, False],
    ]


@pytest.mark.parametrize("method", ["sum", "count"])
def test_consensus_sums_equals_elect_then_masked_sums(method):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 50, 7, generator=g) * (torch.rand(4, 50, 7, generator=g) > 0.3)  # with zeros
    w = torch.tensor([1.0, 0.5, -0.7, 2.0])
    num, den = consensus_sums(x, w, method)
    ref_num, ref_den = masked_sums(x, elect_sign(x, method), w)
    torch.testing.assert_close(num, ref_num)
    torch.testing.assert_close(den, ref_den)
    scales = torch.tensor([0.5, 0.0, 2.0, 1.0])  # SCE: scale the sums, not the election
    num, den = consensus_sums(x, w, method, scales=scales)
    torch.testing.assert_close(num, masked_sums(x * expand_like(scales, x), elect_sign(x, method), w)[0])
    torch.testing.assert_close(den, ref_den)
    mean, _ = consensus_sums(x, w, method, normalize=True)
    torch.testing.assert_close(mean, disjoint_mean(x, elect_sign(x, method), w))


def test_consensus_sums_chunks_match_whole():
    x = torch.randn(3, 700_001, generator=torch.Generator().manual_seed(4))  # several chunks, ragged end
    num, den = consensus_sums(x, torch.tensor([1.0, 2.0, 0.5]))
    ref_num, ref_den = masked_sums(x, elect_sign(x), torch.tensor([1.0, 2.0, 0.5]))
    torch.testing.assert_close(num, ref_num)
    torch.testing.assert_close(den, ref_den)


def test_disjoint_mean_hand_case():
    x = torch.tensor([[2.0, -1.0, 0.0], [4.0, 3.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(disjoint_mean(x, mask), torch.tensor([3.0, -1.0, 0.0]))
    w = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(disjoint_mean(x, mask, w), torch.tensor([6.0 / 4.0, -1.0, 0.0]))  # (2+4)/(1+3)


def test_generator_for_is_deterministic_per_name():
    a = torch.rand(4, generator=generator_for(0, "w"))
    assert torch.equal(a, torch.rand(4, generator=generator_for(0, "w")))
    assert not torch.equal(a, torch.rand(4, generator=generator_for(0, "v")))
    assert not torch.equal(a, torch.rand(4, generator=generator_for(1, "w")))


def test_variance_over_models():
    x = torch.tensor([[1.0, -2.0, 0.0], [3.0, 2.0, -1.0]])
    torch.testing.assert_close(variance_over_models(x), torch.tensor([1.0, 4.0, 0.25]))
    y = torch.randn(4, 30, 7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(variance_over_models(y), y.var(dim=0, unbiased=False))


def test_consensus_sum_tie_elects_plus_and_zeros_never_agree():
    x = torch.tensor([[1.0, 2.0, 0.0], [-1.0, -3.0, 0.0]])  # entry 0 sums to 0: + is elected
    num, den = consensus_sums(x, torch.tensor([2.0, 1.0]))
    assert num.tolist() == [1.0, -3.0, 0.0]
    assert den.tolist() == [2.0, 1.0, 0.0]


def test_weighted_sum_hand_case():
    x = torch.tensor([[1.0, 2.0], [3.0, -4.0], [0.5, 0.0]])
    assert weighted_sum(x, torch.tensor([2.0, -1.0, 4.0])).tolist() == [1.0, 8.0]


def test_uniform_is_seeded_uniform_and_advances_its_generator():
    from unimerge.methods.primitives import uniform_

    a = uniform_(torch.empty(200_000), torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(uniform_(torch.empty(200_000), g), a)  # same seed, same samples
    assert not torch.equal(uniform_(torch.empty(200_000), g), a)  # the generator moved on
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0
    for p in (0.1, 0.5, 0.9):  # P(u < p) = p within 5 standard deviations
        assert abs(float((a < p).float().mean()) - p) < 5 * (p * (1 - p) / a.numel()) ** 0.5
    strided = torch.empty(4, 6)[:, ::2]  # not contiguous: torch.rand fills it
    assert uniform_(strided, torch.Generator().manual_seed(0)).shape == (4, 3)
