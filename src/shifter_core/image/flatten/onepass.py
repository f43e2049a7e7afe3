"""Flatten a single-layer image while it is read: the tar stream leaves as the layer arrives.

A thread decompresses the layer into a spool file (as for the two passes), the headers are read
as it grows and the data is copied from it by the kernel, while the converter works. The result
is what :func:`~.twopass.flatten` writes for that layer, in the layer's order, because every
member goes through the same :mod:`.policy`. Where that cannot be done in one pass (a name
twice, a directory after what it holds, a parent that is not a directory, a sparse file, a
root entry that is not the first), :class:`OnePassImpossible` is raised before the end and the
caller flattens the layer in two passes.
"""

from __future__ import annotations

import tarfile
import threading
from pathlib import Path
from typing import BinaryIO

from ..limits import UnpackBudget
from .policy import (
    DEV,
    DIR,
    FIFO,
    LINK,
    REG,
    SYM,
    FlattenPolicy,
    FlattenStats,
    Meta,
    below_aufs_metadata,
    header,
    hidden_name,
    is_whiteout,
    link_header,
    link_target,
    member_kind,
    member_path,
)
from .spool import LayerSource
from .writer import TarWriter


class OnePassImpossible(Exception):
    """The layer cannot be written as it is read (a name twice, a directory after what it
    holds, a parent that is not a directory, a sparse file): flatten it in two passes."""


def flatten_one_pass(
    layer: Path,
    out: BinaryIO,
    *,
    policy: FlattenPolicy | None = None,
    spool_dir: Path | None = None,
    budget: UnpackBudget | None = None,
) -> FlattenStats:
    """A single-layer image, written to ``out`` while it is read: a thread decompresses it
    into a spool file (as for :func:`~.twopass.flatten`), the headers are read as it grows and
    the data is copied from it by the kernel, while the converter works.  The result is what
    :func:`~.twopass.flatten` writes for that layer, in the layer's order; where that cannot be
    done in one pass, ``OnePassImpossible`` is raised before the end (the output must then be
    discarded, as after any error)."""
    policy = policy or FlattenPolicy()
    stats = FlattenStats(layers=1)
    writer = TarWriter(out)
    seen: dict[str, str] = {"": DIR}  # path -> its kind (dropped devices too; "devkept")
    primaries: dict[str, tarfile.TarInfo] = {}  # written non-directories, for hardlinks
    primary_of: dict[str, str] = {}  # a name -> the name its inode was written under
    source = LayerSource(Path(layer), 0, spool_dir, threading.Semaphore(1), budget)
    members = 0
    try:
        for member in source.members():
            members += 1
            path = member_path(0, member, stats)
            if path == "":  # the root, first; after anything else it would come too late
                if members > 1 or not member.isdir():
                    raise OnePassImpossible("the layer's root entry is not its first")
                writer.add(header(".", Meta(member, policy.keep_xattrs), policy))
                stats.dirs += 1
                continue
            if members == 1:  # no root entry first: the implicit one, as flatten() writes it
                writer.add(header(".", Meta(None, False), policy))
                stats.dirs += 1
            if path is None:
                continue
            if is_whiteout(path):  # nothing below to hide: only counted
                hidden_name(0, member, path, stats)
                continue
            if below_aufs_metadata(path):
                continue
            if path in seen:  # also a directory that came after what it holds
                raise OnePassImpossible(f"{path!r} is in the layer twice, or late")
            kind = member_kind(0, member, stats)
            if kind is None:
                continue
            target = None
            if kind == LINK:
                target = link_target(0, member, stats, seen.get)
                if target is None:
                    continue
            parts = path.split("/")
            for depth in range(1, len(parts)):
                parent = "/".join(parts[:depth])
                parent_kind = seen.get(parent)
                if parent_kind is None:  # as flatten() writes a directory no layer declares
                    seen[parent] = DIR
                    writer.add(header(parent, Meta(None, False), policy))
                    stats.dirs += 1
                elif parent_kind != DIR:
                    raise OnePassImpossible(f"{path!r} is below a non-directory")
            _write_member(
                member,
                kind,
                path,
                target,
                source,
                writer,
                policy,
                stats,
                seen,
                primaries,
                primary_of,
            )
        source.size()  # the whole layer decompressed: a bad checksum at its end fails here
    finally:
        source.close()
    if members == 0:
        writer.add(header(".", Meta(None, False), policy))
        stats.dirs += 1
    writer.close()
    return stats


def _write_member(
    member: tarfile.TarInfo,
    kind: str,
    path: str,
    target: str | None,
    source: LayerSource,
    writer: TarWriter,
    policy: FlattenPolicy,
    stats: FlattenStats,
    seen: dict[str, str],
    primaries: dict[str, tarfile.TarInfo],
    primary_of: dict[str, str],
) -> None:
    """One kept member of :func:`flatten_one_pass` (of *kind*; a hardlink's *target*), as
    :func:`~.twopass.flatten` would write it."""
    meta = Meta(member, policy.keep_xattrs)
    if kind == DIR:
        seen[path] = DIR
        writer.add(header(path, meta, policy))
        stats.dirs += 1
    elif kind == LINK:
        assert target is not None
        target_kind = seen[target]
        if target_kind == DEV:  # a device that is not written: neither is this name
            seen[path] = DEV
            stats.devices_dropped += 1
        else:
            primary = primary_of.get(target, target)
            seen[path], primary_of[path] = target_kind, primary
            writer.add(link_header(path, primary, primaries[primary]))
            stats.hardlinks += 1
    elif kind == REG:
        if member.sparse is not None:
            raise OnePassImpossible(f"{path!r} is a sparse file")
        info = header(path, meta, policy)
        info.type = tarfile.REGTYPE
        if info.size:
            source.wait_for(member.offset_data + info.size)
            writer.add_data(info, source, member.offset_data)
        else:
            writer.add(info)
        seen[path], primaries[path] = REG, info
        stats.files += 1
        stats.bytes += info.size
    elif kind == SYM:
        info = header(path, meta, policy)
        writer.add(info)
        seen[path], primaries[path] = SYM, info
        stats.symlinks += 1
    elif kind == FIFO:
        info = header(path, meta, policy)
        writer.add(info)
        seen[path], primaries[path] = FIFO, info
        stats.fifos += 1
    elif policy.keeps(DEV):
        info = header(path, meta, policy)
        writer.add(info)
        seen[path], primaries[path] = "devkept", info
        stats.devices += 1
    else:
        seen[path] = DEV
        stats.devices_dropped += 1
