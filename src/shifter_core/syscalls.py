"""Linux system calls missing from :mod:`os`, with errors that name the call and the path.

The C side is ``shifter_core._syscalls`` (compiled by ``cffi_build/build_syscalls.py``).
Every wrapper raises :class:`SyscallError` (an :class:`OSError` and a
:class:`~shifter_core.errors.ShifterError`) carrying ``errno``, the call and its path.
"""

from __future__ import annotations

import errno as _errno
import os

from ._syscalls import ffi, lib
from .errors import ShifterError

# Re-exported constants (names as in the C headers).
MS_RDONLY: int = lib.MS_RDONLY
MS_NOSUID: int = lib.MS_NOSUID
MS_NODEV: int = lib.MS_NODEV
MS_NOEXEC: int = lib.MS_NOEXEC
MS_REMOUNT: int = lib.MS_REMOUNT
MS_BIND: int = lib.MS_BIND
MS_MOVE: int = lib.MS_MOVE
MS_REC: int = lib.MS_REC
MS_PRIVATE: int = lib.MS_PRIVATE
MS_SLAVE: int = lib.MS_SLAVE
MS_SHARED: int = lib.MS_SHARED
MS_RELATIME: int = lib.MS_RELATIME
MS_SILENT: int = lib.MS_SILENT
MNT_FORCE: int = lib.MNT_FORCE
MNT_DETACH: int = lib.MNT_DETACH
UMOUNT_NOFOLLOW: int = lib.UMOUNT_NOFOLLOW
CLONE_NEWNS: int = lib.CLONE_NEWNS
CLONE_NEWUSER: int = lib.CLONE_NEWUSER
CLONE_NEWPID: int = lib.CLONE_NEWPID
CLONE_NEWUTS: int = lib.CLONE_NEWUTS
CLONE_NEWIPC: int = lib.CLONE_NEWIPC
CLONE_NEWNET: int = lib.CLONE_NEWNET
PR_SET_NO_NEW_PRIVS: int = lib.PR_SET_NO_NEW_PRIVS
PR_GET_NO_NEW_PRIVS: int = lib.PR_GET_NO_NEW_PRIVS
PR_CAPBSET_DROP: int = lib.PR_CAPBSET_DROP
PR_CAPBSET_READ: int = lib.PR_CAPBSET_READ
PR_CAP_AMBIENT: int = lib.PR_CAP_AMBIENT
PR_CAP_AMBIENT_CLEAR_ALL: int = lib.PR_CAP_AMBIENT_CLEAR_ALL
PR_SET_PDEATHSIG: int = lib.PR_SET_PDEATHSIG
PR_SET_DUMPABLE: int = lib.PR_SET_DUMPABLE
PR_GET_DUMPABLE: int = lib.PR_GET_DUMPABLE
PR_SET_CHILD_SUBREAPER: int = lib.PR_SET_CHILD_SUBREAPER
LO_FLAGS_READ_ONLY: int = lib.LO_FLAGS_READ_ONLY
LO_FLAGS_AUTOCLEAR: int = lib.LO_FLAGS_AUTOCLEAR
LO_FLAGS_DIRECT_IO: int = lib.LO_FLAGS_DIRECT_IO
MOUNT_ATTR_RDONLY: int = lib.MOUNT_ATTR_RDONLY
MOUNT_ATTR_NOSUID: int = lib.MOUNT_ATTR_NOSUID
MOUNT_ATTR_NODEV: int = lib.MOUNT_ATTR_NODEV
MOUNT_ATTR_NOEXEC: int = lib.MOUNT_ATTR_NOEXEC
AT_RECURSIVE: int = lib.AT_RECURSIVE
OPEN_TREE_CLONE: int = lib.OPEN_TREE_CLONE
OPEN_TREE_CLOEXEC: int = lib.OPEN_TREE_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH: int = lib.MOVE_MOUNT_F_EMPTY_PATH
MOVE_MOUNT_T_EMPTY_PATH: int = lib.MOVE_MOUNT_T_EMPTY_PATH
AT_EMPTY_PATH: int = lib.AT_EMPTY_PATH
AT_SYMLINK_NOFOLLOW: int = lib.AT_SYMLINK_NOFOLLOW
RESOLVE_NO_XDEV: int = lib.RESOLVE_NO_XDEV
RESOLVE_NO_MAGICLINKS: int = lib.RESOLVE_NO_MAGICLINKS
RESOLVE_NO_SYMLINKS: int = lib.RESOLVE_NO_SYMLINKS
RESOLVE_BENEATH: int = lib.RESOLVE_BENEATH
RESOLVE_IN_ROOT: int = lib.RESOLVE_IN_ROOT
AT_FDCWD: int = -100


class SyscallError(ShifterError, OSError):
    """A system call failed: ``call``, ``path`` and ``errno`` say which, where and why."""

    def __init__(self, call: str, err: int, path: str | None = None, detail: str = "") -> None:
        where = f" {path}" if path else ""
        extra = f" ({detail})" if detail else ""
        code = _errno.errorcode.get(err, str(err))
        super().__init__(f"{call}{where}: {os.strerror(err)} [{code}]{extra}")
        self.errno = err
        self.strerror = os.strerror(err)
        self.filename = path
        self.call = call


def _check(result: int, call: str, path: str | None = None, detail: str = "") -> int:
    if result < 0:
        raise SyscallError(call, ffi.errno, path, detail)
    return result


def _c(path: str | None) -> object:
    return ffi.NULL if path is None else os.fsencode(path)


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    """mount(2)."""
    parts = (f"type {fstype}" if fstype else "", f"source {source}" if source else "")
    detail = ", ".join(p for p in parts if p)
    _check(lib.mount(_c(source), _c(target), _c(fstype), flags, _c(data)), "mount", target, detail)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _check(lib.umount2(_c(target), flags), "umount2", target)


def unshare(flags: int) -> None:
    """unshare(2)."""
    _check(lib.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2)."""
    _check(lib.setns(fd, nstype), "setns")


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2)."""
    _check(lib.sh_pivot_root(_c(new_root), _c(put_old)), "pivot_root", new_root)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2); returns the call's result."""
    return _check(lib.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def mount_setattr(
    path: str,
    attr_set: int = 0,
    attr_clr: int = 0,
    *,
    recursive: bool = False,
    dirfd: int = AT_FDCWD,
    propagation: int = 0,
) -> None:
    """mount_setattr(2): set/clear ``MOUNT_ATTR_*`` on a mount (and its submounts)."""
    flags = AT_RECURSIVE if recursive else 0
    if not path:
        flags |= AT_EMPTY_PATH
    result = lib.sh_mount_setattr(dirfd, _c(path), flags, attr_set, attr_clr, propagation)
    _check(result, "mount_setattr", path or f"fd {dirfd}")


def open_tree(path: str, flags: int, *, dirfd: int = AT_FDCWD) -> int:
    """open_tree(2): an fd for the mount at ``path``; with ``OPEN_TREE_CLONE`` a detached copy
    (with ``AT_RECURSIVE`` of the whole tree below it), unmounted when the fd is closed
    unless :func:`move_mount` attached it."""
    return _check(lib.sh_open_tree(dirfd, _c(path), flags), "open_tree", path or f"fd {dirfd}")


def move_mount(
    from_dirfd: int,
    from_path: str,
    to_dirfd: int,
    to_path: str,
    flags: int = 0,
    *,
    name: str | None = None,
) -> None:
    """move_mount(2): move a mount, or attach a detached tree from :func:`open_tree`;
    ``name`` (the target, for messages) when ``to_path`` is empty."""
    result = lib.sh_move_mount(from_dirfd, _c(from_path), to_dirfd, _c(to_path), flags)
    source = from_path or f"fd {from_dirfd}"
    _check(result, "move_mount", to_path or name or f"fd {to_dirfd}", f"from {source}")


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): open ``path`` below ``dirfd`` under ``RESOLVE_*`` rules; returns the fd."""
    return _check(lib.sh_openat2(dirfd, _c(path), flags, mode, resolve), "openat2", path)


def loop_ctl_get_free(ctl_fd: int) -> int:
    """``LOOP_CTL_GET_FREE`` on /dev/loop-control: the number of a free loop device."""
    return _check(lib.sh_loop_ctl_get_free(ctl_fd), "ioctl(LOOP_CTL_GET_FREE)", "/dev/loop-control")


def loop_configure(loop_fd: int, backing_fd: int, flags: int, name: str, device: str) -> None:
    """``LOOP_CONFIGURE``: attach ``backing_fd`` to a loop device with ``LO_FLAGS_*``."""
    encoded = os.fsencode(name)[-63:]
    _check(
        lib.sh_loop_configure(loop_fd, backing_fd, flags, encoded),
        "ioctl(LOOP_CONFIGURE)",
        device,
        f"backing file {name}",
    )


def clone_user_namespace(uid: int, gid: int, stack: bytearray) -> int:
    """An idle child in a new user namespace owned by ``uid`` (group ``gid``), cloned by root
    without copying its memory (``CLONE_VM``); returns its pid. It runs on ``stack``, which
    the caller keeps alive until it has killed (SIGKILL) and reaped the child; the caller's
    memory is non-dumpable afterwards (see ``sh_clone_userns`` in ``cffi_build``)."""
    pid = lib.sh_clone_userns(uid, gid, ffi.from_buffer(stack), len(stack))
    return _check(pid, "clone(CLONE_NEWUSER)", detail=f"owner uid {uid}")


def capset_clear() -> None:
    """Clear the effective, permitted and inheritable capability sets."""
    _check(lib.sh_capset_clear(), "capset")


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) capability masks of this thread."""
    eff = ffi.new("uint64_t *")
    prm = ffi.new("uint64_t *")
    inh = ffi.new("uint64_t *")
    _check(lib.sh_capget(eff, prm, inh), "capget")
    return int(eff[0]), int(prm[0]), int(inh[0])
