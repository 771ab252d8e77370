"""FR-Merging and FREE-Merging's per-task experts on the benchmark's real MiniLM experts.

Merges the experts of an earlier ``unimerge bench`` run with ``unimerge merge`` (``fr_merging``),
stores FREE-Merging's lightweight experts with ``unimerge masks --kind free_merging``, rebuilds each
task's model with ``unimerge task`` and prints test accuracy per task (expert, FR-Merging, FR-Merging
plus that task's expert). Everything goes through the CLI, as a user would run it.

The packaged MiniLM checkpoint stores an ``embeddings.position_ids`` buffer that the experts (saved
by a newer transformers, where it is not persistent) lack; the base is copied without it.

Usage::

    python benchmarks/free_experts.py --results bench-text8 --work /tmp/free --density 0.01
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from rich.console import Console
from safetensors.torch import load_file, save_file

from unimerge.bench.model import accuracy, load_encoder, pretrained_dir
from unimerge.bench.runner import get_suite, prepare


def _cli(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "unimerge"), *args], check=True, capture_output=True)


def _base_without_position_ids(work: Path) -> Path:
    base = work / "base"
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(pretrained_dir(), base)
    tensors = load_file(base / "model.safetensors")
    tensors.pop("embeddings.position_ids", None)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="output folder of `unimerge bench`")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (overwritten)")
    parser.add_argument("--cutoff", type=float, default=0.2)
    parser.add_argument("--density", type=float, default=0.01)
    args = parser.parse_args()
    results = json.loads((args.results / "results.json").read_text())
    args.work.mkdir(parents=True, exist_ok=True)
    base = _base_without_position_ids(args.work)
    cfg = {
        "merge_method": "fr_merging",
        "base_model": str(base),
        "models": [{"model": f"{p}/encoder"} for p in results["experts"].values()],
        "parameters": {"cutoff": args.cutoff, "lambda": 1.0},
    }
    config = args.work / "fr.yaml"
    config.write_text(yaml.safe_dump(cfg))
    _cli("merge", str(config), str(args.work / "fr_out"), "--force")
    experts = args.work / "free.safetensors"
    _cli("masks", str(config), str(experts), "--kind", "free_merging", "--density", str(args.density))
    prep = prepare(get_suite(results["suite"]), results["seed"], None, Console(quiet=True))
    merged = load_encoder(args.work / "fr_out")
    print(f"| task | expert | fr_merging | fr_merging + task expert (density {args.density}) |")
    print("|---|---|---|---|")
    for i, task in enumerate(prep.tasks):
        out = args.work / f"task_{i}"
        _cli("task", str(experts), str(base), str(out), "--task", str(i), "--force")
        head = prep.heads[task.name]
        cells = [
            prep.individual[task.name],
            accuracy(merged, task.test, head),
            accuracy(load_encoder(out), task.test, head),
        ]
        print(f"| {task.name} | " + " | ".join(f"{100 * c:.1f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
