"""unimerge.io.atomic: all-or-nothing folders and files, with the user's normal permissions.

``atomic_dir``'s three policies for an existing folder (``error``, ``replace``, ``keep``), what a
failing block leaves behind (nothing: no temporary sibling, the old folder untouched), and modes:
under ``umask 022`` everything written is readable by group and others, as any file the user makes
(``tempfile.mkdtemp``/``mkstemp`` would give 0700/0600).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from unimerge.errors import MergeError
from unimerge.io.atomic import atomic_dir, atomic_file, atomic_write_text


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "entry") as tmp:
        (tmp / "f").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "entry") as tmp:
        (tmp / "f").write_text("whole")
    assert (tmp_path / "entry" / "f").read_text() == "whole"


def test_atomic_dir_works_beside_its_final_place_under_a_hidden_name(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "out") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.")
        assert not (tmp_path / "out").exists()  # nothing at the final place until the block ends
    assert _names(tmp_path) == ["out"]


def test_error_policy_refuses_before_any_work(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    entered = False
    with pytest.raises(MergeError, match="already exists"), atomic_dir(final):
        entered = True
    assert not entered
    assert _names(tmp_path) == ["out"] and (final / "old").read_text() == "old"


def test_error_policy_refuses_a_folder_that_appears_during_the_block(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with pytest.raises(MergeError, match="already exists"), atomic_dir(final) as tmp:
        (tmp / "new").write_text("new")
        final.mkdir()
        (final / "theirs").write_text("theirs")
    assert _names(tmp_path) == ["out"] and _names(final) == ["theirs"]


def test_replace_policy_swaps_the_old_folder_out(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    with atomic_dir(final, exists="replace") as tmp:
        (tmp / "new").write_text("new")
        assert (final / "old").exists()  # the old folder stays until the new one is complete
    assert _names(tmp_path) == ["out"] and _names(final) == ["new"]


def test_replace_policy_keeps_the_old_folder_when_the_block_fails(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final, exists="replace") as tmp:
        (tmp / "new").write_text("half")
        raise RuntimeError("boom")
    assert _names(tmp_path) == ["out"] and _names(final) == ["old"]


def test_keep_policy_keeps_what_another_process_finished_first(tmp_path: Path) -> None:
    final = tmp_path / "entry"
    with atomic_dir(final, exists="keep") as tmp:
        (tmp / "ours").write_text("ours")
        final.mkdir()  # another process finishes the same cache entry meanwhile
        (final / "theirs").write_text("theirs")
    assert _names(tmp_path) == ["entry"] and _names(final) == ["theirs"]
    with atomic_dir(final, exists="keep") as tmp:  # it existed before the block: kept as well
        (tmp / "again").write_text("again")
    assert _names(tmp_path) == ["entry"] and _names(final) == ["theirs"]


def test_keep_policy_creates_a_missing_entry(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "cache" / "entry", exists="keep") as tmp:  # parents are created
        (tmp / "f").write_text("whole")
    assert (tmp_path / "cache" / "entry" / "f").read_text() == "whole"
    assert _names(tmp_path / "cache") == ["entry"]


def test_atomic_file_and_text_leave_nothing_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert _names(tmp_path) == ["a.json"] and path.read_text() == "old"
    atomic_write_text(path, "new ✓")
    assert _names(tmp_path) == ["a.json"] and path.read_text(encoding="utf-8") == "new ✓"


@pytest.mark.usefixtures("umask_022")
def test_files_and_folders_get_the_users_normal_permissions(tmp_path: Path) -> None:
    text = tmp_path / "sub" / "results.json"
    atomic_write_text(text, "{}")
    assert _mode(text) & 0o044 == 0o044 and _mode(text) == 0o644
    assert _mode(text.parent) == 0o755  # a parent it had to create
    with atomic_file(tmp_path / "w.bin") as tmp:
        tmp.write_bytes(b"\0")
    assert _mode(tmp_path / "w.bin") == 0o644
    with atomic_dir(tmp_path / "entry", exists="keep") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert _mode(tmp_path / "entry") == 0o755  # readable and enterable by group and others
    assert _mode(tmp_path / "entry" / "meta.json") == 0o644
    with atomic_dir(tmp_path / "entry", exists="replace") as tmp:
        pass
    assert _mode(tmp_path / "entry") == 0o755


def test_permissions_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write_text(tmp_path / "private.txt", "x")
        with atomic_dir(tmp_path / "private") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "private.txt") == 0o600 and _mode(tmp_path / "private") == 0o700


@pytest.mark.usefixtures("umask_022")
def test_files_a_library_creates_0600_are_shared_when_renamed_into_place(tmp_path: Path) -> None:
    """safetensors' save_file (and save_pretrained, which uses it) creates its files 0600."""
    import torch
    from safetensors.torch import save_file

    probe = tmp_path / "probe.safetensors"
    save_file({"t": torch.zeros(2)}, str(probe))
    assert stat.S_IMODE(probe.stat().st_mode) == 0o600  # what the library does on its own
    with atomic_file(tmp_path / "one.safetensors") as tmp:
        save_file({"t": torch.zeros(2)}, str(tmp))
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "sub").mkdir()
        save_file({"t": torch.zeros(2)}, str(tmp / "sub" / "w.safetensors"))
    for f in (tmp_path / "one.safetensors", tmp_path / "folder" / "sub" / "w.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
