"""``align:`` in a merge config: permute every model into the reference's basis, then merge as usual.

:func:`run_aligned_merge` (what ``unimerge merge`` runs for a config with ``align:``) plans the merge
from the inputs' headers first (every name, shape and parameter checked), then, for each model but the
reference:

1. builds its class from ``config.json`` with transformers (never remote code) and loads its tensors;
2. finds the permutation groups by walking the modules (:func:`~unimerge.align.modules.transformer_spec`:
   MLP hidden units and attention heads; ``torch.fx`` cannot trace transformers models);
3. weight matching (:func:`~unimerge.align.matching.match_weights`) towards the reference;
4. checks the permuted model computes what the model did on ``align.inputs`` (default: random token
   ids), and refuses the model otherwise.

The configured method then runs unchanged through the streaming engine, reading the permuted tensors
from memory (:class:`AlignedCheckpoint`) and every other tensor from disk. Alignment holds one whole
model in memory at a time (float32) plus the permuted tensors of every aligned model: it is for models
that fit in RAM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unimerge.align.matching import apply_permutation, match_weights
from unimerge.align.modules import Heads, transformer_spec
from unimerge.align.spec import PermutationSpec
from unimerge.alignconfig import AlignSpec
from unimerge.config import MergeConfig, load_config, parse_config
from unimerge.errors import AlignError, ConfigError
from unimerge.execute import run_plan
from unimerge.io import Checkpoint, resolve_ref
from unimerge.io.atomic import exists_error
from unimerge.io.writer import format_size
from unimerge.options import Check, MergeResult, Progress, RunOptions
from unimerge.plan import MergePlan, make_plan

__all__ = ["AlignedCheckpoint", "check_aligned_merge", "has_align", "load_model", "run_aligned_merge"]

ConfigLike = MergeConfig | str | Path | Mapping[str, Any]
DECLARE_HINT = (
    "align it in Python with a declared spec instead: spec = unimerge.align.declare_spec({'h1': "
    "[('fc1.weight', 0), ('fc1.bias', 0), ('fc2.weight', 1)], ...}, model.state_dict()); aligned = "
    "unimerge.align.weight_matching(reference, model, example_inputs, spec=spec); then merge the aligned state dicts "
    "with unimerge.merge_state_dicts (see docs/align.md)"
)


class AlignedCheckpoint(Checkpoint):
    """``inner`` with some tensors replaced by permuted copies held in memory (same names, shapes, dtypes)."""

    def __init__(self, inner: Checkpoint, permuted: Mapping[str, Tensor]) -> None:
        super().__init__(inner.ref, inner.root, inner.tensors())
        self.inner, self.permuted = inner, dict(permuted)

    def files(self) -> list[Path]:
        return self.inner.files()

    def read(self, name: str) -> Tensor:
        t = self.permuted.get(name)
        return t.clone() if t is not None else self.inner.read(name)

    def read_into(self, name: str, out: Tensor) -> None:
        t = self.permuted.get(name)
        if t is None:
            self.inner.read_into(name, out)
        else:
            out.copy_(t)

    def close(self) -> None:
        self.inner.close()


def _config(config: ConfigLike) -> tuple[MergeConfig, Path | None]:
    if isinstance(config, MergeConfig):
        return config, None
    if isinstance(config, (str, Path)):
        return load_config(config), Path(config).resolve().parent
    return parse_config(dict(config)), None


def has_align(config: ConfigLike) -> bool:
    """Whether the config has an ``align:`` section (validates the whole config)."""
    return _config(config)[0].align is not None


def _cannot(ref: str, why: str) -> AlignError:
    return AlignError(
        f"Cannot align {ref}: {why}. `align:` in a config works for Hugging Face folders whose config.json "
        f"transformers can build without remote code, with safetensors weights; {DECLARE_HINT}."
    )


def _build(ck: Checkpoint) -> nn.Module:
    """The class named in ``ck``'s ``config.json`` (``AutoModel`` if it names none), randomly initialised."""
    if not (ck.root / "config.json").is_file():
        raise _cannot(ck.ref, f"it has no config.json in {ck.root}, so its class cannot be built")
    try:
        import transformers
    except ImportError:
        raise AlignError(
            "`align:` builds each model with transformers, which is not installed: pip install transformers."
        ) from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(ck.root), trust_remote_code=False)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            model: Any = cls(config)
        else:
            model = transformers.AutoModel.from_config(config, trust_remote_code=False)
    except Exception as err:  # transformers raises many types for a config it cannot build
        first = str(err).splitlines()[0] if str(err) else "no message"
        raise _cannot(
            ck.ref, f"transformers cannot build it from config.json ({type(err).__name__}: {first})"
        ) from None
    if not isinstance(model, nn.Module):
        raise _cannot(ck.ref, f"config.json built a {type(model).__name__}, not a torch module")
    return model.to(torch.float32).eval()


def load_model(ck: Checkpoint) -> nn.Module:
    """``ck``'s model built from its ``config.json`` with its tensors loaded (float32, eval mode).

    Raises:
        AlignError: transformers cannot build it, or its tensors do not fit the built model.
    """
    model = _build(ck)
    own = model.state_dict()
    names = set(ck.tensors())
    extra = sorted(names - set(own))
    if extra:
        raise _cannot(
            ck.ref, f"tensors {extra[:3]} are not in the {type(model).__name__} its config.json builds"
        )
    loaded = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in names}
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) not in loaded]
    if missing:
        raise _cannot(
            ck.ref, f"it lacks the parameters {missing[:3]} of the {type(model).__name__} it builds"
        )
    with torch.no_grad():
        for name, meta in ck.tensors().items():
            if tuple(own[name].shape) != tuple(meta.shape):
                raise _cannot(
                    ck.ref, f"tensor {name!r} has shape {list(meta.shape)}, the model {list(own[name].shape)}"
                )
            own[name].copy_(ck.read(name))
    return model


def _heads(model: nn.Module) -> Heads | None:
    config = getattr(model, "config", None)
    n, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    kv = getattr(config, "num_key_value_heads", None) or n
    dim = getattr(config, "head_dim", None) or (
        hidden // n if isinstance(hidden, int) and isinstance(n, int) and n else None
    )
    if isinstance(n, int) and isinstance(kv, int) and isinstance(dim, int) and min(n, kv, dim) > 0:
        return Heads(n, kv, dim)
    return None


def model_spec(model: nn.Module, ck: Checkpoint) -> PermutationSpec:
    """The module-walk spec of ``model`` (``ck``'s), refused when it finds nothing to permute."""
    spec = transformer_spec(model, _heads(model))
    if not spec.groups:
        raise _cannot(
            ck.ref,
            f"no MLP or attention layer of {type(model).__name__} matches the layouts unimerge.align knows",
        )
    spec.check(model.state_dict())
    return spec


def example_inputs(spec: AlignSpec, model: nn.Module, ck: Checkpoint) -> tuple[Tensor, ...]:
    """``align.inputs`` as model inputs; default: 2 x 16 random token ids from the model's vocabulary."""
    gen = torch.Generator().manual_seed(spec.seed)
    if spec.inputs is not None and spec.inputs.shape is not None:
        return (torch.randn(spec.inputs.shape, generator=gen),)
    if spec.inputs is not None and spec.inputs.text is not None:
        return (_tokenize(ck, spec.inputs.text),)
    config = getattr(model, "config", None)
    vocab, positions = getattr(config, "vocab_size", None), getattr(config, "max_position_embeddings", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise ConfigError(
            f"{ck.ref}'s config.json has no vocab_size, so alignment cannot make token inputs to check the "
            "aligned models with: give `align: {inputs: {shape: [1, 3, 32, 32]}}` (the model's input shape)."
        )
    length = min(16, positions) if isinstance(positions, int) and positions > 0 else 16
    return (torch.randint(vocab, (2, length), generator=gen),)


def _tokenize(ck: Checkpoint, text: str) -> Tensor:
    try:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(str(ck.root), trust_remote_code=False)
        ids = tok(text, return_tensors="pt")["input_ids"]
    except Exception as err:  # missing or unreadable tokenizer files, transformers missing
        raise ConfigError(
            f"Cannot tokenize align.inputs.text with the tokenizer in {ck.root} ({type(err).__name__}: {err}); "
            "give `inputs: {shape: [...]}` instead, or add the tokenizer files to the reference's folder."
        ) from None
    return ids if isinstance(ids, Tensor) else torch.as_tensor(ids)


def _tensors(out: Any) -> list[Tensor]:
    """Every tensor in a model's output (a ModelOutput, tuple, list or dict; caches are skipped)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _run(model: nn.Module, inputs: Sequence[Tensor], ref: str) -> list[Tensor]:
    try:
        with torch.no_grad():
            outs = _tensors(model(*inputs))
    except Exception as err:  # any forward failure: the inputs do not fit the model
        raise ConfigError(
            f"Cannot run {ref} on the alignment inputs ({type(err).__name__}: {str(err)[:200]}); give "
            "`align.inputs` that fit the model: `shape: [...]` (float inputs) or `text: ...` (tokenized)."
        ) from None
    if not outs:
        raise _cannot(ref, f"its {type(model).__name__} returns no tensor to check the permutation with")
    return outs


def _check_same(before: Sequence[Tensor], after: Sequence[Tensor], model: nn.Module, ref: str) -> None:
    for a, b in zip(before, after, strict=True):
        err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        if not err <= 1e-4 * max(1.0, a.abs().max().item() if a.numel() else 0.0):
            raise _cannot(
                ref,
                f"the permutation of its MLP units and attention heads changes what its {type(model).__name__} "
                f"computes (outputs differ by {err:.3g}), so the layout read from its module names does not fit",
            )


def align_checkpoint(
    ck: Checkpoint,
    reference: Mapping[str, Tensor],
    spec: PermutationSpec,
    inputs: Sequence[Tensor],
    options: AlignSpec,
) -> AlignedCheckpoint:
    """``ck`` with its spec tensors permuted into ``reference``'s basis by weight matching, after checking
    the permuted model computes what the model did on ``inputs``."""
    model = load_model(ck)
    state = model.state_dict()
    spec.check(state)
    perms = match_weights(spec, reference, state, seed=options.seed, max_sweeps=options.max_sweeps)
    before = _run(model, inputs, ck.ref)
    names = list(spec.axes_of())
    permuted = apply_permutation(spec, {n: state[n] for n in names}, perms)
    with torch.no_grad():
        for n in names:
            state[n].copy_(permuted[n])
    _check_same(before, _run(model, inputs, ck.ref), model, ck.ref)
    stored = apply_permutation(spec, {n: ck.read(n) for n in names}, perms)  # in the stored dtype
    return AlignedCheckpoint(ck, stored)


def _reference_index(cfg: MergeConfig, plan: MergePlan, config_dir: Path | None) -> int:
    assert cfg.align is not None
    ref = cfg.align.reference or cfg.base_model or cfg.expert_refs()[0]
    target = resolve_ref(ref, config_dir)
    return next(i for i, ck in enumerate(plan.checkpoints) if ck.ref == target)


def align_plan(
    plan: MergePlan, config_dir: Path | None, progress: Progress | None = None
) -> tuple[int, PermutationSpec]:
    """Replace every checkpoint of ``plan`` but the reference's by its aligned copy; returns the
    reference's index and the spec used."""
    cfg = plan.config
    assert cfg.align is not None
    r = _reference_index(cfg, plan, config_dir)
    model = load_model(plan.checkpoints[r])
    spec = model_spec(model, plan.checkpoints[r])
    inputs = example_inputs(cfg.align, model, plan.checkpoints[r])
    own = model.state_dict()
    reference = {n: own[n] for n in spec.axes_of()}
    del model, own
    todo = [i for i in range(len(plan.checkpoints)) if i != r]
    for done, i in enumerate(todo):
        if progress is not None:
            progress("aligning (weight matching)", done, len(todo))
        plan.checkpoints[i] = align_checkpoint(plan.checkpoints[i], reference, spec, inputs, cfg.align)
    if progress is not None:
        progress("aligning (weight matching)", len(todo), len(todo))
    return r, spec


def _load(config: ConfigLike) -> tuple[MergeConfig, Path | None]:
    cfg, cdir = _config(config)
    if cfg.align is None:
        raise ConfigError("This config has no `align:` section; run it with unimerge.run_merge.")
    for ref in cfg.expert_refs() + ([cfg.base_model] if cfg.base_model else []):
        if (Path(resolve_ref(ref, cdir)) / "adapter_config.json").is_file():
            raise ConfigError(
                f"`align:` permutes whole models and cannot align the PEFT adapter {ref!r}; merge each "
                "adapter into its base first (a full model folder), then align those."
            )
    return cfg, cdir


def run_aligned_merge(
    config: ConfigLike,
    out_dir: str | Path,
    options: RunOptions = RunOptions(),
    progress: Progress | None = None,
) -> MergeResult:
    """Check, align and merge a config with ``align:``; the output appears only when complete.

    Example:
        >>> run_aligned_merge("aligned.yaml", "out/")
    """
    cfg, cdir = _load(config)
    out = Path(out_dir)
    if out.exists() and not options.force:
        raise exists_error(out)
    plan = make_plan(cfg, out, config_dir=cdir, allow_pickle=options.allow_pickle)
    try:
        align_plan(plan, cdir, progress)
    except BaseException:
        for ck in plan.checkpoints:
            ck.close()
        raise
    return run_plan(plan, out, options, progress)


def check_aligned_merge(config: ConfigLike, out_dir: str | Path, options: RunOptions = RunOptions()) -> Check:
    """The checks of a merge (headers) plus the reference's build and spec; no matching is run."""
    cfg, cdir = _load(config)
    plan = make_plan(cfg, Path(out_dir), config_dir=cdir, allow_pickle=options.allow_pickle)
    try:
        r = _reference_index(cfg, plan, cdir)
        spec = model_spec(load_model(plan.checkpoints[r]), plan.checkpoints[r])
        s = plan.summary(options.memory_budget)
        rows = [("method", f"{plan.method.name} ({plan.method.family})")]
        rows += [("reference" if i == r else "aligned", ck.ref) for i, ck in enumerate(plan.checkpoints)]
        kinds = [g.rpartition(":")[2] for g in spec.groups]
        rows += [
            (
                "alignment",
                f"weight matching: {kinds.count('mlp')} MLP groups, {kinds.count('heads')} head groups",
            ),
            ("tensors", str(s["tensors"])),
            ("bytes to read", format_size(s["bytes_read"])),
            ("bytes to write", format_size(s["bytes_written"])),
        ]
        return Check(rows, list(plan.warnings))
    finally:
        for ck in plan.checkpoints:
            ck.close()
