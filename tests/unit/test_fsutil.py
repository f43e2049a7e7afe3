"""Atomic writes: readers see the old file or the new one, never a part."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shifter_core.fsutil import atomic_file, atomic_write


def test_replaces_with_the_exact_mode_whatever_the_umask(tmp_path: Path):
    target = tmp_path / "record"
    target.write_text("old")
    old_umask = os.umask(0o077)
    try:
        atomic_write(target, "new", mode=0o644, sync=True)
    finally:
        os.umask(old_umask)
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record"]


def test_a_failure_leaves_the_old_file_and_no_partial(tmp_path: Path):
    target = tmp_path / "record"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as fh:
        fh.write(b"half")
        raise RuntimeError("disk gone")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record"]


def test_before_replace_sees_the_complete_partial(tmp_path: Path):
    target = tmp_path / "record"
    seen = []

    def check(partial: str) -> None:
        seen.append((Path(partial).read_bytes(), target.exists()))

    with atomic_file(target, mode=0o600, before_replace=check) as fh:
        fh.write(b"complete")
    assert seen == [(b"complete", False)]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
