"""The public surface is exactly ``unimerge.__all__`` (as httpx checks its exports)."""

from __future__ import annotations

import inspect

import unimerge


def test_all_is_sorted_and_complete() -> None:
    assert unimerge.__all__ == sorted(unimerge.__all__)
    public = {
        name
        for name, obj in vars(unimerge).items()
        if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
    }
    assert public == set(unimerge.__all__), "export new public names in unimerge.__all__ (or make them private)"


def test_every_export_is_documented() -> None:
    for name in unimerge.__all__:
        assert inspect.getdoc(getattr(unimerge, name)), f"{name} has no docstring"


def test_errors_are_one_hierarchy() -> None:
    for name in ("CheckpointError", "ConfigError", "MergeError", "PlanError"):
        assert issubclass(getattr(unimerge, name), unimerge.UnimergeError)
    assert issubclass(unimerge.ConfigError, ValueError)
