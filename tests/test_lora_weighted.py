"""PEFT's add_weighted_adapter by name, end to end: adapter folders written by real PEFT
(``save_pretrained``) -> ``combine_adapters`` / a ``combination_type:`` config -> the written adapter,
loaded back into PEFT, has the updates PEFT's own ``add_weighted_adapter`` gives for the same request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from _lora_fixtures import TARGETS, lora_layers, tiny_peft_model
from unimerge import ConfigError, check_merge, combine_adapters, run_merge
from unimerge.cli import app
from unimerge.io.checkpoint import Checkpoint
from unimerge.lora import COMBINATION_TYPES, LoraAdapter, merge_adapters

peft = pytest.importorskip("peft")

# x1, x2, x3: rank 2 (x2 lacks the embedding); x4: rank 3, and 4 on lin2 (rank_pattern); x5: rsLoRA.
# (PEFT warns about names inside its prefix 'lora_', so no single letters.)
ADAPTERS: dict[str, dict[str, Any]] = {
    "x1": {"r": 2, "lora_alpha": 4},
    "x2": {"r": 2, "lora_alpha": 3, "target_modules": ["lin1", "lin2"]},
    "x3": {"r": 2, "lora_alpha": 2},
    "x4": {"r": 3, "lora_alpha": 5, "rank_pattern": {"lin2": 4}, "target_modules": ["lin1", "lin2"]},
    "x5": {"r": 2, "lora_alpha": 2, "use_rslora": True},
}
SAME, MIXED = ["x1", "x2", "x3"], ["x1", "x2", "x4"]
WEIGHTS = [1.0, -0.5, 0.7]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The PEFT model holding every adapter, and the folder its ``save_pretrained`` wrote them to."""
    model = tiny_peft_model(ADAPTERS)
    root = tmp_path_factory.mktemp("peft")
    model.save_pretrained(root)  # one folder per (non-default) adapter: root/<name>
    assert all((root / n / "adapter_config.json").is_file() for n in ADAPTERS)
    return model, root


def _new_name(model: Any, kind: str) -> str:
    return f"{kind}_{len(model.peft_config)}"


def _peft_combine(
    model: Any, names: list[str], weights: list[float], kind: str, options: dict
) -> tuple[str, Any]:
    """PEFT's add_weighted_adapter; returns the new adapter's name and the global RNG state at its first
    DARE draw (None when it draws nothing)."""
    new, state = _new_name(model, kind), {}
    original = torch.bernoulli

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        state.setdefault("rng", torch.get_rng_state())
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "bernoulli", spy)
        model.add_weighted_adapter(names, weights, new, combination_type=kind, **options)
    return new, state.get("rng")


def _assert_same_updates(model: Any, peft_name: str, ours: Path) -> None:
    """Our written adapter, loaded by PEFT, has the update of ``peft_name`` in every module PEFT adapted."""
    mine = f"ours_{peft_name}"
    model.load_adapter(ours, adapter_name=mine)
    for layer in lora_layers(model):
        if peft_name not in layer.scaling:
            continue
        want, got = layer.get_delta_weight(peft_name), layer.get_delta_weight(mine)
        scale = float(want.abs().max())
        assert scale > 0
        assert float((got - want).abs().max()) <= 1e-5 * scale, (peft_name, layer)


CASES = [(k, {"density": 0.5} if k not in ("cat", "svd", "linear") else {}) for k in COMBINATION_TYPES] + [
    ("ties", {"density": 0.6, "majority_sign_method": "frequency"}),
    ("ties_svd", {"density": 0.4, "majority_sign_method": "frequency", "svd_rank": 3}),
    ("svd", {"svd_clamp": 0.9}),
    ("svd", {"svd_rank": 2, "svd_full_matrices": False}),
]


@pytest.mark.parametrize(("kind", "options"), CASES)
def test_same_request_same_updates(setup: tuple[Any, Path], tmp_path: Path, kind: str, options: dict) -> None:
    """Missing modules (b has no embedding), rank_pattern (d), DARE's draws: all as PEFT."""
    model, root = setup
    names = MIXED if kind == "cat" or kind.endswith("svd") else SAME
    new, rng = _peft_combine(model, names, WEIGHTS, kind, options)
    assert (rng is not None) == kind.startswith("dare")
    if rng is not None:
        torch.set_rng_state(rng)  # seed=None: torch's global RNG, drawn from where PEFT's draws started
    res = combine_adapters(
        kind, [root / n for n in names], WEIGHTS, seed=None, out=tmp_path / "out", **options
    )
    assert res.rank == model.peft_config[new].r and res.combination_type == kind
    assert sorted(res.modules) == TARGETS
    _assert_same_updates(model, new, tmp_path / "out")


@pytest.mark.parametrize(
    ("names", "kind", "options"),
    [
        # PEFT keeps the first adapter's use_rslora: the new update is scaled by sqrt(r)
        (["x5", "x1"], "svd", {}),
        (["x5", "x1", "x3"], "dare_linear", {"density": 0.7}),
        (["x1"], "ties_svd", {"density": 0.3}),  # one adapter: PEFT runs linear
    ],
)
def test_rslora_first_and_one_adapter(
    setup: tuple[Any, Path], tmp_path: Path, names: list[str], kind: str, options: dict
) -> None:
    model, root = setup
    weights = WEIGHTS[: len(names)]
    new, rng = _peft_combine(model, names, weights, kind, options)
    if rng is not None:
        torch.set_rng_state(rng)
    res = combine_adapters(
        kind, [root / n for n in names], weights, seed=None, out=tmp_path / "out", **options
    )
    assert res.combination_type == ("linear" if len(names) == 1 else kind)
    _assert_same_updates(model, new, tmp_path / "out")


def test_seeded_dare_is_reproducible_and_dense_output_is_the_update(setup: tuple[Any, Path]) -> None:
    _, root = setup
    paths = [root / n for n in SAME]
    one = combine_adapters("dare_ties", paths, WEIGHTS, density=0.5, seed=3, output="dense")
    two = combine_adapters("dare_ties", paths, WEIGHTS, density=0.5, seed=3, output="dense")
    other = combine_adapters("dare_ties", paths, WEIGHTS, density=0.5, seed=4, output="dense")
    assert all(torch.equal(one.deltas[m], two.deltas[m]) for m in TARGETS)
    assert not all(torch.equal(one.deltas[m], other.deltas[m]) for m in TARGETS)
    cat = combine_adapters("cat", paths, WEIGHTS)  # exact: sum_i w_i dW_i
    dense = combine_adapters("cat", paths, WEIGHTS, output="dense")
    for m in TARGETS:
        torch.testing.assert_close(cat.factors[m].delta(), dense.deltas[m])


def _read_nothing(mp: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tensor data read")

    mp.setattr(LoraAdapter, "factors", refuse)
    mp.setattr(Checkpoint, "read", refuse)


def test_bad_requests_before_any_data_is_read(setup: tuple[Any, Path], tmp_path: Path) -> None:
    _, root = setup
    with pytest.MonkeyPatch.context() as mp:
        _read_nothing(mp)
        with pytest.raises(ConfigError, match=r"one rank \(.*x1 r=2.*x4 r=4\).*'cat'"):
            combine_adapters("ties", [root / n for n in MIXED], WEIGHTS, density=0.5, out=tmp_path / "o")
        with pytest.raises(ConfigError, match="dare_ties_svd"):
            combine_adapters("dare-ties", [root / "x1", root / "x2"], [1.0, 1.0], out=tmp_path / "o")
        with pytest.raises(ConfigError, match="needs a density"):
            combine_adapters("ties_svd", [root / "x1", root / "x2"], [1.0, 1.0], out=tmp_path / "o")
        with pytest.raises(ConfigError, match=r"Rank 7 .*'emb'.*at most 6"):
            combine_adapters("svd", [root / "x1", root / "x3"], [1.0, 1.0], svd_rank=7, out=tmp_path / "o")
        with pytest.raises(ConfigError, match="density"):
            combine_adapters("ties", [root / "x1", root / "x3"], [1.0, 1.0], density=1.5)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match=r"'ties_svd' is one of PEFT's .*combine_adapters\('ties_svd'"):
        merge_adapters("ties_svd", [root / "x1"])


# ------------------------------------------------------------------ configs: unimerge merge / validate / run_merge


@pytest.fixture()
def config_dir(setup: tuple[Any, Path], tmp_path: Path) -> Iterator[Path]:
    """The adapters beside a config folder (relative paths), and a base model folder of Tiny's weights."""
    model, root = setup
    for n in ADAPTERS:
        (tmp_path / n).symlink_to(root / n, target_is_directory=True)
    (tmp_path / "base").mkdir()
    base = {
        f"{k}.weight": m.base_layer.weight.detach().clone()
        for k, m in zip(TARGETS, lora_layers(model), strict=True)
    }
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    yield tmp_path


def _write(folder: Path, cfg: dict) -> Path:
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


COMBINE = {
    "combination_type": "ties_svd",
    "models": [{"model": n, "parameters": {"weight": w}} for n, w in zip(MIXED, WEIGHTS, strict=True)],
    "parameters": {"density": 0.5, "svd_rank": 3},
}


def test_cli_merge_of_a_combination_config(setup: tuple[Any, Path], config_dir: Path) -> None:
    model, _ = setup
    new, _ = _peft_combine(model, MIXED, WEIGHTS, "ties_svd", {"density": 0.5, "svd_rank": 3})
    result = CliRunner().invoke(app, ["merge", str(_write(config_dir, COMBINE)), str(config_dir / "out")])
    assert result.exit_code == 0, result.output
    assert "combination_type ties_svd" in result.output
    assert (config_dir / "out" / "merge_report.json").is_file()
    _assert_same_updates(model, new, config_dir / "out")


def test_dense_output_is_base_plus_peft_update(setup: tuple[Any, Path], config_dir: Path) -> None:
    model, _ = setup
    new, _ = _peft_combine(model, SAME, WEIGHTS, "cat", {})
    cfg = {**COMBINE, "combination_type": "cat", "parameters": {}, "base_model": "base"}
    cfg["models"] = [{"model": n, "parameters": {"weight": w}} for n, w in zip(SAME, WEIGHTS, strict=True)]
    cfg["output"] = {"format": "dense"}
    result = run_merge(_write(config_dir, cfg), config_dir / "out")  # the public API routes it too
    assert result.tensors == 3
    got = load_file(str(config_dir / "out" / "model.safetensors"))
    for name, layer in zip(TARGETS, lora_layers(model), strict=True):
        want = layer.base_layer.weight + layer.get_delta_weight(new)
        torch.testing.assert_close(got[f"{name}.weight"], want, rtol=1e-5, atol=1e-6)


def test_validate_prints_the_plan_without_reading_data(config_dir: Path) -> None:
    path = _write(config_dir, COMBINE)
    merge = {"merge_method": "ties", "models": [{"model": "x1"}, {"model": "x4"}],
             "parameters": {"density": 0.5}, "output": {"format": "peft_lora", "rank": 3}}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        _read_nothing(mp)
        result = CliRunner().invoke(app, ["validate", str(path), str(config_dir / "out")], terminal_width=200)
        rows = dict(check_merge(path, config_dir / "out").rows)
        merge_rows = dict(check_merge(_write(config_dir, merge), config_dir / "out").rows)
        exact = {
            **merge,
            "merge_method": "task_arithmetic",
            "parameters": {},
            "output": {"format": "peft_lora"},
        }
        exact_rows = dict(check_merge(_write(config_dir, exact), config_dir / "out").rows)
    assert result.exit_code == 0, result.output
    assert "combination_type ties_svd" in result.output and "new adapter r = lora_alpha = 3" in result.output
    assert rows["lin2"] == "[5, 8], ranks 2 + 2 + 4 -> 3" and rows["emb"] == "[11, 6], ranks 2 + - + - -> 3"
    assert rows["modules"] == "3 (2 in every adapter)"
    assert merge_rows["output"] == "peft_lora, truncated SVD to rank 3" and merge_rows["lin1"].endswith(
        "-> 3"
    )
    assert (
        exact_rows["lin2"] == "[5, 8], ranks 2 + 4 -> 6" and exact_rows["emb"] == "[11, 6], ranks 2 + - -> 2"
    )
    assert exact_rows["output"].startswith("peft_lora, exact")
    assert not (config_dir / "out").exists()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"output": {"format": "peft_lora", "rank": 4}}, "svd_rank"),
        ({"combination_type": "tie_svd"}, "ties_svd"),
        (
            {"models": [{"model": "x1", "parameters": {"density": 0.5}}, {"model": "x2"}]},
            "one number per adapter",
        ),
        ({"parameters": {"density": 0.5, "svd_rnak": 3}}, "svd_rnak: unknown key"),
        ({"merge_method": "ties"}, "not both"),
        (
            {"base_model": "base", "output": {"format": "dense"}, "models": [{"model": "base"}]},
            "not a PEFT adapter",
        ),
    ],
)
def test_bad_combination_configs(config_dir: Path, change: dict, match: str) -> None:
    result = CliRunner().invoke(
        app, ["merge", str(_write(config_dir, {**COMBINE, **change})), str(config_dir / "out")]
    )
    assert result.exit_code != 0 and match in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not (config_dir / "out").exists()


def test_progress_reports_each_finished_module_in_every_output(config_dir: Path) -> None:
    """progress(k, 3) after the k-th of emb, lin1, lin2, for each output; a dense folder's DARE draws
    (combined as the folder is written) are those of the in-memory result with the same seed."""
    paths = [config_dir / n for n in SAME]
    outputs: list[tuple[str, dict]] = [
        ("cat", {}),
        ("ties_svd", {"density": 0.5, "out": config_dir / "adapter"}),
        ("dare_ties", {"density": 0.5, "seed": 3, "output": "dense"}),
        ("dare_ties", {"density": 0.5, "seed": 3, "output": "dense", "base": config_dir / "base",
                       "out": config_dir / "dense"}),
    ]  # fmt: skip
    results, calls = [], list[tuple[int, int]]()
    for kind, kwargs in outputs:
        calls.clear()
        results.append(
            combine_adapters(kind, paths, WEIGHTS, progress=lambda d, t: calls.append((d, t)), **kwargs)
        )
        assert calls == [(1, 3), (2, 3), (3, 3)], (kind, kwargs)
    got = load_file(str(config_dir / "dense" / "model.safetensors"))
    for name, w in load_file(str(config_dir / "base" / "model.safetensors")).items():
        torch.testing.assert_close(
            got[name], w + results[2].deltas[name.removesuffix(".weight")], rtol=0, atol=1e-6
        )
    seen: list[tuple[str, int, int]] = []
    run_merge(_write(config_dir, COMBINE), config_dir / "api", progress=lambda *c: seen.append(c))
    merge = {
        "merge_method": "ties",
        "models": [{"model": "x1"}, {"model": "x4"}],
        "parameters": {"density": 0.5},
        "output": {"format": "peft_lora", "rank": 3},
    }
    run_merge(_write(config_dir, merge), config_dir / "api2", progress=lambda *c: seen.append(c))
    assert seen == [("combine adapters", k, 3) for k in (1, 2, 3)] + [
        ("merge adapters", k, 3) for k in (1, 2, 3)
    ]


def test_cli_merge_of_adapters_draws_a_progress_bar(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib

    import unimerge.cli.lora as cli_lora

    seen: list[tuple[str, int, int]] = []

    @contextlib.contextmanager
    def recording() -> Iterator[Any]:
        yield lambda *c: seen.append(c)

    monkeypatch.setattr(cli_lora, "progress_bars", recording)
    result = CliRunner().invoke(app, ["merge", str(_write(config_dir, COMBINE)), str(config_dir / "out")])
    assert result.exit_code == 0, result.output
    assert seen == [("combine adapters", k, 3) for k in (1, 2, 3)]
