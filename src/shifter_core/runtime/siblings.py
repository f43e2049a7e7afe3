"""One container for sibling processes: the ranks of an MPI job on a node.

``srun -n 64 shifter ./app`` and ``mpirun -np 4 shifter ./app`` start one ``shifter`` per
rank, all children of one process (slurmstepd, the MPI launcher's proxy). Ranks in user
namespaces of their own cannot use each other's memory (CMA, ``/proc/PID/fd``, shared
memory segments), so the first sibling that asks for a container builds it and offers it,
and the others join its user and mount namespaces, as ``ch-run --join`` does; NERSC's
Shifter has all ranks of a node in one mounted image too.

Siblings meet at a file in the user's cache (:mod:`shifter_core.usercache`), named by the
request's key and the parent's pid and start time: ``.join-KEY-PPID-START``. The builder
holds an exclusive lock on it while it builds; once in the root it writes ``PID START`` and
lets go. A sibling that gets the lock and finds that builder alive joins it; otherwise it
builds and offers its own. The C launcher does the same (``join_sibling`` in
``launcher/shifter_launch.c``, the recipe's ``join`` operation), so a rank of either joins
a container built by the other.
"""

from __future__ import annotations

import fcntl
import os

from .. import syscalls
from ._log import get_logger
from .errors import ContainerError

log = get_logger(__name__)


def start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (field 22 of ``/proc/PID/stat``); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read(1024)
    except OSError:
        return None
    fields = text[text.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22; fields[0] is field 3
    except (IndexError, ValueError):
        return None


def rendezvous_path(directory: str, key_hex: str) -> str | None:
    """Where this process's siblings meet for the request ``key_hex`` (None: no parent)."""
    parent = os.getppid()
    started = start_time(parent)
    if started is None:
        return None
    return f"{directory}/.join-{key_hex}-{parent}-{started}"


class Rendezvous:
    """The meeting file, locked: :meth:`join` a live builder's container, else build and
    :meth:`offer` it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.start = start_time(os.getpid())

    @classmethod
    def open(cls, directory: str, key_hex: str) -> Rendezvous | None:
        """Wait for the lock of the siblings' file (None: no sharing possible here)."""
        path = rendezvous_path(directory, key_hex)
        if path is None:
            return None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            log.debug("no container sharing: %s: %s", path, err.strerror)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            return None
        return cls(fd)

    def builder(self) -> int | None:
        """The pid of the live sibling whose container this file offers, if any."""
        text = os.pread(self.fd, 64, 0).decode("ascii", "replace").split()
        try:
            pid, started = int(text[0]), int(text[1])
        except (IndexError, ValueError):
            return None
        return pid if pid > 0 and start_time(pid) == started else None

    def join(self, pid: int) -> bool:
        """Enter the user and mount namespaces of ``pid``'s container; False, with nothing
        changed, if its user namespace cannot be joined."""
        try:
            user = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            mnt = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            log.debug("cannot join the container of process %d: %s", pid, err.strerror)
            return False
        try:
            try:
                syscalls.setns(user, syscalls.CLONE_NEWUSER)
            except syscalls.SyscallError as err:
                log.debug("cannot join the container of process %d: %s", pid, err)
                return False
            try:
                syscalls.setns(mnt, syscalls.CLONE_NEWNS)
            except syscalls.SyscallError as err:  # half joined: there is no way back
                raise ContainerError(
                    f"cannot join the container of process {pid}: {err}"
                ) from None
        finally:
            os.close(user)
            os.close(mnt)
        self.close()
        log.info("joined the container of process %d", pid)
        return True

    def offer(self) -> None:
        """In the root this process built: offer it to the siblings waiting for the lock."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()} {self.start}\n".encode(), 0)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
