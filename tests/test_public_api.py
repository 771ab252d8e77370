"""The public surface is exactly ``unimerge.__all__`` (as httpx checks its exports)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import unimerge


def test_all_is_sorted_and_complete() -> None:
    assert unimerge.__all__ == sorted(unimerge.__all__)
    public = {
        name
        for name in dir(unimerge)
        if not name.startswith("_") and (inspect.isclass(obj := getattr(unimerge, name)) or inspect.isfunction(obj))
    }
    assert public == set(unimerge.__all__), "export new public names in unimerge.__all__ (or make them private)"


def test_every_export_has_a_source_module() -> None:
    assert set(unimerge._MODULE_OF) == set(unimerge.__all__)


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'merge_models'"):
        _ = unimerge.merge_models  # type: ignore[attr-defined]


def test_the_cli_module_does_not_import_torch() -> None:
    """`unimerge --help` stays fast, and `main` can import torch with the GC paused (see its docstring)."""
    code = "import sys, unimerge.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_export_is_documented() -> None:
    for name in unimerge.__all__:
        assert inspect.getdoc(getattr(unimerge, name)), f"{name} has no docstring"


def test_errors_are_one_hierarchy() -> None:
    for name in ("CheckpointError", "ConfigError", "MergeError", "PlanError"):
        assert issubclass(getattr(unimerge, name), unimerge.UnimergeError)
    assert issubclass(unimerge.ConfigError, ValueError)
