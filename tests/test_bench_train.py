"""Benchmark training (protocol v2): experts fine-tuned through frozen heads stop early on validation,
their bits depend neither on the caller's torch thread count nor on how many worker processes train
them, and every built model is cached by its recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from _bench_toy import TOY_SUITE, tiny_bert, toy_task
from unimerge.bench.build import build_heads, build_models
from unimerge.bench.model import evaluate, load_encoder
from unimerge.bench.recipes import recipe_hash
from unimerge.bench.train import TRAIN_THREADS, _Best, fit_encoder, torch_threads

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("bench")
    pdir = tiny_bert(root / "pretrained")
    tasks = [toy_task("a", 2, 1), toy_task("b", 3, 2)]
    heads = build_heads(root / "cache", load_encoder(pdir), tasks, 0, "sha")
    return {"root": root, "pretrained": pdir, "tasks": tasks, "heads": heads}


def _train(world: dict, outer_threads: int) -> dict[str, torch.Tensor]:
    with torch_threads(outer_threads):
        torch.manual_seed(0)
        encoder = load_encoder(world["pretrained"])
        fit_encoder(encoder, world["tasks"][:1], world["heads"][:1], 6, TOY_SUITE, 0, None)
        assert torch.get_num_threads() == outer_threads  # restored
    return {k: v.clone() for k, v in encoder.state_dict().items()}


def test_training_is_bit_identical_whatever_the_callers_thread_count(world) -> None:
    """Tensors are split between threads, so without the pinned count the weights could differ."""
    one, other = _train(world, 1), _train(world, TRAIN_THREADS + 1)
    assert all(torch.equal(one[k], other[k]) for k in one)


def test_early_stopping_keeps_the_best_state_and_stops_after_patience() -> None:
    enc = torch.nn.Linear(2, 2)
    best = _Best(patience=2)
    with torch.no_grad():
        enc.weight.fill_(1.0)
        assert best.update(0, 0.5, enc, ["weight"])
        enc.weight.fill_(2.0)
        assert best.update(10, 0.7, enc, ["weight"])  # better: kept
        enc.weight.fill_(3.0)
        assert best.update(20, 0.6, enc, ["weight"])  # worse once: go on
        assert not best.update(30, 0.7, enc, ["weight"])  # a tie is no improvement: patience spent
    assert (
        best.step == 10 and best.score == 0.7 and torch.equal(best.state["weight"], torch.full((2, 2), 2.0))
    )
    assert best.history == [(0, 0.5), (10, 0.7), (20, 0.6), (30, 0.7)]


def test_expert_never_ends_below_the_pretrained_validation_score(world) -> None:
    """The pretrained encoder is the first point of the early-stopping record, so an expert that
    never improves returns the pretrained weights, not worse ones."""
    task, head = world["tasks"][0], world["heads"][0]
    encoder = load_encoder(world["pretrained"])
    before = evaluate(encoder, [task], {head.task: head.state}, "val")[task.name]
    bad = dataclasses.replace(TOY_SUITE, lr=1.0)  # diverges
    best = fit_encoder(encoder, [task], [head], 6, bad, 0, None)
    after = evaluate(encoder, [task], {head.task: head.state}, "val")[task.name]
    assert best.history[0][1] == before and after == best.score >= before


def test_models_are_bit_identical_with_one_or_two_worker_processes(world, tmp_path: Path) -> None:
    """The experts and the multi-task model train in one pool; the bits do not depend on it."""
    args = (world["pretrained"], world["tasks"], world["heads"], TOY_SUITE, 0, "sha")
    serial, mtl_serial = build_models(tmp_path / "serial", *args, jobs=1)
    parallel, mtl_parallel = build_models(tmp_path / "parallel", *args, jobs=2)
    assert mtl_serial is not None and mtl_parallel is not None
    assert set(mtl_serial.test) == {"a", "b"} and mtl_serial.meta["features"] == "unit_mean_pool"
    for a, b in zip([*serial, mtl_serial], [*parallel, mtl_parallel], strict=True):
        assert a.path.name == b.path.name  # the same recipe
        assert (a.encoder_dir / "model.safetensors").read_bytes() == (
            b.encoder_dir / "model.safetensors"
        ).read_bytes()
        assert a.meta["best_step"] == b.meta["best_step"] and a.val == b.val
    again, _ = build_models(tmp_path / "serial", *args, jobs=1)  # cached: not retrained
    assert [e.meta["train_seconds"] for e in again] == [e.meta["train_seconds"] for e in serial]


def test_a_suite_without_a_multitask_model(world, tmp_path: Path) -> None:
    suite = dataclasses.replace(TOY_SUITE, mtl_steps=0)
    experts, mtl = build_models(
        tmp_path, world["pretrained"], world["tasks"], world["heads"], suite, 0, "sha"
    )
    assert mtl is None and len(experts) == 2 and not (tmp_path / "multitask").exists()
    assert all((e.path / "head.safetensors").exists() for e in experts)


def test_recipe_hash_ignores_key_order_but_not_values():
    assert recipe_hash({"a": 1, "b": 2}) == recipe_hash({"b": 2, "a": 1})
    assert recipe_hash({"a": 1, "b": 2}) != recipe_hash({"a": 1, "b": 3})
