"""Merge speed and memory against an I/O floor measured in the same run.

Builds Llama-shaped checkpoints of a chosen size (default ~220M parameters, fp32: a base and three
experts; ``--shape tinyllama-1.1b --dtype bfloat16`` for TinyLlama's real shape in bf16) under ``$UNIMERGE_CACHE/bench-speed/<size>`` (default ``~/.cache/unimerge``), reused when
present. Then, each in a fresh subprocess so that peak RSS is per run, it times:

- the I/O floor: read every input tensor with ``safetensors`` and write one output of the same size
  (``save_file`` per output shard, then ``fsync``, as unimerge's writer does);
- unimerge's ``linear``, ``ties``, ``dare_ties`` (base + 3 experts) and ``slerp`` (base + 1 expert,
  compared with a floor over the same two inputs), each as the command a user runs, ``python -m
  unimerge merge CONFIG OUT``: its process time (start to exit) is compared with mergekit's, and the
  merge time it prints (planned merge to committed output) with the floor;
- with ``--vs-mergekit``, ``mergekit-yaml`` on the very same YAML config, and each tool's start-up
  alone (``unimerge methods --json``, ``mergekit-yaml --help``).

Each method runs right after a floor over the same inputs and its ratio is taken against that floor,
so load from other processes on the machine shifts both. Inputs that fit in half the memory are read
warm (a warm-up floor runs first; nothing is dropped from the page cache), larger ones from disk.
Targets: ``linear`` <= 1.5x the floor, ``ties`` <= 2.5x (1.5x for bf16 inputs), every method >= 3x
faster than mergekit, peak RSS <= (n_models + 3) x largest float32 tensor + 500 MB.

With ``--vs-mergekit`` the table also shows the floor's own process time and mergekit's process over
it ("floor's speedup"): the most any tool that reads every input and writes (and fsyncs) one output
could gain on mergekit here, since the floor merges nothing.

Usage::

    python benchmarks/merge_speed.py --params 220M --threads 2 --repeats 1 --out-json speed.json
    python benchmarks/merge_speed.py --params 60M --methods linear,ties --vs-mergekit
    python benchmarks/merge_speed.py --shape tinyllama-1.1b --dtype bfloat16 --vs-mergekit --repeats 2
    python benchmarks/merge_speed.py --shape llama-7b --dtype bfloat16 --n-models 3 --methods ties,linear
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llama_checkpoints import (
    BYTES,
    MB,
    SHAPES,
    SHARD_BYTES,
    LlamaShape,
    build_checkpoints,
    cache_dir,
    mkdir_p,
    parse_count,
    shape_for,
)

METHODS = ("linear", "ties", "dare_ties", "slerp")
TARGETS = {"linear": 1.5, "ties": 2.5}  # max ratio to the floor (float32 inputs)
TARGETS_BF16 = {"linear": 1.5, "ties": 1.5}  # bf16 inputs (issue 12): the floor moves half the bytes
MIN_SPEEDUP = 3.0  # vs mergekit
# Every child (floor, unimerge, mergekit) gets PyTorch's huge-page allocator, as the `unimerge` CLI sets it.
CHILD_ENV = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1"}


# ----------------------------------------------------------------------------- configs


def merge_config(method: str, models: list[Path], dtype: str = "float32") -> dict[str, Any]:
    """A mergekit YAML config (also unimerge's) for ``method`` over ``models`` (``models[0]`` = base)."""
    base, experts = str(models[0]), [str(m) for m in models[1:]]
    if method == "linear":  # plain average of all four
        specs = [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]
        return {
            "merge_method": "linear",
            "models": specs,
            "parameters": {"normalize": True},
            "dtype": dtype,
        }
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base,
                "models": [{"model": base}, {"model": experts[0]}],
                "parameters": {"t": 0.5}, "dtype": dtype}  # fmt: skip
    specs = [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in experts]
    return {"merge_method": method, "base_model": base, "models": specs,
            "parameters": {"normalize": True}, "dtype": dtype}  # fmt: skip


def n_inputs(method: str, n_models: int) -> int:
    return 2 if method == "slerp" else n_models


# ----------------------------------------------------------------------------- child processes


def child_floor(inputs: list[str], out: str) -> float:
    """Read every tensor of every input into memory; write the base's back out, sharded, with fsync.

    ``safetensors >= 0.6`` may hand back tensors that merely map the file, so each one is cloned:
    every input byte is then really read, as any merge must.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    start = time.perf_counter()
    index = [json.loads((Path(m) / "model.safetensors.index.json").read_text())["weight_map"] for m in inputs]
    handles: dict[str, Any] = {}
    Path(out).mkdir(parents=True)
    shard: dict[str, Any] = {}
    size, files = 0, []

    def flush() -> None:
        path = Path(out) / f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        files.append(path)

    for name in index[0]:
        tensors = []
        for root, wmap in zip(inputs, index, strict=True):
            file = str(Path(root) / wmap[name])
            if file not in handles:
                handles[file] = safe_open(file, framework="pt")
            tensors.append(handles[file].get_tensor(name).clone())  # get_tensor may only map the file
        nbytes = tensors[0].numel() * tensors[0].element_size()
        if shard and size + nbytes > SHARD_BYTES:
            flush()
            shard, size = {}, 0
        shard[name] = tensors[0]
        size += nbytes
    flush()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - start


def child_main(argv: list[str]) -> None:
    payload = json.loads(argv[0])
    print(json.dumps({"inner_s": child_floor(payload["inputs"], payload["out"])}))


# ----------------------------------------------------------------------------- measuring


@dataclass
class Run:
    """One timed subprocess."""

    label: str
    wall_s: float  # the process, start to exit
    inner_s: float | None  # the timed section inside it (None for mergekit)
    peak_rss_mb: float  # VmHWM polled from /proc (the program's peak RSS after exec)
    peak_anon_mb: float  # max RssAnon seen polling /proc (excludes mmapped file pages)


def _poll_anon(pid: int, stop: threading.Event, peak: list[int]) -> None:
    """Poll ``/proc/PID/status`` every 20 ms: ``peak[0]`` the largest ``RssAnon``, ``peak[1]`` the last
    ``VmHWM`` (the process's own peak RSS since its ``exec``)."""
    path = f"/proc/{pid}/status"
    while not stop.is_set():
        try:
            text = Path(path).read_text()
        except OSError:
            return
        m = re.search(r"RssAnon:\s+(\d+) kB", text)
        if m:
            peak[0] = max(peak[0], int(m[1]))
        hwm = re.search(r"VmHWM:\s+(\d+) kB", text)
        if hwm:  # monotonic after exec, so the last read is the peak (a max would keep the fork's)
            peak[1] = int(hwm[1])
        stop.wait(0.02)


# The inner time each kind of process reports: the floor as JSON, `unimerge merge` on its last line.
INNER = re.compile(r'^\{"inner_s": ([0-9.e+-]+)\}$|^wrote .* in ([0-9.]+) s$', re.MULTILINE)


def measure(label: str, cmd: list[str]) -> Run:
    """Run ``cmd`` in a fresh process: wall time, its own peak RSS (``wait4``) and its peak RssAnon."""
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=CHILD_ENV)
        stop, peak = threading.Event(), [0, 0]
        poller = threading.Thread(target=_poll_anon, args=(proc.pid, stop, peak), daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        wall = time.perf_counter() - start
        stop.set()
        poller.join()
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
    if code != 0:
        tail = "\n".join(err.strip().splitlines()[-15:])
        raise SystemExit(f"{label} failed (exit {code}): {' '.join(cmd)}\n{tail}")
    found = INNER.findall(out)
    inner = float(next(v for v in found[-1] if v)) if found else None
    # ru_maxrss counts the forked child before its exec, i.e. this benchmark's own resident memory
    # (checkpoints it just built): VmHWM is the new program's own peak. ru_maxrss only if never polled.
    rss_kb = peak[1] or usage.ru_maxrss
    return Run(label, wall, inner, rss_kb * 1024 / MB, peak[0] * 1024 / MB)


# ----------------------------------------------------------------------------- orchestration


@dataclass
class Row:
    """One method's result (medians over repeats)."""

    method: str
    n_inputs: int
    wall_s: float
    floor_s: float
    ratio: float
    process_s: float
    peak_rss_mb: float
    peak_anon_mb: float
    rss_bound_mb: float
    target_ratio: float | None
    mergekit_s: float | None = None
    mergekit_rss_mb: float | None = None
    speedup: float | None = None
    speedup_after_startup: float | None = None  # (mergekit - its start-up) / (unimerge - its start-up)
    floor_process_s: float | None = None  # the floor's whole process (interpreter and imports included)
    # mergekit's process over the floor's: the most any tool that reads every input and fsyncs its
    # output could be faster than mergekit here (the floor reads through safetensors, starts no torch
    # start-up beyond the import, and computes nothing)
    ceiling: float | None = None


class Bench:
    """Runs floors, unimerge and mergekit in fresh subprocesses, writing to a scratch folder."""

    def __init__(
        self, models: list[Path], work: Path, threads: int, mergekit: str | None, dtype: str = "float32"
    ) -> None:
        self.models, self.work, self.threads, self.mergekit = models, work, threads, mergekit
        self.dtype = dtype
        self.runs: list[Run] = []

    def _out(self) -> Path:
        out = self.work / "out"
        shutil.rmtree(out, ignore_errors=True)
        return out

    def _config(self, method: str) -> Path:
        path = self.work / f"{method}.yaml"
        import yaml

        path.write_text(yaml.safe_dump(merge_config(method, self.models, self.dtype), sort_keys=False))
        return path

    def floor(self, n: int) -> Run:
        out = self._out()
        payload = {"inputs": [str(m) for m in self.models[:n]], "out": str(out)}
        return self._timed(f"floor/{n}", [sys.executable, __file__, "_child", json.dumps(payload)], out)

    def unimerge(self, method: str) -> Run:
        out = self._out()
        cmd = [sys.executable, "-m", "unimerge", "merge", str(self._config(method)), str(out), "--threads",
               str(self.threads), "--out-shard-size", str(SHARD_BYTES), "--seed", "0"]  # fmt: skip
        return self._timed(method, cmd, out)

    def mergekit_run(self, method: str) -> Run:
        out = self._out()
        shard_params = str(
            SHARD_BYTES // BYTES[self.dtype]
        )  # mergekit counts parameters per shard, not bytes
        cmd = [str(self.mergekit), str(self._config(method)), str(out), "--out-shard-size", shard_params,
               "--lazy-unpickle", "--no-copy-tokenizer", "--random-seed", "0", "--quiet"]  # fmt: skip
        return self._timed(f"mergekit/{method}", cmd, out)

    def _timed(self, label: str, cmd: list[str], out: Path | None = None) -> Run:
        """Run and record ``cmd``; remove its output folder; print the run (its inner time if it has one)."""
        run = measure(label, cmd)
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        self.runs.append(run)
        if run.inner_s is None:
            print(f"  {label:<16} {run.wall_s:7.2f} s  (peak RSS {run.peak_rss_mb:7.0f} MB)", file=sys.stderr)
        else:
            print(f"  {label:<16} {run.inner_s:7.2f} s  (process {run.wall_s:6.2f} s, peak RSS "
                  f"{run.peak_rss_mb:7.0f} MB, anon {run.peak_anon_mb:7.0f} MB)", file=sys.stderr)  # fmt: skip
        return run

    def startup(self, repeats: int) -> tuple[float, float]:
        """Median process times of each command doing nothing but start: ``unimerge methods --json``
        (torch and the registry, as a merge imports them) and ``mergekit-yaml --help``."""
        um = [self._timed("unimerge/start", [sys.executable, "-m", "unimerge", "methods", "--json"])
              for _ in range(repeats)]  # fmt: skip
        mk = [self._timed("mergekit/start", [str(self.mergekit), "--help"]) for _ in range(repeats)]
        return statistics.median(r.wall_s for r in um), statistics.median(r.wall_s for r in mk)


def run_method(
    bench: Bench, method: str, repeats: int, largest: int, startup: tuple[float, float] | None
) -> Row:
    """``repeats`` x (floor over the same inputs, then the method); medians of times and ratios."""
    n = n_inputs(method, len(bench.models))
    floors, merges = [], []
    for _ in range(repeats):
        floors.append(bench.floor(n))
        merges.append(bench.unimerge(method))
    ratios = [m.inner_s / f.inner_s for f, m in zip(floors, merges, strict=True)]
    row = Row(
        method=method, n_inputs=n,
        wall_s=statistics.median(m.inner_s for m in merges),
        floor_s=statistics.median(f.inner_s for f in floors),
        ratio=statistics.median(ratios),
        process_s=statistics.median(m.wall_s for m in merges),
        peak_rss_mb=max(m.peak_rss_mb for m in merges),
        peak_anon_mb=max(m.peak_anon_mb for m in merges),
        rss_bound_mb=((n + 3) * largest + 500 * MB) / MB,
        target_ratio=(TARGETS_BF16 if bench.dtype == "bfloat16" else TARGETS).get(method),
        floor_process_s=statistics.median(f.wall_s for f in floors),
    )  # fmt: skip
    if bench.mergekit:
        mk = [bench.mergekit_run(method) for _ in range(repeats)]
        row.mergekit_s = statistics.median(r.wall_s for r in mk)
        row.mergekit_rss_mb = max(r.peak_rss_mb for r in mk)
        row.speedup = row.mergekit_s / row.process_s
        row.ceiling = row.mergekit_s / row.floor_process_s
        mk_rest, um_rest = (
            (row.mergekit_s - startup[1], row.process_s - startup[0]) if startup else (0.0, 0.0)
        )
        if mk_rest > 0 and um_rest > 0:  # else start-up noise exceeds the merge: no meaningful quotient
            row.speedup_after_startup = mk_rest / um_rest
    return row


def _verdict(row: Row) -> str:
    ok = [row.peak_rss_mb <= row.rss_bound_mb]
    if row.target_ratio is not None:
        ok.append(row.ratio <= row.target_ratio)
    if row.speedup is not None:
        ok.append(row.speedup >= MIN_SPEEDUP)
    return "ok" if all(ok) else "MISSED"


def table(rows: list[Row], with_mergekit: bool) -> str:
    """The results as a markdown table."""
    head = ["method", "inputs", "wall s", "floor s", "ratio", "target", "peak RSS MB", "anon RSS MB",
            "RSS bound MB"]  # fmt: skip
    if with_mergekit:
        head += ["process s", "floor process s", "mergekit s", "mergekit RSS MB", "speedup",
                 "floor's speedup", "speedup after start-up"]  # fmt: skip
    lines = ["| " + " | ".join(head + ["verdict"]) + " |", "|" + "---|" * (len(head) + 1)]
    for r in rows:
        cells = [r.method, str(r.n_inputs), f"{r.wall_s:.2f}", f"{r.floor_s:.2f}", f"{r.ratio:.2f}x",
                 f"<= {r.target_ratio}x" if r.target_ratio else "-", f"{r.peak_rss_mb:.0f}",
                 f"{r.peak_anon_mb:.0f}", f"{r.rss_bound_mb:.0f}"]  # fmt: skip
        if with_mergekit:
            cells += [f"{r.process_s:.2f}", f"{r.floor_process_s:.2f}", f"{r.mergekit_s:.2f}",
                      f"{r.mergekit_rss_mb:.0f}", f"{r.speedup:.2f}x", f"{r.ceiling:.2f}x",
                      f"{r.speedup_after_startup:.2f}x" if r.speedup_after_startup else "-"]  # fmt: skip
        lines.append("| " + " | ".join(cells + [_verdict(r)]) + " |")
    return "\n".join(lines)


def find_mergekit(path: str | None) -> str:
    """The ``mergekit-yaml`` executable, or exit with how to install it."""
    exe = shutil.which(path or "mergekit-yaml")
    if exe is None:
        raise SystemExit(
            f"--vs-mergekit: {path or 'mergekit-yaml'} not found. Install mergekit in its own venv, e.g. "
            "`python -m venv /tmp/mk-venv && /tmp/mk-venv/bin/pip install torch==2.13.0 mergekit`, "
            "then pass --mergekit-bin /tmp/mk-venv/bin/mergekit-yaml."
        )
    return exe


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--params", type=parse_count, default=parse_count("220M"), help="model size (default 220M)"
    )
    p.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="a real model's shape instead of --params"
    )
    p.add_argument("--dtype", choices=sorted(BYTES), default="float32", help="checkpoint and merge dtype")
    p.add_argument(
        "--n-models", type=int, default=4, help="checkpoints: the base and N-1 experts (default 4)"
    )
    p.add_argument("--threads", type=int, default=2, help="unimerge worker threads (default 2)")
    p.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}"
    )
    p.add_argument("--repeats", type=int, default=1, help="runs per method; medians are reported")
    p.add_argument("--vs-mergekit", action="store_true", help="also time mergekit-yaml on the same configs")
    p.add_argument("--mergekit-bin", default=None, help="path of mergekit-yaml (default: from PATH)")
    p.add_argument(
        "--cache", type=Path, default=None, help="checkpoint cache (default $UNIMERGE_CACHE/bench-speed)"
    )
    p.add_argument("--work", type=Path, default=None, help="scratch folder for outputs (default: a temp dir)")
    p.add_argument("--out-json", type=Path, default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(args.methods) - set(METHODS))
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    return args


def checkpoint_label(shape: LlamaShape, name: str | None, dtype: str, n_models: int) -> str:
    """The cache folder's name: the size (fp32 base + 3, as before) or the shape's name, then dtype and count."""
    label = name or f"{round(shape.params / 1e6)}M"
    if dtype != "float32":
        label += "-bf16" if dtype == "bfloat16" else f"-{dtype}"
    return label if n_models == 4 else f"{label}-x{n_models}"


def fits_page_cache(shape: LlamaShape, dtype: str, n_models: int) -> bool:
    """Whether every input fits in half of this machine's memory (else a warm-up read is pointless)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return n_models * BYTES[dtype] * shape.params < total // 2


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    mergekit = find_mergekit(args.mergekit_bin) if args.vs_mergekit else None
    shape = SHAPES[args.shape] if args.shape else shape_for(args.params)
    label = checkpoint_label(shape, args.shape, args.dtype, args.n_models)
    root = (args.cache or cache_dir() / "bench-speed") / label
    models = build_checkpoints(root, shape, args.n_models, args.dtype)
    work = args.work or Path(tempfile.mkdtemp(prefix="unimerge-speed-"))
    warm = fits_page_cache(shape, args.dtype, args.n_models)
    print(
        f"{label}: {shape.params / 1e6:.0f}M params ({shape}), {args.dtype}, largest tensor "
        f"{shape.largest_numel * BYTES[args.dtype] / MB:.0f} MB, threads {args.threads}, {os.cpu_count()} CPUs, "
        f"inputs {'warm (page cache)' if warm else 'larger than the page cache: read from disk'}",
        file=sys.stderr,
    )
    bench = Bench(models, mkdir_p(work), args.threads, mergekit, args.dtype)
    try:
        if warm:
            bench.floor(len(models))  # warm-up: pulls every input into the page cache (not reported)
        startup = bench.startup(max(3, args.repeats)) if mergekit else None
        rows = [run_method(bench, m, args.repeats, shape.largest_bytes, startup) for m in args.methods]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{label}: {shape.params / 1e6:.0f}M parameters, {len(models)} {args.dtype} checkpoints of "
        f"{BYTES[args.dtype] * shape.params / 1e9:.2f} GB, "
        f"threads={args.threads}, repeats={args.repeats}, {time.strftime('%Y-%m-%d %H:%M')}\n"
    )
    if startup:
        print(
            f"start-up (median process, a command that only starts): `unimerge methods --json` {startup[0]:.2f} s, "
            f"`mergekit-yaml --help` {startup[1]:.2f} s\n"
        )
    print(table(rows, mergekit is not None))
    if args.out_json:
        blob = {"params": shape.params, "shape": asdict(shape), "dtype": args.dtype, "label": label,
                "threads": args.threads, "repeats": args.repeats,
                "startup_s": {"unimerge": startup[0], "mergekit": startup[1]} if startup else None,
                "rows": [asdict(r) for r in rows], "runs": [asdict(r) for r in bench.runs],
                "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpus": os.cpu_count()}  # fmt: skip
        args.out_json.write_text(json.dumps(blob, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
