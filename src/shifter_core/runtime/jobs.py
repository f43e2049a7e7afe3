"""Prepared roots of Slurm jobs: where they live and the state file that describes them.

Layout (``runtime.run_dir``, node-local, root-owned, a private mount so nothing mounted
below it propagates to other mount namespaces)::

    RUN_DIR/NODE/JOB/root         the container root, fully mounted (read-only to users)
    RUN_DIR/NODE/JOB/root.staging only while preparing
    RUN_DIR/NODE/JOB/userns       the job's user namespace, pinned (:mod:`.userns`)
    RUN_DIR/NODE/JOB/state.json   written by root (0644) once the root is complete

``NODE`` is ``SLURMD_NODENAME`` (several slurmd may share a host) and ``JOB`` the job id.
``state.json`` (version 1)::

    {"version": 1, "job_id": "42", "node": "n1", "root": "/run/shifter/n1/42/root",
     "uid": 1001, "gid": 1002, "image_id": "<64 hex>", "image_file": "<squashfs used>",
     "image_request": "docker:busybox:latest", "mount_digest": "<sha256 hex>",
     "mount_key": {"image_id", "uid", "gid", "volumes", "site_volumes", "modules", "tmp",
                   "writable"},
     "loop_devices": ["/dev/loop3"], "userns": "/run/shifter/n1/42/userns" (or null),
     "created": 1732770000.0, "pid": 1234}

A ``shifter`` run in the job enters ``root`` (the fast path) when the state is root's, not
writable by others, for the caller's uid, and its ``mount_digest`` equals the digest of the
caller's own plan (:meth:`Plan.mount_digest`); otherwise it builds a private root. On the fast
path it joins the user namespace ``userns`` (the user's groups mapped) when there is one.
"""

from __future__ import annotations

import json
import os
import stat
import time

from ..jobdirs import ROOT_DIR as ROOT_DIR
from ..jobdirs import STATE_FILE, valid_name
from ..jobdirs import job_dir as job_dir
from ._log import get_logger

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time

if TYPE_CHECKING:
    from typing import Any

log = get_logger(__name__)

STATE_VERSION = 1
ENV_NODE = "SLURMD_NODENAME"
ENV_JOB = "SLURM_JOB_ID"


class JobState:
    """A parsed, trusted ``state.json``."""

    __slots__ = ("data", "path")

    def __init__(self, path: str, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @property
    def root(self) -> str:
        return str(self.data["root"])

    @property
    def uid(self) -> int:
        return int(self.data["uid"])

    @property
    def mount_digest(self) -> str:
        return str(self.data["mount_digest"])

    @property
    def loop_devices(self) -> list[str]:
        return [str(d) for d in self.data.get("loop_devices", [])]

    @property
    def userns(self) -> str | None:
        """The pinned user namespace of the job (a file to ``setns`` to), if there is one."""
        value = self.data.get("userns")
        return str(value) if value else None


def state_data(
    plan: Any, job_id: str, node: str, root: str, loops: list[str], userns: str | None = None
) -> dict[str, Any]:
    """The state record of a prepared root (``plan`` is a :class:`~.plan.Plan`)."""
    return {
        "version": STATE_VERSION,
        "job_id": job_id,
        "node": node,
        "root": root,
        "uid": plan.user.uid,
        "gid": plan.user.gid,
        "image_id": plan.image_id,
        "image_file": plan.image_file,
        "image_request": plan.image_request,
        "mount_key": plan.mount_key(),
        "mount_digest": plan.mount_digest(),
        "loop_devices": loops,
        "userns": userns,
        "created": time.time(),
        "pid": os.getpid(),
    }


def write_state(directory: str, data: dict[str, Any]) -> str:
    """Write ``state.json`` atomically (root-owned, 0644)."""
    path = os.path.join(directory, STATE_FILE)
    partial = f"{path}.{os.getpid()}.partial"
    fd = os.open(
        partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
    )
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fchmod(fh.fileno(), 0o644)
    os.replace(partial, path)
    return path


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


def read_state(directory: str) -> JobState | None:
    """The state of a prepared root, or None (missing, not root's, unreadable, malformed)."""
    path = os.path.join(directory, STATE_FILE)
    if not _trusted(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        return None
    if not all(k in data for k in ("root", "uid", "mount_digest")):
        return None
    return JobState(path, data)


def current_job(environ: dict[str, str] | os._Environ[str]) -> tuple[str, str] | None:
    """(node, job id) of the Slurm job this process runs in, from its environment."""
    node = environ.get(ENV_NODE, "")
    job = environ.get(ENV_JOB, "")
    if not node or not job or not valid_name(node) or not valid_name(job):
        return None
    return node, job
