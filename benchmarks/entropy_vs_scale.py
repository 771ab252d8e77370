"""Why entropy-minimising methods (AdaMerging, WEMoE) can fail on the benchmark: a diagnostic.

For task arithmetic at several scales ``lambda`` on a cached suite (default ``text8``), prints per
scale the mean over tasks of the heads' prediction entropy, the mean norm of the pooled features
the heads read, and validation accuracy. If entropy keeps falling as ``lambda`` grows while accuracy
falls, an entropy objective rewards larger task-vector scales for the wrong reason (the heads are
linear on unnormalised features, so a larger feature norm alone sharpens the predictions; CLIP's
zero-shot heads, where these methods were developed, read unit-norm features).

Usage::

    python benchmarks/entropy_vs_scale.py --suite text8 --lambdas 0,0.3,0.6,1.0
"""

from __future__ import annotations

import argparse

import torch

from unimerge import merge_state_dicts
from unimerge.bench.model import features
from unimerge.bench.runner import get_suite, prepare


def _row(prep, lam: float) -> tuple[float, float, float]:
    merged = merge_state_dicts("task_arithmetic", prep.states, prep.base, **{"lambda": lam})
    prep.model.load_state_dict(merged, strict=False)
    ent, norm, acc = [], [], []
    for task in prep.tasks:
        with torch.inference_mode():
            feats = features(prep.model, task.val).float()  # (n, hidden)
        head = prep.heads[task.name]
        logits = feats @ head["weight"].float().T + head["bias"].float()
        logp = torch.log_softmax(logits, dim=-1)
        ent.append(float(-(logp.exp() * logp).sum(-1).mean()))
        norm.append(float(feats.norm(dim=-1).mean()))
        acc.append(float((logits.argmax(-1) == task.val.labels).float().mean()))
    prep.model.load_state_dict(prep.base, strict=True)
    return sum(ent) / len(ent), sum(norm) / len(norm), sum(acc) / len(acc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="text8")
    parser.add_argument("--lambdas", default="0,0.3,0.6,1.0")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    prep = prepare(get_suite(args.suite), args.seed)
    print("| lambda | mean entropy (nats) | mean feature norm | val accuracy % |")
    print("|---|---|---|---|")
    for lam in (float(v) for v in args.lambdas.split(",")):
        ent, norm, acc = _row(prep, lam)
        print(f"| {lam:g} | {ent:.3f} | {norm:.2f} | {100 * acc:.1f} |")


if __name__ == "__main__":
    main()
