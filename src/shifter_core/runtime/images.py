"""From ``--image`` to an image file and its metadata: the one place images are looked up.

``id:HEX`` (a full id or a unique prefix of 12+ digits) is read from the store directly.
Names go to the image gateway (munge-authenticated; it applies the image's ACL); if the
gateway cannot be reached, images whose recorded source matches are found in the store,
with a warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import Config
from ..reference import ImageRequest
from ..store import ImageMetadata, ImageStore
from .errors import ImageError
from .plan import User

log = logging.getLogger(__name__)


def _by_id(store: ImageStore, prefix: str) -> ImageMetadata | None:
    try:
        if len(prefix) == 64:
            return store.get(prefix)
        found = [m for m in store if m.id.startswith(prefix)]
    except OSError:
        return None
    if len(found) > 1:
        raise ImageError(f"image id prefix {prefix} is ambiguous", hint="give more digits")
    return found[0] if found else None


def _by_source(store: ImageStore, request: ImageRequest) -> ImageMetadata | None:
    wanted = str(request.docker)
    for meta in store:
        if meta.source == wanted:
            return meta
    return None


def _from_gateway(config: Config, text: str) -> ImageMetadata | None:
    """The gateway's answer; None when the gateway is unreachable."""
    from ..client import GatewayClient, GatewayError, GatewayUnreachable

    try:
        with GatewayClient(config.gateway.url) as client:
            data = client.lookup(text)
    except GatewayUnreachable as err:
        log.warning("%s; looking in the image store instead", err)
        return None
    except GatewayError as err:
        raise ImageError(err.message, err.hint) from None
    fields = set(ImageMetadata.__dataclass_fields__)
    meta = {k: v for k, v in data.items() if k in fields}
    return ImageMetadata.from_json(json.dumps(meta))


def resolve_image(text: str, config: Config, user: User) -> tuple[ImageMetadata, str]:
    """(metadata, squashfs path) of the image ``text`` names, if ``user`` may use it."""
    request = ImageRequest.parse(text, config.default_image_type)
    store = ImageStore(config.image_path)
    meta: ImageMetadata | None = None
    if request.type == "id":
        meta = _by_id(store, request.tag)
        if meta is None:
            meta = _from_gateway(config, f"id:{request.tag}")
    else:
        meta = _from_gateway(config, str(request))
        if meta is None:
            meta = _by_source(store, request)
    if meta is None or not meta.visible_to(user.uid, user.groups):
        raise ImageError(
            f"image {text!r} not found",
            hint=f"pull it first: shifterimg pull {request.tag}"
            if request.type == "docker"
            else None,
        )
    image_file = Path(store.image_file(meta.id))
    return meta, str(image_file)
