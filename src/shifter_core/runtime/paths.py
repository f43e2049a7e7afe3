"""Paths inside a container root, resolved without ever leaving it.

Every path a user names inside the container (a volume target, the working directory) is
resolved here component by component against the image tree: an absolute symlink restarts
at the container's root, ``..`` above the root is an escape and is refused, and nothing is
ever looked up on the host through the image's symlinks. Mount targets are then opened with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` and mounted onto through
``/proc/self/fd/N``, so what was checked is what gets mounted on.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections import namedtuple

from .. import syscalls
from .errors import VolumeError

MAX_SYMLINKS = 40
_BENEATH = syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_SYMLINKS | syscalls.RESOLVE_NO_MAGICLINKS


class Resolved(namedtuple("_Resolved", "path existing missing kind")):
    """Where a container path really is: ``path`` (absolute, no symlinks), the deepest part
    that exists (``existing``), the components below it that do not (``missing``) and the
    type of the final component (``dir``, ``file``, ``other``; None when missing)."""

    __slots__ = ()


def _join(parts: list[str]) -> str:
    return "/" + "/".join(parts)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def resolve_in_root(root_fd: int, path: str, what: str) -> Resolved:
    """Resolve ``path`` inside the tree at ``root_fd``; ``what`` names it in errors."""
    todo = [c for c in path.split("/") if c not in ("", ".")]
    done: list[str] = []
    links = 0
    last_link = ""
    while todo:
        name = todo.pop(0)
        if name == "..":
            if not done:
                via = f" through the symlink {last_link}" if last_link else ""
                raise VolumeError(
                    f"{what}: {path} leads outside the container{via}",
                    hint="symlinks in the image may not point above its root",
                )
            done.pop()
            continue
        rel = "/".join([*done, name])
        try:
            st = os.stat(rel, dir_fd=root_fd, follow_symlinks=False)
        except FileNotFoundError:
            if ".." in todo:
                raise VolumeError(f"{what}: {path} uses '..' below a missing directory") from None
            return Resolved(_join([*done, name, *todo]), _join(done), (name, *todo), None)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise VolumeError(f"{what}: too many levels of symlinks in {path}")
            target = os.readlink(rel, dir_fd=root_fd)
            last_link = f"{_join([*done, name])} -> {target}"
            if target.startswith("/"):
                done = []
            todo = [c for c in target.split("/") if c not in ("", ".")] + todo
            continue
        if todo and not stat.S_ISDIR(st.st_mode):
            raise VolumeError(f"{what}: {_join([*done, name])} is not a directory in the image")
        done.append(name)
    resolved = _join(done)
    if done:
        kind = _kind(os.stat("/".join(done), dir_fd=root_fd, follow_symlinks=False).st_mode)
    else:
        kind = "dir"
    return Resolved(resolved, resolved, (), kind)


def open_beneath(root_fd: int, path: str, *, directory: bool = False) -> int:
    """An ``O_PATH`` fd of ``path`` (absolute, symlink-free) strictly inside ``root_fd``."""
    rel = path.lstrip("/") or "."
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    return syscalls.openat2(root_fd, rel, flags, _BENEATH)


def fd_path(fd: int) -> str:
    """The magic link naming an open file (for mount sources and targets)."""
    return f"/proc/self/fd/{fd}"


def make_path(
    base_fd: int,
    path: str,
    final: str,
    *,
    mirror_fd: int | None = None,
    copy_owner: bool = False,
) -> None:
    """Create ``path`` (absolute, symlink-free) below ``base_fd``: missing directories, then
    the final component as a directory (``final="dir"``) or an empty file (``"file"``).

    With ``mirror_fd`` (the image tree), directories that exist there are created with the
    same mode (and owner when ``copy_owner``), so an overlay upper layer stays invisible.
    """
    parts = [c for c in path.split("/") if c]
    current = os.dup(base_fd)
    try:
        for index, name in enumerate(parts):
            last = index == len(parts) - 1
            rel = "/".join(parts[: index + 1])
            try:
                st = os.stat(name, dir_fd=current, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is None:
                mode, owner = 0o755, None
                if mirror_fd is not None:
                    try:
                        ref = os.stat(rel, dir_fd=mirror_fd, follow_symlinks=False)
                    except FileNotFoundError:
                        ref = None
                    if ref is not None and (stat.S_ISDIR(ref.st_mode) or not last):
                        mode = stat.S_IMODE(ref.st_mode)
                        owner = (ref.st_uid, ref.st_gid) if copy_owner else None
                    elif ref is not None:
                        mode = stat.S_IMODE(ref.st_mode)
                if last and final == "file":
                    fd = os.open(
                        name,
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o644,
                        dir_fd=current,
                    )
                    os.close(fd)
                    return
                os.mkdir(name, 0o700, dir_fd=current)
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=current)
                try:
                    if owner is not None:
                        os.fchown(fd, *owner)
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
            elif last:
                return
            elif not stat.S_ISDIR(st.st_mode):
                raise VolumeError(f"cannot create {path}: /{rel} is not a directory")
            following = os.open(
                name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current
            )
            os.close(current)
            current = following
    finally:
        os.close(current)


def write_file(
    base_fd: int,
    path: str,
    data: bytes,
    mode: int = 0o644,
    *,
    mirror_fd: int | None = None,
    copy_owner: bool = False,
) -> None:
    """Write a new file at ``path`` below ``base_fd`` (parents made as :func:`make_path`)."""
    parent, _, name = path.rstrip("/").rpartition("/")
    if parent:
        make_path(base_fd, parent, "dir", mirror_fd=mirror_fd, copy_owner=copy_owner)
    dir_fd = (
        os.open(parent.lstrip("/"), os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=base_fd)
        if parent
        else os.dup(base_fd)
    )
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            mode,
            dir_fd=dir_fd,
        )
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            os.fchmod(fh.fileno(), mode)
    finally:
        os.close(dir_fd)


def read_image_file(root_fd: int, path: str, limit: int = 1 << 20) -> str:
    """A small text file of the image ('' when missing); symlinks resolved inside the root."""
    try:
        resolved = resolve_in_root(root_fd, path, path)
    except VolumeError:
        return ""
    if resolved.kind != "file":
        return ""
    try:
        fd = open_beneath(root_fd, resolved.path)
        try:
            real = os.open(fd_path(fd), os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(fd)
    except OSError:
        return ""
    with os.fdopen(real, "rb") as fh:
        return fh.read(limit).decode("utf-8", "replace")
