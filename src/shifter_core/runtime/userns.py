"""A user namespace pinned for a job: the user's uid and every one of their gids mapped.

Without privilege a process can map only its own uid and gid into a user namespace, so a
user's ``shifter`` shows their supplementary groups as the overflow gid (65534). The prolog
(root) therefore makes, once per node per job, a user namespace **owned by the job's user**
in which the uid and all the user's gids map to themselves, and pins it by bind-mounting its
``/proc/PID/ns/user`` onto ``RUN_DIR/NODE/JOB/userns``. ``shifter`` in the job joins it with
``setns`` (the owner holds ``CAP_SYS_ADMIN`` in it) instead of making its own, and keeps its
groups, now mapped (:func:`shifter_core.runtime.unprivileged.enter_job_user_namespace`).

The namespace is made without forking the prolog (a fork copies its page tables: ~5 ms of
a ~20 ms prolog): root clones a child that shares its memory into a new user namespace while
its thread holds the user's euid (:func:`shifter_core.syscalls.clone_user_namespace`), writes
the child's ``uid_map`` and ``gid_map`` (root in the parent namespace may map any ids), bind-
mounts its ``ns/user`` and kills it: ~0.3 ms. The memory stays non-dumpable while the child
lives, so its owner cannot read it (and nothing is pinned where ``fs.suid_dumpable`` is 1).

``setgroups`` is denied in it, as in every unprivileged user namespace: the user holds
``CAP_SETGID`` there and could otherwise drop a group to get past permissions that deny that
group. The user keeps the groups it has (the kernel checks them), now shown by their gids.
"""

from __future__ import annotations

import errno
import os
import signal

from .. import syscalls
from ..syscalls import SyscallError
from ._log import get_logger
from .errors import ContainerError, PrivilegeError
from .plan import User

log = get_logger(__name__)

MAX_EXTENTS = 340  # lines of a uid_map/gid_map (Linux >= 4.15)
STACK_SIZE = 16384  # of the namespace's only process, which just waits to be killed


def id_map(ids: list[int] | tuple[int, ...]) -> str:
    """``/proc/PID/[ug]id_map`` text mapping each id to itself (consecutive ids merged)."""
    lines: list[str] = []
    start = count = 0
    for value in sorted(set(ids)):
        if count and value == start + count:
            count += 1
            continue
        if count:
            lines.append(f"{start} {start} {count}\n")
        start, count = value, 1
    if count:
        lines.append(f"{start} {start} {count}\n")
    if len(lines) > MAX_EXTENTS:
        raise ContainerError(f"{len(lines)} id ranges: a user namespace maps at most {MAX_EXTENTS}")
    return "".join(lines)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _suid_dumpable() -> str:
    try:
        with open("/proc/sys/fs/suid_dumpable", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def pin(user: User, target: str) -> None:
    """Make a user namespace owned by ``user`` with its uid and all its gids mapped to
    themselves, and bind-mount it onto ``target`` (created, root's, must not exist).
    Raises :class:`ContainerError` (nothing left behind) when it cannot."""
    if os.geteuid() != 0:
        raise PrivilegeError("pinning a user namespace for a job needs root")
    if user.uid == 0 or user.gid == 0:
        raise PrivilegeError("refusing to pin a user namespace for root")
    if _suid_dumpable() == "1":
        # The namespace's first process shares this process's memory while it lives (see
        # syscalls.clone_user_namespace): with fs.suid_dumpable=1 its owner could read it.
        raise ContainerError("not pinning a user namespace: fs.suid_dumpable is 1 (unsafe)")
    gid_map = id_map((user.gid, *user.groups))
    dumpable = syscalls.prctl(syscalls.PR_GET_DUMPABLE)
    stack = bytearray(STACK_SIZE)
    try:
        pid = syscalls.clone_user_namespace(user.uid, user.gid, stack)
    except SyscallError as err:
        raise ContainerError(f"cannot create a user namespace for uid {user.uid}: {err}") from None
    try:
        proc = f"/proc/{pid}"
        _write(f"{proc}/uid_map", f"{user.uid} {user.uid} 1\n")
        _write(f"{proc}/setgroups", "deny")
        _write(f"{proc}/gid_map", gid_map)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        os.close(os.open(target, flags, 0o444))
        try:
            syscalls.mount(f"{proc}/ns/user", target, None, syscalls.MS_BIND)
        except BaseException:
            os.unlink(target)
            raise
    except OSError as err:
        raise ContainerError(f"cannot pin a user namespace at {target}: {err}") from None
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)  # only then may ``stack`` go
        if dumpable in (0, 1):
            syscalls.prctl(syscalls.PR_SET_DUMPABLE, dumpable)
    log.debug("pinned a user namespace for uid %d (gids %s) at %s", user.uid, gid_map, target)


def release(target: str) -> list[str]:
    """Unmount and remove a pinned namespace; the problems left (empty when it is gone).
    Idempotent: nothing there is not a problem."""
    problems: list[str] = []
    for _round in range(8):  # a bind mount per earlier attempt, at most
        try:
            syscalls.umount2(target, syscalls.UMOUNT_NOFOLLOW)
        except SyscallError as err:
            if err.errno in (errno.EINVAL, errno.ENOENT):
                break  # not (or no longer) a mount point
            if err.errno != errno.EBUSY:
                problems.append(str(err))
                break
            log.warning("%s is busy: detaching it lazily", target)
            try:
                syscalls.umount2(target, syscalls.MNT_DETACH | syscalls.UMOUNT_NOFOLLOW)
            except SyscallError as again:
                problems.append(str(again))
                break
    try:
        os.unlink(target)
    except FileNotFoundError:
        pass
    except OSError as err:
        problems.append(f"cannot remove {target}: {err.strerror}")
    return problems
