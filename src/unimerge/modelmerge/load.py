"""Saving MoE-style and test-time merged models to a folder, and loading them back.

A folder written by :func:`save_merged` holds:

- ``unimerge_model.json``: ``format``, ``method``, ``params``, the replaced layers (dotted name ->
  ``{kind, config}``), the wrapper around the model (Twin-Merging's router), per-task modules
  (representation surgery), and the parameter counts (stored vs. the dense model);
- ``model.safetensors``: every tensor (``module.*``; ``task_modules.<task>.*`` for per-task modules);
- ``config.json``: the base model's Hugging Face config, when it has one;
- ``README.md``: a model card stating the parameter count against the dense model.

:func:`load` rebuilds the module: the base architecture comes from ``base`` (an ``nn.Module`` used as a
template, or a callable returning one) or, for Hugging Face models, from ``config.json``
(``transformers`` is imported only then).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unimerge.errors import CheckpointError
from unimerge.io import atomic_dir
from unimerge.methods import MergedModel
from unimerge.modelmerge._moe import count_params, record_method, recorded_method, replace_module
from unimerge.modelmerge.smile import SmileLinear
from unimerge.modelmerge.surgery import SurgeryModule
from unimerge.modelmerge.twin import TwinLinear, TwinModel
from unimerge.modelmerge.wemoe import WEMoELinear, link_groups

__all__ = ["MODEL_FILE", "load", "load_merged", "save_merged", "write_merged"]

MODEL_FILE = "unimerge_model.json"
FORMAT = "unimerge-merged-model/1"
_LAYERS = {cls.kind: cls for cls in (SmileLinear, WEMoELinear, TwinLinear)}
_WRAPPERS = {cls.kind: cls for cls in (TwinModel, SurgeryModule)}
BaseSpec = nn.Module | Callable[[], nn.Module] | None
Layer = SmileLinear | WEMoELinear | TwinLinear  # the layer kinds a method puts into a model
Wrapper = TwinModel | SurgeryModule  # the modules a method wraps a model in


def _layers(inner: nn.Module) -> dict[str, Layer]:
    return {name: m for name, m in inner.named_modules() if isinstance(m, Layer)}


def _wrapper(module: nn.Module) -> Wrapper | None:
    """``module`` when it is a wrapper (Twin-Merging's router model), else ``None``."""
    return module if isinstance(module, Wrapper) else None


def _dense_count(inner: nn.Module) -> int:
    """Parameters of the dense model: the module with each replaced layer counted as a plain linear."""
    total = count_params(inner)
    for layer in _layers(inner).values():
        total -= count_params(layer) - layer.in_features * layer.out_features
        total += layer.out_features if layer.bias is not None else 0
    return total


def save_merged(
    merged: MergedModel,
    path: str | Path,
    *,
    method: str | None = None,
    params: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write ``merged`` to the folder ``path`` (see the module docstring), all at once; returns the path.

    ``method``/``params`` default to what the method recorded on the module. An existing folder is
    replaced only with ``force``.

    Raises:
        MergeError: ``path`` exists and ``force`` is not set.
    """
    out = Path(path)
    with atomic_dir(out, exists="replace" if force else "error") as tmp:
        write_merged(merged, tmp, method=method, params=params)
    return out


def write_merged(
    merged: MergedModel, out: Path, *, method: str | None = None, params: dict[str, Any] | None = None
) -> None:
    """The files of :func:`save_merged`, written into the existing folder ``out`` (a caller's
    temporary folder that it renames into place itself)."""
    module = merged.module
    recorded = recorded_method(module)
    wrapper = _wrapper(module)
    inner = wrapper.model if wrapper is not None else module
    tensors = {f"module.{k}": v for k, v in module.state_dict().items()}
    tasks = {}
    for name, tm in merged.task_modules.items():
        if not isinstance(tm, SurgeryModule) or tm.model is not module:
            raise CheckpointError(
                f"task module {name!r} is not a surgery module on the merged model; cannot save it"
            )
        tasks[name] = {"kind": tm.kind, "config": tm.wrapper_config()}
        tensors.update({f"task_modules.{name}.adapter.{k}": v for k, v in tm.adapter.state_dict().items()})
    total = merged.params_total or count_params(module, *merged.task_modules.values())
    meta = {
        "format": FORMAT,
        "method": method or recorded.get("method"),
        "params": params if params is not None else recorded.get("params", {}),
        "wrapper": None if wrapper is None else {"kind": wrapper.kind, "config": wrapper.wrapper_config()},
        "layers": {name: {"kind": m.kind, "config": m.config()} for name, m in _layers(inner).items()},
        "task_modules": tasks,
        "params_total": total,
        "params_dense": _dense_count(inner),
        "examples_used": merged.examples_used,
        "labeled": merged.labeled,
        "base_config": None,
    }
    hf_config = getattr(inner, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_json_file"):
        hf_config.to_json_file(out / "config.json")
        meta["base_config"] = "config.json"
    save_file(
        {k: v.detach().contiguous().clone() for k, v in tensors.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    (out / MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(_model_card(meta))


def _model_card(meta: dict[str, Any]) -> str:
    total, dense = meta["params_total"], meta["params_dense"]
    ratio = total / dense if dense else float("nan")
    extra = f" plus {len(meta['task_modules'])} per-task modules" if meta["task_modules"] else ""
    return (
        f"# Merged model ({meta['method']})\n\n"
        f"Made with unimerge's `{meta['method']}` method{extra}.\n\n"
        f"- Parameters stored: **{total:,}**, against **{dense:,}** for the dense model ({ratio:.2f}x).\n"
        f"- Upgraded layers: {len(meta['layers'])}; examples drawn per task: {meta['examples_used']} "
        f"({'labelled' if meta['labeled'] else 'unlabeled'}).\n"
        f"- Parameters: `{json.dumps(meta['params'])}`\n\n"
        'Load it with:\n\n```python\nimport unimerge\nmodel = unimerge.load("path/to/this/folder")'
        "  # base=... for non-Hugging Face models\n```\n"
    )


def _read_meta(folder: Path) -> dict[str, Any]:
    file = folder / MODEL_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} not found: {folder} is not a folder written by unimerge's save_merged")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); re-save the model") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} holds a JSON {type(meta).__name__}, not an object; re-save the model")
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{file}: unknown format {meta.get('format')!r} (this unimerge reads {FORMAT!r})"
        )
    return meta


def _base_module(folder: Path, meta: dict[str, Any], base: BaseSpec) -> nn.Module:
    if isinstance(base, nn.Module):
        return copy.deepcopy(base)
    if base is not None:
        return base()
    if meta.get("base_config") is None:
        raise CheckpointError(
            f"{folder} has no Hugging Face config.json; pass the base architecture: load(path, base=module_or_factory)"
        )
    return _hf_module(folder)


def _hf_module(folder: Path) -> nn.Module:
    """The architecture named in ``folder``'s Hugging Face ``config.json`` (freshly initialised)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    # Model classes lack from_config; AutoModel builds the default architecture for the config.
    build: Callable[[Any], object] = cls if cls is not None else transformers.AutoModel.from_config
    model = build(config)
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{folder}/config.json built a {type(model).__name__}, not a torch module")
    return model


def _rebuild(folder: Path, meta: dict[str, Any], base: BaseSpec) -> nn.Module:
    inner = _base_module(folder, meta, base)
    for name, spec in meta["layers"].items():
        if spec["kind"] not in _LAYERS:
            raise CheckpointError(f"{folder / MODEL_FILE}: unknown layer kind {spec['kind']!r} at {name!r}")
        replace_module(inner, name, _LAYERS[spec["kind"]].from_config(spec["config"]))
    link_groups(inner)
    wrapper = meta.get("wrapper")
    return _WRAPPERS[wrapper["kind"]](inner, **wrapper["config"]) if wrapper else inner


def load_merged(path: str | Path, base: BaseSpec = None) -> MergedModel:
    """Rebuild a :class:`MergedModel` (with its per-task modules) saved by :func:`save_merged`.

    Raises:
        CheckpointError: the folder is not a saved merged model, its tensors do not fit, or the base
            architecture is missing.
    """
    folder = Path(path)
    meta = _read_meta(folder)
    module = _rebuild(folder, meta, base)
    tensors = load_file(folder / "model.safetensors")
    own = {k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")}
    try:
        module.load_state_dict(own, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{folder / 'model.safetensors'} does not fit the rebuilt model: {err}"
        ) from None
    module.requires_grad_(False).eval()
    record_method(module, meta["method"], meta["params"])
    tasks = {
        name: _task_module(folder, module, name, spec, tensors) for name, spec in meta["task_modules"].items()
    }
    return MergedModel(
        module=module,
        examples_used=meta["examples_used"],
        labeled=meta["labeled"],
        task_modules=tasks,
        params_total=meta["params_total"],
    )


def _task_module(
    folder: Path, module: nn.Module, name: str, spec: Mapping[str, Any], tensors: Mapping[str, Tensor]
) -> SurgeryModule:
    """Task ``name``'s saved module on ``module`` (a surgery adapter, the only per-task kind)."""
    if spec["kind"] != SurgeryModule.kind:
        raise CheckpointError(
            f"{folder / MODEL_FILE}: task module {name!r} has kind {spec['kind']!r}, expected {SurgeryModule.kind!r}"
        )
    tm = SurgeryModule(module, **spec["config"])
    prefix = f"task_modules.{name}.adapter."
    tm.adapter.load_state_dict(
        {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    )
    return tm.requires_grad_(False).eval()


def load(path: str | Path, base: BaseSpec = None) -> nn.Module:
    """The merged module saved in the folder ``path`` (routers and low-rank experts included).

    Args:
        path: a folder written by :func:`save_merged`.
        base: the base architecture (an ``nn.Module`` template or a factory); ``None`` builds it from
            the folder's ``config.json`` with ``transformers``.

    Per-task modules (representation surgery) are in :func:`load_merged`'s result.
    """
    return load_merged(path, base).module
