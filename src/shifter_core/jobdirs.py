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


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compact host lists: ``n[1-3,5],gpu07`` → ``n1 n2 n3 n5 gpu07`` (zero padding
    kept, one bracket per name)."""
    names: list[str] = []
    items, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    for item in filter(None, items):
        prefix, bracket, rest = item.partition("[")
        if not bracket:
            names.append(item)
            continue
        ranges, _, suffix = rest.partition("]")
        for part in ranges.split(","):
            low, dash, high = part.partition("-")
            if not dash:
                names.append(f"{prefix}{low}{suffix}")
                continue
            names.extend(
                f"{prefix}{n:0{len(low)}d}{suffix}" for n in range(int(low), int(high) + 1)
            )
    return names
