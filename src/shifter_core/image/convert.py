"""Tar stream → squashfs, with ``tar2sqfs`` (squashfs-tools-ng) reading a pipe.

Nothing is unpacked to disk on the way: the flattener writes the image's tar stream into
``tar2sqfs``'s stdin. zstd level 3 is the default: it costs a fraction of xz or zstd-15 and
reads as fast as a plain directory once mounted.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from ..errors import ShifterError
from .limits import UnpackBudget

log = logging.getLogger(__name__)


class ConversionError(ShifterError):
    """tar2sqfs is missing or failed."""


@dataclass(frozen=True)
class SquashfsOptions:
    """How images are compressed (the ``conversion:`` part of the site config)."""

    compressor: str = "zstd"
    level: int | None = 3
    block_size: int = 131072
    jobs: int = 0  # 0: one per CPU

    def argv(self, output: Path) -> list[str]:
        tool = shutil.which("tar2sqfs")
        if tool is None:
            raise ConversionError(
                "tar2sqfs not found", hint="install squashfs-tools-ng on the gateway host"
            )
        argv = [
            tool,
            "--quiet",
            "--force",
            "--no-skip",
            "--no-xattr",
            "-c",
            self.compressor,
            "-b",
            str(self.block_size),
            "-j",
            str(self.jobs or os.cpu_count() or 1),
        ]
        if self.level is not None:
            argv += ["-X", f"level={self.level}"]
        return [*argv, str(output)]


def tar_to_squashfs(
    write_tar: Callable[[BinaryIO], object], output: Path, options: SquashfsOptions | None = None
) -> int:
    """Run ``write_tar(pipe)`` into tar2sqfs writing ``output``; return the image's size.

    On any failure ``output`` is removed and the error says what tar2sqfs reported.
    """
    options = options or SquashfsOptions()
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            options.argv(output), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors
        )
        assert proc.stdin is not None
        try:
            with proc.stdin:
                write_tar(cast(BinaryIO, proc.stdin))  # a pipe opened in binary mode
        except BrokenPipeError:
            pass  # tar2sqfs gave up: its exit code and message say why
        except BaseException:
            proc.kill()
            proc.wait()
            output.unlink(missing_ok=True)
            raise
        rc = proc.wait()
        errors.seek(0)
        message = errors.read().decode(errors="replace").strip()[-500:]
    if rc != 0:
        output.unlink(missing_ok=True)
        raise ConversionError(f"tar2sqfs failed (exit {rc}): {message or 'no message'}")
    size = output.stat().st_size
    log.info("wrote %s (%d bytes)", output, size)
    return size


def layers_to_squashfs(
    layers: Sequence[Path],
    output: Path,
    options: SquashfsOptions | None = None,
    *,
    spool_dir: Path | None = None,
    budget: UnpackBudget | None = None,
) -> int:
    """Flatten image layers (lowest first) into a squashfs file; return its size.

    A single layer is written while it is read when it allows that (no name twice, nothing
    before its directory: :func:`~.flatten.onepass.flatten_one_pass`), so decompressing
    it overlaps compressing the squashfs; anything else, or a single layer that turns out not
    to allow it, goes through the two passes of :func:`~.flatten.twopass.flatten`.
    *budget* bounds what the layers may decompress to (a bomb fails with ``LimitExceeded``).
    """
    from .flatten.onepass import OnePassImpossible, flatten_one_pass
    from .flatten.twopass import flatten

    if len(layers) == 1:
        try:
            return tar_to_squashfs(
                lambda pipe: flatten_one_pass(layers[0], pipe, spool_dir=spool_dir, budget=budget),
                output,
                options,
            )
        except OnePassImpossible as why:
            log.info("converting in two passes: %s", why)
            if budget is not None:
                budget.reset()
    return tar_to_squashfs(
        lambda pipe: flatten(layers, pipe, spool_dir=spool_dir, budget=budget), output, options
    )
