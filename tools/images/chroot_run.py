#!/usr/bin/env python3
"""Run a command chrooted into an unpacked image root, with /proc, /sys and /dev mounted.

Usage (as root)::

    chroot_run.py ROOT COMMAND [ARG...]

A bare ``chroot ROOT cmd`` has no /proc, /sys nor /dev in the root; MPICH's UCX transports need
them (see tools/images/README.md).  This does what a container runtime would, and no more: in a
private mount namespace (so nothing is left mounted, whatever happens) it mounts a fresh proc
and sysfs at ROOT/proc and ROOT/sys, binds the host's /dev (with /dev/shm and /dev/pts) at
ROOT/dev, then execs ``chroot ROOT COMMAND...``.  File descriptors and the environment are
inherited, so it works under ``mpiexec`` and ``srun --mpi=pmi2`` (PMI_FD stays open)::

    srun --mpi=pmi2 -N3 -n6 python3 tools/images/chroot_run.py ROOT /usr/local/bin/mpi-hello

Python 3.11 standard library only; needs util-linux's ``unshare``, ``mount`` and ``chroot``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

INNER_FLAG = "--in-namespace"


def mount_runtime_fs(root: Path) -> None:
    """Mount proc, sysfs and the host's /dev into ``root`` (in the current mount namespace)."""
    for target, cmd in (
        ("proc", ["mount", "-t", "proc", "-o", "nosuid,nodev,noexec", "proc"]),
        ("sys", ["mount", "-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs"]),
        ("dev", ["mount", "--rbind", "/dev"]),
    ):
        path = root / target
        path.mkdir(exist_ok=True)
        subprocess.run([*cmd, str(path)], check=True)


def main(argv: list[str]) -> int:
    """Re-exec in a private mount namespace, mount, then exec ``chroot ROOT COMMAND...``."""
    inner = bool(argv) and argv[0] == INNER_FLAG
    args = argv[1:] if inner else argv
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(args[0]).resolve()
    if not (root / "usr").is_dir():
        print(f"chroot_run: {root} does not look like a root file system", file=sys.stderr)
        return 2
    if not inner:
        if os.geteuid() != 0:
            print("chroot_run: needs root", file=sys.stderr)
            return 2
        os.execvp(
            "unshare",
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                sys.executable,
                "-I",
                str(Path(__file__).resolve()),
                INNER_FLAG,
                str(root),
                *args[1:],
            ],
        )
    mount_runtime_fs(root)
    os.execvp("chroot", ["chroot", str(root), *args[1:]])
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
