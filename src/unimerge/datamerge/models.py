"""The models of a data-aware merge: Hugging Face folders as a body module, per-task heads and features.

Every input is a local Hugging Face folder (``config.json`` plus safetensors, read lazily through
:func:`unimerge.io.open_checkpoint`). ``transformers`` is imported only here and only when a merge
runs; remote code is never trusted. Three kinds of folders:

- ``bench``: an expert of ``unimerge bench`` (``EXPERT/encoder/`` a Hugging Face encoder,
  ``EXPERT/head.safetensors`` its linear head, ``EXPERT/meta.json`` its task); the config may name
  ``EXPERT`` or ``EXPERT/encoder``. Features are the attention-masked mean of the last hidden states,
  as the benchmark trained them.
- ``seqcls``: ``config.json``'s ``architectures`` ends in ``ForSequenceClassification``. The body is
  the model's ``base_model`` and the head its ``classifier``; features are what the model feeds the
  classifier (captured at the classifier's input, so pooling and dropout are the model's own).
- ``plain``: any other folder: no head; features are the masked mean of the last hidden states.

The merged module is the *body*; every expert's tensors are keyed like ``body.state_dict()`` (a
checkpoint's ``{base_model_prefix}.`` prefix, e.g. ``bert.``, is mapped away).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from safetensors.torch import load_file
from torch import Tensor, nn

from unimerge.errors import CheckpointError, ConfigError, PlanError
from unimerge.io import Checkpoint, open_checkpoint, resolve_ref

__all__ = [
    "Body",
    "ClassifierInput",
    "MissingHeads",
    "ModelRef",
    "bench_dirs",
    "build_body",
    "check_models",
    "check_tensors",
    "features_for",
    "file_names",
    "head_classes",
    "load_head",
    "mean_pool",
    "unit_mean_pool",
    "no_heads_error",
    "open_model",
    "read_state",
]

Kind = Literal["plain", "seqcls", "bench"]
Batch = dict[str, Tensor]
Features = Callable[[nn.Module, Batch], Tensor]
_NO_HEADS = (
    "RegMean and RegMean++ need only inputs, not heads (so do SMILE, Twin-Merging and representation "
    "surgery, which read features only); methods that score predictions need experts with heads: "
    "sequence-classification folders (architectures ending in ForSequenceClassification) or "
    "`unimerge bench` experts (encoder/ plus head.safetensors)"
)


@dataclass
class ModelRef:
    """One input folder, opened (headers only)."""

    ref: str  # as written in the config
    folder: Path  # the Hugging Face folder (config.json, weights)
    stats_dir: Path  # where its statistics sidecars go: the folder the config names
    checkpoint: Checkpoint
    kind: Kind
    config: dict[str, Any]
    head_file: Path | None = None  # bench experts
    trained_on: str | None = None  # bench experts: the task in meta.json
    pooling: str = "mean_pool"  # bench experts: what their head reads (meta.json's "features")

    def files(self) -> list[Path]:
        """The weight files (and the head file), for hashes."""
        return [*self.checkpoint.files(), *([self.head_file] if self.head_file else [])]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Cannot read {path}: {err}.") from None
    return data if isinstance(data, dict) else {}


def bench_dirs(path: Path) -> tuple[Path, Path | None]:
    """(Hugging Face folder, bench expert folder or ``None``) for a folder the config names."""
    if (path / "encoder" / "config.json").is_file() and (path / "head.safetensors").is_file():
        return path / "encoder", path
    if path.name == "encoder" and (path.parent / "head.safetensors").is_file():
        return path, path.parent
    return path, None


def _bench_meta(bench: Path) -> dict[str, Any]:
    meta = bench / "meta.json"
    return _read_json(meta) if meta.is_file() else {}


def _trained_on(bench: Path) -> str | None:
    tasks = _bench_meta(bench).get("recipe", {}).get("tasks", [])
    return str(tasks[0]) if len(tasks) == 1 else None


def _kind(config: Mapping[str, Any], bench: Path | None) -> Kind:
    if bench is not None:
        return "bench"
    archs = [str(a) for a in config.get("architectures") or []]
    return "seqcls" if any(a.endswith("ForSequenceClassification") for a in archs) else "plain"


def open_model(ref: str, config_dir: Path | None, allow_pickle: bool = False) -> ModelRef:
    """Resolve and open one input (relative paths against ``config_dir``); headers only.

    Raises:
        ConfigError: an adapter (``BASE+ADAPTER``) reference.
        CheckpointError: missing folder, no ``config.json``, unreadable weights.
    """
    if "+" in ref and not Path(ref).exists():
        raise ConfigError(
            f"{ref!r}: data-aware merges read whole models, not BASE+ADAPTER; merge the adapter into its "
            "base first (e.g. PEFT's merge_and_unload) and name that folder."
        )
    path = Path(resolve_ref(ref, config_dir))
    folder, bench = bench_dirs(path if path.is_dir() else path.parent)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{ref}: no config.json in {folder}. Data-aware merges run the models, so every input must "
            "be a Hugging Face folder with config.json."
        )
    config = _read_json(folder / "config.json")
    ck = open_checkpoint(str(path if path.is_file() else folder), allow_pickle=allow_pickle)
    return ModelRef(
        ref, folder, path if path.is_dir() else path.parent, ck, _kind(config, bench), config,
        head_file=bench / "head.safetensors" if bench else None,
        trained_on=_trained_on(bench) if bench else None,
        pooling=str(_bench_meta(bench).get("features", "mean_pool")) if bench else "mean_pool",
    )  # fmt: skip


def check_models(base: ModelRef, experts: Sequence[ModelRef]) -> None:
    """One architecture (``model_type``), one kind of expert, no folder twice.

    Raises:
        PlanError: naming the models that disagree and the fix.
    """
    types = {m.ref: m.config.get("model_type") for m in (base, *experts)}
    if len(set(types.values())) > 1:
        listed = ", ".join(f"{r}: {t}" for r, t in types.items())
        raise PlanError(
            f"The inputs are different architectures ({listed}). Merge only models of one architecture."
        )
    kinds = {m.kind for m in experts}
    if len(kinds) > 1:
        raise PlanError(
            f"The experts mix kinds ({', '.join(f'{m.ref}: {m.kind}' for m in experts)}); they need one way "
            "to compute features: all sequence-classification folders, all `unimerge bench` experts, or "
            "all plain encoders."
        )
    seen: dict[Path, str] = {}
    for m in experts:
        key = m.stats_dir.resolve()
        if key in seen:
            raise PlanError(f"{seen[key]} and {m.ref} are the same folder; list each expert once.")
        seen[key] = m.ref


@dataclass
class Body:
    """The module that is merged (built from an expert's config), and how tasks are scored on it."""

    module: nn.Module
    prefix: str  # the checkpoints' prefix for the body (``bert``), tried when a name is missing
    shell: nn.Module | None = None  # seqcls: the classification model around the body
    heads: dict[str, nn.Module] = field(default_factory=dict)


def _auto(config_dir: Path, seqcls: bool) -> nn.Module:
    import transformers

    try:
        cfg = transformers.AutoConfig.from_pretrained(config_dir, trust_remote_code=False)
        if seqcls:
            model = transformers.AutoModelForSequenceClassification.from_config(cfg, trust_remote_code=False)
        else:
            model = transformers.AutoModel.from_config(cfg, trust_remote_code=False)
        return cast(nn.Module, model)
    except (ValueError, KeyError, OSError) as err:
        raise CheckpointError(
            f"transformers cannot build the model in {config_dir} from its config.json ({err}). Models "
            "with custom code are not supported."
        ) from None


def build_body(expert: ModelRef) -> Body:
    """The body architecture (random weights; load tensors with :func:`read_state`), in eval mode.

    For ``seqcls`` also the shell around it (its body swapped out) whose ``classifier`` gives heads.

    Raises:
        PlanError: a classification model with parameters between its body and its ``classifier``.
    """
    model = _auto(expert.folder, expert.kind == "seqcls").eval()
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    if expert.kind != "seqcls":
        return Body(_named(model), prefix)
    body, head = model.base_model, getattr(model, "classifier", None)
    if not isinstance(body, nn.Module) or not isinstance(head, nn.Module) or body is model:
        raise PlanError(
            f"{expert.ref}: {type(model).__name__} has no `classifier` module to use as the task head."
        )
    inner = {id(p) for p in (*body.parameters(), *head.parameters())}
    extra = [n for n, p in model.named_parameters() if id(p) not in inner]
    if extra:
        raise PlanError(
            f"{expert.ref}: {type(model).__name__} has parameters between its body and its classifier "
            f"({extra[:4]}), which would not be merged; data-aware merges support classifiers that read "
            "the body's output directly (BERT, RoBERTa, ELECTRA, ...)."
        )
    setattr(model, prefix, nn.Identity())
    return Body(_named(body), prefix, shell=model)


def _named(module: nn.Module) -> nn.Module:
    """``module`` with ``config.architectures`` naming its own class (so its saved config rebuilds it)."""
    config = getattr(module, "config", None)
    if config is not None:
        config = copy.deepcopy(config)
        config.architectures = [type(module).__name__]
        module.config = config
    return module


def file_names(ck: Checkpoint, keys: Sequence[str], prefix: str) -> dict[str, str | None]:
    """Body key -> the checkpoint's name for it (``key`` or ``prefix.key``), ``None`` when absent."""
    names = ck.tensors()
    out: dict[str, str | None] = {}
    for k in keys:
        out[k] = k if k in names else f"{prefix}.{k}" if prefix and f"{prefix}.{k}" in names else None
    return out


def check_tensors(
    model: ModelRef, mapping: Mapping[str, str | None], ref: Mapping[str, Tensor], *, complete: bool = True
) -> None:
    """Every mapped tensor of ``model`` has the body's shape; with ``complete``, none is missing.

    Raises:
        PlanError: naming the model, the tensors and their shapes.
    """
    missing = [k for k, n in mapping.items() if n is None]
    if complete and missing:
        raise PlanError(
            f"{model.ref} lacks {len(missing)} tensors of the model body ({missing[:5]}); all models must "
            "be the same architecture and size."
        )
    metas = model.checkpoint.tensors()
    bad = [
        (k, n) for k, n in mapping.items() if n is not None and tuple(metas[n].shape) != tuple(ref[k].shape)
    ]
    if bad:
        k, n = bad[0]
        raise PlanError(
            f"{model.ref}: tensor {n!r} has shape {list(metas[n].shape)}, the architecture in "
            f"config.json needs {list(ref[k].shape)} ({len(bad)} tensors differ); merge models of one size."
        )


def read_state(model: ModelRef, mapping: Mapping[str, str | None]) -> dict[str, Tensor]:
    """The model's body tensors, keyed like ``body.state_dict()`` (mapped names only)."""
    return {k: model.checkpoint.read(n) for k, n in mapping.items() if n is not None}


def load_head(expert: ModelRef, body: Body) -> nn.Module | None:
    """The expert's task head (eval mode, no gradients), or ``None`` for plain folders."""
    if expert.kind == "bench":
        return _bench_head(expert)
    if expert.kind == "plain" or body.shell is None:
        return None
    return _classifier_head(expert, body.shell)


def _bench_head(expert: ModelRef) -> nn.Module:
    """The linear head a bench expert keeps in ``head_file`` (``weight`` ``(k, d)``, ``bias`` ``(k,)``)."""
    assert expert.head_file is not None
    state = load_file(str(expert.head_file))
    k, d = state["weight"].shape
    head = nn.Linear(d, k)
    head.load_state_dict({"weight": state["weight"].float(), "bias": state["bias"].float()})
    return head.eval().requires_grad_(False)


def _classifier_head(expert: ModelRef, shell: nn.Module) -> nn.Module:
    """A copy of ``shell``'s ``classifier`` holding the expert's ``classifier.*`` tensors."""
    head = copy.deepcopy(shell.get_submodule("classifier"))
    names = expert.checkpoint.tensors()
    state = {}
    for k in head.state_dict():
        name = f"classifier.{k}"
        if name not in names:
            raise PlanError(f"{expert.ref} has no tensor {name!r}; is it a {type(shell).__name__}?")
        state[k] = expert.checkpoint.read(name)
    head.load_state_dict(state)
    return head.eval().requires_grad_(False)


def head_classes(head: nn.Module) -> int:
    """Output size of a head (its last linear layer's ``out_features``)."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features) if linears else 0


def mean_pool(module: nn.Module, batch: Batch) -> Tensor:
    """Attention-masked mean of the last hidden states: ``(b, hidden)``."""
    out = module(**{k: v for k, v in batch.items() if k != "labels"})
    h: Tensor = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (b, t, hidden)
    mask = batch.get("attention_mask")
    if mask is None:
        return h.mean(1)
    m = mask.unsqueeze(-1).to(h.dtype)  # (b, t, 1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class _Grabbed(Exception):
    """Raised at the classifier's input: the features are in hand, the classifier need not run."""


class ClassifierInput:
    """``features(module, batch)``: what a sequence-classification model feeds its ``classifier``,
    computed with ``module`` as its body (pooling and dropout as the model defines them)."""

    def __init__(self, shell: nn.Module, prefix: str) -> None:
        self.shell, self.prefix = shell.eval(), prefix

    @contextlib.contextmanager
    def _body(self, module: nn.Module) -> Iterator[None]:
        setattr(self.shell, self.prefix, module)
        try:
            yield
        finally:
            setattr(self.shell, self.prefix, nn.Identity())

    def __call__(self, module: nn.Module, batch: Batch) -> Tensor:
        grabbed: list[Tensor] = []

        def grab(mod: nn.Module, args: tuple[Tensor, ...]) -> None:
            grabbed.append(args[0])
            raise _Grabbed

        handle = self.shell.get_submodule("classifier").register_forward_pre_hook(grab)
        try:
            with self._body(module), contextlib.suppress(_Grabbed):
                self.shell(**{k: v for k, v in batch.items() if k != "labels"})
        finally:
            handle.remove()
        return grabbed[0]


class MissingHeads(Mapping[str, nn.Module]):
    """The heads of experts that have none: any use raises a :class:`ConfigError` saying which
    methods work without heads."""

    def __init__(self, method: str, refs: Sequence[str]) -> None:
        self.method, self.refs = method, list(refs)

    def _fail(self) -> ConfigError:
        return ConfigError(
            f"Method {self.method!r} needs task heads, but the experts ({', '.join(self.refs)}) are plain "
            f"encoders without one. {_NO_HEADS}."
        )

    def __getitem__(self, key: str) -> nn.Module:
        raise self._fail()

    def __iter__(self) -> Iterator[str]:
        raise self._fail()

    def __len__(self) -> int:
        raise self._fail()


def no_heads_error(method: str, refs: Sequence[str]) -> ConfigError:
    """The error for a method that needs heads when the experts have none."""
    return MissingHeads(method, refs)._fail()


def unit_mean_pool(module: nn.Module, batch: Batch) -> Tensor:
    """:func:`mean_pool` at unit L2 norm: what ``unimerge bench`` experts' heads read (protocol v2)."""
    return nn.functional.normalize(mean_pool(module, batch).float(), dim=-1)


def features_for(expert: ModelRef, body: Body) -> tuple[Features, str]:
    """(features function, its name for sidecar recipes) for experts like ``expert``."""
    if expert.kind == "seqcls" and body.shell is not None:
        return ClassifierInput(body.shell, body.prefix), f"classifier_input:{type(body.shell).__name__}"
    if expert.pooling == "unit_mean_pool":
        return unit_mean_pool, "unit_mean_pool"
    return mean_pool, "mean_pool"
