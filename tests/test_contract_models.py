"""Contract tests parametrized over the registry's data-aware kind: every ModelMethod, present and future.

For each method: what copies of one expert merge to (read from its code and paper), bit-identical
results for the same problem seed whatever the global random state, and bounded parameters. The
problem is the toy MLP of ``_modelmerge_a_toy`` (3 tasks, inputs of dimension 6, hidden 8) with a few
steps of training at most, so the file runs in seconds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _bounds import unbounded_fields
from _modelmerge_a_toy import mlp_problem
from unimerge import MergedModel, MergeProblem, ModelMethod, get_method, list_methods
from unimerge.modelmerge.wemoe import WEMoELinear

METHODS = [m.name for m in list_methods(kind=ModelMethod)]
N = 3  # experts (copies of one, for the identical-experts contract)
ALL_LINEARS = (".",)  # the toy's linears are "0" and "2", which the MoE methods' default targets miss

# Small, fast parameters for a run of each method (a step or two of any training).
FAST: dict[str, dict[str, Any]] = {
    "fisher": {"batch_size": 8, "bf16": False},
    "greedy_soup": {},
    "regmean": {},
    "regmean_plusplus": {},
    "task_wise_adamerging": {"steps": 2},
    "layer_wise_adamerging": {"steps": 2},
    "lorahub": {"evaluations": 4},
    "surgery": {"steps": 2, "rank": 2},
    "surgery_v2": {"steps": 2, "rank": 2, "layers": (r"^\d+$",)},  # the toy's blocks: children 0, 1, 2
    "adarank": {"steps": 2},
    "tsv_c": {},
    "smile": {"targets": ALL_LINEARS},
    "twin_merging": {"router_steps": 2, "router_hidden": 8},
    "wemoe": {"steps": 2, "batch_size": 8, "targets": ALL_LINEARS},
}


def _problem(identical: bool) -> MergeProblem:
    p = mlp_problem(n=N, budget=16)
    if identical:
        p.experts = [p.experts[0]] * N
    return p


def _run(method: str, problem: MergeProblem, **params: Any) -> MergedModel:
    info = get_method(method, ModelMethod)
    return info.fn(problem, info.params(**{**FAST[method], **params}))


def _inputs(problem: MergeProblem) -> Tensor:
    """5 inputs of every task (the tasks' input distributions differ): ``(5 N, 6)``."""
    return torch.cat([t.inputs(5, seed=99) for t in problem.tasks])


def _expert(problem: MergeProblem) -> nn.Module:
    module = copy.deepcopy(problem.base)
    module.load_state_dict(problem.experts[0])
    return module


# ----------------------------------------------------------------- what copies of one expert give

Check = Callable[[MergeProblem, MergedModel], None]


def state_is_expert(p: MergeProblem, merged: MergedModel) -> None:
    """The merged module holds exactly the expert's tensors."""
    state = merged.module.state_dict()
    assert state.keys() == p.experts[0].keys()
    for k, v in p.experts[0].items():
        assert torch.equal(state[k], v), k


def outputs_are_expert(atol: float) -> Check:
    """The merged module (and every per-task module) answers as the expert on every task's inputs."""

    def check(p: MergeProblem, merged: MergedModel) -> None:
        x = _inputs(p)
        with torch.no_grad():
            want = _expert(p)(x)
            for name in ("", *(t.name for t in p.tasks)):
                got = merged.for_task(name)(x) if name else merged.module(x)
                torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=f"task {name or '(shared)'}")

    return check


def on_the_line(lo: float, hi: float, shared: bool) -> Check:
    """Every tensor is ``base + c tau`` (tau = expert - base) with ``lo <= c <= hi``; one ``c`` for all
    tensors when ``shared``. Copies of one expert leave a task-arithmetic search only this line."""

    def check(p: MergeProblem, merged: MergedModel) -> None:
        base, state = p.base.state_dict(), merged.module.state_dict()
        cs = []
        for k, b in base.items():
            tau, delta = p.experts[0][k] - b, state[k] - b
            c = float((delta * tau).sum() / (tau * tau).sum())
            torch.testing.assert_close(delta, c * tau, atol=1e-6, rtol=1e-5, msg=k)
            assert lo - 1e-6 <= c <= hi + 1e-6, (k, c)
            cs.append(c)
        if shared:
            assert max(cs) - min(cs) < 1e-5, cs

    return check


def task_models_are_expert(atol: float) -> Check:
    """Every task's own module answers as the expert on every task's inputs (TSV-C: the shared
    module is the pretrained one, no merged model to check)."""

    def check(p: MergeProblem, merged: MergedModel) -> None:
        x = _inputs(p)
        with torch.no_grad():
            want = _expert(p)(x)
            for t in p.tasks:
                torch.testing.assert_close(merged.for_task(t.name)(x), want, atol=atol, rtol=0, msg=t.name)

    return check


def wemoe_layers_mix_one_task_vector(p: MergeProblem, merged: MergedModel) -> None:
    """Each WEMoE layer computes ``W_0 + s(x) tau`` per example, ``s = sum_i r_i(x)`` its (unnormalised)
    routing weights: identical task vectors make the mixture a multiple of the one tau."""
    base = p.base.state_dict()
    seen: list[tuple[str, Tensor, Tensor, Tensor]] = []
    layers = {m: n for n, m in merged.module.named_modules() if isinstance(m, WEMoELinear)}
    assert sorted(layers.values()) == ["0", "2"]
    hooks = [
        m.register_forward_hook(lambda m, a, out: seen.append((layers[m], a[0], out, m.route.weights)))
        for m in layers
    ]
    try:
        with torch.no_grad():
            merged.module(_inputs(p))
    finally:
        for h in hooks:
            h.remove()
    assert [name for name, *_ in seen] == ["0", "2"]
    for name, x, out, r in seen:
        s = r.sum(-1, keepdim=True)  # (b, 1)
        w0, b0 = base[f"{name}.weight"], base[f"{name}.bias"]
        tw, tb = p.experts[0][f"{name}.weight"] - w0, p.experts[0][f"{name}.bias"] - b0
        want = F.linear(x, w0, b0) + s * F.linear(x, tw, tb)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, msg=name)
        assert float(s.min()) > 0.5, (
            "s starts at N init_lambda = 0.9 (s near 0 would make this check vacuous)"
        )


@dataclass(frozen=True)
class Identical:
    """Copies of one expert, merged with ``params`` (over :data:`FAST`), pass ``check``, because ``why``."""

    params: dict[str, Any]
    check: Check
    why: str


THIRD = 1.0 / N
_ADAM_STEP = 5e-3 * 0.1 / 0.001**0.5  # lr (1 - b1) / sqrt(1 - b2): the most one Adam step moves (Kingma & Ba)
ADA_SUM = (N * (0.3 - 2 * _ADAM_STEP), N * (0.3 + 2 * _ADAM_STEP))  # N coefficients, 2 steps from init 0.3
IDENTICAL: dict[str, list[Identical]] = {
    "fisher": [
        Identical(
            {},
            state_is_expert,
            "no tensor varies, so no Fisher is estimated; the average of equal tensors is that tensor",
        )
    ],
    "greedy_soup": [Identical({}, state_is_expert, "every soup is a uniform average of equal ingredients")],
    "regmean": [Identical({}, state_is_expert, "no linear layer varies: no Gram matrix, the average")],
    "regmean_plusplus": [Identical({}, state_is_expert, "no block has a varying layer: the average")],
    "task_wise_adamerging": [
        Identical(
            {"steps": 0, "init": THIRD},
            outputs_are_expert(1e-5),
            "base + sum_k lambda_k tau = base + N init tau: init = 1/N gives the expert",
        ),
        Identical(
            {},
            on_the_line(*ADA_SUM, shared=True),
            "equal task vectors get equal gradients, so the coefficients stay equal: "
            "base + (sum_k lambda_k) tau, each lambda_k within 2 Adam steps of init 0.3",
        ),
    ],
    "layer_wise_adamerging": [
        Identical({"steps": 0, "init": THIRD}, outputs_are_expert(1e-5), "init = 1/N: the expert"),
        Identical(
            {},
            on_the_line(*ADA_SUM, shared=False),
            "one coefficient sum per tensor: base + c_j tau_j, c_j within 2 Adam steps of N init",
        ),
    ],
    "lorahub": [
        Identical(
            {"lower": 0.333, "upper": 0.334, "init": THIRD},
            on_the_line(N * 0.333, N * 0.334, shared=True),
            "task_arithmetic of equal task vectors with searched weights w: base + (sum_i w_i) tau "
            "for every tensor; weights pinned near 1/N keep sum_i w_i near 1",
        ),
    ],
    "surgery": [
        Identical(
            {"lambda": THIRD, "steps": 0},
            outputs_are_expert(1e-5),
            "shared model base + lambda N tau is the expert at lambda = 1/N; untrained adapters "
            "(up = 0) are the identity",
        ),
        Identical({}, on_the_line(0.9, 0.9, shared=True), "default lambda 0.3: base + 0.3 N tau"),
    ],
    "surgery_v2": [
        Identical(
            {"lambda": THIRD, "steps": 0},
            outputs_are_expert(1e-5),
            "shared model base + lambda N tau is the expert at lambda = 1/N; untrained adapters after "
            "every block and on the output (up = 0) are the identity",
        ),
        Identical({}, on_the_line(0.9, 0.9, shared=True), "default lambda 0.3: base + 0.3 N tau"),
    ],
    "adarank": [
        Identical(
            {"steps": 0, "init": THIRD},
            outputs_are_expert(1e-5),
            "all components kept at the start (rank_fraction 1.0): base + sum_i lambda_i tau = base + N init tau",
        ),
        Identical(
            {},
            on_the_line(*ADA_SUM, shared=False),
            "equal task vectors get equal gradients: per tensor base + (sum_i lambda_i) tau with each "
            "lambda_i within 2 Adam steps of 0.3, and 2 steps of at most lr cannot move a +0.1 mask logit "
            "below 0, so every component stays",
        ),
    ],
    "tsv_c": [
        Identical(
            {"rank_fraction": 1.0},
            task_models_are_expert(1e-5),
            "each task's model is base + its full-rank task matrices (and dense biases): the expert",
        )
    ],
    "smile": [
        Identical(
            {},
            outputs_are_expert(1e-5),
            "W_0 x + sum_i r_i (tau x) with routing weights "
            "summing to 1 and full-rank experts (k=32 > 6), the rest averaged",
        )
    ],
    "twin_merging": [
        Identical(
            {},
            outputs_are_expert(1e-5),
            "theta* + sum_i w_i (theta_i - theta*) with "
            "softmax weights summing to 1 is theta_i; exclusive parts at full rank",
        )
    ],
    "wemoe": [
        Identical({}, wemoe_layers_mix_one_task_vector, "routing weights are not normalised: W_0 + s(x) tau"),
        Identical(
            {"steps": 0, "lambda": THIRD, "init_lambda": THIRD},
            outputs_are_expert(1e-2),
            "untrained routers give each task ~init_lambda = 1/N (their N(0, 0.01) weights "
            "move it by ~1e-3): about the expert",
        ),
    ],
}


def test_the_identical_experts_table_covers_every_method() -> None:
    assert set(IDENTICAL) == set(METHODS) == set(FAST)
    assert len(METHODS) == 14


@pytest.mark.parametrize("method", METHODS)
def test_copies_of_one_expert_merge_to_what_the_method_defines(method: str) -> None:
    for case in IDENTICAL[method]:
        problem = _problem(identical=True)
        merged = _run(method, problem, **case.params)
        try:
            case.check(problem, merged)
        except AssertionError as err:
            raise AssertionError(f"{method} {case.params}: {case.why}") from err


def _wrong(problem: MergeProblem, merged: MergedModel, c: float, check: Check) -> MergedModel:
    """A wrong answer, ``base + c tau``: a dense model, or (for the WEMoE check, which reads WEMoE
    layers) ``merged`` with its layers' task vectors scaled by ``c``."""
    if check is wemoe_layers_mix_one_task_vector:
        for m in merged.module.modules():
            if isinstance(m, WEMoELinear):
                m.tau_weight.mul_(c)
                m.tau_bias.mul_(c)
        return merged
    base = problem.base.state_dict()
    module = copy.deepcopy(problem.base)
    module.load_state_dict({k: b + c * (problem.experts[0][k] - b) for k, b in base.items()})
    return MergedModel(module=module, examples_used=0, labeled=False)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("c", [0.0, 2.0], ids=["base", "2tau"])
def test_the_checks_tell_wrong_answers_apart(method: str, c: float) -> None:
    """Each identical-experts check fails a method that returned the base model (c = 0) or the base
    plus twice the task vector (c = 2)."""
    for case in IDENTICAL[method]:
        problem = _problem(identical=True)
        wrong = _wrong(problem, _run(method, problem, **case.params), c, case.check)
        with pytest.raises(AssertionError):
            case.check(problem, wrong)


# ------------------------------------------------------------------------ same seed, same result


def _fingerprint(problem: MergeProblem, merged: MergedModel) -> dict[str, Any]:
    x = _inputs(problem)
    with torch.no_grad():
        outs = {t.name: merged.for_task(t.name)(x) for t in problem.tasks}
    return {
        "state": merged.module.state_dict(),
        "tasks": {k: m.state_dict() for k, m in merged.task_modules.items()},
        "outputs": outs,
        "meta": (merged.examples_used, merged.labeled, merged.params_total, merged.details),
    }


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_output(method: str) -> None:
    """Two runs on the same problem (seed 0) are bit-identical, whatever the global random state:
    a method draws only from generators seeded by ``problem.seed``."""
    runs, np_state = [], np.random.get_state()
    with torch.random.fork_rng():  # the other tests keep their global random state
        for global_seed in (1, 2):
            problem = _problem(identical=False)
            torch.manual_seed(global_seed)
            np.random.seed(global_seed)
            runs.append(_fingerprint(problem, _run(method, problem)))
    np.random.set_state(np_state)
    assert _equal(runs[0], runs[1]), f"{method}: two runs with problem.seed=0 differ"


# --------------------------------------------------------------------------------- bounded params


@pytest.mark.parametrize("method", METHODS)
def test_parameters_are_bounded(method: str) -> None:
    """Every number has a lower and an upper bound, every string or sequence a maximum length."""
    assert unbounded_fields(get_method(method)) == []
