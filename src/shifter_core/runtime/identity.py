"""``/etc/passwd`` and ``/etc/group`` for the container: the image's entries plus the user.

Entries of the image that clash with the user (same name or id) or with the user's groups
are dropped; malformed lines are dropped. Pure functions of text.
"""

from __future__ import annotations

from .plan import User


def _clean(value: str) -> str:
    return value.replace(":", " ").replace("\n", " ")


def passwd_file(image_text: str, user: User, shell: str) -> str:
    """The image's passwd with the user's own line appended."""
    lines = []
    for line in image_text.splitlines():
        fields = line.split(":")
        if len(fields) != 7 or not fields[2].isdigit():
            continue
        if fields[0] == user.name or int(fields[2]) == user.uid:
            continue
        lines.append(line)
    gecos, home = _clean(user.gecos), _clean(user.home)
    lines.append(f"{user.name}:x:{user.uid}:{user.gid}:{gecos}:{home}:{shell}")
    return "\n".join(lines) + "\n"


def group_file(image_text: str, user: User, overflow: int | None = None) -> str:
    """The image's groups with the user's groups (the user a member of each) appended;
    with ``overflow``, a ``nogroup`` line for that gid unless the image names it."""
    names = dict(user.group_names)
    taken_names = set(names.values())
    lines = []
    for line in image_text.splitlines():
        fields = line.split(":")
        if len(fields) != 4 or not fields[2].isdigit():
            continue
        if int(fields[2]) in names or fields[0] in taken_names:
            continue
        lines.append(line)
    for gid in user.groups:
        name = names.get(gid)
        if name is None:
            continue
        members = "" if gid == user.gid else user.name
        lines.append(f"{name}:x:{gid}:{members}")
    if overflow is not None and not any(line.split(":")[2] == str(overflow) for line in lines):
        lines.append(f"nogroup:x:{overflow}:")
    return "\n".join(lines) + "\n"
