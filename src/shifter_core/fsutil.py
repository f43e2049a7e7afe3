"""Files written so that readers see the old content or the new, never a part.

Every writer of a file that others read while it changes (the store's records, a job's
state, the node cache's statistics, launch recipes, caches of the configuration, stored
credentials) goes through :func:`atomic_file`: a new hidden file next to the target, created
exclusively (no link followed) with its final mode, filled, optionally synced, then renamed
over the target. On any failure the partial file is removed and the target is untouched.

Kept to ``os`` and ``contextlib``: slurmstepd imports it on a step's start-up path.
"""

from __future__ import annotations

import contextlib
import os

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import BinaryIO

PARTIAL_SUFFIX = ".partial"
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def partial_name(path: str | os.PathLike[str]) -> str:
    """A fresh hidden name next to ``path`` for its new content."""
    directory, name = os.path.split(os.fspath(path))
    token = os.urandom(6).hex()
    return os.path.join(directory, f".{name}.{os.getpid()}.{token}{PARTIAL_SUFFIX}")


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str],
    *,
    mode: int = 0o644,
    sync: bool = False,
    before_replace: Callable[[str], None] | None = None,
) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` when the block ends without an error.

    ``mode`` is set exactly (the umask does not apply); ``sync`` flushes the data and the
    directory to disk; ``before_replace(partial_path)`` runs last before the rename (to set
    an ACL, say), so that the file appears only once it is complete."""
    partial = partial_name(path)
    fd = os.open(partial, _CREATE, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            if sync:
                os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace(partial)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    if sync:
        sync_directory(os.path.dirname(os.fspath(path)) or ".")


def atomic_write(
    path: str | os.PathLike[str], data: bytes | str, *, mode: int = 0o644, sync: bool = False
) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8) in one step for readers."""
    with atomic_file(path, mode=mode, sync=sync) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def sync_directory(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so that a rename in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
