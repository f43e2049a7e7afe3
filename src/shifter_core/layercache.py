"""A cache of compressed layer blobs keyed by digest: ``<dir>/sha256/<hex>``.

A blob is only ever visible under its final name once it is complete and verified: it is
written to a temporary file in the same directory and published with :func:`os.replace`.
Concurrent writers of the same digest — threads of one process or separate processes — are
serialised by an exclusive :func:`fcntl.flock` on a per-digest lock file
(``<dir>/locks/sha256-<hex>.lock``); whoever gets the lock second finds the blob present and
does not download it again. (``flock`` locks belong to an open file description, so two threads
that each open the lock file exclude each other just as two processes do.)

Each download is counted in :attr:`LayerCache.stats` and logged at INFO, which is how tests
prove "one download per layer".
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .registry import DigestMismatch, split_digest

log = logging.getLogger(__name__)

_ALGORITHMS = ("sha256", "sha512")
_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20

Writer = Callable[[BinaryIO], None]


@dataclass
class CacheStats:
    """Counters of one :class:`LayerCache` object (this process only)."""

    downloads: int = 0
    hits: int = 0
    waited: int = 0
    bytes_written: int = 0
    downloaded: list[str] = field(default_factory=list)


class LayerCache:
    """Compressed blobs keyed by digest, safe for concurrent use by threads and processes."""

    def __init__(
        self, directory: str | os.PathLike[str], *, fsync: bool = True, mode: int = 0o700
    ) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        if not self.directory.exists():
            self.directory.mkdir(mode=mode, parents=True, exist_ok=True)
        self._locks = self.directory / "locks"
        self._locks.mkdir(exist_ok=True)
        self.stats = CacheStats()
        self._stats_lock = threading.Lock()

    # -- lookup --------------------------------------------------------------------------------

    def path(self, digest: str) -> Path:
        """Where the blob *digest* lives (whether or not it is there yet)."""
        algo, hexdigest = split_digest(digest)
        return self.directory / algo / hexdigest

    def has(self, digest: str) -> bool:
        """True when the complete blob is in the cache."""
        return self.path(digest).is_file()

    __contains__ = has

    def digests(self) -> Iterator[str]:
        """Every digest in the cache."""
        for algo in _ALGORITHMS:
            folder = self.directory / algo
            if folder.is_dir():
                for entry in sorted(folder.iterdir()):
                    if not entry.name.startswith(_TMP_PREFIX):
                        yield f"{algo}:{entry.name}"

    def size(self) -> int:
        """Total bytes of the cached blobs."""
        return sum(self.path(d).stat().st_size for d in self.digests())

    # -- locking -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, digest: str) -> Iterator[None]:
        """Hold the per-digest exclusive lock (blocks until it is free)."""
        algo, hexdigest = split_digest(digest)
        fd = os.open(
            self._locks / f"{algo}-{hexdigest}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.debug("waiting for another download of %s", digest)
                with self._stats_lock:
                    self.stats.waited += 1
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    # -- writing -------------------------------------------------------------------------------

    def put(
        self, digest: str, writer: Writer, *, size: int | None = None, verify: bool = True
    ) -> Path:
        """Make sure the blob *digest* is cached; return its path.

        When the blob is missing, ``writer(fileobj)`` is called (under the per-digest lock) to
        write it into a temporary file in the cache directory; the file is then checked
        (digest, and *size* when given; skip the digest with ``verify=False`` when the writer
        verified while streaming) and published atomically. If *writer* raises or the check
        fails, the temporary file is removed and nothing becomes visible. A blob that is
        already present (or that another thread or process finishes while this call waits for
        the lock) is not written again.
        """
        final = self.path(digest)
        if final.is_file():
            self._hit(digest)
            return final
        with self.lock(digest):
            if final.is_file():
                self._hit(digest)
                return final
            final.parent.mkdir(exist_ok=True)
            started = time.monotonic()
            fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f"{_TMP_PREFIX}{final.name}-")
            try:
                with os.fdopen(fd, "w+b") as fh:
                    writer(fh)
                    fh.flush()
                    written = fh.tell()
                    if size is not None and written != size:
                        raise DigestMismatch(
                            f"blob {digest} has {written} bytes, expected {size}",
                            blob=digest,
                            expected=digest,
                            actual=None,
                        )
                    if verify:
                        actual = _hash_file(fh, split_digest(digest)[0])
                        if actual != digest:
                            raise DigestMismatch(
                                f"blob {digest} failed verification: expected {digest}, "
                                f"got {actual}",
                                blob=digest,
                                expected=digest,
                                actual=actual,
                            )
                    if self.fsync:
                        os.fsync(fh.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            if self.fsync:
                _fsync_dir(final.parent)
        elapsed = time.monotonic() - started
        with self._stats_lock:
            self.stats.downloads += 1
            self.stats.bytes_written += written
            self.stats.downloaded.append(digest)
        log.info("cached blob %s (%d bytes) in %.2f s", digest, written, elapsed)
        return final

    def put_bytes(self, digest: str, data: bytes) -> Path:
        """Cache *data* as blob *digest* (verified)."""
        return self.put(digest, lambda fh: fh.write(data), size=len(data))

    def remove(self, digest: str) -> bool:
        """Delete the blob *digest*; True when it was there."""
        with self.lock(digest):
            try:
                self.path(digest).unlink()
            except FileNotFoundError:
                return False
        return True

    def clean_temporary(self, max_age: float = 3600.0) -> int:
        """Remove temporary files older than *max_age* seconds (left by crashed writers)."""
        removed = 0
        cutoff = time.time() - max_age
        for algo in _ALGORITHMS:
            folder = self.directory / algo
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.name.startswith(_TMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat().st_mtime < cutoff:
                            entry.unlink()
                            removed += 1
        return removed

    def _hit(self, digest: str) -> None:
        with self._stats_lock:
            self.stats.hits += 1
        log.debug("blob %s already cached", digest)


def _hash_file(fh: BinaryIO, algo: str) -> str:
    hasher = hashlib.new(algo)
    fh.seek(0)
    while chunk := fh.read(_CHUNK):
        hasher.update(chunk)
    return f"{algo}:{hasher.hexdigest()}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
