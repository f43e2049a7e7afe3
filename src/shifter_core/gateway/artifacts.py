"""The gateway's side of images as OCI artifacts (``artifacts.registry``): every image it
makes is published before its pull is READY, republished when its ACL changes, withdrawn
when it is removed or expires; at start, images the registry lacks (the site just turned
artifacts on, the registry lost them) are published in the background."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable

from ..config import Config
from ..errors import ConfigError, ShifterError
from ..image.artifact import ArtifactRegistry, CredentialError, read_credential
from ..image.store import ImageMetadata, ImageStore

log = logging.getLogger(__name__)


def artifact_registry(config: Config) -> ArtifactRegistry | None:
    """The registry the gateway publishes to, with its credential; None when not set. An
    unsafe or unreadable credential stops the gateway (a :class:`ConfigError`)."""
    settings = config.artifacts
    if not settings.registry:
        return None
    credential = None
    if settings.push_credentials:
        try:
            credential = read_credential(settings.push_credentials, owner=os.geteuid())
        except CredentialError as err:
            raise ConfigError(err.message, hint=err.hint) from None
    return ArtifactRegistry(settings.registry, settings.repository, credential, settings.timeout)


class Publisher:
    """Keeps the artifact registry in step with the store (does nothing without one)."""

    def __init__(self, registry: ArtifactRegistry | None, store: ImageStore) -> None:
        self.registry = registry
        self.store = store

    def publish(self, meta: ImageMetadata) -> None:
        """Publish ``meta``'s image and record; an :class:`ArtifactError` fails the pull
        (the image stays in the store; pulling it again publishes it)."""
        if self.registry is not None:
            self.registry.publish(meta, self.store.image_file(meta.id))

    def withdraw(self, image_id: str) -> None:
        """Delete the artifact of a removed image; a failure is logged, not raised (the
        store no longer has the image, whatever the registry says)."""
        if self.registry is None:
            return
        try:
            self.registry.withdraw(image_id)
        except ShifterError as err:
            log.error("image %s stays in the artifact registry: %s", image_id, err)

    def reconcile(self, images: Iterable[ImageMetadata]) -> int:
        """Publish each of ``images`` the registry lacks or holds with another record;
        returns how many were published."""
        if self.registry is None:
            return 0
        published = 0
        for meta in images:
            try:
                if self.registry.metadata(meta.id) != meta:
                    self.publish(meta)
                    published += 1
            except ShifterError as err:
                log.error("cannot publish image %s as an artifact: %s", meta.id, err)
        if published:
            log.info("published %d images missing from the artifact registry", published)
        return published

    def start_reconciling(self) -> threading.Thread | None:
        """:meth:`reconcile` the whole store in a background thread."""
        if self.registry is None:
            return None
        thread = threading.Thread(
            target=lambda: self.reconcile(list(self.store)), name="artifacts", daemon=True
        )
        thread.start()
        return thread
