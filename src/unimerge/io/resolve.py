"""What a model reference in a config points to, and where outputs may not go.

A reference is a path (relative to the config file's folder, else to the working folder),
mergekit's ``BASE+ADAPTER``, or a Hugging Face repo id already in the local cache; unimerge reads
local files only and never downloads. :func:`open_checkpoint` turns a reference into a lazy
:class:`~unimerge.io.checkpoint.Checkpoint` (the formats live in :mod:`~unimerge.io.checkpoint`
and :mod:`~unimerge.io.adapters`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from unimerge.errors import CheckpointError, ConfigError
from unimerge.io.adapters import open_lora_checkpoint
from unimerge.io.checkpoint import EXPECTED_FILES, Checkpoint, open_path

__all__ = ["check_output_outside", "open_checkpoint", "resolve_ref"]


def resolve_ref(ref: str, config_dir: Path | None) -> str:
    """The absolute form of ``ref`` (each ``+``-joined part resolved; config folder first).

    Raises:
        CheckpointError: a part exists neither in the config's folder nor in the working folder.
    """
    out = []
    for p in ref.split("+"):
        path = Path(p).expanduser()
        if not path.is_absolute() and config_dir is not None and (config_dir / path).exists():
            path = config_dir / path
        if not path.exists():
            raise CheckpointError(
                f"Model {p!r} not found (looked in {Path.cwd()}"
                + (f" and {config_dir}" if config_dir else "")
                + "). unimerge reads local folders only and never downloads: download the model first "
                "(e.g. `huggingface-cli download NAME --local-dir DIR`) and give its folder."
            )
        out.append(str(path.resolve()))
    return "+".join(out)


def check_output_outside(out_dir: Path, refs: Sequence[str]) -> None:
    """Refuse an output folder that is, contains, or lies inside an input's folder.

    Raises:
        ConfigError: naming the overlapping input.
    """
    out = out_dir.resolve()
    for ref in refs:
        for part in ref.split("+"):
            root = Path(part).resolve()
            root = root if root.is_dir() else root.parent
            if out == root or out.is_relative_to(root) or root.is_relative_to(out):
                raise ConfigError(
                    f"Output folder {out_dir} overlaps input {part}. Write the merged model to a folder "
                    "outside every input folder (and not a parent of one)."
                )


def _hub_cache(ref: str) -> Path | None:
    """The cached snapshot of a Hugging Face repo id, if ``huggingface_hub`` has one locally."""
    if ref.count("/") != 1 or ref.startswith((".", "/")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:  # not installed, not cached, or not a repo id
        return None


def open_checkpoint(ref: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint lazily (headers only).

    Args:
        ref: A folder (``model.safetensors``, or shards with ``model.safetensors.index.json``), a
            ``.safetensors`` file, ``BASE+ADAPTER`` (a PEFT LoRA folder materialised onto BASE), a
            ``pytorch_model.bin`` folder or file, or a Hugging Face repo id already in the local cache.
        allow_pickle: Permit pickled ``.bin`` weights (unpickling can run code).

    Raises:
        CheckpointError: The path is missing, holds no weights, or a file is corrupt or unsafe.
    """
    text = str(ref)
    path = Path(text).expanduser()
    if path.exists():
        return open_path(text, path, allow_pickle)
    if "+" in text:
        for i in (i for i, ch in enumerate(text) if ch == "+"):
            base, adapter = Path(text[:i]).expanduser(), Path(text[i + 1 :]).expanduser()
            if base.exists() and adapter.exists():
                return open_lora_checkpoint(
                    text, open_path(text[:i], base, allow_pickle), adapter, allow_pickle
                )
        raise CheckpointError(
            f"{text!r} looks like BASE+ADAPTER, but no split of it names two existing paths. "
            "Check both paths (the adapter is a PEFT folder with adapter_config.json)."
        )
    cached = _hub_cache(text)
    if cached is not None:
        return open_path(text, cached, allow_pickle)
    raise CheckpointError(
        f"Checkpoint {text!r} not found: no such file or folder (nor a cached Hugging Face repo). "
        f"Give a local folder with {EXPECTED_FILES}; download hub models first, e.g. `huggingface-cli download {text}`."
    )
