"""The image store: ``<image_path>/<id>.squashfs`` and ``<id>.json``, published atomically.

The store is what every node reads (usually on a shared file system). An image is only
ever visible complete: the squashfs is written to a hidden ``.partial`` file in the same
directory and renamed into place, then its metadata the same way. Readers trust a
``<id>.squashfs`` only when its ``<id>.json`` exists, so a crash between the two renames
leaves an orphan that :meth:`ImageStore.sweep` removes, never a half image.

Public images are mode 0644. Private ones are 0600 plus a POSIX access ACL granting read to
exactly the image's ACL (``user:<uid>:r--`` per user, ``group:<gid>:r--`` per group, mask
``r--``), so that permitted users can read them without privilege (``shifter`` outside a
Slurm job mounts the file with ``squashfuse_ll`` as the user). Where the file system has no
ACLs the files stay 0600 (usable only through root, in Slurm jobs), with a warning.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import struct
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..access import Viewer, visible
from ..errors import ShifterError
from ..fsutil import atomic_file
from .content import MAX_METADATA_TEXT, ImageContentError, check_config, parse_record

if TYPE_CHECKING:  # readers of the store (every container start) need no OCI model
    from .oci import ImageConfig

log = logging.getLogger(__name__)

IMAGE_ID_RE = re.compile(r"^[0-9a-f]{64}$")
PARTIAL_SUFFIX = ".partial"
PUBLIC_MODE = 0o644
PRIVATE_MODE = 0o600


class StoreError(ShifterError):
    """The image store is missing, unwritable or holds something unexpected."""


def check_image_id(image_id: str) -> str:
    """An image id is 64 lower-case hex digits; anything else could be a path."""
    if not IMAGE_ID_RE.match(image_id):
        raise StoreError(f"invalid image id {image_id!r}", hint="ids are 64 hexadecimal digits")
    return image_id


@dataclass(frozen=True)
class Acl:
    """Who may see and use a private image (the puller is always in ``users``)."""

    users: tuple[int, ...] = ()
    groups: tuple[int, ...] = ()

    def allows(self, uid: int, gids: tuple[int, ...] | list[int]) -> bool:
        """Whether ``uid`` with ``gids`` may use an image with this ACL
        (:func:`shifter_core.access.visible`)."""
        return visible(Viewer(uid, gids), self)


@dataclass(frozen=True)
class ImageMetadata:
    """Everything the runtime needs to know about an image, and where it came from."""

    id: str
    source: str
    digest: str
    platform: str
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    workdir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    config_digest: str = ""
    layers: tuple[dict[str, Any], ...] = ()
    size: int = 0
    sha256: str = ""
    created: float = 0.0
    acl: Acl | None = None

    @property
    def private(self) -> bool:
        return self.acl is not None

    def visible_to(self, uid: int, gids: tuple[int, ...] | list[int]) -> bool:
        """Whether ``uid`` with ``gids`` may use the image (:func:`shifter_core.access.visible`)."""
        return visible(Viewer(uid, gids), self.acl)

    @classmethod
    def from_config(
        cls,
        config: ImageConfig,
        *,
        id: str,
        source: str,
        digest: str,
        platform: str,
        config_digest: str,
        layers: Iterable[tuple[str, int, str]],
        size: int,
        acl: Acl | None = None,
    ) -> ImageMetadata:
        """The record of an image built from ``config`` (created now).

        ``layers`` are (digest, size, media type) of the image's layers, in order. The
        config's run-time fields are checked as :mod:`shifter_core.image.content` says: a
        hostile config fails the pull with an :class:`ImageContentError`.
        """
        checked = check_config(
            source,
            env=list(config.env),
            entrypoint=None if config.entrypoint is None else list(config.entrypoint),
            cmd=None if config.cmd is None else list(config.cmd),
            workdir=config.workdir,
            user=config.user,
            labels=dict(config.labels),
        )
        return cls(
            id=id,
            source=source,
            digest=digest,
            platform=platform,
            # check_config returns each field with its type, as a dict of objects
            **checked,  # type: ignore[arg-type]
            config_digest=config_digest,
            layers=tuple({"digest": d, "size": n, "media_type": m} for d, n, m in layers),
            size=size,
            created=time.time(),
            acl=acl,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ImageMetadata:
        """Read a record (the store's ``<id>.json``, a gateway answer): every field is
        checked; anything malformed is an :class:`ImageContentError`, unknown keys are
        ignored."""
        data = parse_record(text)
        acl = data.pop("acl")
        # parse_record checked each field's type; it returns them as a dict of objects
        return cls(acl=None if acl is None else Acl(*acl), **data)  # type: ignore[arg-type,misc]


# -- POSIX access ACLs (acl(5); the xattr format of linux/posix_acl_xattr.h) ------------------

ACL_XATTR = "system.posix_acl_access"
ACL_XATTR_VERSION = 2
ACL_USER_OBJ = 0x01  # entry tags, in the order entries must be sorted
ACL_USER = 0x02
ACL_GROUP_OBJ = 0x04
ACL_GROUP = 0x08
ACL_MASK = 0x10
ACL_OTHER = 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF
ACL_READ, ACL_WRITE = 0x04, 0x02
_ACL_HEADER = struct.Struct("<I")  # little-endian on every architecture
_ACL_ENTRY = struct.Struct("<HHI")  # tag, perm, id

_acl_unsupported_warned = False


def encode_posix_acl(acl: Acl) -> bytes:
    """The ``system.posix_acl_access`` value of a private image's files.

    The owner (the gateway) reads and writes, the owning group and others get nothing (mode
    0600 for everybody outside ``acl``); every listed user and group may read; the mask is
    read-only. Entries are sorted by tag, then id, without duplicates, as the kernel requires.
    """
    named = [(ACL_USER, ACL_READ, uid) for uid in sorted(set(acl.users))]
    named += [(ACL_GROUP, ACL_READ, gid) for gid in sorted(set(acl.groups))]
    entries = [
        (ACL_USER_OBJ, ACL_READ | ACL_WRITE, ACL_UNDEFINED_ID),
        (ACL_GROUP_OBJ, 0, ACL_UNDEFINED_ID),
        (ACL_OTHER, 0, ACL_UNDEFINED_ID),
        *named,
    ]
    if named:
        entries.append((ACL_MASK, ACL_READ, ACL_UNDEFINED_ID))
    entries.sort(key=lambda e: (e[0], e[2]))
    return _ACL_HEADER.pack(ACL_XATTR_VERSION) + b"".join(_ACL_ENTRY.pack(*e) for e in entries)


def decode_posix_acl(data: bytes) -> list[tuple[int, int, int]]:
    """(tag, perm, id) entries of a ``system.posix_acl_access`` value."""
    size = len(data) - _ACL_HEADER.size
    if size < 0 or size % _ACL_ENTRY.size or _ACL_HEADER.unpack_from(data)[0] != ACL_XATTR_VERSION:
        raise ValueError("not a version 2 POSIX ACL")
    return [
        _ACL_ENTRY.unpack_from(data, offset)
        for offset in range(_ACL_HEADER.size, len(data), _ACL_ENTRY.size)
    ]


def _acl_unsupported(path: Path, err: OSError) -> None:
    global _acl_unsupported_warned
    if not _acl_unsupported_warned:
        _acl_unsupported_warned = True
        log.warning(
            "cannot set POSIX ACLs in the image store (%s: %s): private images stay mode 0600 "
            "and can only be used in Slurm jobs; mount the store's file system with ACL support",
            path,
            err.strerror,
        )


def set_image_access(path: Path, acl: Acl | None) -> None:
    """Make an image's file (squashfs or metadata) readable by exactly who may use it.

    Public (``acl`` None): mode 0644 and no ACL. Private: the ACL of :func:`encode_posix_acl`
    (the kernel derives the mode from it: ``rw-r-----``, the group bits being the mask), or
    mode 0600 where the file system has no ACLs. Either change is made in one step for
    those who keep their access: nobody permitted before loses it on the way.
    """
    if acl is None:
        path.chmod(PUBLIC_MODE)  # with an ACL: mask and other r--, so all read at once
        try:
            os.removexattr(path, ACL_XATTR)  # the mode stays 0644
        except OSError as err:
            if err.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise
        return
    try:
        os.setxattr(path, ACL_XATTR, encode_posix_acl(acl))
    except OSError as err:
        if err.errno != errno.EOPNOTSUPP:
            raise
        _acl_unsupported(path, err)
        path.chmod(PRIVATE_MODE)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ImageStore:
    """One directory of images, written by the gateway and read by everyone else."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def image_file(self, image_id: str) -> Path:
        return self.path / f"{check_image_id(image_id)}.squashfs"

    def metadata_file(self, image_id: str) -> Path:
        return self.path / f"{check_image_id(image_id)}.json"

    def create(self) -> None:
        """Make the store's directory, readable by all, if it is missing."""
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self.path.chmod(0o755)  # users read the store; the umask may be 077

    def new_upload(self) -> Path:
        """A fresh hidden file name in the store for an uploaded file (swept after a crash)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path / f".upload-{uuid.uuid4().hex}{PARTIAL_SUFFIX}"

    def discard(self, partial: Path) -> None:
        """Remove a partial file of this store (an upload, an unfinished image), if it is
        there; anything else is refused."""
        if partial.parent != self.path or not partial.name.endswith(PARTIAL_SUFFIX):
            raise StoreError(f"{partial} is not a partial file of the image store {self.path}")
        partial.unlink(missing_ok=True)

    def new_partial(self, image_id: str) -> Path:
        """A fresh hidden file name in the store for an image being written."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path / f".{check_image_id(image_id)}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"

    def publish(self, metadata: ImageMetadata, partial: Path) -> ImageMetadata:
        """Move a complete squashfs into place and write its metadata, both atomically.

        Returns the metadata as written: with the file's size and sha256 (what node caches
        verify their copies against).
        """
        image = self.image_file(metadata.id)
        metadata = dataclasses.replace(
            metadata, size=partial.stat().st_size, sha256=file_sha256(partial)
        )
        with open(partial, "rb") as fh:
            os.fsync(fh.fileno())
        set_image_access(partial, metadata.acl)
        partial.replace(image)
        self._write_metadata(metadata)  # synced, with the directory
        log.info("published image %s (%s, %d bytes)", metadata.id, metadata.source, metadata.size)
        return metadata

    def _write_metadata(self, metadata: ImageMetadata) -> None:
        """Replace an image's record atomically, readable by exactly its ACL."""
        acl = metadata.acl
        with atomic_file(
            self.metadata_file(metadata.id),
            mode=PUBLIC_MODE if acl is None else PRIVATE_MODE,
            sync=True,
            before_replace=lambda partial: set_image_access(Path(partial), acl),
        ) as fh:
            fh.write(metadata.to_json().encode())

    def set_access(self, metadata: ImageMetadata, *, rewrite: bool = True) -> None:
        """Give a published image the ACL of *metadata*: its squashfs first (whoever may
        read the new record can read the image), then its record, replaced atomically.
        Without *rewrite* the record's content stays and only its access is set (files
        published before the store had ACLs get them; idempotent)."""
        set_image_access(self.image_file(metadata.id), metadata.acl)
        if rewrite:
            self._write_metadata(metadata)
        else:
            set_image_access(self.metadata_file(metadata.id), metadata.acl)

    def get(self, image_id: str) -> ImageMetadata | None:
        """The metadata of a complete image, or None; a damaged record (malformed, too
        large, or naming another id) is an :class:`ImageContentError`."""
        try:
            with open(self.metadata_file(image_id), "rb") as fh:
                text = fh.read(MAX_METADATA_TEXT + 1)
        except FileNotFoundError:
            return None
        if not self.image_file(image_id).exists():
            return None
        meta = ImageMetadata.from_json(text)
        if meta.id != image_id:
            raise ImageContentError(
                f"the image record {image_id}.json names the image {meta.id}",
                hint="the image store is damaged; ask an administrator to pull it again",
            )
        return meta

    def __iter__(self) -> Iterator[ImageMetadata]:
        """Every complete image; a damaged record is skipped with a warning."""
        if not self.path.is_dir():
            return
        for meta in sorted(self.path.glob("*.json")):
            if IMAGE_ID_RE.match(meta.stem):
                try:
                    image = self.get(meta.stem)
                except ImageContentError as err:
                    log.warning("skipping the image record %s: %s", meta, err)
                    continue
                if image is not None:
                    yield image

    def remove(self, image_id: str) -> bool:
        """Delete an image (metadata first, so it stops being visible at once)."""
        found = False
        for path in (self.metadata_file(image_id), self.image_file(image_id)):
            try:
                path.unlink()
                found = True
            except FileNotFoundError:
                pass
        return found

    def sweep(self) -> int:
        """Remove partial files and squashfs files without metadata (a crash's leftovers)."""
        removed = 0
        if not self.path.is_dir():
            return 0
        for path in self.path.iterdir():
            orphan = (
                path.suffix == ".squashfs"
                and IMAGE_ID_RE.match(path.stem)
                and not self.metadata_file(path.stem).exists()
            )
            if path.name.endswith(PARTIAL_SUFFIX) or orphan:
                path.unlink(missing_ok=True)
                log.info("removed leftover %s", path)
                removed += 1
        return removed
