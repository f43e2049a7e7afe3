"""Where a job's container lives on a node: ``RUN_DIR/NODE/JOB`` (see
:mod:`shifter_core.runtime.jobs` for what is inside).

Kept apart from the runtime so that slurmstepd can find a job's root without importing it:
this module is on the start-up path of every container step.
"""

from __future__ import annotations

import os

from .errors import ShifterError


class JobDirectoryError(ShifterError):
    """A node name or job id that cannot name a directory."""

STATE_FILE = "state.json"
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
