"""Peak memory of a merge at two depths: it must not grow with the number of layers.

Builds Llama-shaped fp32 checkpoints (base + 3 experts, ``llama_checkpoints.py``) of the same width at
two depths under ``$UNIMERGE_CACHE/bench-memory/`` (or ``--work``), reused when present, then runs
``python -m unimerge merge`` with a TIES config (as ``merge_speed.py`` writes it) on each, in a fresh
subprocess, and reports its peak RSS (``VmHWM``) and peak ``RssAnon`` (both polled from ``/proc``
every 20 ms). Targets: the deep model's peak anon <= 1.1x the shallow one's, and peak RSS <=
``(n_models + 3) x largest tensor + 500 MB``.

Usage::

    python benchmarks/merge_memory.py                           # 6 vs 12 layers, hidden 1024, vocab 12000
    python benchmarks/merge_memory.py --layers 4,16 --repeats 2 --work /tmp/memcheck
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml
from llama_checkpoints import MB, LlamaShape, build_checkpoints, cache_dir
from merge_speed import Run, measure, merge_config

MAX_RATIO = 1.1


def _merge(models: list[Path], scratch: Path, threads: int, label: str) -> Run:
    config = scratch / "ties.yaml"
    config.write_text(yaml.safe_dump(merge_config("ties", models)))
    out = scratch / "out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "unimerge", "merge", str(config), str(out), "--threads", str(threads)]
    try:
        return measure(label, cmd)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="6,12", help="two depths, shallow,deep")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=12000, help="12000 x 1024 fp32: a 49 MB largest tensor")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="where checkpoints are built and kept")
    args = ap.parse_args()
    depths = [int(x) for x in args.layers.split(",")]
    work = args.work or cache_dir() / "bench-memory"
    rows = []
    for depth in depths:
        shape = LlamaShape(depth, args.hidden, args.intermediate, args.vocab, max(1, args.hidden // 64))
        tag = f"h{args.hidden}-i{args.intermediate}-v{args.vocab}-l{depth}"
        models = build_checkpoints(work / tag, shape)
        bound = (len(models) + 3) * shape.largest_bytes / MB + 500
        with tempfile.TemporaryDirectory(dir=work) as scratch:
            runs = [_merge(models, Path(scratch), args.threads, tag) for _ in range(args.repeats)]
        for r in runs:
            print(f"  {tag}: peak RSS {r.peak_rss_mb:.0f} MB, anon {r.peak_anon_mb:.0f} MB", file=sys.stderr)
        rows.append(
            (depth, shape, max(r.peak_rss_mb for r in runs), max(r.peak_anon_mb for r in runs), bound)
        )
    print("| layers | params | largest tensor MB | peak RSS MB | peak anon MB | bound MB | within |")
    print("|---|---|---|---|---|---|---|")
    for depth, shape, rss, anon, bound in rows:
        print(f"| {depth} | {shape.params / 1e6:.0f}M | {shape.largest_bytes / MB:.0f} | {rss:.0f} | {anon:.0f} "
              f"| {bound:.0f} | {'yes' if rss <= bound else 'NO'} |")  # fmt: skip
    ratio = rows[-1][3] / rows[0][3]
    verdict = "ok" if ratio <= MAX_RATIO else "GROWS WITH DEPTH"
    print(f"\npeak anon {depths[-1]} vs {depths[0]} layers: {ratio:.2f}x (target <= {MAX_RATIO}x): {verdict}")
    print(f"command: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
