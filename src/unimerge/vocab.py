"""Merging models whose vocabularies differ: mergekit's ``tokenizer_source`` and ``tokenizer:`` section
(:class:`TokenizerSpec`, read by :mod:`unimerge.config`).

The output vocabulary is the ``union`` of every model's tokens (the base's first, with their ids), the
``base``'s, or one model's; ``tokenizer.tokens`` adds tokens and says where their rows come from. Each
vocabulary tensor (embeddings, ``lm_head``: :func:`is_vocab_tensor`) of every input is gathered into the
output's token order *before* the method runs on it, one tensor at a time, as mergekit 0.1.5 does
(``mergekit/tokenizer/embed.py::PermutedVocabulary``):

- a token every model has: each model's own row;
- else a *default row* stands in for the models lacking it: the one model that has it (its row), else the
  base's row when the base is among the tensor's inputs and has it, else the mean of the rows that have
  it; a token no model has gets zeros. A ``tokens:`` entry sets the default instead (a model's row for
  the token, ``{kind: zero}``, or ``{kind: model_token, ...}``); with ``force`` every model takes it;
- rows past the vocabulary (``pad_to_multiple_of``) are each model's mean row.

:func:`plan_vocabulary` reads the tokenizers (small files) at plan time and checks everything it can;
:class:`RowMap` is one tensor's gather, and :func:`gather_rows` applies it (pure torch).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from unimerge.errors import CheckpointError, ConfigError, PlanError
from unimerge.io import Checkpoint, resolve_ref
from unimerge.io.tokenizer import (
    Tokenizer,
    config_vocab_size,
    copy_tokenizer,
    load_tokenizer,
    strip_tokenizer,
    union_tokenizer,
)

__all__ = [
    "ModelTokenSource",
    "RowMap",
    "TokenSpec",
    "TokenizerSpec",
    "VocabPlan",
    "ZeroSource",
    "gather_rows",
    "is_vocab_tensor",
    "plan_vocabulary",
]

# mergekit's architecture files mark these with `vocabulary_axis: 0` (llama, mistral, qwen2, gemma,
# gpt2, gpt-neox, phi, bert, roberta, distilbert, t5, mamba, chatglm, internlm2, ...).
_VOCAB_TENSOR = re.compile(
    r"(?:^|\.)(?:embed_tokens|tok_embeddings|word_embeddings|wte|embed_in|embed_out|vocab_projector|"
    r"output_layer|lm_head(?:\.linear|\.decoder)?|cls\.predictions(?:\.decoder)?)\.(?:weight|bias)$"
    r"|^(?:output|shared|backbone\.embeddings)\.weight$"
)
_KNOWN = "embed_tokens, tok_embeddings, word_embeddings, wte, embed_in, embed_out, lm_head, output, shared"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ZeroSource(_Strict):
    """A token's embedding row is zeros (``source: {kind: zero}``)."""

    kind: Literal["zero"] = Field(description="`zero`.")


class ModelTokenSource(_Strict):
    """A token's embedding row is a given row of one model (``source: {kind: model_token, ...}``)."""

    kind: Literal["model_token"] = Field(description="`model_token`.")
    model: str = Field(min_length=1, description="The model whose row is taken (as written in the config).")
    token_id: int | None = Field(default=None, ge=0, description="The row's index in that model.")
    token: str | None = Field(
        default=None, description="Or: the token whose row it is, in that model's vocabulary."
    )

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of `token_id` or `token`")
        return self


class TokenSpec(_Strict):
    """Where one token's embedding and ``lm_head`` rows come from (mergekit's ``tokens:`` entries)."""

    source: ModelTokenSource | ZeroSource | str | None = Field(
        default=None,
        description="A model of the config (its row for this token), `{kind: zero}`, or `{kind: model_token, "
        "model, token_id | token}`. Used for models lacking the token (all models with `force`).",
    )
    force: bool = Field(
        default=False, description="Use `source` for every model, even those that have the token."
    )


class TokenizerSpec(_Strict):
    """The output vocabulary (mergekit's ``tokenizer:`` section); see docs/merging.md#vocabularies."""

    source: str = Field(
        default="union",
        min_length=1,
        description="`union` (every model's tokens, the base's first), `base`, or a model (its tokenizer).",
    )
    tokens: dict[str, TokenSpec] | None = Field(
        default=None, description="Tokens to add (when missing) and where their rows come from."
    )
    pad_to_multiple_of: int | None = Field(
        default=None,
        ge=1,
        le=2**20,
        description="Pad the vocabulary rows to a multiple of this; padding rows are each model's mean row.",
    )


def is_vocab_tensor(name: str) -> bool:
    """Whether tensor ``name`` has one row per token (axis 0), by mergekit's architecture names."""
    return _VOCAB_TENSOR.search(name) is not None


@dataclass(frozen=True, eq=False)
class RowMap:
    """How the inputs of one vocabulary tensor are gathered into the output vocabulary.

    ``own[j, t]`` is the row of input ``j`` (checkpoint ``models[j]``) that output token ``t`` takes, or -1
    where it takes the token's default row: the mean of rows ``pick[:, t]`` (-1: not used; none: zeros).
    """

    models: tuple[int, ...]
    size: int  # output rows, padding included
    own: Tensor  # (k, n_tokens) long
    pick: Tensor  # (k, n_tokens) long
    has_default: Tensor  # (n_tokens,) bool

    @property
    def n_tokens(self) -> int:
        return int(self.own.shape[1])


def gather_rows(rows: RowMap, tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each input's tensor (``tensors[j]`` of checkpoint ``rows.models[j]``, vocabulary on axis 0) with
    ``rows.size`` rows in the output's token order (see the module docstring for the rules)."""
    n, rest = rows.n_tokens, tuple(tensors[0].shape[1:])
    acc = tensors[0].new_zeros((n, *rest))  # default rows: sum of picked rows, input by input
    for j, t in enumerate(tensors):
        sel = rows.pick[j] >= 0
        acc[sel] += t[rows.pick[j][sel]]
    count = (rows.pick >= 0).sum(0).clamp(min=1).to(acc.dtype)
    default = acc / count.view(n, *([1] * len(rest)))
    out = []
    for j, t in enumerate(tensors):
        o = t.new_zeros((rows.size, *rest))
        mine = rows.own[j] >= 0
        o[:n][mine] = t[rows.own[j][mine]]
        fill = ~mine & rows.has_default
        o[:n][fill] = default[fill]
        if rows.size > n:  # padding: the mean row (https://nlp.stanford.edu/~johnhew/vocab-expansion.html)
            o[n:] = o[:n].mean(0)
        out.append(o)
    return out


@dataclass
class VocabPlan:
    """The output tokenizer and what every input's vocabulary holds, from the tokenizers alone."""

    tokenizer: Tokenizer
    vocab: dict[str, int]  # output token -> id (0 .. n - 1)
    size: int  # output rows: len(vocab), padded to `pad_to_multiple_of`
    vocabs: list[dict[str, int]]  # per checkpoint: token -> row (below that model's vocab_size)
    names: frozenset[str]  # the vocabulary tensors
    base: int | None
    refs: list[str]
    tokens: dict[str, TokenSpec]
    warnings: list[str] = field(default_factory=list)
    _maps: dict[tuple[int, ...], RowMap] = field(default_factory=dict)

    def row_map(self, models: tuple[int, ...]) -> RowMap:
        """The gather of a tensor whose inputs are checkpoints ``models`` (cached per tuple)."""
        if models not in self._maps:
            self._maps[models] = self._build(models)
        return self._maps[models]

    def _build(self, models: tuple[int, ...]) -> RowMap:
        by_id = sorted(self.vocab, key=self.vocab.__getitem__)
        have = torch.tensor(
            [[self.vocabs[m].get(t, -1) for t in by_id] for m in models], dtype=torch.long
        )  # (k, n)
        present = have >= 0
        n_have = present.sum(0)
        pick = have.clone()
        if self.base in models:  # a token some models lack: the base's row when it has one
            b = models.index(self.base)
            use_base = (n_have >= 2) & present[b]
            pick[:, use_base] = -1
            pick[b, use_base] = have[b, use_base]
        own, has_default = have.clone(), ~present.all(0)
        lost = [t for t, k in zip(by_id, n_have.tolist(), strict=True) if k == 0 and t not in self.tokens]
        if lost:
            self.warnings.append(
                f"{len(lost)} tokens are in no model's vocabulary; their rows are zeros: {lost[:8]}"
            )
        for token, spec in self.tokens.items():
            tid = self.vocab[token]
            if spec.force:
                own[:, tid] = -1
                has_default[tid] = True
            if spec.force or not bool(present[:, tid].all()):
                pick[:, tid] = self._user_pick(token, spec, models, have[:, tid])
        return RowMap(models, self.size, own, pick, has_default)

    def _user_pick(self, token: str, spec: TokenSpec, models: tuple[int, ...], have: Tensor) -> Tensor:
        """``pick[:, t]`` of a ``tokens:`` entry."""
        where = f"tokenizer.tokens[{token!r}]"
        out = torch.full((len(models),), -1, dtype=torch.long)
        src = spec.source
        if isinstance(src, ZeroSource):
            return out
        if src is None:
            lacking = [self.refs[m] for m, h in zip(models, have.tolist(), strict=True) if h < 0]
            raise ConfigError(
                f"{where}: {'`force`' if spec.force else f'{lacking} lack the token, and'} needs a `source:` "
                "(a model of the config, `{kind: zero}` or `{kind: model_token, model: M, token: T}`)"
            )
        ref = src.model if isinstance(src, ModelTokenSource) else src
        m = self._index(ref, where)
        if m not in models:
            raise ConfigError(
                f"{where}: source model {ref!r} is not an input of this merge's vocabulary tensors"
            )
        if isinstance(src, ModelTokenSource):
            row = self._source_row(src, m, where)
        else:
            row = self.vocabs[m].get(token, -1)
            if row < 0:
                raise ConfigError(
                    f"{where}: source model {ref!r} has no token {token!r}; pick another source"
                )
        out[models.index(m)] = row
        return out

    def _source_row(self, src: ModelTokenSource, m: int, where: str) -> int:
        if src.token is not None:
            if src.token not in self.vocabs[m]:
                raise ConfigError(f"{where}: model {src.model!r} has no token {src.token!r}")
            return self.vocabs[m][src.token]
        limit = 1 + max(self.vocabs[m].values(), default=-1)
        if src.token_id is None or src.token_id >= limit:
            raise ConfigError(
                f"{where}: token_id {src.token_id} is out of range for {src.model!r} (< {limit})"
            )
        return src.token_id

    def _index(self, ref: str, where: str) -> int:
        if ref not in self.refs:
            raise ConfigError(f"{where}: {ref!r} is not a model of the config ({self.refs}); use one of them")
        return self.refs.index(ref)


def plan_vocabulary(
    spec: TokenizerSpec,
    cks: Sequence[Checkpoint],
    refs: Sequence[str],
    base: int | None,
    config_dir: Path | None,
) -> VocabPlan:
    """Read every input's tokenizer, build the output one, and check the vocabulary tensors.

    ``refs[i]`` is checkpoint ``cks[i]`` as the config names it; ``base`` its index (``None``: the
    first model stands in, as in mergekit).

    Raises:
        ConfigError: an unknown ``source``, or a ``tokens:`` entry that cannot be satisfied.
        CheckpointError: a model folder without a readable tokenizer.
        PlanError: tensors whose vocabulary rows cannot be told apart from other tensors.
    """
    ref0 = base if base is not None else 0
    limits = [config_vocab_size(ck.root) for ck in cks]
    toks = [load_tokenizer(ck.root, r) for ck, r in zip(cks, refs, strict=True)]
    toks[ref0] = strip_tokenizer(toks[ref0], limits[ref0] or len(toks[ref0].get_vocab()), refs[ref0])
    sizes = [lim or len(t.get_vocab()) for lim, t in zip(limits, toks, strict=True)]
    out = _output_tokenizer(spec.source, toks, sizes, ref0, list(refs), cks, config_dir)
    for token in spec.tokens or {}:
        if token not in out.get_vocab():
            out.add_tokens(token)
    vocab = dict(out.get_vocab())
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise PlanError(
            f"The output tokenizer's ids are not 0..{len(vocab) - 1}; it cannot index embedding rows."
        )
    pad = spec.pad_to_multiple_of or 1
    vocabs = [{t: i for t, i in tok.get_vocab().items() if i < n} for tok, n in zip(toks, sizes, strict=True)]
    names = _vocab_names(cks, refs, vocabs, vocab)
    return VocabPlan(
        out, vocab, -(-len(vocab) // pad) * pad, vocabs, names, base, list(refs), dict(spec.tokens or {})
    )


def _output_tokenizer(
    source: str,
    toks: list[Tokenizer],
    sizes: list[int],
    ref0: int,
    refs: list[str],
    cks: Sequence[Checkpoint],
    config_dir: Path | None,
) -> Tokenizer:
    if source == "union":
        order = [ref0, *(i for i in range(len(toks)) if i != ref0)]
        return union_tokenizer(toks[ref0], [(toks[i], sizes[i]) for i in order])
    if source == "base":
        return copy_tokenizer(toks[ref0])
    if source in refs:
        return load_tokenizer(cks[refs.index(source)].root, source)
    try:
        folder = Path(resolve_ref(source, config_dir))
    except CheckpointError:
        raise ConfigError(
            f"tokenizer source {source!r} is not `union`, `base`, a model of the config ({refs}) or a folder; "
            "use one of those"
        ) from None
    return load_tokenizer(folder if folder.is_dir() else folder.parent, source)


def _vocab_names(
    cks: Sequence[Checkpoint],
    refs: Sequence[str],
    vocabs: Sequence[Mapping[str, int]],
    out: Mapping[str, int],
) -> frozenset[str]:
    """The vocabulary tensors, checked: each has a row for every token of its model, and no other
    tensor's first dimension differs between the inputs (that would be a vocabulary tensor not recognised).
    """
    metas = [ck.tensors() for ck in cks]
    names = frozenset(n for m in metas for n in m if is_vocab_tensor(n))
    for ref, meta, voc in zip(refs, metas, vocabs, strict=True):
        need = 1 + max(voc.values(), default=-1)
        short = [
            f"{n} {list(meta[n].shape)}" for n in sorted(names & set(meta)) if meta[n].shape[:1] < (need,)
        ]
        if short:
            raise PlanError(
                f"{ref}: vocabulary tensors {short} have fewer rows than its tokenizer's {need} tokens."
            )
    unknown = sorted(
        n for n in {n for m in metas for n in m} - names if len({m[n].shape for m in metas if n in m}) > 1
    )
    same = all(dict(v) == dict(out) for v in vocabs)
    if unknown or (not names and not same):
        sized = sorted(n for n, t in metas[0].items() if t.shape[:1] == (len(vocabs[0]),))
        raise PlanError(
            "Merging vocabularies: could not identify these tensors as vocabulary tensors (one row per "
            f"token), yet their shapes differ between the inputs: {unknown or sized}. unimerge recognises "
            f"names ending in {_KNOWN} (+ .weight/.bias), as mergekit's architectures. Rename them, or merge "
            "models that share one vocabulary without `tokenizer_source:`."
        )
    return names
