"""From ``--image`` to an image file and its metadata: the one place images are looked up.

``id:HEX`` (a full id or a unique prefix of 12+ digits) is read from the store directly.
Names go to the image gateway (munge-authenticated; it applies the image's ACL); if the
gateway cannot be reached, images whose recorded source matches are found in the store,
with a warning.

For ``id:`` the store's ``<id>.json`` is read here as an :class:`ImageRecord` instead of
through :mod:`shifter_core.image.store`: this is every container's start-up path, and the store
module's imports cost more than the lookup. The record has the attributes the runtime uses
of :class:`~shifter_core.image.store.ImageMetadata` (which the other paths return).
"""

from __future__ import annotations

import os
import re
from collections import namedtuple

from ..access import AclMembers, Viewer, visible
from ..image.content import parse_record
from ..reference import ImageRequest
from ._log import get_logger
from .errors import ImageError
from .plan import User

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time

if TYPE_CHECKING:
    from typing import Any

    from ..config import Config
    from ..image.store import ImageMetadata

log = get_logger(__name__)

_ID_RE = re.compile(r"^[0-9a-f]{64}$")


class ImageRecord(
    namedtuple(
        "_ImageRecord",
        "id source digest platform env entrypoint cmd workdir user acl",
        defaults=((), None, None, "", "", None),
    )
):
    """An image's metadata as the store records it (``acl``: None or {users, groups})."""

    __slots__ = ()

    @classmethod
    def from_json(cls, text: str | bytes) -> ImageRecord:
        """Read a store record; every field is checked (``imagecontent.parse_record``):
        anything malformed is an ``ImageContentError`` (also a ``ValueError``)."""
        data = parse_record(text)
        acl = data["acl"]  # None, or (users, groups) as parse_record checked them
        users, groups = acl if isinstance(acl, tuple) else ((), ())
        return cls(
            **{k: data[k] for k in cls._fields if k != "acl"},
            acl=None if acl is None else {"users": list(users), "groups": list(groups)},
        )

    @property
    def private(self) -> bool:
        return self.acl is not None

    def visible_to(self, uid: int, gids: Any) -> bool:
        """Whether ``uid`` with ``gids`` may use the image (:func:`shifter_core.access.visible`)."""
        acl = self.acl
        members = None if acl is None else AclMembers(acl.get("users", ()), acl.get("groups", ()))
        return visible(Viewer(uid, gids), members)


def image_file(image_path: str, image_id: str) -> str:
    return os.path.join(image_path, f"{image_id}.squashfs")


def _by_id(image_path: str, prefix: str) -> ImageRecord | None:
    """The complete image (metadata and squashfs) whose id is or starts with ``prefix``."""
    if len(prefix) == 64:
        ids = [prefix]
    else:
        try:
            names = os.listdir(image_path)
        except OSError:
            return None
        ids = sorted(
            {n[:-5] for n in names if n.endswith(".json") and _ID_RE.match(n[:-5])}
            & {n[:-9] for n in names if n.endswith(".squashfs")}
        )
        ids = [i for i in ids if i.startswith(prefix)]
        if len(ids) > 1:
            raise ImageError(f"image id prefix {prefix} is ambiguous", hint="give more digits")
    for image_id in ids:
        try:
            with open(os.path.join(image_path, f"{image_id}.json"), encoding="utf-8") as fh:
                record = ImageRecord.from_json(fh.read())
        except (OSError, ValueError, KeyError):
            return None
        if os.path.exists(image_file(image_path, image_id)) and record.id == image_id:
            return record
    return None


def _by_source(
    image_path: str,
    request: ImageRequest,
    uid: int,
    gids: Any,
    *,
    image_id: str | None = None,
) -> ImageRecord | None:
    """The image of the store that ``request`` names and ``uid``/``gids`` may use.

    Used without the gateway: the store's records are read directly. A record the caller
    cannot read (a private image's files are readable by its ACL only) or cannot parse is
    skipped, never an error. ``docker`` requests match the recorded source, ``id``
    requests the id (a prefix). With ``image_id``, only that image is considered (a job's
    recorded id, verified rather than trusted). Of several matches, the host's platform
    and then the newest record win.
    """
    wanted = str(request.docker) if request.type == "docker" else None
    if image_id is not None:
        names = [f"{image_id}.json"] if _ID_RE.match(image_id) else []
    else:
        try:
            names = os.listdir(image_path)
        except OSError:
            return None
    arch = None
    best: tuple[tuple[bool, float], ImageRecord] | None = None
    for name in names:
        stem = name[:-5]
        if not name.endswith(".json") or not _ID_RE.match(stem):
            continue
        if request.type == "id" and not stem.startswith(request.tag):
            continue
        try:
            with open(os.path.join(image_path, name), encoding="utf-8") as fh:
                mtime = os.fstat(fh.fileno()).st_mtime
                record = ImageRecord.from_json(fh.read())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if record.id != stem or (wanted is not None and record.source != wanted):
            continue
        if not record.visible_to(uid, gids) or not os.path.exists(image_file(image_path, stem)):
            continue
        if arch is None:
            import platform

            machine = platform.machine()
            arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
        key = (str(record.platform).split("/")[1:2] == [arch], mtime)
        if best is None or key > best[0]:
            best = (key, record)
    return best[1] if best else None


def _from_gateway(config: Config, text: str) -> ImageMetadata | None:
    """The gateway's answer; None when the gateway is unreachable."""
    from . import _log

    if _log.on_first_use is not None:
        # The client imports logging: the program sets its handler up first, as it would
        # for the first warning, so that later warnings look like every other message.
        hook, _log.on_first_use = _log.on_first_use, None
        hook()
    from ..client import GatewayClient, GatewayError, GatewayUnreachable

    try:
        with GatewayClient(config.gateway.url) as client:
            return client.lookup(text).image
    except GatewayUnreachable as err:
        log.info("%s; looking in the image store instead", err)
        return None
    except GatewayError as err:
        raise ImageError(err.message, err.hint) from None


def resolve_image(text: str, config: Config, user: User) -> tuple[Any, str]:
    """(metadata, squashfs path) of the image ``text`` names, if ``user`` may use it.

    When the gateway cannot be reached, images already in the store still work (public
    ones for all, private ones for their ACL), with a warning on stderr.
    """
    request = ImageRequest.parse(text, config.default_image_type)
    meta: Any = None
    unreachable = False
    if request.type == "id":
        meta = _by_id(config.image_path, request.tag)
        if meta is None:
            meta = _from_gateway(config, f"id:{request.tag}")
            unreachable = meta is None
    else:
        meta = _from_gateway(config, str(request))
        if meta is None:
            unreachable = True
            meta = _by_source(config.image_path, request, user.uid, user.groups)
            if meta is not None:
                log.warning(
                    "warning: the image gateway at %s cannot be reached; "
                    "using image %s (%s) from the image store",
                    config.gateway.url,
                    request.tag,
                    meta.id[:12],
                )
    if meta is None or not meta.visible_to(user.uid, user.groups):
        if unreachable:
            raise ImageError(
                f"image {text!r} is not in the image store, and the image gateway at "
                f"{config.gateway.url} cannot be reached",
                hint="try again later, or tell your site's support that the gateway is down",
            )
        hint = f"pull it first: shifterimg pull {request.tag}" if request.type == "docker" else None
        raise ImageError(f"image {text!r} not found", hint=hint)
    if config.slurm.image_source == "registry":
        return meta, _node_copy(config, meta.id, text)
    return meta, image_file(config.image_path, meta.id)


def _node_copy(config: Config, image_id: str, text: str) -> str:
    """Where nodes read images from the artifact registry, they have no store: ``shifter``
    uses this node's cached copy, which the prolog of a job asking for the image made."""
    node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename.split(".")[0]
    path = os.path.join(config.slurm.node_cache.replace("%n", node), f"{image_id}.squashfs")
    if not os.access(path, os.R_OK):
        raise ImageError(
            f"image {text!r} is not on this node (its nodes read images from the artifact "
            "registry, and no job here has asked for this one)",
            hint="run it in a job that asks for it: srun --image=... or sbatch --image=...",
        )
    return path
