"""Loop devices: attach a file with ``LOOP_CTL_GET_FREE`` + ``LOOP_CONFIGURE`` (autoclear).

A device attached here detaches by itself when its last user (the mount) goes away, also
when the process that attached it dies before mounting.
"""

from __future__ import annotations

import errno
import os
import time

from .. import syscalls
from ..syscalls import SyscallError
from ._log import get_logger

log = get_logger(__name__)

LOOP_CONTROL = "/dev/loop-control"


def attach(path: str | int, *, read_only: bool = True, name: str | None = None) -> tuple[str, int]:
    """Attach a file (a path or an open fd) to a free loop device; (device path, device fd).

    The caller mounts the device and then closes the fd.
    """
    mode = os.O_RDONLY if read_only else os.O_RDWR
    backing = os.open(path, mode | os.O_CLOEXEC) if isinstance(path, str) else os.dup(path)
    label = name or (path if isinstance(path, str) else f"fd {path}")
    flags = syscalls.LO_FLAGS_AUTOCLEAR | (syscalls.LO_FLAGS_READ_ONLY if read_only else 0)
    control = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _attempt in range(64):
            number = syscalls.loop_ctl_get_free(control)
            device = f"/dev/loop{number}"
            try:
                fd = os.open(device, mode | os.O_CLOEXEC)
            except FileNotFoundError:
                time.sleep(0.01)  # the device node is still being created
                continue
            try:
                syscalls.loop_configure(fd, backing, flags, str(label), device)
            except SyscallError as err:
                os.close(fd)
                if err.errno == errno.EBUSY:  # another process took it first
                    continue
                raise
            log.debug("attached %s to %s", label, device)
            return device, fd
        raise SyscallError("ioctl(LOOP_CONFIGURE)", errno.EBUSY, LOOP_CONTROL, "no free device")
    finally:
        os.close(control)
        os.close(backing)
