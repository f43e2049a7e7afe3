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

Bounds: with ``max_bytes`` the cache evicts the least recently used blobs (by mtime, which
each hit renews) after every download until it fits, skipping blobs that a running pull has
:meth:`~LayerCache.pinned`. Privacy: a blob downloaded with registry credentials carries a
marker (``<dir>/private/<algo>-<hex>``, naming the registry) written before the blob is
published; the registry client reuses such a blob for another pull only after that pull's own
request proved access (:meth:`shifter_core.image.registry.client.RegistryClient.prove_access`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..fsutil import PARTIAL_SUFFIX, atomic_file
from .errors import DigestMismatch
from .oci import split_digest

log = logging.getLogger(__name__)

_ALGORITHMS = ("sha256", "sha512")
_CHUNK = 1 << 20

Writer = Callable[[BinaryIO], object]  # what it returns is ignored


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
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: bool = True,
        mode: int = 0o700,
        max_bytes: int = 0,
    ) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.max_bytes = max_bytes
        if not self.directory.exists():
            self.directory.mkdir(mode=mode, parents=True, exist_ok=True)
        self._locks = self.directory / "locks"
        self._locks.mkdir(exist_ok=True)
        self._private = self.directory / "private"
        self._private.mkdir(exist_ok=True)
        self.stats = CacheStats()
        self._stats_lock = threading.Lock()
        self._pins: dict[str, int] = {}
        self._evict_lock = threading.Lock()

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
                    if not entry.name.endswith(PARTIAL_SUFFIX):
                        yield f"{algo}:{entry.name}"

    def size(self) -> int:
        """Total bytes of the cached blobs."""
        total = 0
        for digest in self.digests():
            with contextlib.suppress(FileNotFoundError):
                total += self.path(digest).stat().st_size
        return total

    # -- privacy -------------------------------------------------------------------------------

    def _marker(self, digest: str) -> Path:
        algo, hexdigest = split_digest(digest)
        return self._private / f"{algo}-{hexdigest}"

    def private_origin(self, digest: str) -> str | None:
        """The registry a blob was downloaded from with credentials; None for a public one."""
        try:
            return self._marker(digest).read_text(encoding="utf-8").strip() or "?"
        except FileNotFoundError:
            return None

    def mark_public(self, digest: str) -> None:
        """Anonymous access to *digest* was proven: anyone may reuse it."""
        self._marker(digest).unlink(missing_ok=True)

    # -- the size bound ------------------------------------------------------------------------

    @contextlib.contextmanager
    def pinned(self, digests: Iterable[str]) -> Iterator[None]:
        """Keep *digests* from eviction while the block runs (a pull that uses them)."""
        held = list(dict.fromkeys(digests))
        with self._evict_lock:
            for digest in held:
                self._pins[digest] = self._pins.get(digest, 0) + 1
        try:
            yield
        finally:
            with self._evict_lock:
                for digest in held:
                    self._pins[digest] -= 1
                    if not self._pins[digest]:
                        del self._pins[digest]

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least recently used blobs until the cache fits ``max_bytes``."""
        if not self.max_bytes:
            return []
        removed: list[str] = []
        with self._evict_lock:
            entries = []
            for digest in self.digests():
                with contextlib.suppress(FileNotFoundError):
                    st = self.path(digest).stat()
                    entries.append((st.st_mtime, digest, st.st_size))
            total = sum(e[2] for e in entries)
            for _mtime, digest, size in sorted(entries):
                if total <= self.max_bytes:
                    break
                if digest == keep or digest in self._pins or not self._try_remove(digest):
                    continue
                total -= size
                removed.append(digest)
        if removed:
            log.info(
                "evicted %d layer(s) to keep the cache under %d bytes", len(removed), self.max_bytes
            )
        if total > self.max_bytes:
            log.warning(
                "layer cache %s holds %d bytes, over its cap of %d: the rest is in use",
                self.directory,
                total,
                self.max_bytes,
            )
        return removed

    def _try_remove(self, digest: str) -> bool:
        """Remove a blob unless someone holds its lock (downloading or waiting for it)."""
        algo, hexdigest = split_digest(digest)
        fd = os.open(
            self._locks / f"{algo}-{hexdigest}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            with contextlib.suppress(FileNotFoundError):
                self.path(digest).unlink()
            self.mark_public(digest)
            return True
        finally:
            os.close(fd)

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
        self,
        digest: str,
        writer: Writer,
        *,
        size: int | None = None,
        verify: bool = True,
        private: str | None = None,
    ) -> Path:
        """Make sure the blob *digest* is cached; return its path.

        When the blob is missing, ``writer(fileobj)`` is called (under the per-digest lock) to
        write it into a temporary file in the cache directory; the file is then checked
        (digest, and *size* when given; skip the digest with ``verify=False`` when the writer
        verified while streaming) and published atomically. If *writer* raises or the check
        fails, the temporary file is removed and nothing becomes visible. A blob that is
        already present (or that another thread or process finishes while this call waits for
        the lock) is not written again. *private* (a registry name) marks a new blob as
        downloaded with credentials from there. Over ``max_bytes``, older blobs are evicted.
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
            written = 0

            def check(partial: str) -> None:
                """The blob is complete and what it claims, and marked, before it appears."""
                if size is not None and written != size:
                    raise DigestMismatch(
                        f"blob {digest} has {written} bytes, expected {size}",
                        blob=digest,
                        expected=digest,
                        actual=None,
                    )
                if verify:
                    actual = _hash_file(partial, split_digest(digest)[0])
                    if actual != digest:
                        raise DigestMismatch(
                            f"blob {digest} failed verification: expected {digest}, got {actual}",
                            blob=digest,
                            expected=digest,
                            actual=actual,
                        )
                if private is not None:
                    self._marker(digest).write_text(private, encoding="utf-8")
                else:
                    self.mark_public(digest)

            with atomic_file(final, mode=0o644, sync=self.fsync, before_replace=check) as fh:
                writer(fh)
                written = fh.tell()
        elapsed = time.monotonic() - started
        with self._stats_lock:
            self.stats.downloads += 1
            self.stats.bytes_written += written
            self.stats.downloaded.append(digest)
        log.info("cached blob %s (%d bytes) in %.2f s", digest, written, elapsed)
        self.evict(keep=digest)
        return final

    def put_bytes(self, digest: str, data: bytes) -> Path:
        """Cache *data* as blob *digest* (verified)."""
        return self.put(digest, lambda fh: fh.write(data), size=len(data))

    def remove(self, digest: str) -> bool:
        """Delete the blob *digest*; True when it was there."""
        with self.lock(digest):
            self.mark_public(digest)
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
                if entry.name.endswith(PARTIAL_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat().st_mtime < cutoff:
                            entry.unlink()
                            removed += 1
        return removed

    def _hit(self, digest: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.path(digest))  # most recently used
        with self._stats_lock:
            self.stats.hits += 1
        log.debug("blob %s already cached", digest)


def _hash_file(path: str, algo: str) -> str:
    hasher = hashlib.new(algo)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            hasher.update(chunk)
    return f"{algo}:{hasher.hexdigest()}"
