"""Running one registered method on one tensor, and the in-memory API built on it.

The streaming engine (``execute.py``) and :func:`merge_state_dicts` share :func:`merge_tensor`, so a
method gives the same numbers whichever way it is called.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import Tensor

from unimerge.errors import ConfigError, PlanError
from unimerge.methods import MethodInfo, TensorMethod, generator_for, get_method

__all__ = [
    "compute_dtype",
    "merge_stacked",
    "merge_state_dicts",
    "merge_tensor",
    "split_params",
    "stack_buffer",
    "stack_inputs",
    "stack_per_model",
    "validate_params",
]


def _field_keys(model: type[BaseModel]) -> set[str]:
    return {k for name, f in model.model_fields.items() for k in (name, f.alias) if k}


def _explain(err: ValidationError, where: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(parameters)"
        parts.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return f"{where}: " + "; ".join(parts)


def validate_params(
    info: MethodInfo, global_raw: Mapping[str, Any], per_model_raw: Sequence[Mapping[str, Any]]
) -> tuple[BaseModel, list[BaseModel]]:
    """Validate raw parameter values against ``info``'s models.

    Per-model names given globally are every model's default (as in mergekit); a global-only name
    given for one model is an error. Raises :class:`ConfigError` naming the method, model and field.
    """
    gkeys, mkeys = _field_keys(info.params), _field_keys(info.model_params)
    unknown = set(global_raw) - gkeys - mkeys
    if unknown:
        allowed = ", ".join(sorted(gkeys | mkeys)) or "none"
        raise ConfigError(
            f"Method {info.name!r} has no parameter {', '.join(sorted(map(repr, unknown)))}. "
            f"Its parameters are: {allowed}. See `unimerge methods --json` for types and defaults."
        )
    try:
        params = info.params.model_validate({k: v for k, v in global_raw.items() if k in gkeys})
    except ValidationError as err:
        raise ConfigError(_explain(err, f"Method {info.name!r} parameters")) from None
    defaults = {k: v for k, v in global_raw.items() if k in mkeys and k not in gkeys}
    models = []
    for i, raw in enumerate(per_model_raw):
        bad = set(raw) - mkeys
        if bad:
            raise ConfigError(
                f"Model {i}: {', '.join(sorted(map(repr, bad)))} cannot be set per model for method "
                f"{info.name!r}; per-model parameters are: {', '.join(sorted(mkeys))}. "
                "Move global parameters to the top-level `parameters:` section."
            )
        try:
            models.append(info.model_params.model_validate({**defaults, **raw}))
        except ValidationError as err:
            raise ConfigError(_explain(err, f"Method {info.name!r}, model {i} parameters")) from None
    return params, models


def stack_per_model(models: Sequence[BaseModel], device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Per-model parameter instances -> name -> ``(n_models,)`` float32 tensor (numeric fields only)."""
    out: dict[str, Tensor] = {}
    for name in type(models[0]).model_fields:
        values = [getattr(m, name) for m in models]
        if all(isinstance(v, (int, float, bool)) for v in values):
            out[name] = torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)
    return out


def merge_tensor(
    info: TensorMethod,
    tensors: Sequence[Tensor],
    base: Tensor | None,
    params: BaseModel,
    per_model: Mapping[str, Tensor],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Merge one tensor. Computes in float32 (float64 if the inputs are float64) on ``device``;
    returns the merged tensor in that compute dtype (the caller casts to the output dtype)."""
    ref = base if base is not None else tensors[0]
    if not ref.is_floating_point():
        return ref.clone()
    out = merge_stacked(info, _stack(tensors, ref, device), base, params, per_model, generator=generator)
    return (
        out.clone() if out.untyped_storage().nbytes() > out.nbytes else out
    )  # a row of x would keep all n alive


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype methods compute in for inputs stored as ``dtype``: float64 stays, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stack_buffer(n: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """An uninitialised ``(n, *shape)`` buffer in the compute dtype for inputs stored as ``dtype``."""
    return torch.empty((n, *shape), dtype=compute_dtype(dtype), device=device)


def to_method_input(info: TensorMethod, x: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(x, base)`` as ``info.fn`` receives them: ``x`` (the caller's stacked inputs, turned into task
    vectors in place for ``inputs="deltas"`` methods) and the base in ``x``'s dtype and device."""
    b = base.to(device=x.device, dtype=x.dtype) if base is not None else None
    if info.inputs == "deltas":
        if b is None:
            raise ConfigError(f"Method {info.name!r} needs a base model; set `base_model:` in the config.")
        x.sub_(b)
    return x, b


def merge_stacked(
    info: TensorMethod,
    x: Tensor,
    base: Tensor | None,
    params: BaseModel,
    per_model: Mapping[str, Tensor],
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Merge one tensor from its stacked inputs ``x`` ``(n, *shape)`` in the compute dtype.

    ``x`` is consumed: it becomes the task vectors and the method may overwrite it, so a merge needs
    no second ``(n, *shape)`` buffer. Returns the merged tensor in ``x``'s dtype.
    """
    x, b = to_method_input(info, x, base)
    out = info.fn(x, params, per_model, base=b, generator=generator)
    if info.inputs != "deltas" or b is None:
        return out
    if _shares_memory(out, b):  # the base may be the caller's tensor: never written
        return out + b
    return out.add_(b)  # out is new or a row of x, which is consumed


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def stack_inputs(
    info: TensorMethod, tensors: Sequence[Tensor], base: Tensor | None, device: torch.device | str
) -> tuple[Tensor, Tensor | None]:
    """What ``info.fn`` receives for one tensor: ``(x (n, *shape), base)`` in the compute dtype.

    Float32 (float64 for float64 inputs) on ``device``; ``x`` is a fresh buffer holding task vectors
    for ``inputs="deltas"`` methods, the raw tensors otherwise.
    """
    return to_method_input(info, _stack(tensors, base if base is not None else tensors[0], device), base)


def _stack(tensors: Sequence[Tensor], ref: Tensor, device: torch.device | str) -> Tensor:
    x = stack_buffer(len(tensors), tuple(ref.shape), ref.dtype, device)
    for i, t in enumerate(tensors):
        x[i].copy_(t)
    return x


def split_params(
    info: MethodInfo, n: int, kwargs: Mapping[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Python keyword parameters -> ``(global, per-model)`` raw values for :func:`validate_params`:
    a per-model name with a list value gives one value per model, anything else is global."""
    mkeys = _field_keys(info.model_params)
    global_raw: dict[str, Any] = {}
    per_model: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, value in kwargs.items():
        if key in mkeys and isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ConfigError(f"Parameter {key!r} has {len(value)} values for {n} models.")
            for i, v in enumerate(value):
                per_model[i][key] = v
        else:
            global_raw[key] = value
    return global_raw, per_model


def merge_state_dicts(
    method: str,
    experts: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor] | None = None,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    **params: Any,
) -> dict[str, Tensor]:
    """Merge in-memory state dicts with any data-free registered method.

    Per-model parameters (``weight``, ``density``, ...) take a scalar (all models) or a list with one
    value per expert; ``lambda`` can be passed as ``**{"lambda": 0.5}`` or ``lambda_=0.5``.
    Output tensors have the base's dtype (or the first expert's) and live on the CPU.

    Example:
        >>> merged = merge_state_dicts("ties", [sd_a, sd_b], base=sd_0, density=0.2, weight=[1.0, 0.5])
    """
    info = get_method(method, TensorMethod)
    if not experts:
        raise ConfigError("merge_state_dicts needs at least one expert state dict.")
    if info.needs_base and base is None:
        raise ConfigError(f"Method {info.name!r} needs a base model: pass base=...")
    global_raw, per_model_raw = split_params(info, len(experts), params)
    p, models = validate_params(info, global_raw, per_model_raw)
    stacked = stack_per_model(models, device)
    names = list(experts[0])
    for i, sd in enumerate(experts):
        if set(sd) != set(names):
            missing, extra = sorted(set(names) - set(sd)), sorted(set(sd) - set(names))
            raise PlanError(f"Expert {i} differs from expert 0: missing {missing[:5]}, extra {extra[:5]}.")
    if info.prepare is not None:  # whole-model statistics first (e.g. TIES trim_scope: global)

        def deltas() -> Iterator[tuple[str, Tensor]]:
            for n in names:
                if experts[0][n].is_floating_point():
                    b = None if base is None else base[n]
                    yield n, stack_inputs(info, [sd[n] for sd in experts], b, device)[0]

        stacked = {**stacked, **info.prepare(p, stacked, deltas)}
    out: dict[str, Tensor] = {}
    for name in names:
        ref = base[name] if base is not None else experts[0][name]
        g = generator_for(seed, name, device) if info.random else None
        merged = merge_tensor(
            info,
            [sd[name] for sd in experts],
            None if base is None else base[name],
            p,
            stacked,
            generator=g,
            device=device,
        )
        out[name] = merged.to(dtype=ref.dtype, device="cpu")
    return out
