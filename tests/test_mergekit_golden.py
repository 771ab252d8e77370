"""unimerge against mergekit 0.1.5's own outputs, stored in ``golden/mergekit-0.1.5.safetensors``.

The file holds tiny Llama-shaped inputs (3 layers, hidden 4), mergekit configs and what ``mergekit-yaml``
wrote for each: every tensor must match to 1e-5 of its largest entry. The other method tests restate
mergekit's steps; these compare with mergekit itself, without installing it. Regenerate with the
command in the file's metadata (``python benchmarks/mergekit_parity.py --write-golden ...``, which
installs mergekit 0.1.5 in a venv of its own); ``benchmarks/mergekit_parity.py`` runs the full suite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from _fixtures import llama_tensor_shapes, load_all_tensors, make_tiny_llama, save_sharded
from unimerge.execute import RunOptions, run_merge

GOLDEN = Path(__file__).parent / "golden" / "mergekit-0.1.5.safetensors"
with safe_open(GOLDEN, framework="pt") as _f:
    META: dict[str, str] = _f.metadata()
CONFIGS: dict[str, dict[str, Any]] = json.loads(META["configs"])
SIZES: dict[str, int] = json.loads(META["sizes"])
LAYERS: dict[str, int] = json.loads(META["layers"])


def _unflat(flat: torch.Tensor, n_layers: int) -> dict[str, torch.Tensor]:
    """A checkpoint from its tensors concatenated in name order (the golden file's layout)."""
    shapes = llama_tensor_shapes(n_layers, **{k: v for k, v in SIZES.items() if k != "n_layers"})
    out, offset = {}, 0
    for name in sorted(shapes):
        size = math.prod(shapes[name])
        out[name] = flat[offset : offset + size].reshape(shapes[name])
        offset += size
    assert offset == flat.numel()
    return out


def _with_paths(node: Any, paths: dict[str, Path]) -> Any:
    if isinstance(node, dict):
        return {
            k: str(paths[v]) if k in ("model", "base_model") and v in paths else _with_paths(v, paths)
            for k, v in node.items()
        }
    return [_with_paths(v, paths) for v in node] if isinstance(node, list) else node


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The golden inputs as checkpoint folders; ``anti`` is ``2 base - e1`` (as the generator builds it)."""
    root = tmp_path_factory.mktemp("golden")
    with safe_open(GOLDEN, framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith("in/")]  # noqa: SIM118 (safe_open is not a Mapping)
        models = {k.removeprefix("in/"): _unflat(f.get_tensor(k), SIZES["n_layers"]) for k in keys}
    models["anti"] = {n: 2 * models["base"][n] - models["e1"][n] for n in models["base"]}
    paths = {}
    for name, tensors in models.items():
        paths[name] = make_tiny_llama(root / name, **SIZES)  # config.json; the weights are replaced
        save_sharded(tensors, paths[name])
    return paths


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_same_tensors_as_mergekit(inputs: dict[str, Path], tmp_path: Path, case: str) -> None:
    run_merge(_with_paths(CONFIGS[case], inputs), tmp_path / "out", RunOptions(threads=1))
    got = load_all_tensors(tmp_path / "out")
    with safe_open(GOLDEN, framework="pt") as f:
        want = _unflat(f.get_tensor(f"out/{case}"), LAYERS[case])
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype, name
        err = float((got[name].double() - w.double()).abs().max())
        assert err <= 1e-5 * float(w.abs().max()), f"{case}: {name} differs by {err:.3g}"
