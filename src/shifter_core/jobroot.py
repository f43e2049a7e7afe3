"""The job directory on a node: where a job's container lives, the one root-owned record
that says what it serves, the one rule that matches a request to it, and its removal.

Layout (``runtime.run_dir``, node-local, a private mount: nothing mounted below it
propagates to other mount namespaces)::

    RUN_DIR/NODE/JOB/             root's, mode 0700; a POSIX ACL lets the job's user traverse
        root/                     the container root, fully mounted
        root.staging/             only while the root is being built
        userns                    the job's user namespace, pinned (:mod:`.runtime.userns`)
        job.marshal               the record (below), written by root once the root is
                                  complete, or with the job's error when it could not be
        roots/KEY/root            a root for steps whose request differs from the job's,
        roots/KEY/job.marshal     made by the first such step on the node and kept for the
                                  later ones until the job's epilog (``KEY``: a digest of
                                  :func:`root_key`)

``NODE`` is slurmd's ``SLURMD_NODENAME`` (several slurmd may share a host) and ``JOB`` the
job id. The record (:class:`JobRecord`, marshal: the step path must not import json) holds
the request the root serves (uid, gid, image id and name, canonical volumes and modules,
``--writable-tmpfs``), the root, the container's environment, the loop devices, the pinned
user namespace and, for a job whose container could not be set up, the error its steps
report. A request is served by a root when :func:`root_key` of both is equal: that is the
only rule, for job steps (slurmstepd) and for the user's own ``shifter`` in the job alike.
Records are trusted only when root wrote them and nobody else could have
(:func:`_trusted`).

Kept light (``os``, ``marshal``, ``stat``, ``struct``): slurmstepd imports it on every
container step's start-up path.
"""

from __future__ import annotations

import errno
import marshal
import os
import stat
import struct
import time

from .errors import NodeFault, ShifterError

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time
if TYPE_CHECKING:
    from collections.abc import Mapping


class JobDirectoryError(ShifterError):
    """A node name or job id that cannot name a directory."""


RECORD_FILE = "job.marshal"
RECORD_VERSION = 2
USERNS_FILE = "userns"  # the user namespace pinned for the job (a bind mount of nsfs)
ROOT_DIR = "root"
ROOTS_DIR = "roots"
ENV_NODE = "SLURMD_NODENAME"
ENV_JOB = "SLURM_JOB_ID"
_MAX_RECORD = 4 << 20
_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_REST = _FIRST | frozenset("._-")


def valid_name(value: str) -> bool:
    """A node name or job id usable as one path component (no ``..``, no ``/``).

    (Checked without ``re`` or ``string``, which imports ``re``: that would cost every
    container step ~8 ms.)
    """
    return 0 < len(value) <= 128 and value[0] in _FIRST and set(value) <= _REST


def check_name(kind: str, value: str) -> str:
    if not valid_name(value):
        raise JobDirectoryError(f"invalid {kind} {value!r} for a job directory")
    return value


def job_dir(run_dir: str, node: str, job_id: str) -> str:
    """``RUN_DIR/NODE/JOB`` (names checked: no path tricks)."""
    return os.path.join(run_dir, check_name("node name", node), check_name("job id", job_id))


# system.posix_acl_access of a job directory: root rwx, the job's user r-x, nobody else.
_ACL_XATTR = "system.posix_acl_access"
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_NO_ID = 0xFFFFFFFF


def _user_only_acl(uid: int) -> bytes:
    entries = [
        (_ACL_USER_OBJ, 0o7, _NO_ID),
        (_ACL_USER, 0o5, uid),
        (_ACL_GROUP_OBJ, 0, _NO_ID),
        (_ACL_MASK, 0o5, _NO_ID),
        (_ACL_OTHER, 0, _NO_ID),
    ]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def make_job_dir(directory: str, uid: int) -> bool:
    """Create (or keep) the job's directory: root's, mode 0700, and by a POSIX ACL
    traversable by the job's user alone, so their own ``shifter`` can enter the prepared
    root while no other user on the node reaches a byte of it (image, volumes, /tmp).

    False when the file system has no ACLs: the directory is then root's alone (the user's
    ``shifter`` builds a private root). The run directory not being writable is a
    :class:`NodeFault`."""
    try:
        os.makedirs(os.path.dirname(directory), mode=0o755, exist_ok=True)
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            st = os.lstat(directory)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
                raise NodeFault(f"{directory} exists and is not root's directory") from None
        os.chmod(directory, 0o700)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise NodeFault(
                f"cannot create the job directory {directory}: {err.strerror}",
                hint="make runtime.run_dir a node-local directory that root can write",
            ) from None
        raise
    if uid == 0:
        return True
    try:
        os.setxattr(directory, _ACL_XATTR, _user_only_acl(uid))
    except OSError as err:
        if err.errno != errno.EOPNOTSUPP:
            raise
        return False
    return True


def shared_root_dir(directory: str, key: tuple[int, int, str, str, str, bool]) -> str:
    """``RUN_DIR/NODE/JOB/roots/KEY``: where the job's steps that ask for ``key`` (and not
    for the job's own request) find their root. The name only finds it: the record in it
    decides (:meth:`JobRecord.serves`)."""
    from .fnv import fnv1a_hex

    return os.path.join(directory, ROOTS_DIR, fnv1a_hex(repr(key).encode()))


def current_job(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(node, job id) of the Slurm job this process runs in, from its environment."""
    node = environ.get(ENV_NODE, "")
    job = environ.get(ENV_JOB, "")
    if not valid_name(node) or not valid_name(job):
        return None
    return node, job


# ---- the one rule --------------------------------------------------------------------------


def root_key(
    uid: int, gid: int, image_id: str, volume: str, module: str, writable: bool = False
) -> tuple[int, int, str, str, str, bool]:
    """What a prepared root is for: a request is served by a root when their keys are equal.

    ``volume`` and ``module`` are canonical (``options.format_volumes`` of the parsed
    volumes; the parsed module names joined by ``,``; "" for none), as the submission side
    exports them and ``shifter`` computes them."""
    return (uid, gid, image_id, volume, module, writable)


def key_fields(key: tuple[int, int, str, str, str, bool]) -> dict[str, object]:
    """The fields of a record that say which request its root serves."""
    uid, gid, image_id, volume, module, writable = key
    return {"uid": uid, "gid": gid, "image_id": image_id, "volume": volume, "module": module,
            "writable": writable}  # fmt: skip


class JobRecord:
    """The record of a job's (or a step's) root; ``path`` is the file it was read from."""

    __slots__ = ("data", "path")

    def __init__(self, path: str, data: dict[str, object]) -> None:
        self.path = path
        self.data = data

    def _text(self, name: str) -> str:
        value = self.data.get(name)
        return value if isinstance(value, str) else ""

    @property
    def root(self) -> str:
        return self._text("root")

    @property
    def uid(self) -> int:
        value = self.data.get("uid")
        return value if isinstance(value, int) else -1

    @property
    def error(self) -> str:
        """Why the job's container could not be set up ("" when it was)."""
        return self._text("error")

    @property
    def userns(self) -> str | None:
        """The pinned user namespace of the job (a file to ``setns`` to), if there is one."""
        return self._text("userns") or None

    @property
    def loop_devices(self) -> list[str]:
        value = self.data.get("loop_devices")
        return [str(d) for d in value] if isinstance(value, list) else []

    @property
    def env(self) -> list[list[str]]:
        """The container's environment, as (name, value) pairs."""
        value = self.data.get("env")
        return value if isinstance(value, list) else []

    def key(self) -> tuple[int, int, str, str, str, bool]:
        gid = self.data.get("gid")
        return root_key(
            self.uid,
            gid if isinstance(gid, int) else -1,
            self._text("image_id"),
            self._text("volume"),
            self._text("module"),
            self.data.get("writable") is True,
        )

    def serves(self, key: tuple[int, int, str, str, str, bool]) -> bool:
        """Whether this root (complete, without error) is what ``key`` asks for."""
        return not self.error and bool(self.root) and self.key() == key


def write_record(directory: str, **fields: object) -> str:
    """Write the record of ``directory`` (as root: atomically, 0644); its path."""
    from .fsutil import atomic_write

    path = os.path.join(directory, RECORD_FILE)
    record = {"version": RECORD_VERSION, "created": time.time(), "pid": os.getpid(), **fields}
    atomic_write(path, marshal.dumps(record), mode=0o644)
    return path


def read_record(directory: str) -> JobRecord | None:
    """The record of ``directory``, or None (missing, not root's, writable by others,
    malformed or of another version)."""
    path = os.path.join(directory, RECORD_FILE)
    if not _trusted(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        try:
            data = marshal.loads(fh.read(_MAX_RECORD))
        except (EOFError, ValueError, TypeError):
            return None
    if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
        return None
    return JobRecord(path, data)


def _trusted(path: str) -> bool:
    """Root's and not writable by others: the file, and every directory above it (sticky
    directories such as /tmp excepted)."""
    current = path
    while True:
        try:
            st = os.lstat(current)
        except OSError:
            return False
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and current != path
        if st.st_uid != 0 or stat.S_ISLNK(st.st_mode) or (writable and not sticky_dir):
            return False
        parent = os.path.dirname(current)
        if parent == current:
            return True
        current = parent


# ---- removal -------------------------------------------------------------------------------


def remove(directory: str) -> list[str]:
    """Remove a job's or a step's directory from whatever state a crash left (the loop
    devices its record names are waited for); the problems left. Never raises."""
    from .mounts import teardown_tree

    record = read_record(directory)
    return teardown_tree(directory, record.loop_devices if record else [])
