"""The node-local image cache: verified copies of store images, shared by jobs, LRU-evicted.

Reading an image from a shared file system on every node of every job is what makes
container start-up slow at scale; a node-local copy is read once per node. The cache is a
directory (one per node; nodes sharing a host need one each)::

    <dir>/<id>.squashfs          complete, verified copies (published by rename)
    <dir>/.<id>.<pid>.partial    a copy in progress
    <dir>/holds/<id>/<holder>    one empty file per job using the image on this node
    <dir>/.lock                  flock: staging and eviction are serialised
    <dir>/stats.json             copies, hits, evictions (for administrators and tests)

A copy is verified against the sha256 the store recorded at publish time while it is
written, so a truncated or corrupted source never becomes a cache entry. Entries held by a
running job are never evicted; others go least recently used first when the cache is over
its size cap (``slurm.node_cache_size``, 50G by default) or when its file system has not
enough free space for the copy (whatever the cap).

A full disk (ENOSPC), an exhausted quota (EDQUOT) or no file descriptors left (EMFILE,
ENFILE) while staging is the job's error, not the node's: :class:`NodeCacheError` with the
reason and a hint, the partial copy and the job's hold removed. Other errors of the cache
directory (EACCES, EROFS, EIO) are left as ``OSError``: a fault of the node.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from ..errors import ShifterError
from .store import check_image_id

log = logging.getLogger(__name__)

CHUNK = 1 << 20
RESERVE = 64 << 20  # free bytes left on the cache's file system after a copy (at most 5%)

# What a job can exhaust on a node; the job fails, the node is fine.
STORAGE_ERRNOS = {
    errno.ENOSPC: (
        "no space left on the node's disk",
        "the node's disk is full; retry on other nodes, or tell your site",
    ),
    errno.EDQUOT: (
        "the disk quota is exhausted",
        "ask your site to raise the quota of that file system",
    ),
    errno.EMFILE: (
        "too many open files in the process",
        "retry; if it persists, ask your site to raise slurmd's open file limit",
    ),
    errno.ENFILE: (
        "too many open files on the node",
        "retry later; if it persists, ask your site to raise fs.file-max",
    ),
}
CACHE_FULL_HINT = (
    "the image is larger than the node cache's free space; ask your site to enlarge the "
    "node cache or to mount images from the store (slurm.image_source: mount)"
)


class NodeCacheError(ShifterError):
    """An image could not be staged into the node cache."""


def storage_error(err: OSError, what: str) -> ShifterError | None:
    """The job error for ``err`` met while doing ``what`` (e.g. "staging image X into
    /var/cache/shifter"), or None when ``err`` is not something a job exhausts."""
    reason = STORAGE_ERRNOS.get(err.errno or 0)
    if reason is None:
        return None
    return NodeCacheError(f"{what}: {reason[0]} ({err.strerror})", hint=reason[1])


class Blob(Protocol):
    """Where a copy comes from: a file of the store or an artifact of a registry."""

    @property
    def size(self) -> int: ...

    @property
    def public(self) -> bool:
        """Whether users may read the copy (a private image's copy stays root's)."""
        ...

    def open(self) -> contextlib.AbstractContextManager[IO[bytes]]: ...


@dataclass(frozen=True)
class FileBlob:
    """An image file of the store."""

    path: Path

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    @property
    def public(self) -> bool:
        # Readable by all only if the store's file is: a private image stays root's (the
        # prolog mounts it, users never read the copy).
        return bool(os.stat(self.path).st_mode & stat.S_IROTH)

    def __str__(self) -> str:
        return str(self.path)

    def open(self) -> contextlib.AbstractContextManager[IO[bytes]]:
        return open(self.path, "rb")


class NodeCache:
    """One node's cache directory, capped at ``max_bytes`` (0: no cap)."""

    def __init__(self, directory: str | Path, max_bytes: int = 0) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes

    def path(self, image_id: str) -> Path:
        return self.directory / f"{check_image_id(image_id)}.squashfs"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- statistics ---------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        counts = {"copies": 0, "hits": 0, "evictions": 0}
        try:
            stored = json.loads((self.directory / "stats.json").read_text())
        except (OSError, ValueError):
            return counts
        if isinstance(stored, dict):
            counts.update((k, v) for k, v in stored.items() if k in counts and type(v) is int)
        return counts

    def _count(self, key: str) -> None:
        """Count an event; best effort (a full disk must not fail a job for statistics)."""
        stats = self.stats()
        stats[key] = stats.get(key, 0) + 1
        partial = self.directory / f".stats.{os.getpid()}.partial"
        try:
            partial.write_text(json.dumps(stats))
            partial.replace(self.directory / "stats.json")
        except OSError as err:
            log.warning("cannot update %s/stats.json: %s", self.directory, err.strerror)
            partial.unlink(missing_ok=True)

    # -- holds --------------------------------------------------------------------------

    def _hold_dir(self, image_id: str) -> Path:
        return self.directory / "holds" / check_image_id(image_id)

    def hold(self, image_id: str, holder: str) -> None:
        """Mark ``image_id`` as used by ``holder`` (a job on this node)."""
        if "/" in holder or holder.startswith("."):
            raise ValueError(f"bad holder name {holder!r}")
        directory = self._hold_dir(image_id)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / holder).touch()

    def release(self, holder: str) -> int:
        """Drop every hold of ``holder``; return how many there were (idempotent)."""
        released = 0
        for hold in (self.directory / "holds").glob(f"*/{holder}"):
            hold.unlink(missing_ok=True)
            released += 1
            with contextlib.suppress(OSError):
                hold.parent.rmdir()
        return released

    def holders(self, image_id: str) -> list[str]:
        directory = self._hold_dir(image_id)
        return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []

    # -- staging ------------------------------------------------------------------------

    def stage(self, image_id: str, source: Path | Blob, sha256: str, holder: str) -> Path:
        """A verified local copy of ``source`` (a store file or a :class:`Blob`) for
        ``holder``; copied only if not cached.

        Concurrent calls for the same image (two jobs starting on one node) copy it once:
        the second waits for the lock and finds the entry. A full disk, an exhausted quota
        or no file descriptors left is a :class:`NodeCacheError` (see the module); so is
        an image larger than the file system can hold after evicting every unheld entry,
        found before anything is copied.
        """
        target = self.path(image_id)
        blob = FileBlob(source) if isinstance(source, Path) else source
        try:
            with self._locked():
                self.hold(image_id, holder)
                try:
                    return self._stage_locked(image_id, blob, sha256, target)
                except BaseException:
                    self._unhold(image_id, holder)
                    raise
        except OSError as err:
            error = storage_error(err, f"cannot stage image {image_id[:12]} into {self.directory}")
            if error is None:
                raise
            if err.errno == errno.ENOSPC:
                error.hint = CACHE_FULL_HINT
            log.error("%s", error)
            raise error from None

    def _stage_locked(self, image_id: str, source: Blob, sha256: str, target: Path) -> Path:
        if target.exists():
            os.utime(target)  # recently used
            self._count("hits")
            log.info("node cache hit for image %s", image_id)
            return target
        size = source.size
        self._evict(needed=size, keep=image_id)
        free = self._free_bytes()
        if size > free:
            raise NodeCacheError(
                f"cannot stage image {image_id[:12]} into {self.directory}: not enough space "
                f"({size} bytes needed, {free} free after evicting every unused image)",
                hint=CACHE_FULL_HINT,
            )
        self._copy(source, target, sha256)
        self._count("copies")
        log.info("staged image %s into the node cache (%d bytes)", image_id, size)
        return target

    def _unhold(self, image_id: str, holder: str) -> None:
        with contextlib.suppress(OSError):
            (self._hold_dir(image_id) / holder).unlink()
            self._hold_dir(image_id).rmdir()

    def _free_bytes(self) -> int:
        """Bytes a copy may use on the cache's file system, a reserve kept free."""
        fs = os.statvfs(self.directory)
        reserve = min(RESERVE, fs.f_blocks * fs.f_frsize // 20)
        return max(0, fs.f_bavail * fs.f_frsize - reserve)

    def _copy(self, source: Blob, target: Path, sha256: str) -> None:
        partial = self.directory / f".{target.stem}.{os.getpid()}.partial"
        digest = hashlib.sha256()
        started = time.monotonic()
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            copied = 0
            with source.open() as src, os.fdopen(fd, "wb") as dst:
                while chunk := src.read(CHUNK):
                    copied += len(chunk)
                    if copied > source.size:
                        break  # a source longer than announced is corrupt: no need to read it all
                    digest.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            if (sha256 and digest.hexdigest() != sha256) or copied != source.size:
                raise NodeCacheError(
                    f"the copy of {source} is corrupt: {copied} bytes with sha256 "
                    f"{digest.hexdigest()}, expected {source.size} bytes with sha256 {sha256}",
                    hint="the image in the store is damaged; ask an administrator to pull it again",
                )
            if source.public:
                partial.chmod(0o644)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        log.debug("copied %s in %.2f s", source, time.monotonic() - started)

    def _evict(self, needed: int, keep: str) -> None:
        """Remove unheld entries, least recently used first, until ``needed`` bytes fit
        under the cap and in the file system's free space."""
        entries = []
        for path in self.directory.glob("*.squashfs"):
            with contextlib.suppress(FileNotFoundError):
                if path.stem != keep:
                    entries.append((path.stat(), path))
        entries.sort(key=lambda e: e[0].st_mtime)
        used = sum(st.st_size for st, _ in entries)
        cap = self.max_bytes or None
        free = self._free_bytes()
        for st, entry in entries:
            if (cap is None or used + needed <= cap) and needed <= free:
                return
            if self.holders(entry.stem):
                continue
            entry.unlink(missing_ok=True)
            used -= st.st_size
            free = self._free_bytes()
            self._count("evictions")
            log.info("evicted image %s from the node cache", entry.stem)
        if cap is not None and used + needed > cap:
            log.warning(
                "node cache over its cap (%d + %d > %d bytes): every entry is in use",
                used,
                needed,
                cap,
            )

    def sweep(self) -> int:
        """Remove partial copies left by a crash (call when nothing stages)."""
        removed = 0
        with self._locked():
            for partial in self.directory.glob(".*.partial"):
                partial.unlink(missing_ok=True)
                removed += 1
        return removed
