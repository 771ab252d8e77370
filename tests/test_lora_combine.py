"""PEFT's add_weighted_adapter combination types (unimerge.lora.combine) against real PEFT."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from _lora_fixtures import lora_factors, lora_layers, tiny_peft_model
from unimerge import ConfigError
from unimerge.lora.combine import COMBINATION_TYPES, combine_lora

peft = pytest.importorskip("peft")

SAME_RANK = ["t1", "t2", "t3"]  # r = 2 each: the non-SVD types need one rank
MIXED_RANK = ["t1", "t2", "t4"]  # r = 2, 2, 3
RANKS = {"t1": 2, "t2": 2, "t3": 2, "t4": 3}
ALPHAS = {"t1": 4, "t2": 3, "t3": 2, "t4": 5}  # scales alpha / r differ
WEIGHTS = [1.0, -0.5, 0.7]


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_peft_model({n: {"r": RANKS[n], "lora_alpha": ALPHAS[n]} for n in RANKS})


def _peft_delta(layer: Any, name: str) -> torch.Tensor:
    a, b = lora_factors(layer, name)
    return layer.scaling[name] * (b @ a)  # in the B @ A layout (embeddings: PEFT's delta transposed)


CASES = [(ct, {"density": 0.5} if ct not in ("cat", "svd", "linear") else {}) for ct in COMBINATION_TYPES] + [
    ("ties", {"density": 0.6, "majority_sign_method": "frequency"}),
    ("ties_svd", {"density": 0.4, "majority_sign_method": "frequency", "svd_rank": 4}),
    ("svd", {"svd_clamp": 0.9}),
    ("svd", {"svd_rank": 2, "svd_full_matrices": False}),
]


@pytest.mark.parametrize(("combination_type", "options"), CASES)
def test_same_request_gives_peft_s_update(model: Any, combination_type: str, options: dict) -> None:
    adapters = MIXED_RANK if combination_type == "cat" or combination_type.endswith("svd") else SAME_RANK
    new = f"{combination_type}_{len(model.peft_config)}"
    state: dict[str, torch.Tensor] = {}
    original = torch.bernoulli

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:  # the global RNG state at PEFT's first DARE draw
        state.setdefault("rng", torch.get_rng_state())
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "bernoulli", spy)
        model.add_weighted_adapter(adapters, WEIGHTS, new, combination_type=combination_type, **options)
    assert ("rng" in state) == combination_type.startswith("dare")
    if "rng" in state:
        torch.set_rng_state(state["rng"])  # our draws start where PEFT's did, module by module in its order
    r = model.peft_config[new].r
    for layer in lora_layers(model):
        factors = [(*lora_factors(layer, n), layer.scaling[n]) for n in adapters]
        embedding = adapters[0] in layer.lora_embedding_A  # PEFT's delta of an embedding is (in, out)
        ours = combine_lora(combination_type, factors, WEIGHTS, transposed=embedding, **options)
        assert ours.r == r and ours.alpha == model.peft_config[new].lora_alpha
        want = _peft_delta(layer, new)
        got = ours.delta()
        scale = float(want.abs().max())
        assert scale > 0
        assert float((got - want).abs().max()) <= 1e-5 * scale, (combination_type, layer)


def test_exact_types_merge_the_updates(model: Any) -> None:
    """cat is exact: B A = sum_i w_i s_i B_i A_i; svd at full rank too."""
    layer = lora_layers(model)[1]  # lin1, (8, 6)
    factors = [(*lora_factors(layer, n), layer.scaling[n]) for n in MIXED_RANK]
    want = sum(w * _peft_delta(layer, n) for n, w in zip(MIXED_RANK, WEIGHTS, strict=True))
    torch.testing.assert_close(combine_lora("cat", factors, WEIGHTS).delta(), want)
    torch.testing.assert_close(
        combine_lora("svd", factors, WEIGHTS, svd_rank=6).delta(), want, atol=1e-5, rtol=1e-5
    )


def test_one_adapter_is_linear_and_keeps_its_update() -> None:
    a, b = torch.randn(2, 5), torch.randn(4, 2)
    out = combine_lora("ties_svd", [(a, b, 0.5)], [2.0], density=0.3)  # PEFT: one adapter -> linear
    assert out.r == 2
    torch.testing.assert_close(out.delta(), 2.0 * 0.5 * b @ a)


def test_bad_requests_name_the_fix() -> None:
    f = [(torch.randn(2, 5), torch.randn(4, 2), 1.0), (torch.randn(3, 5), torch.randn(4, 3), 1.0)]
    with pytest.raises(ConfigError, match="dare_ties_svd"):
        combine_lora("dare-ties", f, [1.0, 1.0])
    with pytest.raises(ConfigError, match="cat"):
        combine_lora("linear", f, [1.0, 1.0])  # different ranks
    with pytest.raises(ConfigError, match="density"):
        combine_lora("ties_svd", f, [1.0, 1.0])
    with pytest.raises(ConfigError, match="weight"):
        combine_lora("cat", f, [1.0])
