"""Opening host paths the user named (volume sources) with the user's permissions.

Root never looks a user's path up itself: a child process drops to the user (groups, gid,
uid), opens each path ``O_PATH``, checks that the user may read it (and search it, for a
directory) and sends the descriptors back over a socket. Mounts then bind from
``/proc/self/fd/N``, so a path swapped after the check cannot redirect them.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Sequence

from .errors import VolumeError
from .plan import User


def _open_checked(path: str) -> int:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        mode = os.R_OK | (os.X_OK if stat.S_ISDIR(st.st_mode) else 0)
        if not os.access(f"/proc/self/fd/{fd}", mode):
            raise PermissionError(13, "Permission denied")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _describe(err: OSError) -> str:
    return err.strerror or str(err)


def open_as_user(user: User, paths: Sequence[str], what: Sequence[str]) -> list[int]:
    """O_PATH fds of ``paths``, opened and checked as ``user``; ``what`` names each in errors.

    Runs in the calling process when it already is the user (``shifter``), else in a child.
    """
    if not paths:
        return []
    if os.geteuid() == user.uid and os.getuid() == user.uid:
        fds: list[int] = []
        try:
            for path, label in zip(paths, what, strict=True):
                try:
                    fds.append(_open_checked(path))
                except OSError as err:
                    raise _refused(label, path, _describe(err)) from None
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds
    return _open_in_child(user, paths, what)


def _refused(label: str, path: str, reason: str) -> VolumeError:
    return VolumeError(
        f"{label}: the source {path} cannot be used: {reason}",
        hint="the source must exist and be readable by you",
    )


def _open_in_child(user: User, paths: Sequence[str], what: Sequence[str]) -> list[int]:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            parent.close()
            os.setgroups(list(user.groups))
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            results: list[str | None] = []
            fds = []
            for path in paths:
                try:
                    fds.append(_open_checked(path))
                    results.append(None)
                except OSError as err:
                    results.append(_describe(err))
            socket.send_fds(child, [json.dumps(results).encode()], fds)
            status = 0
        finally:
            os._exit(status)
    child.close()
    try:
        message, fds, _, _ = socket.recv_fds(parent, 1 << 16, len(paths))
    finally:
        parent.close()
        os.waitpid(pid, 0)
    if not message:
        for fd in fds:
            os.close(fd)
        raise VolumeError("could not check the volume sources as the user")
    results = json.loads(message)
    for fd in fds:
        os.set_inheritable(fd, False)
    if any(r is not None for r in results):
        for fd in fds:
            os.close(fd)
        index = next(i for i, r in enumerate(results) if r is not None)
        raise _refused(what[index], paths[index], str(results[index]))
    return list(fds)
