"""Benchmark bookkeeping and report: normalized accuracy, grids, subsets, and report.html in Chromium."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from unimerge.bench.report import render_html, render_markdown, results_table, scaling_markdown
from unimerge.bench.runner import grid_points, scaling_subsets, select_methods
from unimerge.bench.scores import normalized, scaling_trend, summarize
from unimerge.data import SUITES
from unimerge.errors import ConfigError
from unimerge.methods import get_method, list_methods

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_normalized_avg_is_the_mean_of_ratios():
    individual = {"a": 0.8, "b": 0.5}
    row = summarize("m", {"a": 0.6, "b": 0.5}, individual)
    # (0.6 / 0.8 + 0.5 / 0.5) / 2 = (0.75 + 1.0) / 2
    assert row["normalized_avg"] == pytest.approx(0.875)
    assert row["avg"] == pytest.approx(0.55)
    assert normalized({"a": 0.8}, individual) == pytest.approx(1.0)


def test_grid_points_are_the_product_in_order():
    info = get_method("ties")
    points = grid_points(info)
    expected = 1
    for values in info.grid.values():
        expected *= len(values)
    assert len(points) == expected
    assert points[0] == {k: v[0] for k, v in info.grid.items()}
    assert len({tuple(sorted(p.items())) for p in points}) == expected
    assert grid_points(replace(info, grid={})) == [{}]  # no grid: the defaults, once


def test_scaling_subsets_are_distinct_seeded_and_end_with_the_full_set():
    subs = scaling_subsets(5, 3, seed=0)
    assert subs == scaling_subsets(5, 3, seed=0)
    assert [len(s) for s in subs] == [2, 2, 2, 4, 4, 4, 5]  # sizes 2, 4, ... and the full set
    assert len(set(subs)) == len(subs) and subs[-1] == (0, 1, 2, 3, 4)


def test_method_selection():
    every = {m.name for m in list_methods(data="none")}
    assert {m.name for m in select_methods(SUITES["text8"], None)} == every
    assert {m.name for m in select_methods(SUITES["quick"], None)} <= set(SUITES["quick"].default_methods)
    assert [m.name for m in select_methods(SUITES["text8"], ["ties"])] == ["ties"]
    data = select_methods(SUITES["text8"], ["data"])
    assert data and all(m.data != "none" for m in data)
    both = [m.name for m in select_methods(SUITES["text8"], ["ties", "free", "regmean"])]
    assert both[0] == "ties" and both.count("ties") == 1 and set(both) == every | {"regmean"}
    assert {m.name for m in select_methods(SUITES["text8"], ["all"])} == {m.name for m in list_methods()}
    quick = {m.name: m for m in select_methods(SUITES["quick"], None)}  # its coarser grids
    assert len(grid_points(quick["ties"])) == 6 < len(grid_points(get_method("ties")))
    with pytest.raises(ConfigError, match="Unknown merge method"):
        select_methods(SUITES["text8"], ["no_such_method"])


def _results() -> dict:
    tasks = ["t1", "t2"]
    grid = [
        {"params": {"lambda": lam}, "val_avg": 0.5 + lam / 10, "val": {}, "seconds": 0.1}
        for lam in (0.3, 0.5, 1.0)
    ]
    return {
        "suite": "unit",
        "model": "tiny",
        "tasks": tasks,
        "seed": 0,
        "pretrained": {"t1": 0.6, "t2": 0.5},
        "individual": {"t1": 0.9, "t2": 0.8},
        "baselines": [summarize("pretrained (frozen heads)", {"t1": 0.6, "t2": 0.5}, {"t1": 0.9, "t2": 0.8})],
        "rows": [
            summarize("alpha_method", {"t1": 0.7, "t2": 0.6}, {"t1": 0.9, "t2": 0.8})
            | {"params": {"lambda": 1.0}, "seconds": 0.1, "grid": grid}
        ],
        "skipped": [{"method": "two_only", "reason": "needs exactly 2 models"}],
        "scaling": {"alpha_method": [{"n_tasks": 2, "tasks": tasks, "avg": 0.65, "normalized_avg": 0.76}]},
    }


def test_rich_table_lists_rows_and_skips():
    console = Console(record=True, width=200)
    console.print(results_table(_results()))
    text = console.export_text()
    assert "alpha_method" in text and "70.0" in text and "two_only" in text and "lambda=1.0" in text


def test_markdown_table_rows_params_and_data_budget():
    res = _results()
    res["rows"].append(
        summarize("data_method", {"t1": 0.8, "t2": 0.7}, res["individual"])
        | {
            "params": {"steps": 3},
            "seconds": 12.0,
            "data_budget": {"examples_per_task": 64, "labeled": False},
        }
    )
    lines = render_markdown(res).splitlines()
    assert lines[0] == "| method | t1 | t2 | avg | 95% CI | vs TA | norm. | chosen params / data | merge s |"
    assert lines[2].startswith("| pretrained (frozen heads) | 60.0 | 50.0 | 55.0 |")
    assert (
        lines[3]
        == "| `data_method` | 80.0 | 70.0 | 75.0 |  |  | 88.2 | defaults; 64 unlabelled examples per task | 12.0 |"
    )
    assert (
        lines[4].startswith("| `alpha_method` | 70.0 | 60.0 | 65.0 |") and "| lambda=1.0 | 0.1 |" in lines[4]
    )
    assert "Skipped: `two_only` (needs exactly 2 models)." in lines
    assert lines[-1] == "| `alpha_method` | 76.0 |  |  |"  # the scaling table closes it (no fitted line)


def test_scaling_markdown_means_each_size_and_reports_the_fitted_line():
    recs = [
        {"n_tasks": 2, "tasks": ["a", "b"], "avg": 0.8, "normalized_avg": 0.90},
        {"n_tasks": 2, "tasks": ["a", "c"], "avg": 0.8, "normalized_avg": 0.80},
        {"n_tasks": 3, "tasks": ["a", "b", "c"], "avg": 0.7, "normalized_avg": 0.70},
    ]
    res = {"scaling": {"ta": recs}, "scaling_trend": {"ta": scaling_trend(recs)}}
    lines = scaling_markdown(res).splitlines()
    assert lines[0] == "| method | 2 tasks | 3 tasks | trend / task | R² |"
    # size 2: (90 + 80) / 2 = 85; the line through (2, .9), (2, .8), (3, .7): slope -0.15, R² = 0.75
    assert lines[2] == "| `ta` | 85.0 | 70.0 | -15.00 | 0.75 |"
    assert scaling_markdown({"rows": []}) == ""


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)"
)
def test_report_renders_in_headless_chromium(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render_html(_results()), encoding="utf-8")
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert '<table id="results">' in dom
    assert dom.count("<tr") == 1 + 1 + 1 + 1  # header, baseline, method row, skipped
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom)
    assert len(images) == 3  # per-task bars, validation sweep, task scaling
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            str(CHROMIUM),
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a blank page compresses to ~5 KB
    shutil.rmtree(profile, ignore_errors=True)


def test_run_scaling_reuses_earlier_subsets_and_normalizes_on_the_same_examples():
    """Subsets found in ``reuse`` are copied (a merge would fail here); the full set reads the row's
    own correctness cut to ``scaling_test`` examples, normalized by the experts on those examples."""
    from types import SimpleNamespace

    import torch

    from unimerge.bench.runner import run_scaling
    from unimerge.bench.scores import pack_correct

    names = ["a", "b", "c"]
    suite = SimpleNamespace(scaling_subsets=3, scaling_test=2, scaling_methods=("ties",))
    model = torch.nn.Linear(1, 1)
    individual = {
        "a": torch.tensor([1, 1, 0, 0]),
        "b": torch.tensor([1, 0, 1, 1]),
        "c": torch.tensor([1, 1, 1, 1]),
    }
    prep = SimpleNamespace(
        suite=suite,
        seed=0,
        tasks=[SimpleNamespace(name=n) for n in names],
        references={"individual": {k: v.bool() for k, v in individual.items()}},
        model=model,
        base=model.state_dict(),
    )
    row_correct = {"a": [1, 0, 0, 0], "b": [0, 0, 1, 1], "c": [1, 1, 0, 0]}
    row = {
        "method": "ties",
        "correct": {k: pack_correct(torch.tensor(v).bool()) for k, v in row_correct.items()},
    }
    earlier = [
        {"n_tasks": 2, "tasks": list(pair), "avg": 0.5, "normalized_avg": 0.6}
        for pair in (("a", "b"), ("a", "c"), ("b", "c"))
    ]
    out = run_scaling(prep, [row], reuse={"ties": earlier})  # type: ignore[arg-type]
    records = out["ties"]
    assert records[:3] == earlier
    full = records[3]
    assert full["tasks"] == names
    # first 2 examples: row a=0.5, b=0.0, c=1.0; experts a=1.0, b=0.5, c=1.0
    assert full["avg"] == pytest.approx(0.5)
    assert full["normalized_avg"] == pytest.approx((0.5 / 1.0 + 0.0 / 0.5 + 1.0 / 1.0) / 3)
