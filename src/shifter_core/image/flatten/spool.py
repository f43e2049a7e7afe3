"""Reading one layer: decompressed once into an anonymous spool file, headers read strictly.

A layer's compression is told by its magic bytes (gzip with ISA-L, zstd with
python-zstandard, or a plain tar used in place; xz, bzip2 and lz4 are refused). A background
thread decompresses it into an ``O_TMPFILE`` while the headers are read, seeking over the data;
data is later copied by offset. A corrupt or truncated layer (bad header checksum, a partial
header in the middle, a gzip or zstd stream cut short or failing its checksum) raises
:class:`FlattenError` naming the layer, where ``tarfile`` and python-zstandard would end it
early without a word. An :class:`~shifter_core.image.limits.UnpackBudget` stops a
decompression bomb.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

import zstandard
from isal import igzip, isal_zlib

from ...errors import ShifterError
from ..limits import UnpackBudget

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_UNSUPPORTED_MAGIC = {
    b"\xfd7zXZ\x00": "xz",
    b"BZh": "bzip2",
    b"\x04\x22\x4d\x18": "lz4",
}

CHUNK = 1 << 20  # decompression and copy chunks
# What reading a corrupt or truncated layer raises, from tarfile and the decompressors.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    OSError,
    EOFError,
    zlib.error,
    cast("type[BaseException]", isal_zlib.error),  # isal's stub calls it an instance
    zstandard.ZstdError,
)


class FlattenError(ShifterError):
    """A layer could not be read or does not form a valid image."""


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
        # isal's IGzipFile has no annotations; it is a readable binary file.
        gzip = igzip.IGzipFile(fileobj=raw, mode="rb")  # type: ignore[no-untyped-call]
        return cast(BinaryIO, gzip)
    if head.startswith(_ZSTD_MAGIC):
        reader = zstandard.ZstdDecompressor().stream_reader(
            _ZstdFrames(raw),  # type: ignore[arg-type]  # file-like; zstandard wants a BinaryIO
            read_size=CHUNK,
            read_across_frames=True,
            closefd=False,
        )
        return reader
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
        layer: LayerSource,
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
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        try:
            with raw, slots:
                while not self._stop:
                    try:
                        # both decompressors have readinto; BinaryIO does not declare it
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


class LayerSource:
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
        # reader is a _Spool exactly when there is a decompressor
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
                    fileobj=cast(BinaryIO, self.reader),  # a _Spool reads like a file
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
                # Memory per entry of the final tree, not per member (``members`` is
                # TarFile's list of headers read so far, which typeshed does not declare).
                self.tar.members.clear()  # type: ignore[attr-defined]
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
        return data  # type: ignore[return-value]  # an ExFileObject: a readable binary file


class _StrictTarInfo(tarfile.TarInfo):
    """Headers that fail on a corrupt or truncated header instead of ending the archive.

    In stream mode ``tarfile`` treats an invalid or partial header after the first one as the
    end of the archive, which would silently lose the rest of a corrupt layer.  A stream that
    ends exactly between two members, or a zero block, still ends the archive (as in Go's
    ``archive/tar``, which Docker uses).
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> _StrictTarInfo:
        try:
            return super().fromtarfile(tarfile_)
        # both exist in every tarfile since 3.2; typeshed leaves them out
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exc:  # type: ignore[attr-defined]
            if tarfile_.offset == 0:
                raise  # tarfile reports it as "not a tar archive"
            raise tarfile.ReadError(f"{exc} at offset {tarfile_.offset}") from exc
