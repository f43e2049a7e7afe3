"""``/etc/passwd`` and ``/etc/group`` for the container: the image's entries plus the user.

Entries of the image that clash with the user (same name or id) or with the user's groups
are dropped; malformed lines are dropped (see
:func:`shifter_core.image.content.identity_lines`: the image's files are hostile input).
Pure functions of text; a file over the size bound is an ``ImageContentError``.
"""

from __future__ import annotations

from ..image.content import identity_lines
from .plan import User


def _clean(value: str) -> str:
    return "".join(" " if ch == ":" or not ch.isprintable() else ch for ch in value)


def passwd_file(image_text: str, user: User, shell: str) -> str:
    """The image's passwd with the user's own line appended."""
    lines = [
        ":".join(fields)
        for fields in identity_lines(image_text, "/etc/passwd", 7)
        if fields[0] != user.name and int(fields[2]) != user.uid
    ]
    gecos, home = _clean(user.gecos), _clean(user.home)
    lines.append(f"{user.name}:x:{user.uid}:{user.gid}:{gecos}:{home}:{shell}")
    return "\n".join(lines) + "\n"


def group_file(image_text: str, user: User, overflow: int | None = None) -> str:
    """The image's groups with the user's groups (the user a member of each) appended;
    with ``overflow``, a ``nogroup`` line for that gid unless the image names it."""
    names = dict(user.group_names)
    taken_names = set(names.values())
    entries = [
        fields
        for fields in identity_lines(image_text, "/etc/group", 4)
        if int(fields[2]) not in names and fields[0] not in taken_names
    ]
    lines = [":".join(fields) for fields in entries]
    for gid in user.groups:
        name = names.get(gid)
        if name is None:
            continue
        members = "" if gid == user.gid else user.name
        lines.append(f"{name}:x:{gid}:{members}")
    if overflow is not None and not any(line.split(":")[2] == str(overflow) for line in lines):
        lines.append(f"nogroup:x:{overflow}:")
    return "\n".join(lines) + "\n"
