"""Multiple-choice scoring of causal language models by log-likelihood, as lm-evaluation-harness's ``acc``.

Each choice is scored by the sum of the log-probabilities of its tokens given the prompt; the prediction
is the choice of highest sum (:func:`choice_accuracy`). The tokenisation boundary is handled as
lm-evaluation-harness does it, made exact: the prompt and ``prompt + choice`` are tokenised on their
own, and the tokens of ``prompt + choice`` after their longest common prefix with the prompt's tokens
are the ones scored (so a token spanning the boundary is scored, and the context is always the real
tokenisation of the text before it).

Sequences are right-padded with an attention mask and run in batches in inference mode. An input
sequence is shared by the choices it serves: with one-token choices (``" yes"`` / ``" no"``) each
example costs a single forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from unimerge.data.choices import ChoiceTask

__all__ = ["choice_accuracy", "choice_correct", "choice_logliks", "choice_predictions", "continuation"]


def continuation(prompt_ids: Sequence[int], full_ids: Sequence[int]) -> int:
    """Where the scored tokens of ``full_ids`` start: after its longest common prefix with
    ``prompt_ids``, and never at 0 (the first token has no context to be scored in) nor past its end."""
    start = 0
    for a, b in zip(prompt_ids, full_ids, strict=False):
        if a != b:
            break
        start += 1
    return max(1, min(start, len(full_ids) - 1))


@dataclass
class _Request:
    """One input sequence and the (example, choice, first target position) it scores."""

    inputs: tuple[int, ...]
    targets: list[tuple[int, int, int, tuple[int, ...]]]  # (example, choice, start, scored tokens)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _requests(tokenizer: Any, prompts: Sequence[str], choices: Sequence[Sequence[str]]) -> list[_Request]:
    """Unique input sequences (``prompt + choice`` without its last token) with what each scores."""
    by_inputs: dict[tuple[int, ...], _Request] = {}
    for i, (prompt, options) in enumerate(zip(prompts, choices, strict=True)):
        p_ids = _ids(tokenizer, prompt)
        for j, option in enumerate(options):
            full = _ids(tokenizer, prompt + option)
            start = continuation(p_ids, full)
            key = tuple(full[:-1])
            req = by_inputs.setdefault(key, _Request(key, []))
            req.targets.append((i, j, start, tuple(full[start:])))
    return sorted(by_inputs.values(), key=lambda r: len(r.inputs))


def _batch(requests: Sequence[_Request], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-padded input ids and attention mask, (batch, longest)."""
    longest = max(len(r.inputs) for r in requests)
    ids = torch.full((len(requests), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(requests), longest), dtype=torch.long)
    for row, r in enumerate(requests):
        ids[row, : len(r.inputs)] = torch.tensor(r.inputs)
        mask[row, : len(r.inputs)] = 1
    return ids.to(device), mask.to(device)


def _score(logits: Tensor, requests: Sequence[_Request], out: list[list[float]]) -> None:
    """Add each target's summed log-probability to ``out``; ``logits`` is (batch, longest, vocab)."""
    for row, r in enumerate(requests):
        for example, choice, start, tokens in r.targets:
            positions = torch.arange(start - 1, start - 1 + len(tokens))  # logits at t predict token t + 1
            logp = torch.log_softmax(logits[row, positions].float(), dim=-1)  # (n_tokens, vocab)
            picked = logp.gather(1, torch.tensor(tokens, device=logp.device).unsqueeze(1))
            out[example][choice] = float(picked.sum())


def choice_logliks(
    model: Any, tokenizer: Any, prompts: Sequence[str], choices: Sequence[Sequence[str]], batch_size: int = 16
) -> list[list[float]]:
    """The summed log-probability of each choice's tokens given its prompt.

    Args:
        model: a causal LM: ``model(input_ids=..., attention_mask=...).logits`` is (batch, seq, vocab).
        tokenizer: a Hugging Face tokenizer (``tokenizer(text)["input_ids"]``).
        prompts: one prompt per example.
        choices: per example, its choices (continuations of the prompt, e.g. ``" yes"``).
        batch_size: input sequences per forward pass.

    Returns:
        ``out[i][j]``: log p(choice j of example i | prompt i), summed over the choice's tokens.
    """
    out = [[0.0] * len(options) for options in choices]
    requests = _requests(tokenizer, prompts, choices)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for at in range(0, len(requests), batch_size):
            chunk = requests[at : at + batch_size]
            ids, mask = _batch(chunk, pad, device)
            _score(model(input_ids=ids, attention_mask=mask).logits, chunk, out)
    return out


def choice_predictions(model: Any, tokenizer: Any, task: ChoiceTask, batch_size: int = 16) -> list[int]:
    """The index of the most likely choice of each example (the first of ties)."""
    scores = choice_logliks(model, tokenizer, task.prompts, task.choices, batch_size)
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def choice_correct(model: Any, tokenizer: Any, task: ChoiceTask, batch_size: int = 16) -> list[bool]:
    """Per example, whether the most likely choice is the answer."""
    preds = choice_predictions(model, tokenizer, task, batch_size)
    return [p == a for p, a in zip(preds, task.answers, strict=True)]


def choice_accuracy(model: Any, tokenizer: Any, task: ChoiceTask, batch_size: int = 16) -> float:
    """The share of examples whose most likely choice (summed log-likelihood) is the answer."""
    correct = choice_correct(model, tokenizer, task, batch_size)
    return sum(correct) / len(correct)
