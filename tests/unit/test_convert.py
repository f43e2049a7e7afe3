"""Layers to squashfs: one pass for a single layer that allows it, else two; same result."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from shifter_core.image.convert import layers_to_squashfs
from tests.fixtures.edgecase_image import compress, dir_, reg, tar_bytes

pytestmark = pytest.mark.skipif(
    shutil.which("tar2sqfs") is None or shutil.which("unsquashfs") is None,
    reason="needs squashfs-tools-ng and squashfs-tools",
)


def listing(image: Path) -> list[str]:
    """``unsquashfs -lln``: type, mode, owner, size, path of every entry."""
    out = subprocess.run(
        ["unsquashfs", "-lln", str(image)], capture_output=True, text=True, check=True
    ).stdout
    return sorted(" ".join(line.split()[:3] + line.split()[5:]) for line in out.splitlines()[3:])


def cat(image: Path, path: str) -> bytes:
    return subprocess.run(
        ["unsquashfs", "-cat", str(image), path], capture_output=True, check=True
    ).stdout


@pytest.mark.parametrize("kind", ["gzip", "zstd", "none"])
def test_a_single_layer_converts_in_one_pass_or_two(tmp_path: Path, kind: str, caplog) -> None:
    caplog.set_level(logging.INFO, logger="shifter_core.image.convert")
    simple = tmp_path / "simple"
    simple.write_bytes(compress(tar_bytes([dir_("d"), reg("d/f", b"one\n")]), kind))
    twice = tmp_path / "twice"  # the same name twice: the later one wins, in two passes
    twice.write_bytes(compress(tar_bytes([reg("d/f", b"old\n"), reg("d/f", b"new\n")]), kind))
    first, second = tmp_path / "1.sqfs", tmp_path / "2.sqfs"
    layers_to_squashfs([simple], first, spool_dir=tmp_path)
    assert "two passes" not in caplog.text
    layers_to_squashfs([twice], second, spool_dir=tmp_path)
    assert "converting in two passes: 'd/f' is in the layer twice" in caplog.text
    assert cat(first, "d/f") == b"one\n" and cat(second, "d/f") == b"new\n"
    assert listing(first) == listing(second)
    assert list(tmp_path.glob("*.partial")) == []
