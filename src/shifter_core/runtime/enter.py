"""Entering a prepared root and shedding what could regain privilege: the one place both are
written, for job steps (slurmstepd's tasks, as root before Slurm drops to the user) and for
the runtime's own drop to the user (:mod:`.drop`).

Kept to ``os`` and the syscalls: slurmstepd imports it on every container task's path, and
after :func:`pivot_into` the host's Python library is gone, so nothing may be imported late.
"""

from __future__ import annotations

import errno
import os

from .. import syscalls


def pivot(root: str) -> None:
    """``pivot_root`` into ``root`` in this (private) mount namespace and detach the host's
    mounts; the working directory is then the container's ``/``. (The launcher's ``pivot``
    operation.)"""
    os.chdir(root)
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", syscalls.MNT_DETACH)
    os.chdir("/")


def chroot(root: str) -> None:
    """Enter the root a prolog prepared, in a mount namespace of its own user namespace,
    where the host's mounts cannot be detached. (The launcher's ``chroot`` operation.)"""
    os.chroot(root)
    os.chdir("/")


def pivot_into(root: str) -> None:
    """Move this process (still root) into the prepared ``root``: a mount namespace whose
    mounts are slaves of the host's (nothing propagates out; a site volume with ``slave``
    still receives what the host mounts below its source),
    :func:`pivot`. The working directory is kept where it exists in the container, else
    ``/``."""
    cwd = os.getcwd()
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_SLAVE)
    pivot(root)
    try:  # noqa: SIM105 - contextlib stays out of slurmstepd's path
        os.chdir(cwd)
    except OSError:
        pass  # it is not in the container: stay at /


def last_capability() -> int:
    """The highest capability number this kernel knows."""
    # Bytes only: after pivot_root the host's Python library (codecs included) is gone.
    try:
        fd = os.open("/proc/sys/kernel/cap_last_cap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return int(os.read(fd, 32))
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return 63


def drop_bounding_set() -> None:
    """Empty the capability bounding set: no exec can bring a capability back."""
    for cap in range(last_capability() + 1):
        try:
            syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
        except syscalls.SyscallError as err:
            if err.errno != errno.EINVAL:
                raise


def set_no_new_privs() -> None:
    """No setuid bit or file capability takes effect in this process or its children."""
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
