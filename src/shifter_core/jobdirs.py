"""Where a job's container lives on a node: ``RUN_DIR/NODE/JOB`` (see
:mod:`shifter_core.runtime.jobs` for what is inside).

Kept apart from the runtime so that slurmstepd can find a job's root without importing it:
this module is on the start-up path of every container step.
"""

from __future__ import annotations

import errno
import os
import stat
import struct

from .errors import NodeFault, ShifterError


class JobDirectoryError(ShifterError):
    """A node name or job id that cannot name a directory."""


STATE_FILE = "state.json"
USERNS_FILE = "userns"  # the user namespace pinned for the job (a bind mount of nsfs)
ROOT_DIR = "root"
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
