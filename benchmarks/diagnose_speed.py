"""``unimerge diagnose`` against a TIES merge of the same config: issue 13's speed target (<= 2x).

Builds (or reuses) the Llama-shaped fp32 checkpoints of ``merge_speed.py`` (a base and three experts)
at each ``--params`` size, writes the TIES config ``merge_speed.py`` writes, then alternates, in fresh
subprocesses, ``python -m unimerge merge ties.yaml OUT`` and ``python -m unimerge diagnose ties.yaml
--out DIR`` (``--repeats`` pairs, after one warm-up merge that pulls the inputs into the page cache).
Both are whole processes, start-up included; the ratio is taken pair by pair, so load from other
processes shifts both sides, and its median is reported with the peak RSS of each.

Usage::

    python benchmarks/diagnose_speed.py --params 60M,220M --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from llama_checkpoints import build_checkpoints, cache_dir, parse_count, shape_for
from merge_speed import Run, measure, merge_config

TARGET = 2.0


def _pair(config: Path, scratch: Path, threads: int) -> tuple[Run, Run]:
    out = scratch / "out"
    merge_cmd = [sys.executable, "-m", "unimerge", "merge", str(config), str(out), "--threads", str(threads)]
    diag_cmd = [sys.executable, "-m", "unimerge", "diagnose", str(config), "--out", str(out),
                "--threads", str(threads), "--seed", "0"]  # fmt: skip
    runs = []
    for label, cmd in (("merge ties", merge_cmd), ("diagnose", diag_cmd)):
        shutil.rmtree(out, ignore_errors=True)
        runs.append(measure(label, cmd))
        print(
            f"  {label:<10} {runs[-1].wall_s:7.2f} s  peak RSS {runs[-1].peak_rss_mb:6.0f} MB",
            file=sys.stderr,
        )
    shutil.rmtree(out, ignore_errors=True)
    return runs[0], runs[1]


def _size(label: str, params: int, repeats: int, threads: int, scratch: Path) -> str:
    shape = shape_for(params)
    models = build_checkpoints(cache_dir() / "bench-speed" / f"{round(shape.params / 1e6)}M", shape)
    config = scratch / "ties.yaml"
    config.write_text(yaml.safe_dump(merge_config("ties", models), sort_keys=False))
    print(f"{label}: {shape}", file=sys.stderr)
    _pair(config, scratch, threads)  # warm-up: page cache, not reported
    pairs = [_pair(config, scratch, threads) for _ in range(repeats)]
    merge_s = statistics.median(m.wall_s for m, _ in pairs)
    diag_s = statistics.median(d.wall_s for _, d in pairs)
    ratio = statistics.median(d.wall_s / m.wall_s for m, d in pairs)
    verdict = "ok" if ratio <= TARGET else "over"
    return (f"| {round(shape.params / 1e6)}M | {merge_s:.2f} | {diag_s:.2f} | {ratio:.2f}x ({verdict}, "
            f"target <= {TARGET:.0f}x) | {max(m.peak_rss_mb for m, _ in pairs):.0f} | "
            f"{max(d.peak_rss_mb for _, d in pairs):.0f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="60M,220M", help="comma-separated model sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    lines = ["| params | merge ties s | diagnose s | diagnose / merge (median of pairs) | merge peak RSS MB "
             "| diagnose peak RSS MB |", "|---|---|---|---|---|---|"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="unimerge-diag-speed-") as tmp:
        for label in args.params.split(","):
            lines.append(_size(label, parse_count(label), args.repeats, args.threads, Path(tmp)))
    print(f"\nbase + 3 experts, fp32, threads={args.threads}, repeats={args.repeats}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}\n")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
