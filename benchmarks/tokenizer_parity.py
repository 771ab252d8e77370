"""Vocabulary merging against mergekit 0.1.5: ``tokenizer_source`` / ``tokenizer:`` configs through both tools.

Builds the tiny Llama models of ``tests/_vocab_fixtures.py`` (three word-level tokenizers that differ by
added tokens and one missing word), runs every case of :data:`CASES` through ``mergekit-yaml`` (in its
own virtual environment) and ``unimerge merge`` (this one), and compares:

- the output vocabulary: the same tokens, and the base's tokens first with their ids. mergekit orders
  the tokens the other models add by ``list(set(models))``, which changes from run to run, so rows are
  matched by token; unimerge adds them in the config's order;
- every tensor (vocabulary tensors row by row, by token) to ``max |u - m| / max |m| <= 1e-6``;
- ``config.json``'s ``vocab_size``.

``--write-golden tests/golden/mergekit-0.1.5-vocab.safetensors`` stores the inputs, the configs and
mergekit's outputs (with its token order) for ``tests/test_tokenizer_union.py``::

    python benchmarks/tokenizer_parity.py --mergekit /tmp/mkvenv/bin/mergekit-yaml
    python benchmarks/tokenizer_parity.py --mergekit /tmp/mkvenv/bin/mergekit-yaml \
        --write-golden tests/golden/mergekit-0.1.5-vocab.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _vocab_fixtures import make_vocab_world  # noqa: E402

TOL = 1e-6
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
_W = {"weight": 1.0}
CASES: dict[str, dict[str, Any]] = {
    "linear_union": {  # the base among the models: it stands in for models lacking a token it has
        "merge_method": "linear",
        "base_model": "base",
        "models": [
            {"model": "base", "parameters": {"weight": 0.5}},
            {"model": "e1", "parameters": {"weight": 0.3}},
            {"model": "e2", "parameters": {"weight": 0.2}},
        ],
        "tokenizer_source": "union",
    },
    "linear_union_no_base": {  # no base: the mean of the rows that have the token
        "merge_method": "linear",
        "models": [
            {"model": "e1", "parameters": {"weight": 0.7}},
            {"model": "e2", "parameters": {"weight": 0.3}},
        ],
        "parameters": {"normalize": False},
        "tokenizer_source": "union",
    },
    "task_arithmetic_union": {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": "e1", "parameters": {"weight": 0.6}},
            {"model": "e2", "parameters": {"weight": 0.4}},
        ],
        "tokenizer_source": "union",
    },
    "ties_base": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "e1", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "e2", "parameters": {"weight": 0.5, "density": 0.7}},
        ],
        "tokenizer_source": "base",
    },
    "linear_model_e2": {
        "merge_method": "linear",
        "base_model": "base",
        "models": [
            {"model": "base", "parameters": _W},
            {"model": "e1", "parameters": _W},
            {"model": "e2", "parameters": _W},
        ],
        "tokenizer_source": "e2",
    },
    "linear_tokens_pad": {  # the `tokenizer:` section: per-token sources, force, a new token, padding
        "merge_method": "linear",
        "base_model": "base",
        "models": [
            {"model": "base", "parameters": _W},
            {"model": "e1", "parameters": _W},
            {"model": "e2", "parameters": _W},
        ],
        "tokenizer": {
            "source": "union",
            "pad_to_multiple_of": 6,
            "tokens": {
                "<x>": {"source": {"kind": "zero"}},
                "w3": {"source": "e2", "force": True},
                "<y>": {"source": {"kind": "model_token", "model": "e1", "token": "w5"}},
                "<new>": {"source": {"kind": "model_token", "model": "base", "token_id": 4}},
            },
        },
    },
    "passthrough_slices_union": {  # embeddings from the first slice's model, lm_head from the last's
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "e1", "layer_range": [0, 1]}]},
            {"sources": [{"model": "e2", "layer_range": [1, 2]}]},
        ],
        "tokenizer_source": "union",
    },
}


def _paths(node: Any, models: dict[str, Path]) -> Any:
    """``node`` with model names replaced by their folders (every `model`/`base_model`/`source` string)."""
    if isinstance(node, dict):
        return {
            k: str(models[v]) if isinstance(v, str) and v in models and k != "kind" else _paths(v, models)
            for k, v in node.items()
        }
    return [_paths(v, models) for v in node] if isinstance(node, list) else node


def vocab_of(folder: Path) -> list[str]:
    """The tokens of ``folder``'s ``tokenizer.json`` in id order."""
    data = json.loads((folder / "tokenizer.json").read_text())
    ids = {**data["model"]["vocab"], **{e["content"]: e["id"] for e in data["added_tokens"]}}
    return sorted(ids, key=ids.__getitem__)


def compare(um: Path, mk: Path) -> list[str]:
    """Problems of unimerge's output ``um`` against mergekit's ``mk`` (empty: they match)."""
    vu, vm = vocab_of(um), vocab_of(mk)
    out = []
    if sorted(vu) != sorted(vm):
        out.append(f"token sets differ: {sorted(set(vu) ^ set(vm))}")
        return out
    tu, tm = load_file(str(um / "model.safetensors")), load_file(str(mk / "model.safetensors"))
    if set(tu) != set(tm):
        return [f"tensor names differ: {sorted(set(tu) ^ set(tm))}"]
    order = [vm.index(t) for t in vu]
    for name, m in tm.items():
        if m.shape[0] > len(vm) or name.endswith(("embed_tokens.weight", "lm_head.weight")):
            m = torch.cat([m[order], m[len(vm) :]])
        err = float((tu[name].double() - m.double()).abs().max()) / max(float(m.abs().max()), 1e-30)
        if tu[name].shape != m.shape or err > TOL:
            out.append(f"{name}: shape {list(tu[name].shape)} vs {list(m.shape)}, rel err {err:.3g}")
    cu, cm = (json.loads((d / "config.json").read_text())["vocab_size"] for d in (um, mk))
    if cu != cm:
        out.append(f"vocab_size {cu} vs {cm}")
    return out


def run_case(name: str, models: dict[str, Path], work: Path, mergekit: Path) -> tuple[Path, Path]:
    cfg = work / f"{name}.yml"
    cfg.write_text(yaml.safe_dump({**_paths(CASES[name], models), "dtype": "float32"}, sort_keys=False))
    mk, um = work / f"mk_{name}", work / f"um_{name}"
    for cmd in (
        [str(mergekit), str(cfg), str(mk), "--quiet", "--random-seed", "0"],
        [sys.executable, "-m", "unimerge", "merge", str(cfg), str(um), "--threads", "1"],
    ):
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name}: {' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
    return um, mk


def write_golden(path: Path, models: dict[str, Path], outs: dict[str, Path]) -> None:
    tensors = {
        f"in/{m}/{n}": t
        for m, d in models.items()
        for n, t in load_file(str(d / "model.safetensors")).items()
    }
    for case, d in outs.items():
        tensors.update({f"out/{case}/{n}": t for n, t in load_file(str(d / "model.safetensors")).items()})
    meta = {
        "configs": json.dumps(CASES),
        "vocabs": json.dumps({case: vocab_of(d) for case, d in outs.items()}),
        "vocab_sizes": json.dumps(
            {c: json.loads((d / "config.json").read_text())["vocab_size"] for c, d in outs.items()}
        ),
        "generator": "python benchmarks/tokenizer_parity.py --write-golden " + str(path),
        "mergekit": "0.1.5",
    }
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path), metadata=meta)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mergekit", type=Path, default=Path("/tmp/mkvenv/bin/mergekit-yaml"))
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--write-golden", type=Path, default=None)
    args = ap.parse_args()
    names = [n for n in CASES if not args.only or n in args.only.split(",")]
    failed = 0
    with tempfile.TemporaryDirectory(prefix="unimerge-vocab-parity-") as tmp:
        work = Path(tmp)
        models = make_vocab_world(work / "models")
        outs = {}
        for name in names:
            um, mk = run_case(name, models, work, args.mergekit)
            problems = compare(um, mk)
            failed += bool(problems)
            print(
                f"{name:24s} {'ok' if not problems else 'DIFF'}  vocab unimerge {vocab_of(um)[11:]} mergekit {vocab_of(mk)[11:]}"
            )
            for p in problems:
                print("    " + p)
            outs[name] = mk
        if args.write_golden is not None and not failed:
            write_golden(args.write_golden, models, outs)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
