"""Permutation alignment of models trained from different initialisations (Git Re-basin and REPAIR).

- :func:`permutation_spec` derives a model's permutation groups by tracing it with ``torch.fx``;
  :func:`declare_spec` writes one by hand for models that cannot be traced.
- :func:`weight_matching` and :func:`activation_matching` return a copy of a model permuted into a
  reference's basis, computing the same function (Ainsworth et al., ICLR 2023).
- :func:`reset_batchnorm` and :func:`repair` fix the statistics of an averaged model (Jordan et al.,
  ICLR 2023); :func:`linear_path` measures loss and accuracy barriers, :func:`plot_paths` draws them.
- :func:`align_models` / :func:`merge_aligned` make alignment a pre-merge step for any registered
  data-free method (through :func:`unimerge.merge_state_dicts`).
- :func:`zipit` / :func:`zip_models` merge two or more models trained on different tasks (ZipIt!,
  Stoica et al., ICLR 2024); :func:`partial_zip` zips them up to a layer and keeps one head each.

Needs scipy for the linear assignments (``pip install 'unimerge[align]'``).
"""

from __future__ import annotations

from unimerge.align.activations import activation_matching, match_activations
from unimerge.align.barrier import LinearPath, PathPoint, evaluate, interpolate, linear_path, plot_paths
from unimerge.align.derive import permutation_spec
from unimerge.align.matching import apply_permutation, match_weights, weight_matching
from unimerge.align.merge import align_models, merge_aligned
from unimerge.align.partial import PartialZip, partial_zip
from unimerge.align.repair import repair, reset_batchnorm
from unimerge.align.spec import Axis, PermutationSpec, declare_spec
from unimerge.align.zipit import ZipMatrices, zip_matrices, zip_models, zipit

__all__ = [
    "Axis",
    "LinearPath",
    "PartialZip",
    "PathPoint",
    "PermutationSpec",
    "ZipMatrices",
    "activation_matching",
    "align_models",
    "apply_permutation",
    "declare_spec",
    "evaluate",
    "interpolate",
    "linear_path",
    "match_activations",
    "match_weights",
    "merge_aligned",
    "partial_zip",
    "permutation_spec",
    "plot_paths",
    "repair",
    "reset_batchnorm",
    "weight_matching",
    "zip_matrices",
    "zip_models",
    "zipit",
]
