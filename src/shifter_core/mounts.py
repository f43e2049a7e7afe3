"""Mounts on this node: the mount table (``/proc/self/mountinfo``), and removing a directory
with everything mounted below it from whatever state a crash left (:func:`teardown_tree`).

Below the runtime and the job directory (both use it); only ``os``, the syscalls and the
standard library.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import time
from dataclasses import dataclass

from . import syscalls
from .syscalls import SyscallError

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    target: str
    root: str
    options: str
    fstype: str
    source: str
    super_options: str


def read_mounts(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Every mount of the calling process's mount namespace, in the kernel's order."""
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields = left.split(" ")
            rest = right.split(" ")
            if len(fields) < 6 or len(rest) < 3:
                continue
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    root=_unescape(fields[3]),
                    target=_unescape(fields[4]),
                    options=fields[5],
                    fstype=rest[0],
                    source=_unescape(rest[1]),
                    super_options=rest[2],
                )
            )
    return entries


def mounts_under(prefix: str, path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Mounts at ``prefix`` or below it, deepest (and newest) first."""
    prefix = prefix.rstrip("/") or "/"
    found = [
        m
        for m in read_mounts(path)
        if m.target == prefix or m.target.startswith(prefix + "/") or prefix == "/"
    ]
    found.sort(key=lambda m: (m.target.count("/"), m.mount_id), reverse=True)
    return found


def backing_file(device: str) -> str | None:
    """The file behind ``/dev/loopN`` or None when it is detached."""
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return None


def wait_detached(device: str, expected: str | None, timeout: float = 5.0) -> bool:
    """Wait until ``device`` no longer holds ``expected`` (any file when None)."""
    deadline = time.monotonic() + timeout
    while True:
        current = backing_file(device)
        if current is None or (
            expected is not None and current.removesuffix(" (deleted)") != expected
        ):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def unmount_below(base: str, problems: list[str]) -> list[str]:
    """Unmount everything at and below ``base``, deepest first (lazily when busy); the loop
    devices that backed image mounts there."""
    devices: list[str] = []
    for _round in range(20):
        mounts = mounts_under(base)
        if not mounts:
            return devices
        for entry in mounts:
            if entry.source.startswith("/dev/loop"):
                devices.append(entry.source)
            try:
                syscalls.umount2(entry.target, syscalls.UMOUNT_NOFOLLOW)
            except SyscallError as err:
                if err.errno in (errno.EINVAL, errno.ENOENT):
                    continue  # already gone with its parent
                if err.errno != errno.EBUSY:
                    problems.append(str(err))
                    continue
                log.warning("%s is busy: detaching it lazily", entry.target)
                try:
                    syscalls.umount2(entry.target, syscalls.MNT_DETACH | syscalls.UMOUNT_NOFOLLOW)
                except SyscallError as again:
                    problems.append(str(again))
    problems.append(f"mounts remain below {base}")
    return devices


def wait_detached_all(devices: list[str] | tuple[str, ...], problems: list[str]) -> None:
    """Wait for each loop device to detach (autoclear does it on unmount); report those left."""
    for device in dict.fromkeys(devices):
        if not wait_detached(device, None):
            problems.append(f"{device} is still attached to {backing_file(device)}")


def teardown_tree(directory: str, loop_devices: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Remove ``directory`` and everything in it, from whatever state a crash left: every
    mount below it goes first (deepest first), then the files (:func:`remove_tree`: never
    through a mount point or a link, so nothing mounted from elsewhere, such as a user's
    volume or the host's /tmp, is ever deleted through it). Returns the problems left;
    never raises."""
    problems: list[str] = []
    try:
        directory = os.path.abspath(directory)
        devices = list(loop_devices) + unmount_below(directory, problems)
        wait_detached_all(devices, problems)
        if mounts_under(directory):
            problems.append(f"not removing {directory}: mounts remain below it")
        elif os.path.lexists(directory):
            remove_tree(directory, problems)
    except Exception as err:  # a teardown reports, it never raises
        problems.append(f"tearing down {directory}: {err}")
    return problems


def remove_tree(top: str, problems: list[str]) -> None:
    """``rm -r top`` that stays on ``top``'s file system: it never follows a link, never
    enters a mount point (by the mount table, and by device number in case the table was
    read while it changed) and reports what it leaves in ``problems``."""
    st = os.lstat(top)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(top)
        return
    mounted = {m.target for m in read_mounts()}
    if top in mounted:
        problems.append(f"not removing {top}: something is mounted there")
        return

    def empty(dir_fd: int, path: str) -> None:
        for entry in os.scandir(dir_fd):
            full = os.path.join(path, entry.name)
            try:
                if not entry.is_dir(follow_symlinks=False):
                    os.unlink(entry.name, dir_fd=dir_fd)
                    continue
                fd = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    if os.fstat(fd).st_dev != st.st_dev or full in mounted:
                        problems.append(f"not removing {full}: something is mounted there")
                        continue
                    empty(fd, full)
                finally:
                    os.close(fd)
                os.rmdir(entry.name, dir_fd=dir_fd)
            except OSError as err:
                problems.append(f"cannot remove {full}: {err.strerror}")

    fd = os.open(top, _DIR_FLAGS)
    try:
        empty(fd, top)
    finally:
        os.close(fd)
    try:
        os.rmdir(top)
    except OSError as err:
        problems.append(f"cannot remove {top}: {err.strerror}")
