"""Contract tests parametrized over the registry: every data-free method, present and future."""

from __future__ import annotations

import json
import re

import pytest
import torch

from unimerge import ConfigError, get_method, list_methods, merge_state_dicts
from unimerge.core import validate_params

METHODS = [m.name for m in list_methods(data="none")]


def _state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w2d": (12, 8), "bias": (8,), "conv": (4, 3, 2, 2), "scalar": ()}
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


def _merge_n(method: str, expert: dict, base: dict, seed: int = 0, **params) -> dict[str, torch.Tensor]:
    """Merge as many copies of ``expert`` as the method accepts (3, else 2, else 1)."""
    last: Exception | None = None
    for n in (3, 2, 1):
        try:
            return merge_state_dicts(method, [expert] * n, base, seed=seed, **params)
        except ConfigError as err:  # a method limited to fewer models says so
            last = err
    raise AssertionError(f"{method} accepted no model count: {last}")


def test_registry_is_not_empty_and_has_the_core_methods() -> None:
    core = {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "della", "slerp",
            "model_stock", "passthrough", "tsv_m", "iso_c"}
    assert core <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_copies_of_one_model_return_it(method: str) -> None:
    expert = _state(1)
    out = _merge_n(method, expert, expert)
    for k, v in expert.items():
        torch.testing.assert_close(out[k], v, atol=1e-5, rtol=1e-5, msg=f"{method}: {k}")


@pytest.mark.parametrize("method", METHODS)
def test_results_own_their_memory_and_inputs_are_untouched(method: str) -> None:
    """Methods may overwrite their stacked input, and may return a row of it; the in-memory API
    hands back tensors that hold only themselves (not the n-model stack) and never writes the
    caller's state dicts."""
    base, experts = _state(0), [_state(1), _state(2)]
    before = [{k: v.clone() for k, v in sd.items()} for sd in (base, *experts)]
    try:
        out = merge_state_dicts(method, experts, base, seed=0)
    except ConfigError:  # one-other-model methods
        experts = experts[:1]
        out = merge_state_dicts(method, experts, base, seed=0)
    for k, v in out.items():
        assert v.untyped_storage().nbytes() == v.nbytes, (method, k)
    for sd, old in zip((base, *experts), before, strict=False):
        for k in sd:
            assert torch.equal(sd[k], old[k]), (method, k)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shape_and_dtype_preserved(method: str, dtype: torch.dtype) -> None:
    base, expert = _state(0, dtype), _state(1, dtype)
    out = _merge_n(method, expert, base)
    for k, v in base.items():
        assert out[k].shape == v.shape and out[k].dtype == dtype, (method, k)
        assert torch.isfinite(out[k].float()).all(), (method, k)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_output(method: str) -> None:
    base = _state(0)
    experts = [_state(i) for i in (1, 2, 3)]
    info = get_method(method)
    point = {k: v[0] for k, v in info.grid.items()}  # e.g. a density < 1 so DARE drops something
    n = 3
    for n in (3, 2, 1):
        try:
            a = merge_state_dicts(method, experts[:n], base, seed=7, **point)
            break
        except ConfigError:
            continue
    b = merge_state_dicts(method, experts[:n], base, seed=7, **point)
    for k in a:
        assert torch.equal(a[k], b[k]), (method, k)
    if info.random:
        c = merge_state_dicts(method, experts[:n], base, seed=8, **point)
        assert any(not torch.equal(a[k], c[k]) for k in a), f"{method}: seed has no effect"


@pytest.mark.parametrize("method", METHODS)
def test_metadata_and_grid_are_valid(method: str) -> None:
    info = get_method(method)
    assert re.match(r"https?://", info.paper), info.paper
    assert info.summary, f"{method} has no docstring summary"
    json.dumps(info.to_json(), default=str)
    schema = info.param_schema()
    assert "weight" in schema
    # every grid point validates against the method's parameter models
    from itertools import product

    keys = list(info.grid)
    for values in product(*(info.grid[k] for k in keys)):
        point = dict(zip(keys, values, strict=True))
        glob = {k: v for k, v in point.items() if schema[k]["scope"] == "global"}
        per = {k: v for k, v in point.items() if schema[k]["scope"] == "per_model"}
        validate_params(info, glob, [per, per])


@pytest.mark.parametrize("method", METHODS)
def test_numeric_parameters_are_bounded(method: str) -> None:
    info = get_method(method)
    for model in (info.params, info.model_params):
        for name, f in model.model_fields.items():
            if f.annotation in (int, float):
                bounds = [m for m in f.metadata if any(hasattr(m, a) for a in ("ge", "gt", "le", "lt"))]
                assert len(bounds) >= 1, f"{method}.{name} has no bounds"


def test_unknown_method_suggests_a_fix() -> None:
    with pytest.raises(ConfigError, match="dare_ties"):
        get_method("dare-tie")


def test_unknown_parameter_lists_the_valid_ones() -> None:
    sd = _state(0)
    with pytest.raises(ConfigError, match="density"):
        merge_state_dicts("ties", [sd, sd], sd, densty=0.5)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_out_of_range_is_rejected(density: float) -> None:
    sd = _state(0)
    with pytest.raises(ConfigError, match="density"):
        merge_state_dicts("ties", [sd, sd], sd, density=density)
