"""Importing image files (air-gapped sites): docker-archive tar, OCI layout tar, squashfs.

- **docker-archive** (``docker save``): ``manifest.json`` names the config and the layer
  tars; the image id is the sha256 of the config (Docker's image id).
- **OCI layout** tar (``skopeo copy ... oci-archive:``, ``tar -C layout -c .``): ``index.json``
  -> manifest (or an index, resolved for the platform) -> config and layers; the image id is
  the platform manifest's digest, as for a pull.
- **squashfs**: checked with ``unsquashfs -s`` and published as it is; the id is its sha256.

Layers go into the layer cache under their digest (verified) and are flattened and converted
exactly like pulled ones. Nothing is unpacked to disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ..errors import ShifterError
from ..image.convert import SquashfsOptions, layers_to_squashfs
from ..image.layercache import LayerCache
from ..image.limits import UnpackBudget
from ..image.oci import (
    INDEX_TYPES,
    ImageConfig,
    Platform,
    detect_manifest_type,
    select_platform,
    split_digest,
)
from ..image.store import ImageMetadata, ImageStore

log = logging.getLogger(__name__)

SQUASHFS_MAGIC = b"hsqs"
_CHUNK = 1 << 20
MAX_JSON = 16 << 20


class ImageImportError(ShifterError):
    """The file is not an importable image (the message says why)."""


def detect_format(path: Path) -> str:
    """``squashfs``, ``tar`` or raise :class:`ImageImportError`."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head == SQUASHFS_MAGIC:
        return "squashfs"
    if tarfile.is_tarfile(path):
        return "tar"
    raise ImageImportError(
        "the file is neither a tar archive (docker-archive, OCI layout) nor a squashfs image",
        hint="make one with 'docker save', 'skopeo copy ... oci-archive:FILE' or mksquashfs",
    )


def import_file(
    path: Path,
    name: str,
    *,
    file_sha256: str,
    store: ImageStore,
    cache: LayerCache,
    squashfs: SquashfsOptions | None = None,
    platform: Platform | None = None,
    on_converting: Callable[[], None] | None = None,
    budget: UnpackBudget | None = None,
) -> ImageMetadata:
    """Import the file at *path* (a partial file in the store: it is consumed) as *name*.

    *budget* bounds the archive's entries and what its layers decompress to, as for pulls.
    """
    kind = detect_format(path)
    if kind == "squashfs":
        return _import_squashfs(path, name, file_sha256, store)
    with tarfile.open(path, "r:*") as tar:
        return _import_tar(tar, name, store, cache, squashfs, platform, on_converting, budget)


def _import_squashfs(path: Path, name: str, file_sha256: str, store: ImageStore) -> ImageMetadata:
    tool = shutil.which("unsquashfs")
    if tool is None:
        raise ImageImportError(
            "unsquashfs not found", hint="install squashfs-tools on the gateway host"
        )
    check = subprocess.run(
        [tool, "-s", str(path)], capture_output=True, text=True, check=False, timeout=60
    )
    if check.returncode != 0:
        detail = (check.stderr or check.stdout).strip().splitlines()
        raise ImageImportError(
            "the file is not a valid squashfs image: "
            + (detail[-1] if detail else "unsquashfs -s failed")
        )
    existing = store.get(file_sha256)
    if existing is not None:
        store.discard(path)
        return existing
    metadata = ImageMetadata(
        id=file_sha256,
        source=name,
        digest=f"sha256:{file_sha256}",
        platform=str(Platform.host()),
        size=path.stat().st_size,
        created=time.time(),
    )
    return store.publish(metadata, path)  # with the file's sha256, for node caches


def _norm(name: str) -> str:
    """A member name without leading ``./`` and ``/``."""
    while name.startswith(("./", "/")):
        name = name[1:] if name.startswith("/") else name[2:]
    return name


class _Archive:
    """Members of a tar file by normalised name."""

    def __init__(self, tar: tarfile.TarFile, budget: UnpackBudget | None = None) -> None:
        self.tar = tar
        self.members: dict[str, tarfile.TarInfo] = {}
        for member in tar:
            if budget is not None:
                budget.add_entry()
            if member.isfile():
                self.members[_norm(member.name)] = member

    def member(self, name: str) -> tarfile.TarInfo:
        member = self.members.get(_norm(name))
        if member is None:
            raise ImageImportError(f"the archive has no file {name!r}")
        return member

    def open(self, name: str) -> IO[bytes]:
        member = self.member(name)
        handle = self.tar.extractfile(member)
        assert handle is not None
        return handle

    def read_json(self, name: str) -> Any:
        if self.member(name).size > MAX_JSON:
            raise ImageImportError(f"{name} in the archive is too large")
        with self.open(name) as fh:
            data = fh.read()
        try:
            return json.loads(data)
        except ValueError as err:
            raise ImageImportError(f"{name} in the archive is not valid JSON: {err}") from None

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as fh:
            return fh.read()

    def blob_name(self, digest: str) -> str:
        algo, hexdigest = split_digest(digest)
        return f"blobs/{algo}/{hexdigest}"

    def cache_blob(
        self, cache: LayerCache, member_name: str, digest: str | None
    ) -> tuple[str, Path]:
        """Copy a member into the layer cache (verified); return its digest and cached path."""
        if digest is None:
            hasher = hashlib.sha256()
            with self.open(member_name) as fh:
                while chunk := fh.read(_CHUNK):
                    hasher.update(chunk)
            digest = f"sha256:{hasher.hexdigest()}"

        def writer(out: IO[bytes]) -> None:
            with self.open(member_name) as fh:
                shutil.copyfileobj(fh, out, _CHUNK)

        size = self.member(member_name).size
        return digest, cache.put(digest, writer, size=size, verify=True)


def _import_tar(
    tar: tarfile.TarFile,
    name: str,
    store: ImageStore,
    cache: LayerCache,
    squashfs: SquashfsOptions | None,
    platform: Platform | None,
    on_converting: Callable[[], None] | None,
    budget: UnpackBudget | None = None,
) -> ImageMetadata:
    archive = _Archive(tar, budget)
    want = platform or Platform.host()
    if "manifest.json" in archive.members:
        image_id, config_bytes, layers = _docker_archive(archive, name, cache)
    elif "index.json" in archive.members:
        image_id, config_bytes, layers = _oci_layout(archive, name, cache, want)
    else:
        raise ImageImportError(
            "the tar archive has neither manifest.json (docker-archive) nor index.json (OCI layout)"
        )
    existing = store.get(image_id)
    if existing is not None:
        log.info("imported image %s is already in the store", image_id)
        return existing
    try:
        config = ImageConfig.from_json(json.loads(config_bytes))
    except (ValueError, AttributeError) as err:
        raise ImageImportError(f"the image config is not valid: {err}") from None
    if on_converting:
        on_converting()
    partial = store.new_partial(image_id)
    try:
        paths = [p for _, p, _ in layers]
        if budget is not None:
            budget.reset()  # the archive's own entries are not the image's
        size = layers_to_squashfs(
            paths, partial, squashfs, spool_dir=cache.directory, budget=budget
        )
        metadata = ImageMetadata.from_config(
            config,
            id=image_id,
            source=name,
            digest=f"sha256:{image_id}",
            platform=str(config.platform) if config.os else str(want),
            config_digest="sha256:" + hashlib.sha256(config_bytes).hexdigest(),
            layers=((d, p.stat().st_size, m) for d, p, m in layers),
            size=size,
        )
        metadata = store.publish(metadata, partial)  # with the file's sha256
    finally:
        store.discard(partial)
    return metadata


def _docker_archive(
    archive: _Archive, name: str, cache: LayerCache
) -> tuple[str, bytes, list[tuple[str, Path, str]]]:
    manifest = archive.read_json("manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise ImageImportError("manifest.json of the docker-archive lists no image")
    entry = manifest[0]
    if len(manifest) > 1:
        tag = name.rsplit("/", 1)[-1]
        matching = [e for e in manifest if any(t.endswith(tag) for t in e.get("RepoTags") or ())]
        if len(matching) != 1:
            raise ImageImportError(
                f"the docker-archive holds {len(manifest)} images and none is tagged {tag!r}",
                hint="save one image per file (docker save IMAGE)",
            )
        entry = matching[0]
    if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
        raise ImageImportError("manifest.json of the docker-archive has no Config")
    config_bytes = archive.read_bytes(entry["Config"])
    image_id = hashlib.sha256(config_bytes).hexdigest()
    layers = []
    for layer in entry.get("Layers") or ():
        digest, path = archive.cache_blob(cache, str(layer), None)
        layers.append((digest, path, "application/vnd.docker.image.rootfs.diff.tar"))
    return image_id, config_bytes, layers


def _oci_layout(
    archive: _Archive, name: str, cache: LayerCache, want: Platform
) -> tuple[str, bytes, list[tuple[str, Path, str]]]:
    index = archive.read_json("index.json")
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ImageImportError("index.json of the OCI layout lists no image")
    tag = name.rsplit(":", 1)[-1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    named = [
        e
        for e in entries
        if (e.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag
    ]
    if len(named) == 1:
        entry = named[0]
    elif len(entries) == 1:
        entry = entries[0]
    else:
        entry = select_platform(entries, want)
        if entry is None:
            raise ImageImportError(
                f"the OCI layout holds {len(entries)} images and none is tagged {tag!r} "
                f"or for {want}"
            )
    digest = str(entry.get("digest"))
    for _ in range(2):
        raw = archive.read_bytes(archive.blob_name(digest))
        if f"sha256:{hashlib.sha256(raw).hexdigest()}" != digest:
            raise ImageImportError(f"blob {digest} of the OCI layout does not match its digest")
        doc = json.loads(raw)
        media_type = detect_manifest_type(doc, entry.get("mediaType"))
        if media_type not in INDEX_TYPES:
            break
        entry = select_platform(doc.get("manifests") or [], want)
        if entry is None:
            raise ImageImportError(f"the OCI layout's image index has no image for {want}")
        digest = str(entry.get("digest"))
    else:
        raise ImageImportError("the OCI layout nests image indexes; only one level is supported")
    config_digest = str((doc.get("config") or {}).get("digest"))
    config_bytes = archive.read_bytes(archive.blob_name(config_digest))
    if f"sha256:{hashlib.sha256(config_bytes).hexdigest()}" != config_digest:
        raise ImageImportError(f"config blob {config_digest} does not match its digest")
    layers = []
    for layer in doc.get("layers") or ():
        layer_digest = str(layer.get("digest"))
        _, path = archive.cache_blob(cache, archive.blob_name(layer_digest), layer_digest)
        layers.append((layer_digest, path, str(layer.get("mediaType") or "")))
    return split_digest(digest)[1], config_bytes, layers
