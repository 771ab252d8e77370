"""The plan of a 70B-parameter merge across Ray nodes (``unimerge validate --executor ray --nodes N``).

No 70B weights are needed: planning reads headers only. This writes Llama-2-70B-shaped bf16
checkpoints (80 layers, hidden 8192, GQA with 8 key/value heads; a base and ``--models`` experts)
whose safetensors headers are real and whose data is a sparse hole (``ftruncate``: no disk used),
sharded at 5 GB like the Hub's, then prints ``unimerge validate`` for a TIES merge on 1, 2, 4 and 8
nodes at the given bandwidths.

Usage::

    python benchmarks/cluster_plan.py --models 4 --nodes 1 2 4 8 --disk 4GB/s --network 25Gbit/s --compute-ns 4.8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from llama_checkpoints import LlamaShape

from unimerge.io.writer import OutTensor, safetensors_header

LLAMA_70B = LlamaShape(80, 8192, 28672, 32000, 64, kv_heads=8)  # meta-llama/Llama-2-70b-hf's config.json
SHARD = 5_000_000_000


def sparse_checkpoint(folder: Path, shape: LlamaShape) -> None:
    """A bf16 Hugging Face folder of ``shape`` whose tensor data are holes (headers are real)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(shape.config("bfloat16")))
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for name, dims in shape.tensors().items():
        t = OutTensor(name, dims, torch.bfloat16)
        if shards[-1] and size + t.nbytes > SHARD:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards, strict=True):
        header, _ = safetensors_header(shard, {"format": "pt"})
        with open(folder / fname, "wb") as f:
            f.write(header)
            f.truncate(len(header) + sum(t.nbytes for t in shard))
    weight_map = {t.name: fname for fname, shard in zip(names, shards, strict=True) for t in shard}
    index = {"metadata": {"total_size": 2 * shape.params}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=4, help="experts besides the base")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--disk", default="4GB/s", help="shared storage's total throughput")
    ap.add_argument("--network", default="25Gbit/s", help="each node's link")
    ap.add_argument("--compute-ns", default="0", help="TIES's cost per input element on one node (ns)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="unimerge-70b-") as tmp:
        root = Path(tmp)
        for k in range(args.models + 1):
            sparse_checkpoint(root / f"model{k}", LLAMA_70B)
        config = {
            "merge_method": "ties", "base_model": str(root / "model0"), "dtype": "bfloat16",
            "models": [{"model": str(root / f"model{k}"), "parameters": {"weight": 1.0, "density": 0.3}}
                       for k in range(1, args.models + 1)],
        }  # fmt: skip
        (root / "ties.yaml").write_text(yaml.safe_dump(config))
        print(
            f"Llama-2-70B shape: {LLAMA_70B.params / 1e9:.1f}B parameters, base + {args.models} experts, bf16"
        )
        for n in args.nodes:
            cmd = [sys.executable, "-m", "unimerge", "validate", str(root / "ties.yaml"), str(root / "out"),
                   "--executor", "ray", "--nodes", str(n), "--disk-bandwidth", args.disk,
                   "--network-bandwidth", args.network, "--compute-ns", args.compute_ns]  # fmt: skip
            env = {**os.environ, "COLUMNS": "120"}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            sys.stdout.write(done.stdout + done.stderr)
            if done.returncode:
                raise SystemExit(done.returncode)


if __name__ == "__main__":
    main()
