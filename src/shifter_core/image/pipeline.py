"""From an image reference to a published squashfs image: resolve, fetch, flatten, convert.

This is the gateway's work for one pull, usable without the gateway (tests, benchmarks,
``shifterimg`` in a pinch)::

    registry (resolve) ──▶ layer cache (parallel, verified) ──▶ flatten ──pipe──▶ tar2sqfs
        ──▶ store (partial file, atomic rename, <id>.json)

Nothing is unpacked to disk, and nothing is visible in the store until it is complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .convert import SquashfsOptions, layers_to_squashfs
from .layercache import LayerCache
from .limits import Deadline, PullLimits, UnpackBudget
from .oci import Platform
from .registry.client import RegistryClient, ResolvedImage
from .store import Acl, ImageMetadata, ImageStore

log = logging.getLogger(__name__)

# States a pull goes through (the gateway stores them; CLIs print them).
PENDING, PULLING, CONVERTING, READY, FAILED = "PENDING", "PULLING", "CONVERTING", "READY", "FAILED"


@dataclass(frozen=True)
class Progress:
    """One progress report: a state change, or bytes of one layer downloaded."""

    state: str
    layer: str | None = None
    done: int = 0
    total: int = 0


ProgressCallback = Callable[[Progress], None]


def metadata_for(resolved: ResolvedImage, size: int, acl: Acl | None) -> ImageMetadata:
    """The store's record of a pulled image."""
    return ImageMetadata.from_config(
        resolved.config,
        id=resolved.id,
        source=str(resolved.reference),
        digest=resolved.digest,
        platform=str(resolved.platform),
        config_digest=resolved.config_descriptor.digest,
        layers=((d.digest, d.size, d.media_type) for d in resolved.layers),
        size=size,
        acl=acl,
    )


def build_image(
    resolved: ResolvedImage,
    *,
    client: RegistryClient,
    cache: LayerCache,
    store: ImageStore,
    squashfs: SquashfsOptions | None = None,
    acl: Acl | None = None,
    progress: ProgressCallback | None = None,
    limits: PullLimits | None = None,
    deadline: Deadline | None = None,
) -> ImageMetadata:
    """Download, flatten, convert and publish a resolved image; return its metadata.

    An image already in the store is not built again (its metadata is returned as is).
    *limits* bound what the layers decompress to and the tar entries they hold, *deadline*
    the time; past either the pull fails and nothing is left in the store (the spool files
    are anonymous, the partial squashfs is removed).
    """
    report = progress or (lambda _p: None)
    existing = store.get(resolved.id)
    if existing is not None:
        log.info("image %s (%s) is already in the store", resolved.id, resolved.reference)
        return existing
    report(Progress(PULLING))
    with cache.pinned(d.digest for d in resolved.layers):
        layers = client.pull_layers(
            resolved,
            cache,
            lambda digest, done, total: report(Progress(PULLING, digest, done, total)),
            deadline,
        )
        report(Progress(CONVERTING))
        metadata = _convert(resolved, layers, cache, store, squashfs, acl, limits, deadline)
    report(Progress(READY))
    return metadata


def _convert(
    resolved: ResolvedImage,
    layers: list[Path],
    cache: LayerCache,
    store: ImageStore,
    squashfs: SquashfsOptions | None,
    acl: Acl | None,
    limits: PullLimits | None,
    deadline: Deadline | None,
) -> ImageMetadata:
    budget = UnpackBudget(limits, deadline)
    partial = store.new_partial(resolved.id)
    try:
        started = time.monotonic()
        size = layers_to_squashfs(
            layers, partial, squashfs, spool_dir=cache.directory, budget=budget
        )
        log.info(
            "converted %s in %.1f s (%d bytes)",
            resolved.reference,
            time.monotonic() - started,
            size,
        )
        return store.publish(metadata_for(resolved, size, acl), partial)
    finally:
        store.discard(partial)


def pull_image(
    reference: str,
    *,
    client: RegistryClient,
    cache: LayerCache,
    store: ImageStore,
    platform: str | Platform | None = None,
    squashfs: SquashfsOptions | None = None,
    acl: Acl | None = None,
    progress: ProgressCallback | None = None,
) -> ImageMetadata:
    """Resolve ``reference`` and :func:`build_image` it."""
    resolved = client.resolve(reference, platform)
    return build_image(
        resolved,
        client=client,
        cache=cache,
        store=store,
        squashfs=squashfs,
        acl=acl,
        progress=progress,
    )
