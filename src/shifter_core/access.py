"""Who may see and use an image: the one rule, :func:`visible`.

Every path that decides it calls this function: the gateway (lookups, lists, job status,
ambiguous id prefixes, pulls that widen an ACL), the store's records
(:meth:`~shifter_core.image.store.ImageMetadata.visible_to`), the runtime's records
(:meth:`~shifter_core.runtime.images.ImageRecord.visible_to`) and the prolog.

Imports nothing: ``shifter`` and the plugin call it on their start-up paths.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time
if TYPE_CHECKING:
    from collections.abc import Collection, Iterable
    from typing import Protocol

    class Principal(Protocol):
        """Who asks: a user, their groups, and whether they administer the gateway."""

        @property
        def uid(self) -> int: ...
        @property
        def gids(self) -> Collection[int]: ...
        @property
        def admin(self) -> bool: ...

    class Members(Protocol):
        """An image's ACL: the users and groups it is shared with."""

        @property
        def users(self) -> Collection[int]: ...
        @property
        def groups(self) -> Collection[int]: ...


class Viewer:
    """A :class:`Principal` from a uid and groups (never an admin)."""

    __slots__ = ("admin", "gids", "uid")

    def __init__(self, uid: int, gids: Iterable[int] = ()) -> None:
        self.uid = uid
        self.gids = tuple(gids)
        self.admin = False


class AclMembers:
    """:class:`Members` from the lists of a record's ``acl`` object."""

    __slots__ = ("groups", "users")

    def __init__(self, users: Iterable[int] = (), groups: Iterable[int] = ()) -> None:
        self.users = tuple(users)
        self.groups = tuple(groups)


def visible(caller: Principal, acl: Members | None) -> bool:
    """May ``caller`` see and use an image with ``acl``? Public images (``acl`` None):
    everybody. Private ones: root, the gateway's admins, the users in the ACL and the
    members of its groups."""
    if acl is None or caller.admin or caller.uid == 0:
        return True
    return caller.uid in acl.users or any(g in acl.groups for g in caller.gids)
