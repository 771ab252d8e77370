"""The public surface is exactly ``unimerge.__all__`` (as httpx checks its exports), and every module's
``__all__`` names what the module holds."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import unimerge

# What the package docstring and the README promise: removing or renaming one breaks users.
PROMISED = {
    "merge_state_dicts", "run_merge", "check_merge", "plan_config", "load_config", "MergeConfig",
    "RunOptions", "MergeResult", "Check",
    "TensorMethod", "ModelMethod", "MethodInfo", "register_method", "register_model_method", "get_method",
    "list_methods",
    "MergeProblem", "MergedModel", "save_merged", "load", "load_merged",
    "UnimergeError", "ConfigError", "PlanError", "MergeError", "CheckpointError",
}  # fmt: skip


def test_all_is_sorted_and_complete() -> None:
    assert unimerge.__all__ == sorted(unimerge.__all__)
    assert len(set(unimerge.__all__)) == len(unimerge.__all__)
    sourced = [name for names in unimerge._SOURCES.values() for name in names]
    assert len(set(sourced)) == len(sourced), "a name exported from two source modules"
    assert set(sourced) == set(unimerge.__all__), "export each name in _SOURCES and in __all__"
    assert set(unimerge.__all__) >= PROMISED
    # nothing public is defined in the package module itself outside __all__
    public = {
        name
        for name in dir(unimerge)
        if not name.startswith("_")
        and (inspect.isclass(obj := getattr(unimerge, name)) or inspect.isfunction(obj))
    }
    assert public == set(unimerge.__all__), (
        "export new public names in unimerge.__all__ (or make them private)"
    )


def test_every_export_has_a_source_module() -> None:
    assert set(unimerge._MODULE_OF) == set(unimerge.__all__)


@pytest.mark.parametrize("name", unimerge.__all__)
def test_every_export_is_its_source_modules_object(name: str) -> None:
    """``unimerge.X`` is the very object its source module exports (and lists in its ``__all__``)."""
    source = importlib.import_module(unimerge._MODULE_OF[name])
    assert name in source.__all__, f"{source.__name__}.__all__ lacks {name}"
    assert getattr(unimerge, name) is getattr(source, name)


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'merge_models'"):
        _ = unimerge.merge_models  # type: ignore[attr-defined]


def test_the_cli_module_does_not_import_torch() -> None:
    """`unimerge --help` stays fast, and `main` can import torch with the GC paused (see its docstring)."""
    code = "import sys, unimerge.cli; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert out.strip() == "False"


def test_every_export_is_documented() -> None:
    for name in unimerge.__all__:
        assert inspect.getdoc(getattr(unimerge, name)), f"{name} has no docstring"


def test_errors_are_one_hierarchy() -> None:
    for name in ("CheckpointError", "ConfigError", "MergeError", "PlanError"):
        assert issubclass(getattr(unimerge, name), unimerge.UnimergeError)
    assert issubclass(unimerge.ConfigError, ValueError)


# ------------------------------------------------------------------------ every module's __all__


def _raise(name: str) -> None:
    raise ImportError(f"cannot import package {name}")  # walk_packages would skip it silently


MODULES = sorted(m.name for m in pkgutil.walk_packages(unimerge.__path__, "unimerge.", onerror=_raise))


def _declared_all(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return list(ast.literal_eval(node.value))
    return None


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def test_the_walk_finds_every_layer() -> None:
    assert {
        "unimerge.methods.registry",
        "unimerge.io.atomic",
        "unimerge.cli.common",
        "unimerge.__main__",
        "unimerge.modelmerge.wemoe",
    } <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_every_module_all_names_what_it_holds(name: str) -> None:
    """Each module declares ``__all__``, without duplicates, and holds every name in it.

    ``unimerge.__main__`` runs the CLI when imported, so it is read (parsed), not imported.
    """
    if name == "unimerge.__main__":
        tree = ast.parse(Path(unimerge.__file__).with_name("__main__.py").read_text())
        declared = _declared_all(tree)
        assert declared is None or set(declared) <= _top_level_names(tree)
        return
    module: ModuleType = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list), f"{name} declares no __all__ list"
    assert len(set(module.__all__)) == len(module.__all__), f"{name}.__all__ has duplicates"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not hold: {missing}"
