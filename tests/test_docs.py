"""The docs site: the generated method and config references, and a strict build.

The hooks in ``docs/hooks/`` are loaded by path (as mkdocs loads them) and run on the live registry
and config models, so a method or config key added without documentation fails here, without a
site build. The build itself runs when mkdocs is installed (the ``docs`` and ``dev`` extras).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Literal

import pytest

from unimerge.methods import list_methods

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hook(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", DOCS / "hooks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


methods_hook = _hook("methods")
config_hook = _hook("config_reference")


@pytest.fixture(scope="module")
def results() -> dict:
    return methods_hook.parse_results((DOCS / "benchmark.md").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def page() -> str:
    return methods_hook.render_live(DOCS)


def _sections(page: str) -> dict[str, str]:
    """Method name -> its section of the rendered reference (from its heading to the next)."""
    parts = re.split(r"^### `([^`]+)` \{#[^}]+\}$", page, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_registered_method_has_a_section_with_its_parameters(page: str) -> None:
    sections = _sections(page)
    methods = list_methods()
    assert sorted(sections) == sorted(m.name for m in methods)
    for m in methods:
        text = sections[m.name]
        assert f"| {m.kind} | {m.family} | {m.data} |" in text, m.name
        for name, p in m.param_schema().items():
            scope = "global" if p["scope"] == "global" else "per model"
            assert f"| `{name}` | {scope} |" in text, (m.name, name)
        if m.paper:
            assert f"({m.paper})" in text, m.name


def test_methods_are_grouped_by_kind_then_family(page: str) -> None:
    families = re.findall(r"^## (Tensor|Model) methods: `(\w+)`", page, flags=re.M)
    kinds = [k for k, _ in families]
    assert kinds == sorted(kinds, key=["Tensor", "Model"].index)  # every tensor family before any model one
    assert len(families) == len(set(families))  # each family once
    expected = {("Tensor" if m.kind == "tensor" else "Model", m.family) for m in list_methods()}
    assert set(families) == expected


def test_published_tables_are_parsed(results: dict) -> None:
    assert set(results) == {"quick", "text12"}
    assert set(results["quick"]) == {"ties", "linear", "task_arithmetic"}
    ties = results["quick"]["ties"]
    assert (ties.avg, ties.norm, ties.chosen, ties.anchor) == (
        "61.5",
        "92.6",
        "density=0.2, lambda=1.0",
        "results-quick",
    )
    assert {"tsv_m", "twin_merging", "layer_wise_adamerging"} <= set(results["text12"])
    assert "pretrained (frozen heads)" not in results["text12"]  # references are not methods


def test_every_published_row_names_a_registered_method(results: dict) -> None:
    registered = {m.name for m in list_methods()}
    for suite, rows in results.items():
        assert set(rows) <= registered, (suite, set(rows) - registered)


def test_each_method_shows_its_published_rows_or_says_it_has_none(page: str, results: dict) -> None:
    for name, text in _sections(page).items():
        rows = [suite_rows[name] for suite_rows in results.values() if name in suite_rows]
        if not rows:
            assert "not in the published table" in text, name
        for r in rows:
            assert f"| [`{r.suite}`](benchmark.md#{r.anchor}) | {r.avg} | {r.norm} |" in text, (name, r.suite)


def test_parse_results_reads_only_results_tables() -> None:
    md = "\n".join(
        [
            "### `toy` {#results-toy}",
            "",
            "| method | a | avg | norm. | chosen params / data | merge s |",
            "|---|---|---|---|---|---|",
            "| individual experts | 1 | 2 | 100.0 |  |  |",
            "| `ties` | 1 | 50.5 | 90.1 | density=0.5 | 0.3 |",
            "",
            "| lambda | accuracy % |",
            "|---|---|",
            "| `0.3` | 61.6 |",
            "",
            "## Elsewhere",
            "",
            "| method | avg | norm. | chosen params / data | merge s |",
            "|---|---|---|---|---|",
            "| `linear` | 1 | 2 |  |  |",
        ]
    )
    got = methods_hook.parse_results(md)
    assert got == {
        "toy": {"ties": methods_hook.ResultRow("toy", "results-toy", "50.5", "90.1", "density=0.5", "0.3")}
    }


@pytest.mark.parametrize(
    ("bounds", "shown"),
    [
        ({"gt": 0.0, "le": 1.0}, "0.0 < x ≤ 1.0"),
        ({"ge": 0, "le": 10}, "0 ≤ x ≤ 10"),
        ({"ge": 1}, "x ≥ 1"),
        ({"lt": 0.5}, "x < 0.5"),
        ({}, "—"),
    ],
)
def test_format_bounds(bounds: dict, shown: str) -> None:
    assert methods_hook.format_bounds(bounds) == shown


def test_format_type_and_value() -> None:
    assert methods_hook.format_type(Literal["total", "frequency"]) == "'total' | 'frequency'"
    assert methods_hook.format_type(float | None) == "float | None"
    assert methods_hook.format_type(tuple[str, ...]) == "tuple[str, ...]"
    assert methods_hook.format_value((0.5, True, None, "a")) == "[0.5, true, null, 'a']"


def test_every_config_key_is_documented() -> None:
    import unimerge.config as config

    for name in config_hook.MODELS:
        model = getattr(config, name)
        for field in model.model_fields:
            assert config_hook.meaning(model, field).strip(), f"{name}.{field} has no meaning in the docs"
        stale = set(config_hook.MEANINGS.get(name, {})) - set(model.model_fields)
        assert not stale, f"docs/hooks/config_reference.py documents {name} keys that do not exist: {stale}"
    assert set(config_hook.MEANINGS) <= set(config_hook.MODELS)


def test_config_reference_lists_every_key_with_its_default() -> None:
    import unimerge.config as config

    text = config_hook.render_config()
    for name in config_hook.MODELS:
        assert f"## `{name}`" in text
        for field, info in getattr(config, name).model_fields.items():
            assert f"| `{info.alias or field}` |" in text, (name, field)
    assert "| `budget` | `int` | `64` | 1 ≤ x ≤ 1000000 | Examples per task. |" in text


def test_suites_and_datasets_tables() -> None:
    from unimerge.data import DATASETS, SUITES

    suites, datasets = config_hook.render_suites(), config_hook.render_datasets()
    for s in SUITES.values():
        assert f"| `{s.name}` |" in suites and f"≤ {s.n_train} / {s.n_val} / {s.n_test} |" in suites
    for d in DATASETS.values():
        assert f"| `{d.name}` | `{d.archive.package}=={d.archive.version}` |" in datasets


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="mkdocs / mkdocs-material not installed (pip install -e '.[docs]')",
)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    html = (site / "methods" / "index.html").read_text(encoding="utf-8")
    for m in list_methods():
        assert f'id="{m.name}"' in html, m.name
    assert "unimerge:methods" not in html and "<table>" in html
