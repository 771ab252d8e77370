"""The mergekit configs that ``mergekit_parity.py`` runs through both mergekit and unimerge.

Model references are the names of the inputs ``mergekit_parity.py`` builds (``base``, ``e1``...),
replaced by absolute paths when a config is written. Inputs (tiny Llama-shaped checkpoints, 3 layers,
hidden 64, vocabulary 2048, so the embeddings have 131072 entries and the trim's sampled selection runs):

- ``base``; ``e1``, ``e2``, ``e3``: the base plus ``0.01 * i`` Gaussian noise (fp32);
- ``anti``: ``2 base - e1``, whose task vector is ``e1``'s negated (Model Stock's singular case);
- ``qbase``, ``q1``, ``q2``: ``base``, ``e1``, ``e2`` rounded to multiples of ``2^-9`` (fp32), so many
  task-vector entries tie in magnitude at the trim boundary;
- ``bfbase``, ``bf1``, ``bf2``: the same in bfloat16.

Checks (``parity_compare.py``): ``exact`` compares every tensor; ``ties`` every entry but those tied in
magnitude at a trim boundary; ``bf16`` against mergekit computing in fp32; ``dare`` and ``della``
(random methods, one expert) the distribution of the kept entries, not the draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Check = Literal["exact", "ties", "bf16", "dare", "della"]


@dataclass(frozen=True)
class Case:
    """One mergekit config, what to compare, and why the case is there."""

    name: str
    config: dict[str, Any]
    check: Check = "exact"
    note: str = ""


def _m(name: str, **params: Any) -> dict[str, Any]:
    return {"model": name, "parameters": params} if params else {"model": name}


def _src(name: str, lo: int, hi: int, **params: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": name, "layer_range": [lo, hi]}
    return out | ({"parameters": params} if params else {})


def _gta(method: str, models: list[dict[str, Any]], base: str = "base", **params: Any) -> dict[str, Any]:
    return {"merge_method": method, "base_model": base, "models": models, "parameters": params}


_E3 = [_m("e1", weight=1.0), _m("e2", weight=0.5), _m("e3", weight=0.7)]
_Q2 = [_m("q1", weight=1.0), _m("q2", weight=0.5)]
_FILTERED_T = [
    {"filter": "self_attn", "value": [0, 0.5, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0]},
    {"value": 0.5},
]


def _linear_cases() -> list[Case]:
    return [
        Case(
            "linear",
            {"merge_method": "linear", "models": [_m("e1", weight=0.5), _m("e2", weight=0.3), _m("e3", weight=[0.2, 0.8])]},
            note="per-model weight gradient over layers",
        ),
        Case(
            "linear_nonorm",
            {"merge_method": "linear", "models": [_m("e1", weight=0.5), _m("e2", weight=0.3)], "parameters": {"normalize": False}},
        ),
        Case(
            "linear_filter",
            {
                "merge_method": "linear",
                "models": [
                    _m("e1", weight=[{"filter": "self_attn", "value": 0.7}, {"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}]),
                    _m("e2", weight=0.5),
                ],
            },
            note="filter: conditions",
        ),
        Case(
            "linear_filter_star",
            {"merge_method": "linear", "models": [_m("e1", weight=[{"filter": "*", "value": 0.2}]), _m("e2", weight=0.8)]},
            note="filter '*' matches every tensor in mergekit",
        ),
        Case(
            "linear_out_bf16",
            {"merge_method": "linear", "models": [_m("e1", weight=1.0), _m("e2", weight=1.0)], "out_dtype": "bfloat16"},
        ),
        Case("task_arithmetic", _gta("task_arithmetic", _E3, **{"lambda": 0.7})),
        Case(
            "task_arithmetic_norm",
            _gta("task_arithmetic", [_m("e1", weight=0.5), _m("e2", weight=1.0), _m("e3", weight=-0.3)], normalize=True),
        ),
    ]  # fmt: skip


def _ties_cases() -> list[Case]:
    return [
        Case("ties", _gta("ties", _E3, density=0.3)),
        Case("ties_nonorm", _gta("ties", _E3, density=0.5, normalize=False)),
        Case("ties_tiny_density", _gta("ties", _E3, density=0.01), note="int(0.01 * 64) = 0: mergekit keeps 1"),
        Case(
            "ties_gradient_rescale",
            _gta("ties", [_m("e1", weight=1.0, density=[0.2, 0.8]), _m("e2", weight=0.5, density=0.4)], rescale=True, **{"lambda": 1.2}),
            note="density gradient, L1 rescale, lambda",
        ),
        Case("ties_int8", _gta("ties", _E3, density=0.4, int8_mask=True)),
        Case("dare_ties_d1", _gta("dare_ties", _E3, density=1.0, normalize=True), note="density 1: no draws"),
        Case("dare_linear_d1", _gta("dare_linear", _E3, density=1.0, rescale=False)),
        Case("della_d1", _gta("della", _E3, density=1.0)),
        Case("dare_linear_dist", _gta("dare_linear", [_m("e1", weight=1.0, density=0.3)]), "dare"),
        Case("dare_ties_dist", _gta("dare_ties", [_m("e1", weight=1.0, density=0.6)]), "dare"),
        Case("della_dist", _gta("della", [_m("e1", weight=1.0, density=0.5, epsilon=0.2)]), "della"),
        Case("della_linear_dist", _gta("della_linear", [_m("e1", weight=1.0, density=0.4, epsilon=0.1)]), "della"),
        Case("breadcrumbs", _gta("breadcrumbs", _E3, density=0.8, gamma=0.05)),
        Case("breadcrumbs_ties", _gta("breadcrumbs_ties", _E3, density=0.8, gamma=0.05)),
        Case("breadcrumbs_gamma0", _gta("breadcrumbs", _E3, density=0.5, gamma=0.0), note="no outliers dropped"),
        Case("breadcrumbs_tiny", _gta("breadcrumbs", _E3, density=0.01, gamma=0.01), note="small tensors"),
        Case(
            "breadcrumbs_ties_overlap",
            _gta("breadcrumbs_ties", _E3, density=0.9, gamma=0.2, normalize=True),
            note="density + gamma > 1: fewer outliers dropped",
        ),
        Case("ties_ties", _gta("ties", _Q2, base="qbase", density=0.3, normalize=False), "ties", "equal magnitudes at the boundary"),
        Case("breadcrumbs_ties_ties", _gta("breadcrumbs_ties", _Q2, base="qbase", density=0.6, gamma=0.1), "ties", "equal magnitudes"),
        Case("sce", _gta("sce", [_m("e1"), _m("e2"), _m("e3")], select_topk=0.5)),
        Case("sce_all", _gta("sce", [_m("e1"), _m("e2"), _m("e3")])),
    ]  # fmt: skip


def _geometric_cases() -> list[Case]:
    pair = [_m("base"), _m("e1")]
    return [
        Case(
            "slerp_gradient",
            {"merge_method": "slerp", "base_model": "base", "models": pair, "parameters": {"t": [0, 0.5, 1]}},
            note="gradient incl. embeddings, final norm, lm_head",
        ),
        Case(
            "slerp_filter",
            {"merge_method": "slerp", "base_model": "base", "models": pair, "parameters": {"t": _FILTERED_T}},
        ),
        Case("slerp_scalar", {"merge_method": "slerp", "base_model": "base", "models": pair, "parameters": {"t": 0.3}}),
        Case("nuslerp", {"merge_method": "nuslerp", "models": [_m("e1", weight=0.3), _m("e2", weight=0.7)]}),
        Case(
            "nuslerp_rowwise_base",
            _gta("nuslerp", [_m("e1", weight=0.3), _m("e2", weight=0.7)], nuslerp_flatten=False, nuslerp_row_wise=True),
        ),
        Case(
            "nuslerp_columnwise",
            {"merge_method": "nuslerp", "models": [_m("e1", weight=0.6), _m("e2", weight=0.4)], "parameters": {"nuslerp_flatten": False}},
        ),
        Case("multislerp", {"merge_method": "multislerp", "models": [_m("e1", weight=1.0), _m("e2", weight=2.0), _m("e3", weight=3.0)]}),
        Case("multislerp_base", _gta("multislerp", [_m("e1", weight=1.0), _m("e2", weight=2.0), _m("e3", weight=3.0)])),
        Case("karcher", {"merge_method": "karcher", "models": [_m("e1"), _m("e2"), _m("e3")]}),
        Case("karcher_base", {"merge_method": "karcher", "base_model": "base", "models": [_m("e1"), _m("e2")]}),
        Case("model_stock", _gta("model_stock", [_m("e1"), _m("e2"), _m("e3")])),
        Case("model_stock_filter_wise", _gta("model_stock", [_m("e1"), _m("e2"), _m("e3")], filter_wise=True)),
        Case("model_stock_opposed", _gta("model_stock", [_m("e1"), _m("anti")]), note="1 + (N-1) cos = 0: the base"),
        Case(
            "model_stock_opposed_filter_wise",
            _gta("model_stock", [_m("e1"), _m("anti")], filter_wise=True),
        ),
        Case("nearswap", {"merge_method": "nearswap", "base_model": "base", "models": pair, "parameters": {"t": 0.01}}),
    ]  # fmt: skip


def _slice_cases() -> list[Case]:
    return [
        Case(
            "passthrough_slices",
            {"merge_method": "passthrough", "slices": [{"sources": [_src("e1", 0, 2)]}, {"sources": [_src("e2", 1, 3)]}]},
            note="layer stacking: 4 output layers",
        ),
        Case(
            "passthrough_scale",
            {"merge_method": "passthrough", "models": [_m("e1", scale=[{"filter": "o_proj", "value": 0.0}, {"value": 1.0}])]},
        ),
        Case(
            "linear_slices",
            {
                "merge_method": "linear",
                "slices": [
                    {"sources": [_src("e1", 0, 2, weight=[0, 1]), _src("e2", 0, 2, weight=[1, 0])]},
                    {"sources": [_src("e1", 1, 3, weight=0.3), _src("e2", 1, 3, weight=0.7)]},
                ],
            },
            note="per-slice gradients; layers renumbered",
        ),
        Case(
            "slerp_slices_gradient",
            {
                "merge_method": "slerp",
                "base_model": "base",
                "slices": [{"sources": [_src("base", 0, 3), _src("e1", 0, 3)]}],
                "parameters": {"t": [0.2, 0.9]},
            },
            note="gradient: the tensors outside the layers",
        ),
        Case(
            "linear_slices_filter_layer",
            {
                "merge_method": "linear",
                "slices": [
                    {"sources": [_src("e1", 1, 3, weight=[{"filter": "layers.1.", "value": 0.9}, {"value": 0.1}]), _src("e2", 1, 3, weight=0.5)]},
                ],
            },
            note="a source's filters see its own layer numbers",
        ),
        Case(
            "slerp_slice_parameters",
            {
                "merge_method": "slerp",
                "base_model": "base",
                "slices": [
                    {"sources": [_src("base", 0, 2), _src("e1", 0, 2)], "parameters": {"t": [0.1, 0.7]}},
                    {"sources": [_src("base", 2, 3), _src("e1", 2, 3)], "parameters": {"t": [{"filter": "mlp", "value": 0.9}]}},
                ],
                "parameters": {"t": 0.3},
            },
            note="slice parameters first, then the config's",
        ),
        Case(
            "slerp_slices",
            {
                "merge_method": "slerp",
                "base_model": "base",
                "slices": [{"sources": [_src("base", 0, 3), _src("e1", 0, 3)]}],
                "parameters": {"t": _FILTERED_T},
            },
            note="the usual mergekit slerp example",
        ),
    ]  # fmt: skip


_BF16 = "mergekit computes this method in the inputs' bf16, unimerge in fp32"


def _bf16_cases() -> list[Case]:
    bf = [_m("bf1", weight=0.6), _m("bf2", weight=0.4)]
    return [
        Case("bf16_linear", {"merge_method": "linear", "models": bf, "dtype": "bfloat16"}),
        Case(
            "bf16_slerp",
            {"merge_method": "slerp", "base_model": "bfbase", "models": [_m("bfbase"), _m("bf1")], "parameters": {"t": [0, 0.5, 1]}, "dtype": "bfloat16"},
        ),
        Case("bf16_task_arithmetic", _gta("task_arithmetic", bf, base="bfbase") | {"dtype": "bfloat16"}, "bf16", _BF16),
        Case("bf16_ties", _gta("ties", bf, base="bfbase", density=0.5) | {"dtype": "bfloat16"}, "bf16", _BF16),
        Case("bf16_breadcrumbs", _gta("breadcrumbs", bf, base="bfbase", density=0.7, gamma=0.05) | {"dtype": "bfloat16"}, "bf16", _BF16),
        Case("bf16_model_stock", _gta("model_stock", [_m("bf1"), _m("bf2")], base="bfbase") | {"dtype": "bfloat16"}, "bf16", _BF16),
        Case("bf16_nuslerp", {"merge_method": "nuslerp", "models": bf, "dtype": "bfloat16"}, "bf16", _BF16),
    ]  # fmt: skip


def all_cases() -> list[Case]:
    """Every case, in the order the report lists them."""
    return [*_linear_cases(), *_ties_cases(), *_geometric_cases(), *_slice_cases(), *_bf16_cases()]
