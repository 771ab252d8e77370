"""SMILE, WEMoE, Twin-Merging, Representation Surgery and save/load, on tiny MLP models.

The tiny model is a stack of blocks ``fc2(relu(fc1(x)))`` reading ``x (b, t, d)``; its features are the
token mean. Fake tasks yield seeded random batches around a task-specific centre.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unimerge.errors import CheckpointError, MergeError
from unimerge.methods import get_method
from unimerge.modelmerge import MergeProblem
from unimerge.modelmerge._moe import LowRankExperts, cycle_batches, match_linears
from unimerge.modelmerge.load import MODEL_FILE, load, load_merged, save_merged
from unimerge.modelmerge.smile import SmileLinear, SmileParams, smile
from unimerge.modelmerge.surgery import SurgeryAdapter, SurgeryParams, _targets, feature_distance, surgery
from unimerge.modelmerge.twin import TwinModel, TwinParams, twin_merging
from unimerge.modelmerge.wemoe import WEMoELinear, WEMoEParams, _build, train_routers, wemoe

D = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is fastest (and kind to a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Block(nn.Module):
    def __init__(self, d: int = D, h: int = D) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class Tiny(nn.Module):
    def __init__(self, n_blocks: int = 2, d: int = D) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_blocks))

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = b(x)
        return x


@dataclass
class FakeTask:
    """Batches ``x (b, 3, d)``: ``centre`` plus seeded noise of scale ``noise``."""

    name: str
    centre: Tensor
    noise: float = 0.3

    def unlabeled(self, n: int, batch_size: int = 32, seed: int = 0) -> Iterator[dict[str, Tensor]]:
        g = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, self.name)))
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            yield {"x": self.centre + self.noise * torch.randn(b, 3, self.centre.numel(), generator=g)}

    def labeled(self, n: int, batch_size: int = 32, seed: int = 0) -> Iterator[dict[str, Tensor]]:
        for batch in self.unlabeled(n, batch_size, seed):
            yield {**batch, "labels": torch.zeros(batch["x"].shape[0], dtype=torch.long)}


def features(module: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return module(batch["x"]).mean(1)


def perturbed(base: nn.Module, seed: int, scale: float = 0.3) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}


def make_problem(n_tasks: int = 3, budget: int = 32, seed: int = 0) -> MergeProblem:
    torch.manual_seed(seed)
    base = Tiny()
    experts = [perturbed(base, 100 + i) for i in range(n_tasks)]
    g = torch.Generator().manual_seed(7)
    tasks = [FakeTask(f"t{i}", 2.0 * torch.randn(D, generator=g)) for i in range(n_tasks)]
    heads = {t.name: nn.Linear(D, 3) for t in tasks}
    return MergeProblem(
        base=base, experts=experts, tasks=tasks, heads=heads, features=features, budget=budget, seed=seed
    )


def expert_module(problem: MergeProblem, i: int) -> nn.Module:
    m = Tiny()
    m.load_state_dict(problem.experts[i])
    return m


# ---------------------------------------------------------------- SMILE


def test_smile_routing_hand_computed() -> None:
    """in=out=2, deltas diag(1,0) and diag(0,2): gate norms of x=(3,4) are (3,4)."""
    linear = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(2))
    dw = torch.stack([torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 2.0]))])
    x = torch.tensor([[3.0, 4.0]])
    top2 = SmileLinear.build(linear, dw, None, k=0, gate_k=1, top_k=2)
    # softmax(3, 4) = (0.268941, 0.731059): x + 0.268941 * (3, 0) + 0.731059 * (0, 8)
    assert torch.allclose(top2(x), torch.tensor([[3.806824, 9.848472]]), atol=1e-5)
    top1 = SmileLinear.build(linear, dw, None, k=0, gate_k=1, top_k=1)
    assert torch.allclose(top1(x), torch.tensor([[3.0, 12.0]]), atol=1e-6)


def _block_problem() -> MergeProblem:
    """4 experts; expert i changes only the 2x2 diagonal block i of both linears; task i's inputs live there."""
    base = Tiny(n_blocks=1)
    with torch.no_grad():
        for fc in (base.blocks[0].fc1, base.blocks[0].fc2):
            fc.weight.copy_(torch.eye(D))
            fc.bias.zero_()
    g = torch.Generator().manual_seed(3)
    experts, tasks = [], []
    for i in range(4):
        sd = {k: v.clone() for k, v in base.state_dict().items()}
        for fc in ("fc1", "fc2"):
            sd[f"blocks.0.{fc}.weight"][2 * i : 2 * i + 2, 2 * i : 2 * i + 2] += (
                0.5 * torch.rand(2, 2, generator=g) + 0.1
            )
        experts.append(sd)
        centre = torch.zeros(D)
        centre[2 * i : 2 * i + 2] = 1.0
        tasks.append(FakeTask(f"t{i}", centre, noise=0.0))
    return MergeProblem(base=base, experts=experts, tasks=tasks, heads={}, features=features)


def test_smile_full_rank_reproduces_experts_on_their_inputs() -> None:
    problem = _block_problem()
    params = SmileParams(k=0, gate_k=2, top_k=1, targets=(r"fc\d$",))
    merged = smile(problem, params)
    assert merged.examples_used == 0 and not merged.labeled
    assert all(isinstance(merged.module.blocks[0].get_submodule(f), SmileLinear) for f in ("fc1", "fc2"))
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        x = torch.zeros(5, 3, D)
        x[..., 2 * i : 2 * i + 2] = torch.rand(5, 3, 2, generator=g) + 0.1  # task i's subspace
        with torch.no_grad():
            assert torch.allclose(merged.module(x), expert_module_1(problem, i)(x), atol=1e-5)


def expert_module_1(problem: MergeProblem, i: int) -> nn.Module:
    m = Tiny(n_blocks=1)
    m.load_state_dict(problem.experts[i])
    return m


def test_smile_identical_experts_and_param_count() -> None:
    problem = make_problem()
    problem.experts = [problem.experts[0]] * 3
    merged = smile(problem, SmileParams(k=0, gate_k=2, top_k=2, targets=(r"fc1$",)))
    x = torch.randn(4, 3, D)
    with torch.no_grad():
        assert torch.allclose(merged.module(x), expert_module(problem, 0)(x), atol=1e-5)
    # per replaced layer: W, b (72) + gate 3*2*8 (48) + experts down 3*8*8, up 3*8*8, bias 3*8 (408)
    assert merged.params_total == 2 * 72 + 2 * (72 + 48 + 408)


def test_smile_bad_targets_message() -> None:
    with pytest.raises(MergeError, match="no nn.Linear of the model matches"):
        smile(make_problem(), SmileParams(targets=(r"nope$",)))


def test_smile_registered() -> None:
    info = get_method("smile")
    assert (info.kind, info.data, info.family) == ("model", "unlabeled", "moe")


# ---------------------------------------------------------------- WEMoE


def test_wemoe_linear_hand_computed() -> None:
    """W0=1, tau=(2, 4), router constant (0.5, 0.25): W = 1 + 1 + 1 = 3, so x=2 -> 6 (bias 1 + 0.5 - 0.25)."""
    layer = WEMoELinear(1, 1, 2, bias=True, group="g", entry=True)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(1.0)
        layer.tau_weight.copy_(torch.tensor([2.0, 4.0]).reshape(2, 1, 1))
        layer.tau_bias.copy_(torch.tensor([[1.0], [-1.0]]))
        layer.router[2].weight.zero_()
        layer.router[2].bias.copy_(torch.tensor([0.5, 0.25]))
    x = torch.tensor([[[2.0], [2.0]]])  # (b=1, t=2, 1)
    assert torch.allclose(layer(x), torch.full((1, 2, 1), 7.25))
    layer.batch_reduce = True  # the training path: one mixture per batch (same here, b=1)
    assert torch.allclose(layer(x), torch.full((1, 2, 1), 7.25))


def test_wemoe_structure_and_task_arithmetic_rest() -> None:
    problem = make_problem()
    params = WEMoEParams(steps=0, targets=(r"fc\d$",), **{"lambda": 0.5})
    module = _build(problem, params)
    layers = [m for m in module.modules() if isinstance(m, WEMoELinear)]
    assert [m.group for m in layers] == ["blocks.0", "blocks.0", "blocks.1", "blocks.1"]
    assert [m.entry for m in layers] == [True, False, True, False]
    assert layers[0].route is layers[1].route and layers[0].route is not layers[2].route
    with torch.no_grad():  # at init the router outputs ~init_lambda for every task
        x = torch.randn(2, 3, D)
        w = layers[0].router(x).mean(1)
    assert torch.allclose(w, torch.full_like(w, 0.3), atol=0.05)


def test_wemoe_training_reduces_entropy() -> None:
    problem = make_problem(budget=32)
    params = WEMoEParams(steps=25, lr=1e-2, batch_size=16, targets=(r"fc\d$",), bf16=False)
    module = _build(problem, params)
    losses = train_routers(module, problem, params)
    assert losses[-1] < 0.8 * losses[0]
    assert all(not p.requires_grad for p in module.parameters())
    assert all(p.grad is None for h in problem.heads.values() for p in h.parameters())


def test_wemoe_method_runs_and_routes_per_example() -> None:
    problem = make_problem(budget=16)
    merged = wemoe(problem, WEMoEParams(steps=2, batch_size=8, targets=(r"fc\d$",)))
    assert merged.examples_used == 16
    x = torch.randn(2, 3, D)
    with torch.no_grad():
        both = merged.module(x)
        one = merged.module(x[:1])
    assert torch.allclose(both[:1], one, atol=1e-5)  # each example has its own weights
    routing = merged.details["routing_mean_per_task"]  # what the routers learned, for reports
    assert set(routing) == {t.name for t in problem.tasks}
    assert all(len(w) == len(problem.experts) for w in routing.values())
    assert len(merged.details["entropy_first_last"]) == 2


# ---------------------------------------------------------------- Twin-Merging


def test_twin_hand_computed() -> None:
    """base 1, experts 3 and 5, lambda 0.5: shared 4, exclusive (-1, +1); weights (0.25, 0.75) -> W = 4.5."""
    base = nn.Sequential(nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        base[0].weight.fill_(1.0)
    problem = MergeProblem(
        base=base,
        experts=[{"0.weight": torch.tensor([[3.0]])}, {"0.weight": torch.tensor([[5.0]])}],
        tasks=[],
        heads={},
        features=lambda m, b: m(b["x"]),
    )
    from unimerge.modelmerge.twin import _build as twin_build

    module = twin_build(problem, TwinParams(rank=0, **{"lambda": 0.5}))
    twin = TwinModel(module, 1, 2, 4)
    x = torch.tensor([[2.0]])
    assert torch.allclose(twin.forward_with_weights(torch.tensor([[0.25, 0.75]]), x), torch.tensor([[9.0]]))
    assert torch.allclose(module(x), torch.tensor([[8.0]]))  # the shared model alone


def test_twin_full_rank_oracle_router_reproduces_experts() -> None:
    problem = make_problem()
    merged = twin_merging(problem, TwinParams(rank=0, router_steps=0))
    x = torch.randn(4, 3, D)
    with torch.no_grad():
        for i in range(3):
            onehot = F.one_hot(torch.full((4,), i), 3).float()
            assert torch.allclose(
                merged.module.forward_with_weights(onehot, x), expert_module(problem, i)(x), atol=1e-5
            )


def test_twin_router_learns_tasks_and_output_follows_expert() -> None:
    problem = make_problem(budget=48)
    merged = twin_merging(problem, TwinParams(rank=0, router_steps=150, router_lr=1e-2, bf16=False))
    for i, task in enumerate(problem.tasks):
        batch = next(iter(task.unlabeled(8, 8, seed=99)))
        with torch.no_grad():
            got = merged.module(batch["x"])
            want = expert_module(problem, i)(batch["x"])
        assert torch.allclose(got, want, atol=0.05 * float(want.abs().max()))
    assert merged.examples_used == 48


# ---------------------------------------------------------------- Representation Surgery


def test_surgery_adapter_hand_computed() -> None:
    adapter = SurgeryAdapter(2, 1)
    with torch.no_grad():
        adapter.down.weight.copy_(torch.tensor([[1.0, 0.0]]))
        adapter.up.weight.copy_(torch.tensor([[1.0], [2.0]]))
    z = torch.tensor([[3.0, 5.0], [-3.0, 5.0]])
    assert torch.equal(adapter(z), torch.tensor([[0.0, -1.0], [-3.0, 5.0]]))


def test_surgery_reduces_feature_distance() -> None:
    problem = make_problem(budget=32)
    params = SurgeryParams(steps=100, lr=1e-2, rank=16, bf16=False)
    merged = surgery(problem, params)
    assert set(merged.task_modules) == {"t0", "t1", "t2"}
    for i, task in enumerate(problem.tasks):
        rows = _targets(problem, merged.module, i, params)
        before = feature_distance(problem, rows, SurgeryAdapter(D, 16))  # up = 0: the identity
        after = feature_distance(problem, rows, merged.task_modules[task.name].adapter)
        assert after < 0.7 * before
    assert merged.params_total == 2 * 144 + 3 * 2 * 16 * D


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("method", ["smile", "wemoe", "twin", "surgery"])
def test_save_load_round_trip(method: str, tmp_path) -> None:
    problem = make_problem(budget=16)
    targets = (r"fc\d$",)
    merged = {
        "smile": lambda: smile(problem, SmileParams(k=3, gate_k=2, targets=targets)),
        "wemoe": lambda: wemoe(problem, WEMoEParams(steps=2, batch_size=8, targets=targets)),
        "twin": lambda: twin_merging(problem, TwinParams(rank=2, router_steps=5)),
        "surgery": lambda: surgery(problem, SurgeryParams(steps=5, rank=2)),
    }[method]()
    save_merged(merged, tmp_path / "m")
    meta = (tmp_path / "m" / MODEL_FILE).read_text()
    assert (
        f"{merged.params_total:,}" in (tmp_path / "m" / "README.md").read_text()
        and '"params_dense": 288' in meta
    )
    back = load_merged(tmp_path / "m", base=Tiny)
    x = torch.randn(3, 3, D)
    with torch.no_grad():
        assert torch.equal(back.module(x), merged.module(x))
        for name, tm in merged.task_modules.items():
            assert torch.equal(back.for_task(name)(x), tm(x))
    assert back.params_total == merged.params_total


def test_load_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a folder written by"):
        load(tmp_path)
    merged = smile(make_problem(), SmileParams(targets=(r"fc1$",)))
    save_merged(merged, tmp_path / "m")
    with pytest.raises(CheckpointError, match="pass the base architecture"):
        load(tmp_path / "m")


def test_smile_on_tiny_bert_saves_and_loads_from_config(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    base = transformers.BertModel(config).eval()
    experts = [perturbed(base, 10 + i, 0.05) for i in range(2)]
    problem = MergeProblem(
        base=base, experts=experts, tasks=[], heads={}, features=lambda m, b: m(**b).pooler_output
    )
    assert len(match_linears(base, SmileParams().targets)) == 4  # intermediate.dense and output.dense x 2
    merged = smile(problem, SmileParams(k=4, gate_k=2))
    save_merged(merged, tmp_path / "bert")
    back = load(tmp_path / "bert")
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(
            back(input_ids=ids).last_hidden_state, merged.module(input_ids=ids).last_hidden_state
        )


def test_low_rank_experts_rank_truncation() -> None:
    """A rank-1 difference u v^T is exact at rank 1; the mixing weight scales it."""
    dw = torch.outer(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0, 4.0])).unsqueeze(0)  # (1, 2, 3)
    experts = LowRankExperts.from_deltas(dw, None, rank=1)
    x = torch.tensor([[1.0, 1.0, 1.0]])
    assert torch.allclose(experts(x, torch.tensor([[0.5]])), torch.tensor([[3.5, 7.0]]), atol=1e-5)
    assert math.isclose(float(experts.up.norm() * experts.down.norm()), 5.0 * math.sqrt(5.0), rel_tol=1e-5)


def test_modules_do_not_import_transformers() -> None:
    code = "import sys, unimerge.modelmerge; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_training_streams_stay_within_the_budget() -> None:
    """Training cycles over the same ``budget`` examples instead of drawing new ones."""
    stream = cycle_batches(FakeTask("t", torch.zeros(D)), 8, 4, seed=0, device="cpu")
    got = [next(stream)["x"] for _ in range(6)]  # 3 passes of 2 batches
    assert torch.equal(got[0], got[2]) and torch.equal(got[1], got[5]) and not torch.equal(got[0], got[1])
