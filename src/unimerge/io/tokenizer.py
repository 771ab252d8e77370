"""Tokenizers on disk: load a model folder's tokenizer, build mergekit's union of several, save one.

Uses ``transformers`` (the ``hf`` extra), imported only when a config asks for a tokenizer
(``tokenizer_source:`` or ``tokenizer:``); local files only, never remote code. The union follows
mergekit 0.1.5 (``mergekit/tokenizer/build.py``): the base's tokenizer (its tokens at or past the base's
``vocab_size`` dropped), then every other model's new ordinary tokens, then the new added tokens with
their settings (the first model's where two differ), each model read in the config's order.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unimerge.errors import CheckpointError, ConfigError
from unimerge.io.writer import TOKENIZER_FILES, ShardedWriter

__all__ = [
    "Tokenizer",
    "config_vocab_size",
    "copy_tokenizer",
    "load_tokenizer",
    "strip_tokenizer",
    "union_tokenizer",
    "write_tokenizer",
]

Tokenizer = Any  # a transformers PreTrainedTokenizerBase (not imported at module level)
_FIX = "install the Hugging Face extra: pip install 'unimerge[hf]'"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            f"Merging tokenizers (`tokenizer_source:` / `tokenizer:`) needs transformers; {_FIX}."
        ) from None
    return transformers


def config_vocab_size(folder: Path) -> int | None:
    """``vocab_size`` of ``folder/config.json`` (or its ``text_config``), ``None`` when absent."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    for section in (cfg, cfg.get("text_config") or {}):
        size = section.get("vocab_size") if isinstance(section, dict) else None
        if isinstance(size, int) and size > 0:
            return size
    return None


def load_tokenizer(folder: Path, ref: str) -> Tokenizer:
    """The fast tokenizer saved in ``folder`` (model ``ref`` of the config, named in errors).

    Raises:
        CheckpointError: no tokenizer files there, or transformers cannot read them.
    """
    folder = Path(folder)
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise CheckpointError(
            f"{ref}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) in {folder}, and merging "
            "vocabularies reads every model's tokenizer. Copy the model's tokenizer files into its folder "
            "(or remove `tokenizer_source:` / `tokenizer:` if all models share one vocabulary)."
        )
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(folder), use_fast=True, trust_remote_code=False, local_files_only=True
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{ref}: cannot read the tokenizer in {folder}: {err}") from None


def copy_tokenizer(tok: Tokenizer) -> Tokenizer:
    """An independent copy of ``tok`` (saved and read back, as mergekit does)."""
    with tempfile.TemporaryDirectory(prefix="unimerge-tok-") as tmp:
        tok.save_pretrained(tmp)
        return load_tokenizer(Path(tmp), "tokenizer copy")


def strip_tokenizer(tok: Tokenizer, size: int, ref: str) -> Tokenizer:
    """``tok`` without the tokens whose id is ``size`` or more (mergekit's ``get_stripped_tokenizer``).

    Raises:
        CheckpointError: such tokens exist and the tokenizer is not a BPE or word-level ``tokenizer.json``.
    """
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    with tempfile.TemporaryDirectory(prefix="unimerge-tok-") as tmp:
        tok.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        kind = data.get("model", {}).get("type")
        if kind not in ("BPE", "WordLevel"):
            raise CheckpointError(
                f"{ref}: its tokenizer has {len(unused)} tokens at or past config.json's vocab_size {size} "
                f"and is of type {kind}; only BPE and word-level tokenizers can be cut to vocab_size. "
                "Remove those tokens from the tokenizer, or give the embedding rows for them."
            )
        data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < size]
        data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if t not in unused}
        if kind == "BPE":
            pairs = (m.split(" ") if isinstance(m, str) else m for m in data["model"]["merges"])
            data["model"]["merges"] = [m for m in pairs if not unused.intersection(m)]
        path.write_text(json.dumps(data), encoding="utf-8")
        return load_tokenizer(Path(tmp), ref)


def union_tokenizer(base: Tokenizer, others: Sequence[tuple[Tokenizer, int]]) -> Tokenizer:
    """mergekit's ``build_union_tokenizer``: ``base`` (copied) plus the tokens of ``others``.

    Args:
        base: The base's (stripped) tokenizer; its ids stay.
        others: ``(tokenizer, vocab_size)`` of every model, the base first, in the config's order;
            tokens with an id of ``vocab_size`` or more are left out.
    """
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, size in others:
        decoder = {i: t for i, t in tok.added_tokens_decoder.items() if i < size}
        for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if idx < size:
                plain.setdefault(token)
        for _, info in sorted(decoder.items()):
            added.setdefault(info.content, info)
    out = copy_tokenizer(base)
    known = base.get_vocab()
    for token in plain:
        if token not in added and token not in known:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def write_tokenizer(tok: Tokenizer, writer: ShardedWriter) -> list[str]:
    """Save ``tok`` (``save_pretrained``) into the output folder of ``writer``; returns the file names."""
    with tempfile.TemporaryDirectory(prefix="unimerge-tok-") as tmp:
        tok.save_pretrained(tmp)
        names = sorted(p.name for p in Path(tmp).iterdir() if p.is_file())
        for name in names:
            writer.copy_file(Path(tmp) / name, name)
    return names
