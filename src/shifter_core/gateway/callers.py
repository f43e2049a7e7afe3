"""Who sends a request and what they may do: the caller a munge credential names, and the
users and groups a private pull is shared with."""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest


@dataclass(frozen=True)
class Caller:
    """Who sent a request (from the munge credential) and what they may do."""

    uid: int
    gid: int
    gids: tuple[int, ...]
    name: str
    admin: bool = False
    may_import: bool = False
    secret: dict[str, Any] | None = dataclasses.field(default=None, repr=False)


def identify(
    uid: int,
    gid: int,
    secret: dict[str, Any] | None = None,
    *,
    admins: Collection[str] = (),
    import_users: Collection[str] = (),
) -> Caller:
    """The caller ``uid``/``gid`` with their groups, an admin when named in ``admins``, an
    importer when named in ``import_users`` (``*``: everybody) or an admin."""
    try:
        name = pwd.getpwuid(uid).pw_name
        gids = tuple(sorted(set(os.getgrouplist(name, gid))))
    except KeyError:
        name, gids = str(uid), (gid,)
    admin = name in admins
    may_import = admin or "*" in import_users or name in import_users
    return Caller(uid, gid, gids, name, admin, may_import, secret)


def resolve_names(names: Sequence[object], kind: str) -> tuple[int, ...]:
    """User (``kind`` "user") or group names, or numeric ids, to ids; an unknown name is a
    BadRequest."""
    ids = []
    for name in names:
        text = str(name).strip()
        if not text:
            continue
        if text.isdigit():
            ids.append(int(text))
            continue
        try:
            ids.append(pwd.getpwnam(text).pw_uid if kind == "user" else grp.getgrnam(text).gr_gid)
        except KeyError:
            raise BadRequest(f"unknown {kind} {text!r}") from None
    return tuple(sorted(set(ids)))
