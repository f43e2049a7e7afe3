"""``/proc/self/mountinfo``: which mounts exist, for teardown and for checks in tests."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    target: str
    root: str
    options: str
    fstype: str
    source: str
    super_options: str


def read_mounts(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Every mount of the calling process's mount namespace, in the kernel's order."""
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields = left.split(" ")
            rest = right.split(" ")
            if len(fields) < 6 or len(rest) < 3:
                continue
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    root=_unescape(fields[3]),
                    target=_unescape(fields[4]),
                    options=fields[5],
                    fstype=rest[0],
                    source=_unescape(rest[1]),
                    super_options=rest[2],
                )
            )
    return entries


def mounts_under(prefix: str, path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Mounts at ``prefix`` or below it, deepest (and newest) first."""
    prefix = prefix.rstrip("/") or "/"
    found = [
        m
        for m in read_mounts(path)
        if m.target == prefix or m.target.startswith(prefix + "/") or prefix == "/"
    ]
    found.sort(key=lambda m: (m.target.count("/"), m.mount_id), reverse=True)
    return found
