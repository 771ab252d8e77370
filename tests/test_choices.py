"""Multiple-choice tasks: the JSONL reader's checks, and log-likelihood scoring against a hand loop.

The scoring tests build a tiny random LlamaForCausalLM and a word-level tokenizer offline; each choice's
summed log-likelihood from the batched, padded, deduplicated path is compared with ``log_softmax``
taken token by token on the unpadded sequence.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from unimerge.bench.causal import choice_accuracy, choice_correct, choice_logliks, continuation
from unimerge.data import CHOICE_TASKS, ChoiceTask, choice_splits, is_choice_jsonl, read_choice_jsonl
from unimerge.data.choices import write_choice_jsonl
from unimerge.errors import ConfigError

WORDS = (
    "the cat dog sat on a mat rug was happy sad very yes no is it Answer Question : ? . "
    "cats red blue green big small review good bad"
)


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# ---------------------------------------------------------------------------------------- reading


def test_reads_indices_and_texts_and_skips_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.jsonl", [
        {"prompt": "Is it red?", "choices": [" yes", " no"], "answer": 1},
        "",
        {"prompt": "Pick", "choices": [" a", " b", " c"], "answer": " c", "id": 7},
    ])  # fmt: skip
    task = read_choice_jsonl(path, "t.jsonl", "colors")
    assert task == ChoiceTask(
        "colors", ["Is it red?", "Pick"], [[" yes", " no"], [" a", " b", " c"]], [1, 2], "t.jsonl"
    )
    assert is_choice_jsonl(path)
    again = tmp_path / "again.jsonl"
    write_choice_jsonl(task, again)
    assert read_choice_jsonl(again, "again", "colors").answers == task.answers


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (
            {"prompt": "p", "choices": [" a", " b"], "answer": 2},
            r'line 2: "answer" is 2, outside the 2 choices.*index',
        ),
        (
            {"prompt": "p", "choices": [" a", " b"], "answer": "a"},
            r"line 2: \"answer\" 'a' is not one of the choices.*exactly",
        ),
        ({"prompt": "p", "choices": [" a", " b"], "answer": True}, r'line 2: "answer" is true.*Add "answer"'),
        ({"prompt": "p", "choices": [" a", " b"]}, r'line 2: the "answer" key is missing'),
        (
            {"prompt": "p", "choices": [" a"], "answer": 0},
            r'line 2: "choices" is not a list of at least 2.*\[" yes", " no"\]',
        ),
        (
            {"prompt": "p", "choices": [" a", " a"], "answer": 0},
            r"line 2: .*repeats a choice. Make every choice distinct",
        ),
        ({"choices": [" a", " b"], "answer": 0}, r'line 2: the "prompt" key is missing. Add "prompt"'),
        (
            {"prompt": "  ", "choices": [" a", " b"], "answer": 0},
            r'line 2: "prompt" is not a non-empty string',
        ),
        ("{not json", r"line 2: not valid JSON \(.*column 2\). Write one JSON object per line"),
        ("[1, 2]", r"line 2: a JSON list, not an object"),
    ],
)
def test_a_bad_line_names_file_line_problem_and_fix(tmp_path: Path, line: object, match: str) -> None:
    good = {"prompt": "q", "choices": [" x", " y"], "answer": 0}
    path = _write(tmp_path / "bad.jsonl", [good, line, good])
    with pytest.raises(ConfigError, match=r"^shown/bad\.jsonl, " + match) as err:
        read_choice_jsonl(path, "shown/bad.jsonl", "t")
    assert "\n" not in str(err.value)


def test_empty_and_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    empty = _write(tmp_path / "e.jsonl", ["", "  "])
    with pytest.raises(ConfigError, match=r"^e\.jsonl: the choice file holds no examples"):
        read_choice_jsonl(empty, "e.jsonl", "t")
    with pytest.raises(ConfigError, match=r"^missing\.jsonl: cannot read"):
        read_choice_jsonl(tmp_path / "missing.jsonl", "missing.jsonl", "t")
    assert not is_choice_jsonl(empty)
    assert not is_choice_jsonl(tmp_path / "missing.jsonl")
    assert not is_choice_jsonl(_write(tmp_path / "x.jsonl", ["", {"prompt": "p", "label": 1}]))
    assert not is_choice_jsonl(_write(tmp_path / "y.jsonl", ["not json"]))


def test_continuation_starts_after_the_common_prefix() -> None:
    assert continuation([5, 6, 7], [5, 6, 7, 8, 9]) == 3
    assert continuation([5, 6, 7], [5, 6, 70, 8]) == 2  # the last prompt token merged with the choice
    assert continuation([], [5, 6]) == 1  # the first token has no context
    assert continuation([5, 6], [5, 6]) == 1  # never past the last token


# ---------------------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *WORDS.split(" ")])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.5, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def _by_hand(model: torch.nn.Module, tokenizer: object, prompt: str, choice: str) -> float:
    """log p(choice | prompt) on the unpadded sequence, one token at a time."""
    p_ids = tokenizer(prompt)["input_ids"]  # type: ignore[operator]
    ids = tokenizer(prompt + choice)["input_ids"]  # type: ignore[operator]
    start = continuation(p_ids, ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return sum(float(torch.log_softmax(logits[t - 1], -1)[ids[t]]) for t in range(start, len(ids)))


PROMPTS = ["the cat sat on a", "Question : is it red ? Answer :", "review : very good", "the dog was very",
           "the", "it is big and the cat"]  # fmt: skip
CHOICES = [[" mat", " rug", " dog sat"], [" yes", " no"], [" happy", " sad"], [" happy", " sad", " big blue"],
           ["  cat sat", " dog"], ["s", " sat"]]  # fmt: skip


@pytest.fixture(scope="module")
def hand(tiny: tuple[torch.nn.Module, object]) -> list[list[float]]:
    model, tokenizer = tiny
    return [[_by_hand(model, tokenizer, p, c) for c in cs] for p, cs in zip(PROMPTS, CHOICES, strict=True)]


def test_logliks_match_the_hand_loop(tiny: tuple[torch.nn.Module, object], hand: list[list[float]]) -> None:
    model, tokenizer = tiny
    got = choice_logliks(model, tokenizer, PROMPTS, CHOICES, batch_size=3)
    assert [len(row) for row in got] == [len(row) for row in hand]
    assert sum(got, []) == pytest.approx(sum(hand, []), abs=1e-5)
    one_by_one = choice_logliks(model, tokenizer, PROMPTS, CHOICES, batch_size=1)
    assert sum(one_by_one, []) == pytest.approx(sum(got, []), abs=1e-5)
    # "cat" + "s" is the word "cats": the boundary token is scored in its real context ("... the")
    ids = tokenizer(PROMPTS[5] + "s")["input_ids"]  # type: ignore[operator]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    assert got[5][0] == pytest.approx(float(torch.log_softmax(logits[-2], -1)[ids[-1]]), abs=1e-5)


def test_accuracy_is_the_share_of_argmax_answers(
    tiny: tuple[torch.nn.Module, object], hand: list[list[float]]
) -> None:
    model, tokenizer = tiny
    best = [max(range(len(s)), key=s.__getitem__) for s in hand]
    answers = [b if i % 2 else (b + 1) % len(CHOICES[i]) for i, b in enumerate(best)]  # 3 right, 3 wrong
    task = ChoiceTask("t", PROMPTS, CHOICES, answers, "hand")
    assert choice_correct(model, tokenizer, task, batch_size=4) == [bool(i % 2) for i in range(6)]
    assert choice_accuracy(model, tokenizer, task) == pytest.approx(0.5)


@pytest.mark.network
def test_packaged_tasks_are_deterministic_and_short() -> None:
    for name in ("sentiment", "topic"):
        a, b = (
            choice_splits(name, seed=3, n_val=10, n_test=20, n_train=50),
            choice_splits(name, seed=3, n_val=10, n_test=20, n_train=50),
        )
        assert a == b and [len(a[s]) for s in ("train", "val", "test")] == [50, 10, 20]
        assert not set(a["test"].prompts) & set(a["train"].prompts)
        labels = sorted(CHOICE_TASKS[name].labels.values())
        for prompt, options in zip(a["test"].prompts, a["test"].choices, strict=True):
            assert sorted(options) == labels and prompt.endswith(":") and len(prompt.split()) <= 60


def test_the_benchmarks_training_loss_is_the_answers_loglik(
    tiny: tuple[torch.nn.Module, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/lora_suite_llm.py trains on the answer tokens only: its batch's mean loss is minus the
    summed log-likelihood of the right choices over their token count, as scoring sees them."""
    import importlib.util

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))  # it imports lora_suite beside it
    spec = importlib.util.spec_from_file_location("lora_suite_llm", bench / "lora_suite_llm.py")
    assert spec is not None and spec.loader is not None
    llm = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "lora_suite_llm", llm)  # its dataclasses look themselves up there
    spec.loader.exec_module(llm)
    model, tokenizer = tiny
    task = ChoiceTask("t", PROMPTS[:4], CHOICES[:4], [0, 1, 1, 2], "hand")
    rows = llm.encode_answers(tokenizer, task, max_len=64)
    scores = choice_logliks(model, tokenizer, task.prompts, task.choices)
    n_tokens = sum(label != -100 for _, labels in rows for label in labels)
    with torch.no_grad():
        loss = float(model(**llm.collate(rows, pad=0)).loss)
    assert loss == pytest.approx(
        -sum(s[a] for s, a in zip(scores, task.answers, strict=True)) / n_tokens, abs=1e-5
    )
    cut = llm.encode_answers(tokenizer, task, max_len=3)
    assert [ids for ids, _ in cut] == [ids[-3:] for ids, _ in rows]
