"""Parity with mergekit 0.1.5: the same YAML through ``mergekit-yaml`` and ``unimerge merge``.

Builds tiny Llama-shaped checkpoints (``tests/_fixtures.py::make_tiny_llama``, fp32 and bf16), runs
every config of ``parity_cases.py`` through both tools as a user would (``mergekit-yaml CONFIG OUT``
in its own virtual environment, ``python -m unimerge merge CONFIG OUT`` in this one) and compares
the outputs tensor by tensor (``parity_compare.py`` defines each check):

- ``exact``: the same tensor names, shapes and dtypes, and ``max |u - m| / max |m| <= 1e-5`` for every
  tensor (``u``: unimerge's, ``m``: mergekit's);
- ``ties``: the same, except the entries whose task-vector magnitude equals a trim boundary (counted);
- ``bf16``: within one bf16 ulp of mergekit computing in fp32 (mergekit's own bf16 run is shown too);
- ``dare`` / ``della`` (random; one expert, so ``out - base`` is the sparsified task vector): the
  fraction of entries kept, within binomial noise of the density and of the other tool's (``|z| <= 4``;
  DELLA by magnitude-rank quartile, against ``density - epsilon + 2 epsilon rank``), and the L1 rescale
  (``||out - base||_1 = ||task vector||_1`` per tensor, to 1e-4). The draws themselves differ by design.

mergekit is installed on first use (``python -m venv`` + ``pip install torch==<this torch> mergekit==0.1.5``)
into ``--mergekit-venv``. One command runs everything::

    python benchmarks/mergekit_parity.py                       # all cases, table on stdout
    python benchmarks/mergekit_parity.py --only ties,slerp_gradient --json parity.json --keep
    python benchmarks/mergekit_parity.py --write-golden tests/golden/mergekit-0.1.5.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from parity_cases import Case, all_cases
from parity_compare import bf16_ulps, compare, compare_random, trim_tie_entries
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _fixtures import llama_tensor_shapes, load_all_tensors, make_tiny_llama, save_sharded  # noqa: E402

MERGEKIT = "mergekit==0.1.5"
TOL = 1e-5  # max |u - m| / max |m| per tensor
Z_MAX = 4.0  # binomial noise bound for random methods
SIZES = {"n_layers": 3, "hidden": 64, "intermediate": 128, "vocab": 2048, "n_heads": 4, "n_kv_heads": 2}
# --write-golden: mergekit's outputs of these cases on much smaller inputs, for tests/test_mergekit_golden.py
GOLDEN_SIZES = {"n_layers": 3, "hidden": 4, "intermediate": 4, "vocab": 4, "n_heads": 2, "n_kv_heads": 1}
GOLDEN_CASES = (
    "linear", "linear_filter_star", "task_arithmetic_norm", "ties", "ties_nonorm", "ties_tiny_density",
    "ties_gradient_rescale", "dare_ties_d1", "della_d1", "breadcrumbs", "breadcrumbs_tiny",
    "breadcrumbs_ties_overlap", "sce", "slerp_gradient", "nuslerp_rowwise_base", "multislerp_base",
    "karcher_base", "model_stock", "model_stock_opposed", "model_stock_opposed_filter_wise", "nearswap",
    "passthrough_slices", "slerp_slices_gradient", "linear_slices_filter_layer", "slerp_slice_parameters",
)  # fmt: skip
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Result:
    """One case's outcome: ``max_rel`` for exact cases, ``max_z`` for random ones."""

    name: str
    method: str
    check: str
    ok: bool
    max_rel: float | None = None
    worst: str = ""
    max_z: float | None = None
    error: str = ""
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- setup


def ensure_mergekit(venv: Path) -> Path:
    """``mergekit-yaml`` of ``venv``, creating the venv (CPU torch of this version + mergekit) if absent."""
    exe = venv / "bin" / "mergekit-yaml"
    if exe.is_file():
        return exe
    print(f"installing {MERGEKIT} into {venv} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", torch_pin, MERGEKIT], check=True)
    return exe


def build_inputs(folder: Path, sizes: dict[str, int] = SIZES) -> dict[str, Path]:
    """The checkpoints the cases name (see ``parity_cases.py``), built deterministically."""
    m: dict[str, Path] = {"base": make_tiny_llama(folder / "base", seed=0, **sizes)}
    for i in (1, 2, 3):
        m[f"e{i}"] = make_tiny_llama(folder / f"e{i}", perturb_from=m["base"], seed=i, scale=0.01 * i)
    base, e1 = load_all_tensors(m["base"]), load_all_tensors(m["e1"])
    m["anti"] = folder / "anti"
    save_sharded({n: 2 * base[n] - e1[n] for n in base}, m["anti"])
    grid = 2.0**-9  # fp32 inputs on a coarse grid: many task-vector entries of equal magnitude
    m["qbase"] = folder / "qbase"
    save_sharded({n: torch.round(t / grid) * grid for n, t in base.items()}, m["qbase"])
    for i in (1, 2):
        expert = load_all_tensors(m[f"e{i}"])
        m[f"q{i}"] = folder / f"q{i}"
        save_sharded({n: torch.round(t / grid) * grid for n, t in expert.items()}, m[f"q{i}"])
    for name in ("anti", "qbase", "q1", "q2"):
        shutil.copy(m["base"] / "config.json", m[name] / "config.json")
    bf = torch.bfloat16
    m["bfbase"] = make_tiny_llama(folder / "bfbase", seed=0, dtype=bf, **sizes)
    for i in (1, 2):
        m[f"bf{i}"] = make_tiny_llama(
            folder / f"bf{i}", perturb_from=m["bfbase"], seed=i, scale=0.01, dtype=bf
        )
    return m


def with_paths(node: Any, paths: dict[str, Path]) -> Any:
    """``node`` with every ``model`` / ``base_model`` input name replaced by its absolute path."""
    if isinstance(node, dict):
        return {
            k: str(paths[v]) if k in ("model", "base_model") and v in paths else with_paths(v, paths)
            for k, v in node.items()
        }
    return [with_paths(v, paths) for v in node] if isinstance(node, list) else node


def write_config(case: Case, work: Path, paths: dict[str, Path]) -> Path:
    """The case's YAML with absolute model paths, under ``work/cfg``."""
    cfg = work / "cfg" / f"{case.name}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump(with_paths(case.config, paths), sort_keys=False))
    return cfg


def mergekit_command(mergekit: Path, cfg: Path, out: Path) -> list[str]:
    return [str(mergekit), str(cfg), str(out), "--quiet", "--no-copy-tokenizer", "--random-seed", "0"]


def run_one(tool: str, cmd: list[str]) -> str:
    """Run a tool; the tail of its error output if it fails, else ``""``."""
    r = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV, timeout=900)
    return (
        f"{tool} rc={r.returncode}: " + " ".join(r.stderr.strip().splitlines()[-3:])[-400:]
        if r.returncode
        else ""
    )


def run_tools(case: Case, work: Path, paths: dict[str, Path], mergekit: Path) -> tuple[Path, Path, str]:
    """Write the case's YAML, run both tools; returns both output folders and any error text."""
    cfg = write_config(case, work, paths)
    mk_out, um_out = work / "mk" / case.name, work / "um" / case.name
    for out in (mk_out, um_out):
        shutil.rmtree(out, ignore_errors=True)
    um = [sys.executable, "-m", "unimerge", "merge", str(cfg), str(um_out), "--threads", "1", "--seed", "0"]
    errors = [run_one("mergekit", mergekit_command(mergekit, cfg, mk_out)), run_one("unimerge", um)]
    return mk_out, um_out, "; ".join(e for e in errors if e)


# ------------------------------------------------------------------------------------- compare


def _bf16_reference(case: Case, work: Path, paths: dict[str, Path], mergekit: Path) -> tuple[Path, str]:
    """mergekit on the case's inputs computing in fp32 (``dtype: float32``), cast to the case's dtype."""
    ref = Case(f"{case.name}.fp32", case.config | {"dtype": "float32", "out_dtype": case.config["dtype"]})
    cfg = write_config(ref, work, paths)
    out = work / "mk" / ref.name
    shutil.rmtree(out, ignore_errors=True)
    return out, run_one("mergekit", mergekit_command(mergekit, cfg, out))


def _judge(
    case: Case,
    mk: dict[str, torch.Tensor],
    um: dict[str, torch.Tensor],
    paths: dict[str, Path],
    res: Result,
    ref: dict[str, torch.Tensor] | None,
) -> None:
    """Fill ``res`` for a deterministic case (``exact``, ``ties``, ``bf16``)."""
    cfg = case.config
    skip = None
    if case.check == "ties" or (case.check == "bf16" and "density" in str(cfg)):
        models = [load_all_tensors(paths[s["model"]]) for s in cfg["models"]]
        skip = trim_tie_entries(cfg, load_all_tensors(paths[cfg["base_model"]]), models)
    got = compare(mk, um, skip)
    res.max_rel, res.worst = got["max_rel"], got["worst"]
    res.details = {k: got[k] for k in ("problems", "skipped_differ")}
    if ref is None:
        res.ok = not got["problems"] and res.max_rel <= TOL
        return
    to_ref = compare(ref, um, skip)
    ulps = max((bf16_ulps(um[n], ref[n], (skip or {}).get(n)) for n in ref if n in um), default=math.inf)
    res.details |= {"vs_fp32_mergekit_rel": to_ref["max_rel"], "vs_fp32_mergekit_ulps": ulps}
    res.ok = not got["problems"] and not to_ref["problems"] and ulps <= 1.0


def evaluate(case: Case, work: Path, paths: dict[str, Path], mergekit: Path) -> Result:
    """Run one case through both tools and compare."""
    res = Result(case.name, str(case.config["merge_method"]), case.check, ok=False, note=case.note)
    mk_out, um_out, res.error = run_tools(case, work, paths, mergekit)
    ref = None
    if not res.error and case.check == "bf16":
        ref_out, res.error = _bf16_reference(case, work, paths, mergekit)
        ref = None if res.error else load_all_tensors(ref_out)
    if res.error:
        return res
    mk, um = load_all_tensors(mk_out), load_all_tensors(um_out)
    if case.check in ("dare", "della"):
        spec = case.config["models"][0]
        base, expert = (
            load_all_tensors(paths[case.config["base_model"]]),
            load_all_tensors(paths[spec["model"]]),
        )
        res.max_z, res.details = compare_random(case.check, spec["parameters"], mk, um, base, expert)
        res.ok = res.max_z <= Z_MAX and max(res.details["l1_error"].values()) <= 1e-4
    else:
        _judge(case, mk, um, paths, res, ref)
    return res


# ------------------------------------------------------------------------------------- golden


def _referenced(node: Any) -> set[str]:
    """Input names a config refers to."""
    if isinstance(node, dict):
        own = {str(v) for k, v in node.items() if k in ("model", "base_model")}
        return own.union(*(_referenced(v) for v in node.values()))
    return set().union(*(_referenced(v) for v in node)) if isinstance(node, list) else set()


def _flat(folder: Path) -> tuple[torch.Tensor, int]:
    """A checkpoint's tensors concatenated in name order, and its layer count (the layout's only variable:
    ``tests/_fixtures.py::llama_tensor_shapes`` gives every name and shape)."""
    tensors = load_all_tensors(folder)
    layers = int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])
    sizes = {k: v for k, v in GOLDEN_SIZES.items() if k != "n_layers"}
    want = llama_tensor_shapes(layers, **sizes)
    if {n: tuple(t.shape) for n, t in tensors.items()} != want:
        raise SystemExit(f"{folder}: not the tiny Llama layout of {layers} layers")
    return torch.cat([tensors[n].reshape(-1) for n in sorted(want)]), layers


def write_golden(path: Path, mergekit: Path, work: Path) -> None:
    """mergekit's output of ``GOLDEN_CASES`` on ``GOLDEN_SIZES`` inputs, with the inputs and the configs, as
    one small safetensors file: ``in/<model>`` and ``out/<case>`` are each a checkpoint flattened by
    :func:`_flat` (layer counts, configs and the command in the metadata); ``anti`` is ``2 base - e1``."""
    paths = build_inputs(work / "in", GOLDEN_SIZES)
    cases = [c for c in all_cases() if c.name in GOLDEN_CASES]
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, int] = {}
    for case in cases:
        out = work / "mk" / case.name
        shutil.rmtree(out, ignore_errors=True)
        error = run_one("mergekit", mergekit_command(mergekit, write_config(case, work, paths), out))
        if error:
            raise SystemExit(f"{case.name}: {error}")
        tensors[f"out/{case.name}"], layers[case.name] = _flat(out)
    for model in sorted(set().union(*(_referenced(c.config) for c in cases)) - {"anti"}):
        tensors[f"in/{model}"], _ = _flat(paths[model])
    meta = {
        "command": f"python benchmarks/mergekit_parity.py --write-golden {path.name}",
        "mergekit": MERGEKIT,
        "torch": torch.__version__,
        "sizes": json.dumps(GOLDEN_SIZES),
        "layers": json.dumps(layers),
        "configs": json.dumps({c.name: c.config for c in cases}),
    }
    save_file(tensors, str(path), metadata=meta)


# ------------------------------------------------------------------------------------- report


def _extra(r: Result) -> str:
    """What the check adds to the table: entries left out at trim ties, distance to fp32 mergekit."""
    d = r.details
    parts = [f"{d['skipped_differ']} tied entries differ"] if d.get("skipped_differ") else []
    if "vs_fp32_mergekit_ulps" in d:
        parts.append(
            f"vs fp32 mergekit: {d['vs_fp32_mergekit_rel']:.1e} ({d['vs_fp32_mergekit_ulps']:.2f} ulp)"
        )
    if "bins" in d:
        parts.append("kept " + ", ".join(f"{b['mergekit']}/{b['unimerge']} (p={b['p']})" for b in d["bins"]))
    return "; ".join(parts + list(d.get("problems", [])))


def table(results: list[Result]) -> str:
    """A Markdown table of the results."""
    lines = [
        "| case | method | check | result | max rel. diff (or z) | worst tensor | details | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        value = (
            f"{r.max_rel:.2e}"
            if r.max_rel is not None
            else f"z={r.max_z:.2f}"
            if r.max_z is not None
            else "-"
        )
        status = "ok" if r.ok else ("ERROR " + r.error[:120] if r.error else "DIFF")
        lines.append(
            f"| {r.name} | {r.method} | {r.check} | {status} | {value} | {r.worst} | {_extra(r)} | {r.note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_venv = (
        Path(os.environ.get("UNIMERGE_CACHE", Path.home() / ".cache" / "unimerge")) / "mergekit-0.1.5-venv"
    )
    ap.add_argument("--mergekit-venv", type=Path, default=default_venv, help="created on first use")
    ap.add_argument(
        "--work", type=Path, default=None, help="inputs and outputs (default: a temporary folder)"
    )
    ap.add_argument("--keep", action="store_true", help="keep --work (or the temporary folder)")
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--json", type=Path, default=None, help="write every result here")
    ap.add_argument(
        "--write-golden", type=Path, default=None, help="write mergekit's golden outputs here, stop"
    )
    args = ap.parse_args(argv)
    if args.write_golden:
        with tempfile.TemporaryDirectory(prefix="unimerge-golden-") as tmp:
            write_golden(args.write_golden, ensure_mergekit(args.mergekit_venv), Path(tmp))
        return 0
    cases = all_cases()
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {c.name for c in cases}
        if unknown:
            ap.error(f"unknown cases {sorted(unknown)}; known: {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in wanted]
    mergekit = ensure_mergekit(args.mergekit_venv)
    work = args.work or Path(tempfile.mkdtemp(prefix="unimerge-parity-"))
    try:
        paths = build_inputs(work / "in")
        results = []
        for case in cases:
            results.append(evaluate(case, work, paths, mergekit))
            print(f"{case.name}: {'ok' if results[-1].ok else 'DIFF'}", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1, default=str))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
