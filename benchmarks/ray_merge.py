"""Wall-clock of ``unimerge merge --executor ray`` against the local executor, at two model sizes.

Llama-shaped fp32 checkpoints (a base and 3 experts, :mod:`llama_checkpoints`, cached), merged with
TIES three ways, each a whole ``unimerge merge`` process: the local executor (2 threads), a local
Ray with 1 worker and with 2 workers (``--threads`` sets its CPUs). Every variant runs ``--repeats``
times, interleaved; the table gives the median seconds and each variant's ratio to the local
executor of the same size, measured in the same run, and checks that every output is byte-identical
to the local one.

Usage::

    python benchmarks/ray_merge.py --sizes 67M 220M --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from llama_checkpoints import build_checkpoints, cache_dir, parse_count, shape_for

VARIANTS = {
    "local, 2 threads": ["--threads", "2"],
    "Ray, 1 worker": ["--executor", "ray", "--threads", "1"],
    "Ray, 2 workers": ["--executor", "ray", "--threads", "2"],
}


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def run(config: Path, out: Path, args: list[str]) -> float:
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "unimerge", "merge", str(config), str(out), *args], check=True,
                   capture_output=True)  # fmt: skip
    return time.perf_counter() - start


def bench_size(label: str, repeats: int, scratch: Path) -> list[tuple[str, float, float, bool]]:
    models = build_checkpoints(cache_dir() / "bench-speed" / f"llama-{label}", shape_for(parse_count(label)))
    config = scratch / f"{label}.yaml"
    config.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(models[0]), "parameters": {"density": 0.5},
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models[1:]],
    }))  # fmt: skip
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    same: dict[str, bool] = {}
    reference = None
    for _ in range(repeats):
        for name, args in VARIANTS.items():
            out = scratch / "out"
            times[name].append(run(config, out, args))
            reference = reference or digest(out)
            same[name] = digest(out) == reference
    local = statistics.median(times["local, 2 threads"])
    return [(n, statistics.median(t), statistics.median(t) / local, same[n]) for n, t in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["67M", "220M"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"{platform.python_version()}, TIES of base + 3 fp32 Llama-shaped models, median of {args.repeats}")  # fmt: skip
    print("| size | executor | wall s | against local | output identical |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="unimerge-raymerge-") as tmp:
        for label in args.sizes:
            for name, seconds, ratio, same in bench_size(label, args.repeats, Path(tmp)):
                print(
                    f"| {label} | {name} | {seconds:.1f} | {ratio:.2f}x | {'yes' if same else 'NO'} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
