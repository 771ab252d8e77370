"""Partial zipping (unimerge.align.partial): ZipIt! up to a cut, one head per model after it.

Closed forms: cut at the last hidden layer, the trunk is the fully zipped model's and the mean of
the heads is its output (the head layer is linear and averaged); cut at the first layer, each head
is its model's tail after ``U_m M``; with duplicated features zip + unzip loses nothing, so each head
computes exactly its own model's function.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from test_align import mlp, resnet, scrambled
from unimerge.align import PartialZip, partial_zip, zip_models
from unimerge.align.zipit import zipped_groups
from unimerge.errors import AlignError

pytest.importorskip("scipy")

X = torch.randn(64, 3, 4, generator=torch.Generator().manual_seed(0))


def test_cut_at_the_last_hidden_layer_is_the_full_zip_with_separate_heads() -> None:
    models = [mlp(s) for s in range(3)]
    full, part = zip_models(models, [X]), partial_zip(models, [X], "4")
    with torch.no_grad():
        torch.testing.assert_close(part.trunk(X), full[:5](X), atol=1e-6, rtol=1e-6)
        outs = part(X)
        assert len(outs) == 3
        torch.testing.assert_close(sum(outs) / 3, full(X), atol=1e-6, rtol=1e-6)
        for m, model in enumerate(models):  # each head is its model's own last layer
            torch.testing.assert_close(
                part.heads[m](part.unzip(part.trunk(X), m)), model[5](part.unzip(full[:5](X), m))
            )
    n_trunk = sum(p.numel() for p in part.trunk.parameters())
    n_heads = sum(p.numel() for p in part.heads.parameters())
    assert n_trunk == sum(p.numel() for p in full[:5].parameters())
    assert n_heads == 3 * sum(p.numel() for p in models[0][5].parameters())


@pytest.mark.parametrize("n", [2, 3])
def test_cut_at_the_first_layer_is_each_tail_after_unmerge_merge(n: int) -> None:
    models = [mlp(s, nn.Tanh) for s in range(n)]
    part = partial_zip(models, [X], "1")
    z = zipped_groups(models, [X]).zips["1.weight:0"]
    with torch.no_grad():
        h_all = torch.cat([m[:2](X) for m in models], dim=1)  # (64, N * 16) pre-activations
        merged = h_all @ z.merge.T.float()  # the trunk's output: M [h_1; ...; h_N]
        torch.testing.assert_close(part.trunk(X), merged, atol=1e-6, rtol=1e-6)
        for m, (model, out) in enumerate(zip(models, part(X), strict=True)):
            own = merged @ z.unmerge[m * 16 : (m + 1) * 16].T.float()
            torch.testing.assert_close(out, model[2:](own), atol=1e-6, rtol=1e-6)


def duplicated(seed: int, width: int, copies: int) -> nn.Sequential:
    """A 3 -> width -> 2 MLP whose hidden units come in ``copies`` identical copies."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2))
    with torch.no_grad():
        distinct = width // copies
        model[0].weight.copy_(model[0].weight[:distinct].repeat_interleave(copies, 0))
        model[0].bias.copy_(model[0].bias[:distinct].repeat_interleave(copies, 0))
    return model


@pytest.mark.parametrize(
    ("n", "width", "copies", "alpha", "stop_at"),
    [(2, 4, 2, 0.0, "1"), (2, 4, 2, 0.0, "0"), (3, 3, 3, 1.0, "1")],
)
def test_duplicated_features_zip_and_unzip_losslessly(
    n: int, width: int, copies: int, alpha: float, stop_at: str
) -> None:
    # every model's copies are perfectly correlated and merge with each other first. n=2: C=4, a
    # pair per unit, 2 = floor(4 // 2) same-model merges per model. n=3: C=3, one unit three times,
    # 2 = floor(floor(2 * 3 / 3)) merges per model; alpha=1 lets a merged pair take its third copy.
    models = [duplicated(s, width, copies) for s in range(n)]
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(1))
    part = partial_zip(models, [x], stop_at, alpha=alpha)
    u = part.unmerge.reshape(n, width, -1)
    assert all(bool((u[m].sum(0) > 0).sum() == width // copies) for m in range(n))  # no cross-model merge
    with torch.no_grad():
        for model, out in zip(models, part(x), strict=True):
            torch.testing.assert_close(out, model(x), atol=1e-6, rtol=1e-6)


def test_resnet_cut_after_the_stem_gives_back_each_model() -> None:
    model, x = resnet(0), torch.randn(8, 3, 8, 8)
    copy = scrambled(model, x)
    part = partial_zip([model, copy], [x], "bn")
    assert isinstance(part, PartialZip) and part.axis.axis == 1
    with torch.no_grad():
        for out, ref in zip(part(x), (model(x), copy(x)), strict=True):
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_partial_zip_refuses_cuts_it_cannot_make() -> None:
    models = [mlp(0), mlp(1)]
    with pytest.raises(AlignError, match="names 0 nodes"):
        partial_zip(models, [X], "nope")
    with pytest.raises(AlignError, match="carries no zipped permutation group.*'1', '2', '3', '4'"):
        partial_zip(models, [X], "5")
    with pytest.raises(AlignError, match="also reads"):  # inside a residual block
        partial_zip([resnet(0), resnet(1)], [torch.randn(8, 3, 8, 8)], "blocks.0.c1")
