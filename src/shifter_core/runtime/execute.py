"""Executing the container operations of a recipe in Python, as the C launcher executes them.

The Python build (:class:`.assemble.RootBuilder`) runs the operations :mod:`.mountops` emits
through :class:`Executor`: ``clone``, ``mount``, ``attach``, ``mkdir``, ``mkfile``,
``symlink`` and ``setattr``, each on a target opened beneath the root without following a
symlink. The launcher (``launcher/shifter_launch.c``) has the same cases for the same
operations; neither adds a flag of its own.
"""

from __future__ import annotations

import contextlib
import os

from .. import syscalls
from .paths import fd_path, open_beneath
from .recipe import PROPAGATIONS

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from .recipe import Op

_ATTACH = syscalls.MOVE_MOUNT_F_EMPTY_PATH | syscalls.MOVE_MOUNT_T_EMPTY_PATH


class Executor:
    """Runs container operations in the root open as ``root_fd``. ``detached`` maps a source
    to a mount tree that was cloned earlier (``open_tree``, before the staging covered it):
    a ``clone`` of that source takes it over instead of cloning again. The executor closes
    only what it opened itself."""

    def __init__(self, root_fd: int, detached: Mapping[str, int] | None = None) -> None:
        self.root_fd = root_fd
        self.detached = dict(detached or {})
        self.slots: dict[int, tuple[int, bool]] = {}  # slot -> (fd, opened here)

    def run(self, ops: Iterable[Op]) -> None:
        """Execute ``ops`` in order; the first that fails raises (OSError, SyscallError)."""
        cases: dict[str, Callable[..., None]] = {
            "clone": self._clone,
            "attach": self._attach,
            "mount": self._mount,
            "mkdir": self._mkdir,
            "mkfile": self._mkfile,
            "symlink": self._symlink,
            "setattr": self._setattr,
        }
        for op in ops:
            cases[op.name](*op.args)

    def close(self) -> None:
        """Close the slots never attached (their copies vanish)."""
        for fd, owned in self.slots.values():
            if owned:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.slots.clear()

    def _beneath(self, path: str, directory: bool = False) -> int:
        return open_beneath(self.root_fd, path, directory=directory)

    def _clone(self, slot: int, source: str, recursive: int, attrs: int, propagation: str) -> None:
        fd = self.detached.pop(source, None)
        owned = fd is None
        if fd is None:
            flags = syscalls.OPEN_TREE_CLONE | syscalls.OPEN_TREE_CLOEXEC
            fd = syscalls.open_tree(source, flags | (syscalls.AT_RECURSIVE if recursive else 0))
        self.slots[slot] = (fd, owned)
        syscalls.mount_setattr(
            "", attrs, dirfd=fd, recursive=bool(recursive),
            propagation=PROPAGATIONS[propagation.encode()],
        )  # fmt: skip

    def _attach(self, slot: int, target: str) -> None:
        fd, owned = self.slots.pop(slot)
        target_fd = self._beneath(target)
        try:
            syscalls.move_mount(fd, "", target_fd, "", _ATTACH, name=target)
        finally:
            os.close(target_fd)
            if owned:
                os.close(fd)

    def _mount(self, source: str, target: str, fstype: str, flags: int, data: str) -> None:
        target_fd = self._beneath(target)
        try:
            syscalls.mount(source, fd_path(target_fd), fstype, flags, data or None)
        finally:
            os.close(target_fd)

    def _parent(self, path: str) -> tuple[int, str]:
        """The directory of ``path`` (an ``O_PATH`` fd, usable as ``dir_fd``) and its name."""
        parent, _, name = path.rstrip("/").rpartition("/")
        return self._beneath(parent or "/", directory=True), name

    def _mkdir(self, path: str, mode: int) -> None:
        dir_fd, name = self._parent(path)
        try:
            os.mkdir(name, mode, dir_fd=dir_fd)
            os.chmod(name, mode, dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            pass
        finally:
            os.close(dir_fd)

    def _mkfile(self, path: str, mode: int) -> None:
        dir_fd, name = self._parent(path)
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            made = os.open(name, flags, mode, dir_fd=dir_fd)
        except FileExistsError:
            return
        finally:
            os.close(dir_fd)
        try:
            os.fchmod(made, mode)
        finally:
            os.close(made)

    def _symlink(self, text: str, path: str) -> None:
        dir_fd, name = self._parent(path)
        try:
            os.symlink(text, name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def _setattr(self, path: str, attrs: int, recursive: int) -> None:
        fd = self._beneath(path)
        try:
            syscalls.mount_setattr("", attrs, dirfd=fd, recursive=bool(recursive))
        finally:
            os.close(fd)

