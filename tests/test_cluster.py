"""The streaming engine on Ray (``merge --executor ray``) and the plan across nodes (``validate --nodes``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from torch import Tensor
from typer.testing import CliRunner

from _fixtures import make_tiny_family
from unimerge.cli import app
from unimerge.cluster import PlanSource, RayDispatch, cluster_plan, merge_batch, run_merge_on_ray
from unimerge.errors import ConfigError, MergeError
from unimerge.execute import RunOptions, plan_config, run_merge, run_plan
from unimerge.io import Placement

SMALL = 60_000  # batch bytes: a few tensors per Ray task, so the tiny model is many tasks


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_family(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this file
    yield ray
    ray.shutdown()


def _cfg(models: dict[str, Path], method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(models[n]), "parameters": {"weight": w}} for n, w in (("e1", 0.7), ("e2", 0.5), ("e3", 0.3))],
        "parameters": dict(params or {}),
        "seed": 7,
    }  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("dare_ties", {"density": 0.5}),  # random: seeded per tensor name
        ("ties", {"density": 0.4, "trim_scope": "global"}),  # a statistics pass in the driver
        ("slerp", None),
    ],
)
def test_ray_output_is_byte_identical_to_the_local_merge(
    models: dict[str, Path], tmp_path: Path, ray_local: Any, method: str, params: dict[str, Any] | None
) -> None:
    cfg = _cfg(models, method, params)
    if method == "slerp":
        cfg = {**cfg, "models": cfg["models"][:1], "parameters": {"t": [0.0, 0.4, 1.0]}}
    opts = RunOptions(threads=2, out_shard_size=8_000)  # several output shards
    run_merge(cfg, tmp_path / "local", opts)
    result = run_merge_on_ray(cfg, tmp_path / "ray", opts, batch_bytes=SMALL)
    local, remote = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert len([n for n in local if n.endswith(".safetensors")]) > 1
    assert local == remote
    assert result.tensors == len(plan_config(cfg, tmp_path / "x").jobs)


def _dies_once(
    key: str, src: PlanSource, extra: Mapping[str, Tensor], items: Sequence[tuple[str, Placement]]
) -> list[str]:
    marker = src.out_dir.parent / "died"
    if not marker.exists() and items[0][0].endswith("layers.1.mlp.up_proj.weight"):
        marker.write_text("x")
        os._exit(1)  # the worker process dies mid-merge, before writing its tensors
    return merge_batch(key, src, extra, items)


def _fails(
    key: str, src: PlanSource, extra: Mapping[str, Tensor], items: Sequence[tuple[str, Placement]]
) -> list[str]:
    if any(name.endswith("layers.1.mlp.up_proj.weight") for name, _ in items):
        raise MergeError("tensor 'model.layers.1.mlp.up_proj.weight': the disk said no")
    return merge_batch(key, src, extra, items)


def _run(models: dict[str, Path], out: Path, ray: Any, task: Any) -> None:
    cfg = _cfg(models, "dare_ties", {"density": 0.5})
    plan = plan_config(cfg, out)
    src = PlanSource(plan.config, None, out.resolve(), False, "cpu", 7)
    run_plan(plan, out, RunOptions(), dispatch=RayDispatch(ray, src, task=task, limit=SMALL))


def test_a_worker_that_dies_is_retried_and_the_output_is_the_same(
    models: dict[str, Path], tmp_path: Path, ray_local: Any
) -> None:
    run_merge(_cfg(models, "dare_ties", {"density": 0.5}), tmp_path / "local")
    _run(models, tmp_path / "ray", ray_local, _dies_once)
    assert (tmp_path / "died").exists()
    assert _files(tmp_path / "local") == _files(tmp_path / "ray")


def test_a_failing_task_stops_the_merge_and_writes_nothing(
    models: dict[str, Path], tmp_path: Path, ray_local: Any
) -> None:
    with pytest.raises(MergeError, match="the disk said no"):
        _run(models, tmp_path / "ray", ray_local, _fails)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder left beside it


def test_data_aware_and_align_configs_are_refused_with_a_reason(
    models: dict[str, Path], tmp_path: Path
) -> None:
    cfg = {**_cfg(models, "regmean"), "data": {"suite": "quick"}}
    with pytest.raises(ConfigError, match="data-aware method 'regmean'.*drop --executor ray"):
        run_merge_on_ray(cfg, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cluster_plan_spreads_the_bytes_and_takes_the_slower_of_links_and_disk(
    models: dict[str, Path], tmp_path: Path
) -> None:
    plan = plan_config(_cfg(models, "ties", {"density": 0.5}), tmp_path / "o")
    metas = [ck.tensors() for ck in plan.checkpoints]
    read = sum(plan.bytes_read(j, metas) for j in plan.jobs)
    written = sum(j.numel * j.dtype.itemsize for j in plan.jobs)
    one = cluster_plan(plan, 1, disk=1e6, network=1e9)
    assert (one.nodes[0].bytes_read, one.nodes[0].bytes_written) == (read, written)
    assert one.seconds == pytest.approx((read + written) / 1e6) and one.bound == "disk"
    four = cluster_plan(plan, 4, disk=1e12, network=1e6, batch_bytes=SMALL)
    assert sum(n.bytes_read for n in four.nodes) == read and sum(n.tensors for n in four.nodes) == len(
        plan.jobs
    )
    slowest = max(n.bytes_read + n.bytes_written for n in four.nodes)
    assert four.bound == "network" and four.seconds == pytest.approx(slowest / 1e6)
    assert slowest < read + written  # the work is spread: no node moves everything
    assert four.one_machine_seconds == pytest.approx((read + written) / 1e12)
    elements = sum(j.numel * (len(j.sources) + 1) for j in plan.jobs)  # 3 experts and the base
    busy = cluster_plan(plan, 2, disk=1e12, network=1e12, compute_ns=10.0, batch_bytes=SMALL)
    assert sum(n.elements for n in busy.nodes) == elements and busy.bound == "compute"
    assert busy.seconds == pytest.approx(max(n.elements for n in busy.nodes) * 10.0 / 1e9)
    assert busy.one_machine_seconds == pytest.approx(elements * 10.0 / 1e9)


def test_validate_prints_the_plan_per_node(models: dict[str, Path], tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_cfg(models, "ties", {"density": 0.5})))
    res = CliRunner().invoke(app, ["validate", str(path), str(tmp_path / "o"), "--executor", "ray", "--nodes", "3",
                                   "--disk-bandwidth", "1GB/s", "--network-bandwidth", "8Gbit/s", "--compute-ns", "3"])  # fmt: skip
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # the table's title wraps with the terminal's width
    assert "on 3 Ray nodes" in text and "network 1.0 GB/s per node, compute 3 ns" in text
    assert "expected:" in text
    bad = CliRunner().invoke(app, ["validate", str(path), "--executor", "ray", "--network-bandwidth", "fast"])
    assert bad.exit_code != 0 and "Cannot read bandwidth 'fast'" in bad.output


def test_cli_merge_on_ray(models: dict[str, Path], tmp_path: Path, ray_local: Any) -> None:
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_cfg(models, "task_arithmetic")))
    res = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "ray"), "--executor", "ray"])
    assert res.exit_code == 0, res.output
    run_merge(path, tmp_path / "local")
    assert _files(tmp_path / "local") == _files(tmp_path / "ray")
