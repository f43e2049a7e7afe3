"""Writing the flattened image: one PAX tar stream.

Headers are made by ``tarfile``; file data is copied from the layer sources by the kernel
(``sendfile``) when the output is a file or a pipe, else read and written in chunks. The stream
is only written sequentially: ``tar2sqfs``'s stdin is the usual output.
"""

from __future__ import annotations

import errno
import os
import tarfile
from typing import BinaryIO

from .spool import CHUNK, FlattenError, LayerSource

# tarfile's stream buffers slice their whole buffer on every read and write: larger buffers
# cost more than they save (measured: 64 KiB is the sweet spot).
_BUFSIZE = 1 << 16


class TarWriter:
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

    def add_data(self, info: tarfile.TarInfo, source: LayerSource, offset: int) -> None:
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
            chunk = os.pread(source.fd, min(CHUNK, size - copied), position)
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
            chunk = data.read(min(CHUNK, left))
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
