"""Parity with mergekit-moe 0.1.5: the same MoE YAML through ``mergekit-moe`` and ``unimerge moe``.

Builds tiny Llama-shaped models (``tests/_fixtures.py::make_tiny_llama``: a base, three experts, a
word-level tokenizer), runs every case of ``CASES`` through both tools as a user would
(``mergekit-moe CONFIG OUT --random-seed S`` in its own virtual environment, ``python -m unimerge moe
CONFIG OUT --seed S`` in this one) and compares the outputs: the same tensor names, shapes and dtypes,
``max |u - m| / max |m| <= 1e-5`` for every tensor, and the same ``config.json``. The cases cover every
gate mode (hidden, hidden_avg, cheap_embed, random, uniform_random), negative prompts, ``noise_scale``
and ``residual_scale`` (seeded), and fp32 / bf16 / fp16 outputs.

    python benchmarks/moe_parity.py --mergekit-moe /tmp/mkvenv/bin/mergekit-moe
    python benchmarks/moe_parity.py --mergekit-moe /tmp/mkvenv/bin/mergekit-moe \\
        --write-golden tests/golden/mergekit-moe-0.1.5.safetensors

``--write-golden`` stores the inputs, each case's config and mergekit's output (tensors, config.json)
in one small safetensors file, read by ``tests/test_moe_upcycle.py`` without mergekit installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _fixtures import load_all_tensors, make_tiny_llama  # noqa: E402

TOL = 1e-5
SIZES = {"n_layers": 2, "hidden": 16, "intermediate": 24, "vocab": 48, "n_heads": 4, "n_kv_heads": 2}
MODELS = ("base", "e1", "e2", "e3")
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
_EXPERTS: list[dict[str, Any]] = [
    {"source_model": "e1", "positive_prompts": ["w5 w6 w7", "w8 w9"], "negative_prompts": ["w20 w21"]},
    {"source_model": "e2", "positive_prompts": ["w30 w31 w32 w33"]},
    {
        "source_model": "e3",
        "positive_prompts": ["w40", "w41 w42 w43 w44"],
        "negative_prompts": ["w5 w6", "w45"],
    },
]
_NOISY = [_EXPERTS[0], {**_EXPERTS[1], "noise_scale": 0.01, "residual_scale": 0.5}, _EXPERTS[2]]
# case -> (config, seed); model references are folder names next to the config file
CASES: dict[str, tuple[dict[str, Any], int]] = {
    "hidden_fp32": ({"base_model": "base", "gate_mode": "hidden", "experts": _EXPERTS}, 0),
    "hidden_avg_bf16": (
        {"base_model": "base", "gate_mode": "hidden_avg", "dtype": "bfloat16", "experts": _NOISY},
        1,
    ),
    "cheap_embed_fp16_top1": (
        {
            "base_model": "base",
            "gate_mode": "cheap_embed",
            "dtype": "float16",
            "experts_per_token": 1,
            "experts": _NOISY,
        },
        5,
    ),
    "random_noise_bf16": (
        {"base_model": "base", "gate_mode": "random", "dtype": "bfloat16", "experts": _NOISY},
        7,
    ),
    "uniform_random_2_experts": (
        {"base_model": "base", "gate_mode": "uniform_random", "dtype": "bfloat16", "experts": _EXPERTS[:2]},
        3,
    ),
}


def build_inputs(folder: Path) -> None:
    """The base (seed 0) and three experts (base + 0.05 N(0, 1), seeds 1-3), each with the tokenizer."""
    base = make_tiny_llama(folder / "base", **SIZES, tokenizer=True)
    for i in (1, 2, 3):
        make_tiny_llama(folder / f"e{i}", perturb_from=base, seed=i, scale=0.05, tokenizer=True)


def run(cmd: list[str], cwd: Path) -> None:
    """Run a tool in ``cwd`` (mergekit reads relative model paths against the working folder)."""
    r = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV, timeout=900, cwd=cwd)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")


def run_case(name: str, work: Path, mergekit: Path) -> tuple[Path, Path]:
    """Write the case's YAML beside the inputs and run both tools; returns (unimerge out, mergekit out)."""
    config, seed = CASES[name]
    cfg = work / f"{name}.yml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    um, mk = work / "out" / f"um_{name}", work / "out" / f"mk_{name}"
    for d in (um, mk):
        shutil.rmtree(d, ignore_errors=True)
    run([str(mergekit), str(cfg), str(mk), "--device", "cpu", "--random-seed", str(seed)], work)
    run([sys.executable, "-m", "unimerge", "moe", str(cfg), str(um), "--seed", str(seed)], work)
    return um, mk


def compare(um: Path, mk: Path) -> tuple[float, str]:
    """(worst relative error over tensors, a problem or "") of unimerge's output against mergekit's."""
    got, want = load_all_tensors(um), load_all_tensors(mk)
    if set(got) != set(want):
        return float("inf"), f"tensor names differ: {sorted(set(got) ^ set(want))[:4]}"
    worst = 0.0
    for n, w in want.items():
        if got[n].dtype != w.dtype or got[n].shape != w.shape:
            return float("inf"), f"{n}: {got[n].dtype} {list(got[n].shape)} vs {w.dtype} {list(w.shape)}"
        err = float((got[n].double() - w.double()).abs().max()) / max(float(w.double().abs().max()), 1e-30)
        worst = max(worst, err)
    if json.loads((um / "config.json").read_text()) != json.loads((mk / "config.json").read_text()):
        return worst, "config.json differs"
    return worst, ""


def write_golden(path: Path, work: Path, outs: dict[str, Path]) -> None:
    """Inputs (``in/<model>/<tensor>``), mergekit's outputs (``out/<case>/<tensor>``), and in the metadata
    the sizes, the tokenizer files, each case's config, seed and mergekit's config.json."""
    tensors = {f"in/{m}/{n}": t for m in MODELS for n, t in load_all_tensors(work / m).items()}
    cases = {}
    for name, mk in outs.items():
        tensors.update({f"out/{name}/{n}": t for n, t in load_all_tensors(mk).items()})
        cases[name] = {
            "config": CASES[name][0],
            "seed": CASES[name][1],
            "config_json": (mk / "config.json").read_text(),
        }
    tok = {
        n: (work / "base" / n).read_text()
        for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    }
    meta = {
        "sizes": json.dumps(SIZES),
        "tokenizer": json.dumps(tok),
        "cases": json.dumps(cases),
        "command": "python benchmarks/moe_parity.py --mergekit-moe PATH --write-golden " + str(path),
        "mergekit": "0.1.5",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
    }
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path), metadata=meta)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} KB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-moe", type=Path, default=Path(shutil.which("mergekit-moe") or "mergekit-moe"))
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--write-golden", type=Path, default=None)
    args = ap.parse_args()
    names = [n for n in CASES if not args.only or n in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="moe-parity-") as tmp:
        work = Path(tmp)
        build_inputs(work)
        outs, failed = {}, False
        print(f"{'case':28} {'max rel err':>12}  result")
        for name in names:
            um, mk = run_case(name, work, args.mergekit_moe)
            worst, problem = compare(um, mk)
            ok = not problem and worst <= TOL
            failed |= not ok
            print(f"{name:28} {worst:12.3g}  {'ok' if ok else 'FAIL ' + problem}")
            outs[name] = mk
        if args.write_golden and not failed:
            write_golden(args.write_golden, work, outs)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
