"""What each tar member becomes: the one member policy of both passes.

Paths are normalised (a member or hardlink target that leaves the root is dropped and counted);
whiteouts are told apart (opaque, a name, aufs metadata, invalid; one with an empty name
refuses the layer); a member's kind decides what it becomes (unsupported types are dropped and
counted; FIFOs are kept like files, devices only if the policy says so); a hardlink must name a
file already in the tree; the metadata written is the member's after :class:`FlattenPolicy`
(modes, xattrs, devices). :mod:`.tree` (two passes) and :mod:`.onepass` apply these functions
in the layer's order, so the two passes drop, count and log the same members the same way.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field

from .spool import FlattenError

LOG = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"

_XATTR_PREFIX = "SCHILY.xattr."

DEVICE_TYPES = (tarfile.CHRTYPE, tarfile.BLKTYPE)  # a FIFO is not a device: it is kept
REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE)

# Member kinds (what the tree and the one-pass writer record for a path).
DIR, LINK, REG, SYM, FIFO, DEV = "dir", "link", "reg", "sym", "fifo", "dev"


@dataclass(frozen=True)
class FlattenPolicy:
    """What survives flattening.  The defaults are Shifter's policy (DESIGN.md item 2)."""

    keep_devices: bool = False  # char/block devices (FIFOs are always kept)
    keep_xattrs: bool = False  # PAX SCHILY.xattr.* records (file capabilities among them)
    world_readable: bool = True  # a+rX on every entry
    keep_setid: bool = True  # setuid/setgid bits (the runtime mounts nosuid)

    def keeps(self, kind: str) -> bool:
        """Whether a non-directory of *kind* is written (devices only if kept)."""
        return kind != DEV or self.keep_devices


@dataclass
class FlattenStats:
    """What ``flatten`` wrote and dropped.

    ``files`` counts regular-file inodes written with their content (a hardlinked file
    counts once, its other names count in ``hardlinks``); ``dirs`` includes the root.
    ``fifos`` counts FIFO inodes written (like files: other names count in ``hardlinks``);
    ``devices_dropped`` counts names of devices in the final tree that were not written;
    ``escaping_dropped`` counts members (and hardlinks) whose path or link target leaves the
    root; ``whiteouts`` counts whiteout entries applied (opaque ones included);
    ``other_dropped`` counts hardlinks to missing targets or directories and members of
    unsupported types.
    """

    layers: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    fifos: int = 0
    devices: int = 0  # devices written (only with FlattenPolicy.keep_devices)
    bytes: int = 0
    devices_dropped: int = 0
    escaping_dropped: int = 0
    whiteouts: int = 0
    other_dropped: int = 0
    layers_with_data: list[int] = field(default_factory=list)


class Meta:
    """The metadata of a directory or inode, as it will be written (before the policy)."""

    __slots__ = (
        "devmajor",
        "devminor",
        "gid",
        "linkname",
        "mode",
        "mtime",
        "size",
        "type",
        "uid",
        "xattrs",
    )
    mtime: float  # PAX headers carry fractions of a second

    def __init__(self, member: tarfile.TarInfo | None, keep_xattrs: bool) -> None:
        self.xattrs: dict[str, str] | None = None
        if member is None:  # an implicit directory
            self.type, self.mode, self.uid, self.gid, self.mtime = tarfile.DIRTYPE, 0o755, 0, 0, 0
            self.size, self.linkname, self.devmajor, self.devminor = 0, "", 0, 0
            return
        self.type = member.type
        self.mode = member.mode & 0o7777
        self.uid = member.uid
        self.gid = member.gid
        self.mtime = member.mtime
        self.size = member.size if member.isreg() else 0
        self.linkname = member.linkname if member.issym() else ""
        self.devmajor = member.devmajor
        self.devminor = member.devminor
        if keep_xattrs:
            xattrs = {k: v for k, v in member.pax_headers.items() if k.startswith(_XATTR_PREFIX)}
            self.xattrs = xattrs or None


def normalise(name: str) -> str | None:
    """Return ``name`` relative to the image root, ``""`` for the root, None if it escapes."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def member_path(layer: int, member: tarfile.TarInfo, stats: FlattenStats) -> str | None:
    """The member's path relative to the image root (``""`` for the root), or None when it
    leaves the root: then the member is dropped, counted and logged."""
    path = normalise(member.name)
    if path is None:
        stats.escaping_dropped += 1
        LOG.warning(
            "layer %d: dropping %r: its path leaves the image root", layer + 1, member.name
        )
    return path


def is_whiteout(path: str) -> bool:
    """Whether the member at *path* is a whiteout (or aufs metadata), never written."""
    return path.rpartition("/")[2].startswith(WHITEOUT_PREFIX)


def below_aufs_metadata(path: str) -> bool:
    """Whether *path* is below aufs metadata (``.wh..wh.plnk/...``): ignored."""
    return any(part.startswith(WHITEOUT_META_PREFIX) for part in path.split("/")[:-1])


def hidden_name(layer: int, member: tarfile.TarInfo, path: str, stats: FlattenStats) -> str | None:
    """What the whiteout at *path* hides in its directory: a name, :data:`WHITEOUT_OPAQUE` for
    every child, or None for aufs metadata and invalid whiteouts (``.wh..`` and ``.wh...``:
    counted and logged). A whiteout that hides something counts in ``stats.whiteouts``.

    A whiteout with an empty name (``.wh.``) refuses the layer, as umoci does: ``FlattenError``
    naming the layer (from 1) and the member."""
    base = path.rpartition("/")[2]
    if base == WHITEOUT_OPAQUE:
        stats.whiteouts += 1
        return WHITEOUT_OPAQUE
    if base.startswith(WHITEOUT_META_PREFIX):
        return None  # aufs metadata (.wh..wh.plnk, .wh..wh.aufs, ...): not a whiteout
    name = base[len(WHITEOUT_PREFIX) :]
    if not name:
        raise FlattenError(
            f"layer {layer + 1}: the whiteout {member.name!r} has an empty name",
            "the layer is invalid (umoci refuses it too); rebuild the image without it",
        )
    if name in (".", ".."):
        stats.other_dropped += 1
        LOG.warning("layer %d: ignoring invalid whiteout %r", layer + 1, member.name)
        return None
    stats.whiteouts += 1
    return name


def member_kind(layer: int, member: tarfile.TarInfo, stats: FlattenStats) -> str | None:
    """:data:`DIR`, :data:`LINK`, :data:`REG`, :data:`SYM`, :data:`FIFO` or :data:`DEV`
    (char/block devices); None for any other type: then the member is dropped, counted and
    logged."""
    if member.isdir():
        return DIR
    if member.islnk():
        return LINK
    if member.type in REGULAR_TYPES:
        return REG
    if member.issym():
        return SYM
    if member.isfifo():
        return FIFO
    if member.type in DEVICE_TYPES:
        return DEV
    stats.other_dropped += 1
    LOG.warning(
        "layer %d: dropping %r: unsupported tar member type %r",
        layer + 1,
        member.name,
        member.type,
    )
    return None


def link_target(
    layer: int,
    member: tarfile.TarInfo,
    stats: FlattenStats,
    kind_at: Callable[[str], str | None],
) -> str | None:
    """The path that hardlink *member* names, if that is a non-directory of the tree so far
    (*kind_at* gives the kind at a path, None where there is nothing); else None: then the
    hardlink is dropped, counted and logged."""
    target = normalise(member.linkname)
    if target is None:
        stats.escaping_dropped += 1
        LOG.warning(
            "layer %d: dropping hardlink %r: its target %r leaves the image root",
            layer + 1,
            member.name,
            member.linkname,
        )
        return None
    kind = kind_at(target) if target else DIR
    if kind is None or kind == DIR:
        stats.other_dropped += 1
        what = "is a directory" if kind == DIR else "does not exist"
        LOG.warning(
            "layer %d: dropping hardlink %r: its target %r %s",
            layer + 1,
            member.name,
            member.linkname,
            what,
        )
        return None
    return target


def header(path: str, meta: Meta, policy: FlattenPolicy) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type = meta.type
    mode = meta.mode
    if not policy.keep_setid:
        mode &= ~0o6000
    if policy.world_readable:
        mode |= 0o444
        if meta.type == tarfile.DIRTYPE or mode & 0o111:
            mode |= 0o111
    info.mode = mode
    info.uid = meta.uid
    info.gid = meta.gid
    info.uname = ""
    info.gname = ""
    info.mtime = meta.mtime
    info.size = meta.size
    info.linkname = meta.linkname
    info.devmajor = meta.devmajor
    info.devminor = meta.devminor
    if meta.xattrs:
        info.pax_headers = dict(meta.xattrs)
    return info


def link_header(path: str, target: str, primary: tarfile.TarInfo) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    info.mode, info.uid, info.gid = primary.mode, primary.uid, primary.gid
    info.mtime = primary.mtime
    info.uname = info.gname = ""
    return info
