"""Flatten OCI/Docker image layers into one tar stream, without extracting anything to disk.

``flatten(layers, out)`` applies the layer tars in order, as the OCI image spec's "Applying
changesets" describes, and writes ONE PAX tar of the final tree to ``out`` (meant to be the
stdin of ``tar2sqfs``).  Layers may be gzip-, zstd- or un-compressed; the compression is
detected from the magic bytes, never from the name.

How it works (two passes; memory proportional to the number of entries in the final tree,
never to file sizes; each layer decompressed once):

1. *Plan*: every compressed layer is decompressed once (gzip with ISA-L, zstd with
   python-zstandard) into an anonymous spool file (``spool_dir``; an uncompressed layer is
   used in place), and its headers are read in order, seeking over the data.  An in-memory
   tree is updated as each member is applied: directories hold their metadata and children;
   every other name points to an *inode* (regular file, symlink, device or FIFO) that
   remembers the layer and the offset of its data.  Hardlinks add a name to the inode that
   their target names at that moment, so a hardlink keeps its content when the original is
   later whited out or replaced, and hardlinks across layers work.
2. *Emit*: the final tree is written in this order:

   a. every directory, root (``./``) first, then sorted by path, so parents come before their
      children (metadata from the last layer that declared the directory; directories no
      layer declares are emitted as mode 0755, uid/gid 0, mtime 0, as ``tar2sqfs`` does);
   b. inodes without data (symlinks, empty files, devices when kept), sorted by path;
   c. regular files with data, in layer order and offset order inside a layer; the kernel
      copies the data from the spool files to the output (``sendfile``) when the output is
      a pipe or a file.

   An inode with several surviving names is written once, under its first surviving name
   (the name that was created first), immediately followed by hardlinks to it for the other
   names.  The stream is therefore valid for any tar reader: directories before their
   contents, hardlink targets before the links.  ``tar2sqfs`` builds its tree in memory and
   keeps every mtime (its default; ``-k`` would drop them).  GNU tar, which restores a
   directory's mtime as soon as the archive leaves that directory, needs
   ``--delay-directory-restore`` to keep directory mtimes with this order.

Semantics (matching ``umoci unpack`` where the spec leaves room):

- ``DIR/.wh.NAME`` removes ``NAME`` and its subtree; ``DIR/.wh..wh..opq`` removes every child
  of ``DIR``.  Both affect only what lower layers put there: entries of the same layer (and
  directories that are ancestors of them) that were applied before the whiteout survive.
  Whiteouts never appear in the output; whiteouts of missing paths are no-ops; aufs metadata
  (``.wh..wh.*`` other than the opaque marker, and anything below it) is ignored.
- A non-directory replaces whatever was at its path (a directory with its whole subtree); a
  directory replaces a non-directory; a directory entry for an existing directory only
  updates its metadata and keeps its children.  Parents that a member needs but no layer
  declared are created implicitly; a non-directory in the way of such a parent is replaced
  by a directory (like overlayfs; symlinks are never followed, so ``lib/x`` below a ``lib``
  symlink does not land in the symlink's target as it would with ``umoci``).
- Symlinks are data: targets are kept verbatim, even absolute or escaping ones.
- Names are normalised: a leading ``/`` or ``./``, ``.`` components and trailing slashes are
  dropped and ``..`` is resolved lexically, so ``/abs/path`` becomes ``abs/path`` (the image
  root is the only root a layer knows, as in Docker, containerd and umoci).  A member whose
  name still climbs above the root (``../x``, ``a/../../x``) is dropped with a warning, and so
  is a hardlink whose target does; nothing can name anything outside the tree.

Policy (DESIGN.md item 2; ``FlattenPolicy``): contents, types, modes, numeric uid/gid and
mtimes (including fractions of a second, in PAX records) are kept, user and group names are
not; setuid, setgid and sticky bits are kept (the runtime mounts every image ``nosuid`` and
sets ``no_new_privs``); device nodes and FIFOs are dropped and counted, hardlinks to them
too; every extended attribute (PAX ``SCHILY.xattr.*``, hence file capabilities) and every
other PAX record is dropped; every entry gets ``a+rX`` (read for all; execute/search for all
on directories and on files with any execute bit).

Errors: a layer that is missing, compressed otherwise (xz, bzip2, lz4), corrupt or truncated
(bad header checksum or partial header in the middle of the tar, a gzip or zstd stream cut
short or failing its checksum) raises ``FlattenError`` naming the layer; ``tarfile`` and
python-zstandard would otherwise end such a layer early without a word.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard
from isal import igzip, isal_zlib

from ...errors import ShifterError
from ..limits import UnpackBudget

LOG = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_UNSUPPORTED_MAGIC = {
    b"\xfd7zXZ\x00": "xz",
    b"BZh": "bzip2",
    b"\x04\x22\x4d\x18": "lz4",
}

# tarfile's stream buffers slice their whole buffer on every read and write: larger buffers
# cost more than they save (measured: 64 KiB is the sweet spot).
_BUFSIZE = 1 << 16
_SPOOL_CHUNK = 1 << 20  # decompression and copy chunks
_XATTR_PREFIX = "SCHILY.xattr."
# What reading a corrupt or truncated layer raises, from tarfile and the decompressors.
_READ_ERRORS = (
    tarfile.TarError,
    OSError,
    EOFError,
    zlib.error,
    isal_zlib.error,
    zstandard.ZstdError,
)

# Inode kinds.
_REG, _SYM, _DEV = "reg", "sym", "dev"

_DEVICE_TYPES = (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE)
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE)


class FlattenError(ShifterError):
    """A layer could not be read or does not form a valid image."""


@dataclass(frozen=True)
class FlattenPolicy:
    """What survives flattening.  The defaults are Shifter's policy (DESIGN.md item 2)."""

    keep_devices: bool = False  # char/block devices and FIFOs
    keep_xattrs: bool = False  # PAX SCHILY.xattr.* records (file capabilities among them)
    world_readable: bool = True  # a+rX on every entry
    keep_setid: bool = True  # setuid/setgid bits (the runtime mounts nosuid)


@dataclass
class FlattenStats:
    """What ``flatten`` wrote and dropped.

    ``files`` counts regular-file inodes written with their content (a hardlinked file
    counts once, its other names count in ``hardlinks``); ``dirs`` includes the root.
    ``devices_dropped`` counts names of devices and FIFOs in the final tree that were not
    written; ``escaping_dropped`` counts members (and hardlinks) whose path or link target
    leaves the root; ``whiteouts`` counts whiteout entries applied (opaque ones included);
    ``other_dropped`` counts hardlinks to missing targets or directories and members of
    unsupported types.
    """

    layers: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    devices: int = 0  # devices and FIFOs written (only with FlattenPolicy.keep_devices)
    bytes: int = 0
    devices_dropped: int = 0
    escaping_dropped: int = 0
    whiteouts: int = 0
    other_dropped: int = 0
    layers_with_data: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Reading layers


class _ZstdFrames:
    """Follows the frame structure of a zstd stream (RFC 8878) while it is read.

    python-zstandard's stream reader returns a clean end of stream when its input stops in
    the middle of a frame (a truncated layer would look empty or short).  This walks the frame
    and block headers of the compressed bytes, without decompressing anything, and raises
    ``EOFError`` when the input ends anywhere but between two frames.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self._state = "magic"
        self._head = bytearray()
        self._skip = 0  # bytes to pass over (block contents, skippable frames)
        self._checksum = False
        self._rest = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if data:
            self._feed(data)
        elif size != 0 and (self._state != "magic" or self._head or self._skip):
            raise EOFError("zstd stream ends inside a frame")
        return data

    def _want(self) -> int:
        return {"magic": 4, "fhd": 1, "block": 3, "checksum": 4, "skippable": 4}.get(
            self._state, self._rest
        )

    def _feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            want = self._want()
            step = min(want - len(self._head), end - pos)
            self._head += data[pos : pos + step]
            pos += step
            if len(self._head) == want:
                head = bytes(self._head)
                self._head.clear()
                self._advance(head)

    def _advance(self, head: bytes) -> None:
        if self._state == "magic":
            if head == _ZSTD_MAGIC:
                self._state = "fhd"
            elif head[1:] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50:
                self._state = "skippable"
            else:
                raise zstandard.ZstdError("data after the last zstd frame is not a zstd frame")
        elif self._state == "fhd":
            fhd = head[0]
            single_segment = bool(fhd & 0x20)
            self._checksum = bool(fhd & 0x04)
            fcs = (1 if single_segment else 0, 2, 4, 8)[fhd >> 6]
            self._rest = (0 if single_segment else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
            self._state = "rest" if self._rest else "block"
        elif self._state == "rest":
            self._state = "block"
        elif self._state == "block":
            header = int.from_bytes(head, "little")
            kind, size = (header >> 1) & 3, header >> 3
            if kind == 3:
                raise zstandard.ZstdError("reserved zstd block type")
            self._skip = 1 if kind == 1 else size
            if header & 1:  # the last block of the frame
                self._state = "checksum" if self._checksum else "magic"
        elif self._state == "checksum":
            self._state = "magic"
        else:  # skippable frame size
            self._skip = int.from_bytes(head, "little")
            self._state = "magic"


def _decompressor(path: Path, raw: BinaryIO) -> BinaryIO | None:
    """The decompressor ``raw``'s magic bytes call for (``raw`` at 0), None for a plain tar."""
    head = raw.read(8)
    raw.seek(0)
    if head.startswith(_GZIP_MAGIC):
        return igzip.IGzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if head.startswith(_ZSTD_MAGIC):
        reader = zstandard.ZstdDecompressor().stream_reader(
            _ZstdFrames(raw),  # type: ignore[arg-type]
            read_size=_SPOOL_CHUNK,
            read_across_frames=True,
            closefd=False,
        )
        return reader  # type: ignore[return-value]
    for magic, name in _UNSUPPORTED_MAGIC.items():
        if head.startswith(magic):
            raise FlattenError(
                f"layer {path} is {name}-compressed, which image layers may not be",
                "only gzip, zstd and uncompressed tar layers are supported",
            )
    return None


class _Spool:
    """A layer decompressed into an anonymous file (``O_TMPFILE``: gone with the process) by a
    background thread, so that reading its headers overlaps decompressing it.  ``read`` and
    ``seek`` follow the writer, waiting for bytes that are not there yet."""

    def __init__(
        self,
        layer: _LayerSource,
        decompressor: BinaryIO,
        raw: BinaryIO,
        spool_dir: Path | None,
        slots: threading.Semaphore,
    ) -> None:
        self.layer = layer
        self.where = str(spool_dir or tempfile.gettempdir())
        try:
            self.file = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115 - see close()
        except OSError as exc:
            raise FlattenError(
                f"cannot create a spool file in {self.where}: {exc.strerror or exc}",
                "layers are decompressed there while an image is converted",
            ) from exc
        self.fd = self.file.fileno()
        self.position = 0
        self.written = 0
        self.done = False
        self.error: BaseException | None = None
        self._stop = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(
            target=self._run,
            args=(decompressor, raw, slots),
            name=f"spool-layer-{layer.index + 1}",
            daemon=True,
        )
        self._thread.start()

    def _run(self, decompressor: BinaryIO, raw: BinaryIO, slots: threading.Semaphore) -> None:
        buffer = bytearray(_SPOOL_CHUNK)
        view = memoryview(buffer)
        try:
            with raw, slots:
                while not self._stop:
                    try:
                        count = decompressor.readinto(buffer)  # type: ignore[attr-defined]
                    except _READ_ERRORS as exc:
                        raise self.layer.fail(exc) from exc
                    if not count:
                        break
                    if self.layer.budget is not None:  # a decompression bomb stops here
                        self.layer.budget.add_bytes(
                            self.layer.index + 1, self.written + count, count
                        )
                    self._write(view[:count])
                    with self._changed:
                        self.written += count
                        self._changed.notify_all()
        except BaseException as exc:  # handed to the reader
            self.error = exc
        finally:
            with self._changed:
                self.done = True
                self._changed.notify_all()

    def _write(self, data: memoryview) -> None:
        offset = self.written  # only this thread changes it
        try:
            while data:
                count = os.pwrite(self.fd, data, offset)
                offset += count
                data = data[count:]
        except OSError as exc:
            raise FlattenError(
                f"cannot decompress layer {self.layer.index + 1} into {self.where}: "
                f"{exc.strerror or exc}",
                "the image's uncompressed layers must fit there while it is converted",
            ) from exc

    def _available(self, end: int) -> int:
        """Wait until ``end`` bytes are written or the writer stopped; how many there are."""
        with self._changed:
            while self.written < end and not self.done:
                self._changed.wait()
            if self.written < end and self.error is not None:
                raise self.error
            return self.written

    def finish(self) -> int:
        """Wait for the whole layer; its uncompressed size (raises what the writer hit)."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.written

    # -- the file interface tarfile uses ---------------------------------------------------------

    def read(self, size: int = -1) -> bytes:
        end = (
            self.finish()
            if size < 0
            else min(self._available(self.position + size), self.position + size)
        )
        data = os.pread(self.fd, max(0, end - self.position), self.position)
        self.position += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self.position
        elif whence == os.SEEK_END:
            offset += self.finish()
        self.position = offset
        return offset

    def tell(self) -> int:
        return self.position

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.file.close()


def _invalid_layer(path: Path, index: int, exc: BaseException) -> FlattenError:
    return FlattenError(
        f"layer {index + 1} ({path}) is not a valid tar archive: {exc}",
        "the layer is corrupt or truncated; remove it from the layer cache and pull again",
    )


class _LayerSource:
    """One layer as a seekable, uncompressed tar: the layer file itself when it is a plain tar,
    else a :class:`_Spool` it is being decompressed into, once.  Headers are read with seeks
    over the data, and data is copied by offset."""

    def __init__(
        self,
        path: Path,
        index: int,
        spool_dir: Path | None,
        slots: threading.Semaphore,
        budget: UnpackBudget | None = None,
    ) -> None:
        self.path = path
        self.index = index
        self.budget = budget
        self.tar: tarfile.TarFile | None = None
        try:
            raw = open(path, "rb")  # noqa: SIM115 - kept, or handed to the spool
        except OSError as exc:
            raise FlattenError(
                f"cannot read layer {path}: {exc.strerror or exc}",
                "check that the layer was downloaded completely",
            ) from exc
        try:
            decompressor = _decompressor(path, raw)
            self.reader: BinaryIO | _Spool = (
                raw if decompressor is None else _Spool(self, decompressor, raw, spool_dir, slots)
            )
        except BaseException:
            raw.close()
            raise
        self.fd = self.reader.fileno() if decompressor is None else self.reader.fd  # type: ignore[union-attr]
        if decompressor is None and budget is not None:  # a plain tar counts as it is
            size = os.fstat(self.fd).st_size
            try:
                budget.add_bytes(index + 1, size, size)
            except BaseException:
                raw.close()
                raise

    def wait_for(self, end: int) -> None:
        """Wait until the first ``end`` bytes of the uncompressed layer are there."""
        if isinstance(self.reader, _Spool) and self.reader._available(end) < end:
            raise _invalid_layer(self.path, self.index, EOFError("unexpected end of data"))

    def size(self) -> int:
        """The uncompressed layer's size, once it is all there."""
        if isinstance(self.reader, _Spool):
            return self.reader.finish()
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        self.reader.close()

    def fail(self, exc: BaseException) -> FlattenError:
        return _invalid_layer(self.path, self.index, exc)

    def members(self) -> Iterator[tarfile.TarInfo]:
        """The layer's members in order (headers only: the data is skipped by seeking)."""
        try:
            try:
                self.tar = tarfile.open(  # noqa: SIM115 - closed with the source
                    fileobj=self.reader,  # type: ignore[arg-type]
                    mode="r:",
                    encoding="utf-8",
                    errors="surrogateescape",
                    tarinfo=_StrictTarInfo,
                )
            except tarfile.ReadError:
                if self.size() == 0:
                    return  # an empty layer
                raise
            while True:
                member = self.tar.next()
                if member is None:
                    break
                self.tar.members.clear()  # memory per entry of the final tree, not per member
                if self.budget is not None:
                    self.budget.add_entry()
                yield member
            if self.tar.offset > self.size():
                raise tarfile.ReadError("unexpected end of data")
        except _READ_ERRORS as exc:
            raise self.fail(exc) from exc

    def sparse_data(self, member: tarfile.TarInfo) -> BinaryIO:
        """The expanded data of a GNU sparse member."""
        assert self.tar is not None
        data = self.tar.extractfile(member)
        assert data is not None
        return data  # type: ignore[return-value]


class _TarWriter:
    """Writes a PAX tar stream: headers made by ``tarfile``, file data copied from the layer
    sources by the kernel (``sendfile``) when ``out`` is a file or a pipe."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.pending = bytearray()
        try:
            self.fd: int | None = out.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: BytesIO
            self.fd = None

    def add(self, info: tarfile.TarInfo) -> None:
        self.pending += info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        if len(self.pending) >= _BUFSIZE:
            self.flush()

    def add_data(self, info: tarfile.TarInfo, source: _LayerSource, offset: int) -> None:
        """``info`` followed by ``info.size`` bytes at ``offset`` of ``source``."""
        self.add(info)
        self.flush()
        self.out.flush()
        size = info.size
        copied = 0
        if self.fd is not None:
            try:
                copied = _sendfile(self.fd, source.fd, offset, size)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
        position = offset + copied
        while copied < size:
            chunk = os.pread(source.fd, min(_SPOOL_CHUNK, size - copied), position)
            if not chunk:
                raise source.fail(tarfile.ReadError("unexpected end of data"))
            self.out.write(chunk)
            copied += len(chunk)
            position += len(chunk)
        self.pending += bytes(-size % tarfile.BLOCKSIZE)

    def add_stream(self, info: tarfile.TarInfo, data: BinaryIO) -> None:
        """``info`` followed by ``info.size`` bytes read from ``data``."""
        self.add(info)
        self.flush()
        left = info.size
        while left:
            chunk = data.read(min(_SPOOL_CHUNK, left))
            if not chunk:
                raise FlattenError(f"{info.name}: its data ends early")
            self.out.write(chunk)
            left -= len(chunk)
        self.pending += bytes(-info.size % tarfile.BLOCKSIZE)

    def close(self) -> None:
        """The end-of-archive marker: two zero blocks."""
        self.flush()
        self.out.write(bytes(2 * tarfile.BLOCKSIZE))
        self.out.flush()

    def flush(self) -> None:
        if self.pending:
            self.out.write(self.pending)
            self.pending.clear()


def _sendfile(out_fd: int, in_fd: int, offset: int, size: int) -> int:
    """Copy ``size`` bytes at ``offset`` of ``in_fd`` to ``out_fd``; return how many were."""
    copied = 0
    while copied < size:
        sent = os.sendfile(out_fd, in_fd, offset + copied, size - copied)
        if sent == 0:
            break  # the source ends early: the caller says so
        copied += sent
    return copied


class _StrictTarInfo(tarfile.TarInfo):
    """Headers that fail on a corrupt or truncated header instead of ending the archive.

    In stream mode ``tarfile`` treats an invalid or partial header after the first one as the
    end of the archive, which would silently lose the rest of a corrupt layer.  A stream that
    ends exactly between two members, or a zero block, still ends the archive (as in Go's
    ``archive/tar``, which Docker uses).
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exc:  # type: ignore[attr-defined]
            if tarfile_.offset == 0:
                raise  # tarfile reports it as "not a tar archive"
            raise tarfile.ReadError(f"{exc} at offset {tarfile_.offset}") from exc


# --------------------------------------------------------------------------------------------
# The tree


class _Meta:
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


class _Inode:
    """A non-directory object; ``layer`` and ``offset`` (of its data in the uncompressed
    layer) locate its data; ``sparse`` is the member of a GNU sparse file."""

    __slots__ = ("kind", "layer", "meta", "offset", "sparse")

    def __init__(self, kind: str, meta: _Meta, layer: int, member: tarfile.TarInfo) -> None:
        self.kind = kind
        self.meta = meta
        self.layer = layer
        self.offset = member.offset_data
        self.sparse = member if member.sparse is not None else None


class _Dir:
    __slots__ = ("children", "meta", "touched")

    def __init__(self, meta: _Meta, touched: int) -> None:
        self.meta = meta
        self.children: dict[str, _Dir | _Name] = {}
        self.touched = touched  # the last layer that declared it or put something below it


class _Name:
    """A directory entry naming an inode."""

    __slots__ = ("inode", "seq", "touched")

    def __init__(self, inode: _Inode, touched: int, seq: int) -> None:
        self.inode = inode
        self.touched = touched
        self.seq = seq  # creation order: the first surviving name carries the data


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


class _Tree:
    def __init__(self, policy: FlattenPolicy, stats: FlattenStats) -> None:
        self.policy = policy
        self.stats = stats
        self.root = _Dir(_Meta(None, False), -1)
        self.seq = 0

    # -- lookups and changes -----------------------------------------------------------------

    def lookup(self, path: str) -> _Dir | _Name | None:
        node: _Dir | _Name = self.root
        if not path:
            return node
        for part in path.split("/"):
            if not isinstance(node, _Dir):
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def parent_for(self, path: str, layer: int) -> tuple[_Dir, str]:
        """The directory that will hold ``path`` (created as needed) and the base name."""
        *parents, base = path.split("/")
        node = self.root
        for depth, part in enumerate(parents):
            child = node.children.get(part)
            if not isinstance(child, _Dir):
                if child is not None:
                    LOG.warning(
                        "layer %d: %r needs %r as a directory: replacing the non-directory there",
                        layer + 1,
                        path,
                        "/".join(parents[: depth + 1]),
                    )
                child = _Dir(_Meta(None, False), layer)
                node.children[part] = child
            child.touched = layer
            node = child
        return node, base

    def remove_lower(self, parent: _Dir, name: str, layer: int) -> None:
        """Remove ``parent/name`` except what ``layer`` itself has put there."""
        stack = [(parent, name)]
        while stack:
            directory, child_name = stack.pop()
            child = directory.children[child_name]
            if child.touched != layer:
                del directory.children[child_name]
            elif isinstance(child, _Dir):
                stack.extend((child, grandchild) for grandchild in child.children)

    # -- applying one member -----------------------------------------------------------------

    def apply(self, layer: int, member: tarfile.TarInfo) -> None:
        path = normalise(member.name)
        if path is None:
            self.stats.escaping_dropped += 1
            LOG.warning(
                "layer %d: dropping %r: its path leaves the image root", layer + 1, member.name
            )
            return
        if not path:
            if member.isdir():
                self.root.meta = _Meta(member, self.policy.keep_xattrs)
            else:
                self.stats.other_dropped += 1
                LOG.warning(
                    "layer %d: dropping %r: the root can only be a directory",
                    layer + 1,
                    member.name,
                )
            return
        base = path.rpartition("/")[2]
        if base.startswith(WHITEOUT_PREFIX):
            self.whiteout(layer, path, member)
            return
        if any(part.startswith(WHITEOUT_META_PREFIX) for part in path.split("/")[:-1]):
            return  # below aufs metadata (.wh..wh.plnk/...)
        if member.isdir():
            parent, base = self.parent_for(path, layer)
            existing = parent.children.get(base)
            meta = _Meta(member, self.policy.keep_xattrs)
            if isinstance(existing, _Dir):
                existing.meta = meta
                existing.touched = layer
            else:
                parent.children[base] = _Dir(meta, layer)
            return
        if member.islnk():
            inode = self.link_target(layer, member)
            if inode is None:
                return
        elif member.type in _REGULAR_TYPES:
            inode = _Inode(_REG, _Meta(member, self.policy.keep_xattrs), layer, member)
        elif member.issym():
            inode = _Inode(_SYM, _Meta(member, self.policy.keep_xattrs), layer, member)
        elif member.type in _DEVICE_TYPES:
            inode = _Inode(_DEV, _Meta(member, self.policy.keep_xattrs), layer, member)
        else:
            self.stats.other_dropped += 1
            LOG.warning(
                "layer %d: dropping %r: unsupported tar member type %r",
                layer + 1,
                member.name,
                member.type,
            )
            return
        parent, base = self.parent_for(path, layer)
        self.seq += 1
        parent.children[base] = _Name(inode, layer, self.seq)

    def link_target(self, layer: int, member: tarfile.TarInfo) -> _Inode | None:
        target = normalise(member.linkname)
        if target is None:
            self.stats.escaping_dropped += 1
            LOG.warning(
                "layer %d: dropping hardlink %r: its target %r leaves the image root",
                layer + 1,
                member.name,
                member.linkname,
            )
            return None
        node = self.lookup(target) if target else self.root
        if not isinstance(node, _Name):
            self.stats.other_dropped += 1
            what = "is a directory" if isinstance(node, _Dir) else "does not exist"
            LOG.warning(
                "layer %d: dropping hardlink %r: its target %r %s",
                layer + 1,
                member.name,
                member.linkname,
                what,
            )
            return None
        return node.inode

    def whiteout(self, layer: int, path: str, member: tarfile.TarInfo) -> None:
        head, _, base = path.rpartition("/")
        if base == WHITEOUT_OPAQUE:
            self.stats.whiteouts += 1
            directory = self.lookup(head)
            if isinstance(directory, _Dir):
                for child in list(directory.children):
                    self.remove_lower(directory, child, layer)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            return  # aufs metadata (.wh..wh.plnk, .wh..wh.aufs, ...): not a whiteout
        name = base[len(WHITEOUT_PREFIX) :]
        if name in ("", ".", ".."):
            self.stats.other_dropped += 1
            LOG.warning("layer %d: ignoring invalid whiteout %r", layer + 1, member.name)
            return
        self.stats.whiteouts += 1
        directory = self.lookup(head)
        if isinstance(directory, _Dir) and name in directory.children:
            self.remove_lower(directory, name, layer)

    # -- the final tree ----------------------------------------------------------------------

    def walk(
        self,
    ) -> tuple[list[tuple[str, _Meta]], dict[int, list[tuple[int, str]]], dict[int, _Inode]]:
        """Directories in emission order, and the surviving names of every inode."""
        dirs: list[tuple[str, _Meta]] = []
        names: dict[int, list[tuple[int, str]]] = {}
        inodes: dict[int, _Inode] = {}
        stack: list[tuple[str, _Dir]] = [("", self.root)]
        while stack:
            prefix, directory = stack.pop()
            for name, child in directory.children.items():
                path = prefix + name
                if isinstance(child, _Dir):
                    dirs.append((path, child.meta))
                    stack.append((path + "/", child))
                else:
                    key = id(child.inode)
                    inodes[key] = child.inode
                    names.setdefault(key, []).append((child.seq, path))
        # A parent's path is a prefix of its children's, so sorting puts parents first.
        dirs.sort(key=lambda item: item[0])
        dirs.insert(0, (".", self.root.meta))
        return dirs, names, inodes


# --------------------------------------------------------------------------------------------
# Writing


def _header(path: str, meta: _Meta, policy: FlattenPolicy) -> tarfile.TarInfo:
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


def _link_header(path: str, target: str, primary: tarfile.TarInfo) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    info.mode, info.uid, info.gid = primary.mode, primary.uid, primary.gid
    info.mtime = primary.mtime
    info.uname = info.gname = ""
    return info


def flatten(
    layers: Sequence[Path],
    out: BinaryIO,
    *,
    policy: FlattenPolicy | None = None,
    spool_dir: Path | None = None,
    budget: UnpackBudget | None = None,
) -> FlattenStats:
    """Apply ``layers`` (lowest first) and write the final tree to ``out`` as a PAX tar stream.

    Compressed layers are decompressed once each into anonymous files in ``spool_dir``
    (default: the temporary directory), which need the image's uncompressed size while the
    call runs.  ``out`` is only written sequentially (a pipe is fine) and is flushed, not
    closed.  Raises ``FlattenError`` when a layer cannot be read or is not a tar archive;
    errors writing to ``out`` (``BrokenPipeError`` when the converter died) propagate
    unchanged.  After any error the output is incomplete (no end-of-archive blocks) and must
    be discarded.  *budget* bounds decompressed bytes and entries (``LimitExceeded``).
    """
    policy = policy or FlattenPolicy()
    stats = FlattenStats(layers=len(layers))
    tree = _Tree(policy, stats)
    with contextlib.ExitStack() as stack:
        sources: list[_LayerSource] = []
        # Pass 1: each layer decompressed once, its headers applied to the tree.
        # Every layer starts decompressing at once (as many at a time as there are CPUs) ...
        slots = threading.Semaphore(os.cpu_count() or 1)
        for index, path in enumerate(layers):
            source = _LayerSource(Path(path), index, spool_dir, slots, budget)
            stack.callback(source.close)
            sources.append(source)
        # ... while pass 1 reads their headers in order and applies them to the tree.
        for index, source in enumerate(sources):
            for member in source.members():
                tree.apply(index, member)
            source.size()  # the whole layer decompressed: a bad checksum at its end fails here
        _emit(tree, sources, _TarWriter(out), policy, stats)
    LOG.debug("flattened %d layers: %s", len(layers), stats)
    return stats


def _emit(
    tree: _Tree,
    sources: list[_LayerSource],
    writer: _TarWriter,
    policy: FlattenPolicy,
    stats: FlattenStats,
) -> None:
    """Pass 2: write the final tree (see the module's docstring for the order)."""
    dirs, names, inodes = tree.walk()
    no_data: list[tuple[str, _Inode, list[str]]] = []
    with_data: list[tuple[int, int, _Inode, list[str]]] = []
    for key, inode in inodes.items():
        inode_names = [path for _, path in sorted(names[key])]
        if inode.kind == _DEV and not policy.keep_devices:
            stats.devices_dropped += len(inode_names)
            continue
        if inode.kind == _REG and inode.meta.size > 0:
            with_data.append((inode.layer, inode.offset, inode, inode_names))
        else:
            no_data.append((inode_names[0], inode, inode_names))
    no_data.sort(key=lambda item: item[0])
    with_data.sort(key=lambda item: item[:2])  # layer by layer, each read front to back

    def write_names(inode: _Inode, inode_names: list[str]) -> None:
        primary = _header(inode_names[0], inode.meta, policy)
        if inode.kind == _REG:
            primary.type = tarfile.REGTYPE
            stats.files += 1
            stats.bytes += primary.size
            source = sources[inode.layer]
            if inode.sparse is not None:
                writer.add_stream(primary, source.sparse_data(inode.sparse))
            elif primary.size:
                writer.add_data(primary, source, inode.offset)
            else:
                writer.add(primary)
        elif inode.kind == _SYM:
            stats.symlinks += 1
            writer.add(primary)
        else:
            stats.devices += 1
            writer.add(primary)
        for other in inode_names[1:]:
            writer.add(_link_header(other, inode_names[0], primary))
            stats.hardlinks += 1

    for path, meta in dirs:
        writer.add(_header(path, meta, policy))
        stats.dirs += 1
    for _, inode, inode_names in no_data:
        write_names(inode, inode_names)
    for layer, _, inode, inode_names in with_data:
        if layer not in stats.layers_with_data:
            stats.layers_with_data.append(layer)
        write_names(inode, inode_names)
    writer.close()


# --------------------------------------------------------------------------------------------
# One pass, for a single layer


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
    into a spool file (as for :func:`flatten`), the headers are read as it grows and the data
    is copied from it by the kernel, while the converter works.  The result is what
    :func:`flatten` writes for that layer, in the layer's order; where that cannot be done in
    one pass, ``OnePassImpossible`` is raised before the end (the output must then be
    discarded, as after any error)."""
    policy = policy or FlattenPolicy()
    stats = FlattenStats(layers=1)
    writer = _TarWriter(out)
    seen: dict[str, str] = {"": "dir"}  # path -> dir | reg | sym | dev (dropped ones too)
    primaries: dict[str, tarfile.TarInfo] = {}  # written non-directories, for hardlinks
    primary_of: dict[str, str] = {}  # a name -> the name its inode was written under
    source = _LayerSource(Path(layer), 0, spool_dir, threading.Semaphore(1), budget)
    members = 0
    try:
        for member in source.members():
            members += 1
            path = normalise(member.name)
            if path == "":  # the root, first; after anything else it would come too late
                if members > 1 or not member.isdir():
                    raise OnePassImpossible("the layer's root entry is not its first")
                writer.add(_header(".", _Meta(member, policy.keep_xattrs), policy))
                stats.dirs += 1
                continue
            if members == 1:  # no root entry first: the implicit one, as flatten() writes it
                writer.add(_header(".", _Meta(None, False), policy))
                stats.dirs += 1
            if path is None:
                stats.escaping_dropped += 1
                LOG.warning("layer 1: dropping %r: its path leaves the image root", member.name)
                continue
            parts = path.split("/")
            if parts[-1].startswith(WHITEOUT_PREFIX):  # nothing below to hide
                name = parts[-1][len(WHITEOUT_PREFIX) :]
                if parts[-1] == WHITEOUT_OPAQUE:
                    stats.whiteouts += 1
                elif not parts[-1].startswith(WHITEOUT_META_PREFIX):
                    if name in ("", ".", ".."):
                        stats.other_dropped += 1
                        LOG.warning("layer 1: ignoring invalid whiteout %r", member.name)
                    else:
                        stats.whiteouts += 1
                continue
            if any(part.startswith(WHITEOUT_META_PREFIX) for part in parts[:-1]):
                continue
            if path in seen:  # also a directory that came after what it holds
                raise OnePassImpossible(f"{path!r} is in the layer twice, or late")
            if not _one_pass_keeps(member, seen, stats):
                continue
            for depth in range(1, len(parts)):
                parent = "/".join(parts[:depth])
                kind = seen.get(parent)
                if kind is None:  # as flatten() writes a directory no layer declares
                    seen[parent] = "dir"
                    writer.add(_header(parent, _Meta(None, False), policy))
                    stats.dirs += 1
                elif kind != "dir":
                    raise OnePassImpossible(f"{path!r} is below a non-directory")
            _write_member(member, path, source, writer, policy, stats, seen, primaries, primary_of)
        source.size()  # the whole layer decompressed: a bad checksum at its end fails here
    finally:
        source.close()
    if members == 0:
        writer.add(_header(".", _Meta(None, False), policy))
        stats.dirs += 1
    writer.close()
    return stats


def _one_pass_keeps(member: tarfile.TarInfo, seen: dict[str, str], stats: FlattenStats) -> bool:
    """Whether a member gets a name (flatten() drops bad hardlinks and unknown types first)."""
    if member.islnk():
        target = normalise(member.linkname)
        kind = seen.get(target) if target else "dir"
        if target is None:
            stats.escaping_dropped += 1
            LOG.warning(
                "layer 1: dropping hardlink %r: its target %r leaves the image root",
                member.name,
                member.linkname,
            )
            return False
        if kind in (None, "dir"):
            stats.other_dropped += 1
            what = "is a directory" if kind == "dir" else "does not exist"
            LOG.warning(
                "layer 1: dropping hardlink %r: its target %r %s",
                member.name,
                member.linkname,
                what,
            )
            return False
        return True
    if member.isdir() or member.issym() or member.type in _REGULAR_TYPES + _DEVICE_TYPES:
        return True
    stats.other_dropped += 1
    LOG.warning("layer 1: dropping %r: unsupported tar member type %r", member.name, member.type)
    return False


def _write_member(
    member: tarfile.TarInfo,
    path: str,
    source: _LayerSource,
    writer: _TarWriter,
    policy: FlattenPolicy,
    stats: FlattenStats,
    seen: dict[str, str],
    primaries: dict[str, tarfile.TarInfo],
    primary_of: dict[str, str],
) -> None:
    """One member of :func:`flatten_one_pass` that :func:`_one_pass_keeps`, as flatten()
    would write it."""
    meta = _Meta(member, policy.keep_xattrs)
    if member.isdir():
        seen[path] = "dir"
        writer.add(_header(path, meta, policy))
        stats.dirs += 1
    elif member.islnk():
        target = normalise(member.linkname)
        assert target
        kind = seen[target]
        if kind == "dev":  # a device that is not written: neither is this name
            seen[path] = "dev"
            stats.devices_dropped += 1
        else:
            primary = primary_of.get(target, target)
            seen[path], primary_of[path] = kind, primary
            writer.add(_link_header(path, primary, primaries[primary]))
            stats.hardlinks += 1
    elif member.type in _REGULAR_TYPES:
        if member.sparse is not None:
            raise OnePassImpossible(f"{path!r} is a sparse file")
        info = _header(path, meta, policy)
        info.type = tarfile.REGTYPE
        if info.size:
            source.wait_for(member.offset_data + info.size)
            writer.add_data(info, source, member.offset_data)
        else:
            writer.add(info)
        seen[path], primaries[path] = "reg", info
        stats.files += 1
        stats.bytes += info.size
    elif member.issym():
        info = _header(path, meta, policy)
        writer.add(info)
        seen[path], primaries[path] = "sym", info
        stats.symlinks += 1
    elif policy.keep_devices:
        info = _header(path, meta, policy)
        writer.add(info)
        seen[path], primaries[path] = "devkept", info
        stats.devices += 1
    else:
        seen[path] = "dev"
        stats.devices_dropped += 1
