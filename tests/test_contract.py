"""Contract tests parametrized over the registry: every data-free method, present and future."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

from _bounds import CHECKED_ELSEWHERE, unbounded_fields
from unimerge import ConfigError, TensorMethod, get_method, list_methods, merge_state_dicts
from unimerge.core import validate_params

METHODS = [m.name for m in list_methods(kind=TensorMethod)]
SHAPES = {"w2d": (12, 8), "bias": (8,), "conv": (4, 3, 2, 2), "scalar": ()}


def _state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}


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
    core = {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "della",
        "slerp",
        "model_stock",
        "passthrough",
        "tsv_m",
        "iso_c",
    }
    assert core <= set(METHODS)


# --------------------------------------------------------------- copies of one expert, a base apart
#
# The base and the expert differ, so the task vector tau = expert - base is not zero. All entries are
# multiples of 1/256 (sums, differences and halvings are exact in float32), no base entry is zero, and
# the |tau| of a tensor are distinct (top-k selections have no ties).


def _signs(n: int, g: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


def _base_and_expert(seed: int = 0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base, expert = {}, {}
    for k, shape in SHAPES.items():
        n = math.prod(shape)
        b = (torch.randint(1, 65, (n,), generator=g).float() * _signs(n, g) / 16).reshape(
            shape
        )  # |b| >= 1/16
        tau = ((torch.randperm(n, generator=g).float() + 1) * _signs(n, g) / 256).reshape(
            shape
        )  # |tau| distinct
        base[k], expert[k] = b, b + tau
    return base, expert


def _top(tau: Tensor, fraction: float) -> Tensor:
    """``tau`` on its ``max(1, int(fraction * numel))`` entries of largest magnitude (the TIES trim keeps at
    least one, as mergekit 0.1.5), zero elsewhere."""
    k = max(1, int(fraction * tau.numel()))
    keep = torch.zeros(tau.numel(), dtype=torch.bool)
    keep[tau.abs().reshape(-1).argsort(descending=True)[:k]] = True
    return tau * keep.reshape(tau.shape)


def _svd(tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.linalg.svd(tau.double(), full_matrices=False)  # (m, q), (q,), (q, k)


def _matrices_only(fn: Callable[[Tensor, int], Tensor]) -> Callable[[Tensor, Tensor, int], Tensor]:
    """A spectral expectation for 2-D tensors; the other tensors are averaged (tau), as the methods do."""
    return lambda tau, base, n: fn(tau, n).float() if tau.dim() == 2 else tau


@_matrices_only
def _tsv(tau: Tensor, n: int) -> Tensor:
    r = max(1, int(min(tau.shape) * (1.0 / n)))
    u, s, vh = _svd(tau)
    return (u[:, :r] * s[:r]) @ vh[:r]  # the best rank-r approximation of tau


@_matrices_only
def _iso_c(tau: Tensor, n: int) -> Tensor:
    u, s, vh = _svd(tau)  # the SVD of the sum n tau: same vectors, n times the values
    return n * s.mean() * (u @ vh)


@_matrices_only
def _iso_cts(tau: Tensor, n: int) -> Tensor:
    q = min(tau.shape)
    common = int(q * 0.8)  # common_space_fraction 0.8; the rest, rounded to a multiple of n, task-specific
    specific = round((q - common) / n) * n
    common, per_task = (q, 0) if specific // n == 0 or specific > q else (q - specific, specific // n)
    d = common + per_task  # the copies' task-specific directions are tau's next per_task singular ones
    u, s, vh = _svd(tau)
    s_mean = n * s[:d].sum() / (n * per_task + common)  # common values are n s_j, each copy adds s_j
    return s_mean * (u[:, :d] @ vh[:d])


@_matrices_only
def _star(tau: Tensor, n: int) -> Tensor:
    u, s, vh = _svd(tau)
    r = int((s.cumsum(0) < 0.4 * s.sum()).sum()) + 1  # fewest values reaching eta=0.4 of the nuclear norm
    return (u[:, :r] * (s[:r] * s.sum() / s[:r].sum())) @ vh[:r]  # rescaled to the full nuclear norm


def _pcb(tau: Tensor, base: Tensor, n: int) -> Tensor:
    mags = tau.abs().reshape(-1).sort().values
    threshold = mags[min(int(tau.numel() * (1 - 0.1)), tau.numel() - 1)]
    return tau * (tau.abs() > threshold)


def _slerp_half(tau: Tensor, base: Tensor, n: int) -> Tensor:
    expert = base + tau
    cos = float(
        torch.dot(base.reshape(-1).double(), expert.reshape(-1).double()) / (base.norm() * expert.norm())
    )
    if abs(cos) > 0.9995:  # colinear: linear interpolation
        return (expert - base) / 2
    return (base + expert) / (
        2 * math.cos(math.acos(cos) / 2)
    ) - base  # sin(th/2) / sin(th) = 1 / (2 cos(th/2))


def _knots_ties(tau: Tensor, base: Tensor, n: int) -> Tensor:
    if tau.dim() < 2:  # no basis to share: TIES on the plain task vectors
        return _top(tau, 0.2)
    u, s, vh = _svd(tau.reshape(tau.shape[0], -1))  # SVD of [tau ... tau]: U and s * V_i^T = s * V^T
    return (u @ _top(s[:, None] * vh, 0.2)).float().reshape(tau.shape)


@dataclass(frozen=True)
class Identical:
    """What merging ``copies`` copies of one expert with a different base must give, per tensor.

    ``task(tau, base, n)`` is the merged task vector (the result is ``base + task``); ``None`` means
    the expert itself. ``params`` override defaults, ``exact`` asks for bit equality.
    """

    task: Callable[[Tensor, Tensor, int], Tensor] | None = None
    why: str = ""
    copies: int = 3
    exact: bool = False
    params: dict[str, Any] = field(default_factory=dict)


def expert(why: str = "", **kw: Any) -> Identical:
    return Identical(None, why, **kw)


def times(k: float, why: str, **kw: Any) -> Identical:
    """``base + k * tau`` (``k`` a documented multiple, at the entry's number of copies)."""
    return Identical(lambda tau, base, n: k * tau, why, **kw)


N = 3  # copies merged unless an entry says otherwise
ALL = {"density": 1.0}  # random sparsifiers keep every entry: the result is exact, not an expectation
IDENTICAL: dict[str, Identical] = {
    # averages and means of N equal inputs
    "linear": expert("normalize: sum_i w_i x_i / sum_i w_i"),
    "karcher": expert("the Karcher mean of equal directions, times their mean norm"),
    "multislerp": expert("spherical barycentre of equal task vectors, rescaled to sum_i w_i |tau_i|"),
    "model_stock": expert("equal task vectors: cos = 1, t = N / (1 + (N - 1)) = 1"),
    "nuslerp": expert("two models at most; SLERP of equal task vectors is that vector", copies=2),
    "passthrough": expert("copies its single model", copies=1),
    "ties": expert("normalize (default): the disjoint mean of N agreeing entries is tau"),
    "della": expert("density 1 drops nothing; normalize: disjoint mean", exact=True, params=ALL),
    "sce": expert("mean-square weights 1/N each; erased entries none; divided by the weights' sum"),
    "magmax": expert("the largest-magnitude entry among equal entries is tau"),
    "emr": expert("elected sign = sign(tau), largest agreeing magnitude |tau|: tau_uni = tau"),
    "cart": expert("centred task vectors are 0, so the lambda=2 low-rank term vanishes: mean = tau"),
    "wudi": expert(
        "one copy: the start, tau, is the loss minimum (gradient 0); N copies: test below", copies=1
    ),
    # unnormalised sums: N tau
    "task_arithmetic": times(N, "lambda * sum_i w_i tau_i, weights 1, lambda 1, no normalisation"),
    "magnitude_prune": times(N, "density 1 keeps all; a weighted sum, not normalised"),
    "breadcrumbs": times(N, "density 1 keeps all (gamma only trims below density 1); a plain sum"),
    "breadcrumbs_ties": times(N, "density 1 keeps all; equal signs all agree; a sum, not normalised"),
    "dare_linear": times(N, "density 1 drops nothing (rescale unused); a plain sum", exact=True, params=ALL),
    "dare_ties": times(
        N, "density 1 drops nothing; equal signs agree; not normalised", exact=True, params=ALL
    ),
    "della_linear": times(N, "density 1 drops nothing; a plain sum", exact=True, params=ALL),
    "consensus_ta": times(
        N, "task arithmetic N tau; TALL |tau| > 0.4 |N tau - tau| holds for N=3 copies >= k=2"
    ),
    # a documented part of tau (selection, filtering or a spectrum)
    "consensus_ties": Identical(
        lambda tau, b, n: n * _top(tau, 0.2),
        "TIES trim to the top density=0.2 entries, disjoint *sum* N; all masks on",
    ),
    "localize_stitch": Identical(
        lambda tau, b, n: _top(tau, 0.1),
        "top sparsity=0.1 entries of each copy; overlaps divided by the N masks",
    ),
    "pcb": Identical(
        _pcb,
        "no outlier clamp under 1e4 entries; balance scores rise with |tau|: entries "
        "above the int(0.9 d)-th smallest score keep tau (N s tau / N s), the rest get score 0",
    ),
    "fr_merging": Identical(
        lambda tau, b, n: tau - tau.mean() if tau.dim() >= 2 else tau,
        "lambda_i = 1/N; D0 = 0.1 min(rows, cols) < 1 removes only the DC term "
        "(the mean) of 2-D views; 0-d and 1-D tensors are not filtered",
    ),
    "tsv_m": Identical(
        _tsv,
        "orthogonalising N equal bases changes nothing: the rank-int(min(m, k)/N) "
        "approximation of tau, alpha 1",
    ),
    "iso_c": Identical(
        _iso_c, "SVD of N tau with every singular value set to their mean: N mean(s(tau)) U V^T"
    ),
    "iso_cts": Identical(
        _iso_cts, "common + task directions are tau's top singular directions, all given the mean value"
    ),
    "knots": Identical(
        _knots_ties,
        "copies share tau's basis U and coefficients s V^T: U times their top density=0.2 (TIES' disjoint "
        "mean of equal entries); 0-d / 1-D tensors: TIES on tau",
        params={"density": 0.2},
    ),
    "star": Identical(
        _star,
        "each copy truncated to eta=0.4 of its nuclear norm and rescaled; the mean of equal truncations",
    ),
    "slerp": Identical(
        _slerp_half,
        "one model besides the base; t=0.5 is the midpoint on the arc "
        "from the base to the expert, not the expert",
        copies=1,
    ),
    "nearswap": Identical(
        lambda tau, b, n: (1e-4 / tau.abs()).clamp(0, 1) * tau,
        "entries move from the base towards the expert by at most t=1e-4 (the whole way where |tau| <= t)",
        copies=1,
    ),
}


def test_the_identical_experts_table_covers_every_method() -> None:
    """A new data-free method needs its own entry (what copies of one expert merge to, and why)."""
    assert set(IDENTICAL) == set(METHODS)


def _expected(entry: Identical, base: dict[str, Tensor], expert_: dict[str, Tensor]) -> dict[str, Tensor]:
    if entry.task is None:
        return dict(expert_)
    return {k: base[k] + entry.task(expert_[k] - base[k], base[k], entry.copies) for k in base}


def _agrees(entry: Identical, got: Tensor, want: Tensor) -> bool:
    """Bit equality for ``exact`` entries, else a float32 rounding margin (entries are at most ~4.4)."""
    return torch.equal(got, want) if entry.exact else torch.allclose(got, want, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_copies_of_one_expert_merge_to_what_the_method_defines(method: str) -> None:
    entry = IDENTICAL[method]
    base, one = _base_and_expert()
    out = merge_state_dicts(method, [one] * entry.copies, base, seed=0, **entry.params)
    for k, want in _expected(entry, base, one).items():
        err = float((out[k] - want).abs().max())
        assert _agrees(entry, out[k], want), f"{method}: {k} is off by {err:.3g}; expected: {entry.why}"


@pytest.mark.parametrize("method", METHODS)
def test_the_expectation_tells_wrong_answers_apart(method: str) -> None:
    """Each entry fails a method that returned the base (a zero task vector), zeros, or twice the task
    vector."""
    entry = IDENTICAL[method]
    base, one = _base_and_expert()
    want = _expected(entry, base, one)
    wrong = {
        "the base": base,
        "zeros": {k: torch.zeros_like(v) for k, v in base.items()},
        "2 tau": {k: base[k] + 2 * (one[k] - base[k]) for k in base},
    }
    for name, w in wrong.items():
        assert not all(_agrees(entry, w[k], want[k]) for k in base), f"{method}: {name} would pass"


def _wudi_loss(merged: Tensor, taus: Tensor) -> float:
    """sum_i ||(merged - tau_i) tau_i^T||^2 / ||tau_i||^2 (the WUDI objective, from the paper)."""
    return sum(float(((merged - t) @ t.T).square().sum() / t.square().sum()) for t in taus.double())


def test_wudi_copies_start_at_their_sum_and_only_descend() -> None:
    """N copies: Adam starts at task arithmetic N tau (steps 0 returns it; tensors that are not 2-D
    get the mean, tau); each of the 300 steps
    moves an entry by at most lr (1 - b1) / sqrt(1 - b2) (Kingma & Ba, sec. 2.1) and the loss,
    whose minimum is tau, goes down."""
    base, one = _base_and_expert()
    tau = one["w2d"] - base["w2d"]
    start = merge_state_dicts("wudi", [one] * N, base, steps=0)
    assert torch.equal(start["w2d"], base["w2d"] + N * tau)
    assert all(torch.equal(start[k], one[k]) for k in ("bias", "conv", "scalar"))
    out = merge_state_dicts("wudi", [one] * N, base)["w2d"] - base["w2d"]
    taus = torch.stack([tau] * N)
    assert float((out - N * tau).abs().max()) <= 300 * 1e-5 * 0.1 / math.sqrt(1e-3) + 1e-6
    assert _wudi_loss(out, taus) < _wudi_loss(N * tau, taus)
    assert _wudi_loss(tau, taus) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("method", "params", "want"),
    [
        ("linear", {"normalize": False}, lambda b, e: N * e),  # no division by sum_i w_i = N
        ("task_arithmetic", {"lambda": 0.5}, lambda b, e: b + 0.5 * N * (e - b)),
        ("ties", {"normalize": False}, lambda b, e: b + N * (e - b)),  # the disjoint sum
        ("della", {"normalize": False, "density": 1.0}, lambda b, e: b + N * (e - b)),
        ("slerp", {"t": 1.0}, lambda b, e: e),  # t=1 is the other end
        ("nearswap", {"t": 1e3}, lambda b, e: e),  # every |tau| <= t: swapped entirely
    ],
)
def test_copies_of_one_expert_off_the_defaults(method: str, params: dict, want: Callable) -> None:
    base, one = _base_and_expert()
    copies = IDENTICAL[method].copies if method in ("slerp", "nearswap") else N
    out = merge_state_dicts(method, [one] * copies, base, **params)
    for k in base:
        torch.testing.assert_close(out[k], want(base[k], one[k]), atol=1e-6, rtol=1e-6, msg=f"{method}: {k}")


def test_dare_rescale_keeps_the_l1_norm_of_each_dropped_task_vector() -> None:
    """Below density 1 DARE is random: its result equals tau only in expectation, but with ``rescale``
    the one copy's kept entries are scaled so each tensor keeps tau's L1 norm (mergekit)."""
    base, one = _base_and_expert()
    for method in ("dare_linear", "della_linear"):
        out = merge_state_dicts(method, [one], base, seed=3, density=0.5)
        for k in ("w2d", "conv"):
            tau, got = one[k] - base[k], out[k] - base[k]
            assert 0 < int((got != 0).sum()) < tau.numel(), (method, k)
            assert float(got.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5), (method, k)
            kept = got != 0
            assert torch.all(torch.sign(got[kept]) == torch.sign(tau[kept])), (method, k)


# ------------------------------------------------------------------------------------ other contracts


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
    base, expert_ = _state(0, dtype), _state(1, dtype)
    out = _merge_n(method, expert_, base)
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
    assert unbounded_fields(info) == []


def test_fields_checked_elsewhere_exist() -> None:
    """The bounds test's exceptions name real fields (a renamed field does not hide behind a stale entry)."""
    for method, name in CHECKED_ELSEWHERE:
        assert name in get_method(method).params.model_fields, (method, name)


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
