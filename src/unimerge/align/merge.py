"""Alignment as a pre-merge step: permute models into one basis, then merge with any method.

Models trained from different initialisations only average well once their hidden units are
matched (Ainsworth et al., Git Re-basin, ICLR 2023). :func:`align_models` returns the aligned
copies; :func:`merge_aligned` aligns and then runs any data-free registered method through
:func:`unimerge.core.merge_state_dicts`. The in-memory merge itself takes no ``align=`` keyword:
``unimerge.core`` sits below this package and must not import it, so the step lives here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar

from torch import Tensor, nn

from unimerge.align.activations import activation_matching, as_inputs
from unimerge.align.matching import weight_matching
from unimerge.align.spec import PermutationSpec
from unimerge.core import merge_state_dicts
from unimerge.errors import ConfigError

__all__ = ["AlignMethod", "align_models", "merge_aligned"]

M = TypeVar("M", bound=nn.Module)
AlignMethod = Literal["weight", "activation"]


def align_models(
    reference: nn.Module,
    models: Sequence[M],
    example_inputs: Sequence[object] | None = None,
    *,
    method: AlignMethod = "weight",
    batches: Iterable[object] | None = None,
    seed: int = 0,
    spec: PermutationSpec | None = None,
) -> list[M]:
    """Copies of ``models``, each permuted into ``reference``'s basis; each computes what it did.

    Args:
        reference: the model whose basis the others are moved into (it is not copied or changed).
        models: models of the same architecture as ``reference``.
        example_inputs: inputs to trace the models with (default: the first of ``batches``).
        method: ``"weight"`` (weight matching, data-free) or ``"activation"`` (needs ``batches``).
        batches: model inputs (a tensor or a tuple per batch) for activation matching.
        seed: seeds weight matching's group order.
        spec: a hand-declared spec for weight matching (for models torch.fx cannot trace).
    """
    data = list(batches) if batches is not None else []
    if example_inputs is None and not data:
        raise ConfigError("align_models needs example_inputs (or batches) to trace the models.")
    example = tuple(example_inputs) if example_inputs is not None else as_inputs(data[0])
    if method == "weight":
        return [weight_matching(reference, m, example, seed=seed, spec=spec) for m in models]
    if method == "activation":
        if not data:
            raise ConfigError("Activation matching needs data: pass batches=[inputs, ...].")
        return [activation_matching(reference, m, data, example, seed=seed) for m in models]
    raise ConfigError(f"Unknown alignment method {method!r}; use 'weight' or 'activation'.")


def merge_aligned(
    method: str,
    reference: nn.Module,
    models: Sequence[nn.Module],
    example_inputs: Sequence[object] | None = None,
    *,
    align: AlignMethod = "weight",
    batches: Iterable[object] | None = None,
    seed: int = 0,
    base: Mapping[str, Tensor] | None = None,
    **params: Any,
) -> dict[str, Tensor]:
    """Align ``models`` to ``reference``, then merge ``[reference, *aligned]`` with ``method``.

    ``params`` (and ``base``, ``seed``) go to :func:`unimerge.core.merge_state_dicts`; per-model
    values list the reference first. Load the result with ``reference_copy.load_state_dict(...)``;
    for BatchNorm networks reset the statistics after (:func:`unimerge.align.reset_batchnorm`).

    Example:
        >>> merged = merge_aligned("linear", model_a, [model_b], [x], weight=[0.5, 0.5])
    """
    aligned = align_models(reference, models, example_inputs, method=align, batches=batches, seed=seed)
    experts = [reference.state_dict(), *(m.state_dict() for m in aligned)]
    return merge_state_dicts(method, experts, base, seed=seed, **params)
