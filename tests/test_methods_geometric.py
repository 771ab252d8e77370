"""Closed-form and mergekit-parity tests for slerp, nuslerp, multislerp, karcher, model_stock,
nearswap and passthrough.

Expected numbers are worked out by hand in the comments. The ``_mk_*`` helpers re-state mergekit's
step-by-step definitions (loops, explicit tangent vectors) to check our vectorised / closed forms.
"""

from __future__ import annotations

import math

import pytest
import torch

from unimerge.core import merge_state_dicts
from unimerge.errors import ConfigError, MergeError
from unimerge.methods import get_method
from unimerge.methods.geometric import model_stock_ratio, nuslerp_pair, slerp_pair
from unimerge.methods.karcher import karcher_mean_direction

R2 = math.sqrt(0.5)  # 1/sqrt(2)


def T(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def merge(
    method: str, experts: list[torch.Tensor], base: torch.Tensor | None = None, **params
) -> torch.Tensor:
    sds = [{"w": e} for e in experts]
    return merge_state_dicts(method, sds, None if base is None else {"w": base}, **params)["w"]


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    return torch.allclose(a, b, atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------------ slerp


def test_slerp_orthogonal_unit_vectors_midpoint():
    # theta = pi/2, s0 = s1 = sin(pi/4) / sin(pi/2) = 1/sqrt(2): (a + b) / sqrt(2)
    assert close(merge("slerp", [T(0, 1)], base=T(1, 0), t=0.5), T(R2, R2))


def test_slerp_scales_unnormalised_tensors():
    # Angle from the unit directions (pi/2); weights multiply the raw tensors [2,0] and [0,4].
    # t = 1/3: s0 = sin(pi/3) = 0.8660254, s1 = sin(pi/6) = 0.5 -> [1.7320508, 2.0]
    assert close(slerp_pair(1 / 3, T(2, 0), T(0, 4)), T(1.7320508, 2.0))
    # t = 0.5: s0 = s1 = 0.70710678 -> [1.4142136, 2.8284271]
    assert close(merge("slerp", [T(0, 4)], base=T(2, 0), t=0.5), T(1.4142136, 2.8284271))


def test_slerp_endpoints_and_matrix_shape():
    base, other = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.5, -1.0], [3.0, 1.0]])
    assert close(merge("slerp", [other], base=base, t=0.0), base)
    assert close(merge("slerp", [other], base=base, t=1.0), other, 1e-5)
    assert merge("slerp", [other], base=base).shape == (2, 2)


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        (T(2, 4), T(1.25, 2.5)),  # parallel: 0.75 * [1,2] + 0.25 * [2,4]
        (T(-1, -2), T(0.5, 1.0)),  # antiparallel: 0.75 * [1,2] + 0.25 * [-1,-2]
    ],
)
def test_slerp_colinear_falls_back_to_lerp(other, expected):
    assert close(merge("slerp", [other], base=T(1, 2), t=0.25), expected)


def test_slerp_threshold_on_cosine():
    # cos = 0.9996 > 0.9995 -> lerp; cos = 0.999 -> true slerp (differs from lerp in the 2nd coordinate)
    a = T(1, 0)
    for cos, is_lerp in ((0.9996, True), (0.999, False)):
        b = T(cos, math.sqrt(1 - cos**2)) * 3
        lerp = 0.5 * a + 0.5 * b
        theta = math.acos(cos)
        s = math.sin(theta / 2) / math.sin(theta)
        expected = lerp if is_lerp else s * a + s * b
        assert close(slerp_pair(0.5, a, b), expected)
        assert is_lerp or not close(expected, lerp, 1e-7)


def test_slerp_rejects_more_models_and_bad_t():
    with pytest.raises(ConfigError, match="exactly one other model"):
        merge("slerp", [T(1, 0), T(0, 1), T(1, 1), T(2, 1)], base=T(0, 0))
    with pytest.raises(ConfigError, match="needs a base model"):
        merge("slerp", [T(1, 0)])
    with pytest.raises(ConfigError, match="t"):
        merge("slerp", [T(1, 0)], base=T(0, 1), t=1.5)


# ---------------------------------------------------------------------------------------------- nuslerp


def test_nuslerp_weights_set_t():
    # t = w1 / (w0 + w1) = 3/4, theta = pi/2: [sin(pi/8), sin(3pi/8)] = [0.38268343, 0.92387953]
    assert close(merge("nuslerp", [T(1, 0), T(0, 1)], weight=[1.0, 3.0]), T(0.38268343, 0.92387953))
    # weights summing to ~0 give t = 0.5
    assert close(merge("nuslerp", [T(1, 0), T(0, 1)], weight=[1.0, -1.0]), T(R2, R2))


def test_nuslerp_with_base_interpolates_task_vectors():
    # deltas [1,0] and [0,1], t = 0.5 -> base + [0.7071, 0.7071]
    out = merge("nuslerp", [T(2, 1), T(1, 2)], base=T(1, 1))
    assert close(out, T(1 + R2, 1 + R2))


def test_nuslerp_flatten_rows_and_columns():
    v0, v1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    # flatten: cos = 2/sqrt(10), t = 0.5: coefficient sin(theta/2)/sin(theta) = 0.55343207 on v0 + v1
    k = 0.55343207
    assert close(nuslerp_pair(0.5, v0, v1), torch.tensor([[k, k], [0.0, 3 * k]]))
    # per row: row 0 at pi/2 -> [0.7071, 0.7071]; row 1 colinear ([0,1] -> [0,2]) -> lerp [0, 1.5]
    assert close(nuslerp_pair(0.5, v0, v1, flatten=False), torch.tensor([[R2, R2], [0.0, 1.5]]))
    # per column (row_wise): col 0 [1,0] -> [0,0] (zero vector: cos 0, theta pi/2) -> [0.7071, 0];
    # col 1 [0,1] -> [1,2]: cos = 2/sqrt(5), coefficient 0.51374315 on [1,3]
    c = 0.51374315
    out = nuslerp_pair(0.5, v0, v1, flatten=False, row_wise=True)
    assert close(out, torch.tensor([[R2, c], [0.0, 3 * c]]))
    out = merge("nuslerp", [v0, v1], nuslerp_flatten=False, nuslerp_row_wise=True)
    assert close(out, torch.tensor([[R2, c], [0.0, 3 * c]]))


def test_nuslerp_model_count():
    assert close(merge("nuslerp", [T(1, 2)]), T(1, 2))
    with pytest.raises(ConfigError, match="exactly two models"):
        merge("nuslerp", [T(1, 0), T(0, 1), T(1, 1)])


# ------------------------------------------------------------------------------------------- multislerp


def _mk_multislerp(xs: torch.Tensor, w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's steps: tangent space at the normalised mean, average there, exponential map back."""
    flat = xs.reshape(xs.shape[0], -1).double()
    w = (w / w.sum()).double()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tr = (tangents * w[:, None]).sum(0)
    tn = tr.norm() + eps
    res = mean * torch.cos(tn) + tr * (torch.sin(tn) / tn)
    return (res * (norms.squeeze(-1) * w).sum()).reshape(xs.shape[1:]).float()


def test_multislerp_hand_numbers():
    # equal weights: directions [1,0], [0,1] -> mean direction [0.7071, 0.7071]; mean norm (2+4)/2 = 3
    assert close(merge("multislerp", [T(2, 0), T(0, 4)]), T(3 * R2, 3 * R2))
    # weights 1:3 -> M = [0.25, 0.75], |M| = 0.79056942; norm 0.25*2 + 0.75*4 = 3.5
    # -> 3.5 * [0.31622777, 0.9486833] = [1.1067972, 3.3203915]
    assert close(merge("multislerp", [T(2, 0), T(0, 4)], weight=[1.0, 3.0]), T(1.1067972, 3.3203915))
    # with a base, the task vectors are interpolated
    out = merge("multislerp", [T(3, 1), T(1, 5)], base=T(1, 1))
    assert close(out, T(1 + 3 * R2, 1 + 3 * R2))


def test_multislerp_matches_mergekit_tangent_steps():
    g = torch.Generator().manual_seed(0)
    xs, base = torch.randn(5, 7, 3, generator=g), torch.randn(7, 3, generator=g)
    w = T(1.0, 0.5, 2.0, 0.3, 1.2)
    out = merge("multislerp", list(xs), base=base, weight=w.tolist())
    assert close(out, _mk_multislerp(xs - base, w) + base, 1e-5)


def test_multislerp_degenerate_inputs():
    # two antipodal vectors: zero mean direction, linear fallback 0.5*[1,0] + 0.5*[-1,0] = 0
    assert close(merge("multislerp", [T(1, 0), T(-1, 0)]), T(0, 0))
    # three models whose weighted directions cancel: mergekit raises, so do we
    with pytest.raises(MergeError, match="zero"):
        merge("multislerp", [T(1, 0), T(-1, 0), T(1, 0)], weight=[1.0, 2.0, 1.0])
    # every task vector zero (tensor no expert changed): the base comes back
    assert close(merge("multislerp", [T(1, 2)] * 3, base=T(1, 2)), T(1, 2))


# ---------------------------------------------------------------------------------------------- karcher


def _mk_karcher(tensors: list[torch.Tensor], alphas: list[float], max_iter=10, tol=1e-5) -> torch.Tensor:
    """mergekit's loop, one point at a time (float64)."""
    norms = [float(t.double().norm()) for t in tensors]
    idx = [i for i, n in enumerate(norms) if n > tol]
    units = [tensors[i].double().flatten() / norms[i] for i in idx]
    a = [alphas[i] / sum(alphas[i] for i in idx) for i in idx]
    u = sum(ai * ui for ai, ui in zip(a, units, strict=True))
    u = u / u.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(u)
        for ai, ui in zip(a, units, strict=True):
            dot = torch.clamp(torch.dot(u, ui), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (ui - dot * u)
        tn = tangent.norm()
        if tn.item() < tol:
            break
        u = torch.cos(tn) * u + torch.sin(tn) * tangent / tn
        u = u / u.norm()
    scale = sum(al * n for al, n in zip(alphas, norms, strict=True))
    return (scale * u).reshape(tensors[0].shape).float()


def test_karcher_symmetric_points_on_circle():
    # angles -60 and +60 degrees, norm 2 each: the mean direction is angle 0, norm 2
    pts = [2 * T(0.5, -math.sqrt(0.75)), 2 * T(0.5, math.sqrt(0.75))]
    assert close(merge("karcher", pts), T(2, 0))
    # three symmetric points at -90, 0, 90 degrees: angle 0; norms 1, 3, 2 -> mean norm 2
    assert close(merge("karcher", [T(0, -1), T(3, 0), T(0, 2)]), T(2, 0))


def test_karcher_is_the_geodesic_not_the_euclidean_mean():
    # angles 0 and 90 degrees with weights 1:3: the Karcher mean on the circle is the weighted mean
    # angle 0.25*0 + 0.75*90 = 67.5 degrees (the normalised Euclidean mean would be 71.57 degrees).
    # Norms 1 and 3 -> 0.25*1 + 0.75*3 = 2.5: 2.5 * [cos 67.5, sin 67.5] = [0.95670858, 2.30969883]
    out = merge("karcher", [T(1, 0), T(0, 3)], weight=[1.0, 3.0])
    assert close(out, T(0.95670858, 2.30969883), 1e-5)
    d = karcher_mean_direction(torch.stack([T(1, 0), T(0, 1)]), T(0.25, 0.75))
    assert close(d, T(math.cos(3 * math.pi / 8), math.sin(3 * math.pi / 8)), 1e-5)


def test_karcher_matches_mergekit_loop_and_ignores_base():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 6, generator=g) for _ in range(4)]
    expected = _mk_karcher(xs, [0.25] * 4)
    assert close(merge("karcher", xs), expected, 1e-5)
    assert close(merge("karcher", xs, base=torch.randn(4, 6, generator=g)), expected, 1e-5)


def test_karcher_zero_tensors():
    # norms <= tol take no part in the direction, but count (as 0) in the mean norm: 0.5 * 4 = 2
    assert close(merge("karcher", [T(0, 0), T(0, 4)]), T(0, 2))
    assert close(merge("karcher", [T(0, 0), T(0, 0)]), T(0, 0))


# ------------------------------------------------------------------------------------------ model stock


def test_model_stock_two_task_vectors_at_60_degrees():
    # cos 60 = 0.5, N = 2: t = 2*0.5 / (1 + 0.5) = 2/3. Mean task vector [0.75, 0.4330127];
    # base [1,1] + 2/3 * mean = [1.5, 1.2886751]
    base = T(1, 1)
    experts = [base + T(1, 0), base + T(0.5, math.sqrt(0.75))]
    assert close(model_stock_ratio(torch.stack([T(1, 0), T(0.5, math.sqrt(0.75))])), T(2 / 3))
    assert close(merge("model_stock", experts, base=base), T(1.5, 1.2886751))


def test_model_stock_three_models_average_pairwise_cosine():
    # task vectors e1, e2, (e1+e2)/sqrt2: cosines 0, 0.7071, 0.7071 -> mean 0.47140452
    # t = 3*0.4714 / (1 + 2*0.4714) = 0.72792206; mean vector [0.56903559]*2 -> delta 0.41421356 each
    deltas = [T(1, 0), T(0, 1), T(R2, R2)]
    assert close(model_stock_ratio(torch.stack(deltas)), T(0.72792206))
    assert close(merge("model_stock", deltas, base=T(0, 0)), T(0.41421356, 0.41421356))


def test_model_stock_filter_wise():
    base = torch.zeros(2, 2)
    d1, d2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # per row: row 0 orthogonal (cos 0, t 0) -> [0, 0]; row 1 equal (cos 1, t 1) -> [1, 0]
    out = merge("model_stock", [d1, d2], base=base, filter_wise=True)
    assert close(out, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    # whole tensor: [1,0,1,0] . [0,1,1,0] = 1, norms sqrt2 -> cos 0.5, t = 2/3; mean [0.5,0.5,1,0]
    out = merge("model_stock", [d1, d2], base=base)
    assert close(out, torch.tensor([[1 / 3, 1 / 3], [2 / 3, 0.0]]))


def test_model_stock_needs_two_experts():
    with pytest.raises(ConfigError, match="at least two"):
        merge("model_stock", [T(1, 0)], base=T(0, 0))


# --------------------------------------------------------------------------------------------- nearswap


def test_nearswap_four_element_hand_example():
    # t = 0.1; |base - other| = [0.05, 0.2, 0, 0.5] -> weights t/diff = [2 -> 1, 0.5, inf -> 1, 0.2]
    # out = base + w * (other - base) = [0.05, 1 + 0.5*0.2, 2, 3 - 0.2*0.5] = [0.05, 1.1, 2, 2.9]
    out = merge("nearswap", [T(0.05, 1.2, 2.0, 2.5)], base=T(0, 1, 2, 3), t=0.1)
    assert close(out, T(0.05, 1.1, 2.0, 2.9))


def test_nearswap_rejects_bad_t_and_more_models():
    with pytest.raises(ConfigError, match="t"):
        merge("nearswap", [T(1, 0)], base=T(0, 0), t=0.0)
    with pytest.raises(ConfigError, match="exactly one other model"):
        merge("nearswap", [T(1, 0), T(0, 1)], base=T(0, 0))


# ------------------------------------------------------------------------------------------ passthrough


def test_passthrough_copies_and_scales():
    x = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    assert torch.equal(merge("passthrough", [x]), x)
    assert torch.equal(merge("passthrough", [x], scale=[2.0]), 2 * x)
    assert torch.equal(merge("passthrough", [x], base=torch.zeros(2, 2)), x)


def test_passthrough_errors_on_two_models():
    with pytest.raises(ConfigError, match="2 models contribute"):
        merge("passthrough", [T(1, 2), T(3, 4)])


# ------------------------------------------------------------------------------------------ registry


@pytest.mark.parametrize(
    ("name", "n", "base_is_expert"),
    [
        ("slerp", 1, True),
        ("nearswap", 1, True),
        ("nuslerp", 2, False),
        ("multislerp", 4, False),
        ("multislerp", 4, True),
        ("karcher", 4, False),
        ("model_stock", 4, False),
        ("model_stock", 4, True),
        ("passthrough", 1, False),
    ],
)
def test_copies_of_one_expert_give_the_expert(name, n, base_is_expert):
    g = torch.Generator().manual_seed(2)
    expert = torch.randn(5, 3, generator=g)
    base = expert.clone() if base_is_expert else torch.randn(5, 3, generator=g)
    assert close(merge(name, [expert] * n, base=base), expert, 1e-5)


def test_registry_entries():
    info = {
        m: get_method(m) for m in ("slerp", "nuslerp", "multislerp", "karcher", "model_stock", "nearswap")
    }
    assert info["slerp"].needs_base and info["slerp"].inputs == "tensors"
    assert info["model_stock"].needs_base and info["model_stock"].inputs == "deltas"
    assert (
        not info["karcher"].uses_base and info["multislerp"].optional_base and info["nuslerp"].optional_base
    )
    assert info["slerp"].grid == {"t": (0.3, 0.5, 0.7)}
    assert info["karcher"].param_schema()["max_iter"]["default"] == 10
    assert info["nuslerp"].param_schema()["nuslerp_flatten"]["default"] is True


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_pair_into_v1_equals_a_fresh_result(t: float) -> None:
    g = torch.Generator().manual_seed(3)
    v0, v1 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    expected = slerp_pair(t, v0, v1)
    got = slerp_pair(t, v0, v1.clone(), out=None)
    into = v1.clone()
    assert slerp_pair(t, v0, into, out=into) is into
    torch.testing.assert_close(into, expected, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
