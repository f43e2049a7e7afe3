"""Docker Registry v2 / OCI distribution client: resolve an image, download its layers.

What it handles (each one a behaviour seen on real registries, see
``notes/images-and-registries.md``):

- Manifests: Docker v2 schema 2, Docker manifest lists, OCI manifests and OCI indexes. An
  ``Accept`` header listing all four is always sent (without it distribution converts a v2s2
  manifest to schema 1 and answers 404 for an OCI one). A manifest without ``mediaType``
  (umoci writes those) is typed by ``Content-Type``, then by its shape. Schema 1 is refused
  with a clear message. A manifest fetched by digest is checked against that digest (sha256 of
  the exact bytes); the platform manifest digest is the image id.
- Platform selection for lists and indexes (os, architecture, variant), defaulting to the
  node's platform; the error lists what the image offers.
- Auth (:mod:`.auth`): anonymous, Basic, and Bearer tokens per scope, refreshed when they
  expire or when a 401 comes back; credentials never over plain http unless the registry is
  listed as insecure.
- Blobs: streamed to a file and verified (sha256) while streaming; a corrupt blob raises
  :class:`~shifter_core.image.errors.DigestMismatch` and leaves nothing behind; an
  interrupted download resumes with a ``Range`` request.
- Transport (:mod:`.transport`): redirects (to blob storage) without the ``Authorization``
  header and only where they are safe, retries with backoff, 429 ``Retry-After``, registry
  error texts cut and escaped.
- Privacy: a cached layer that a pull with credentials fetched is reused for another pull only
  after that pull's own request proves access (:meth:`RegistryClient.prove_access`).
- Mirrors (:mod:`.settings`): a registry name (``docker.io``) can map to mirror base URLs
  tried before it.

The OCI model (media types, descriptors, platforms, the image config) is :mod:`..oci`.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import httpx

from ...hubnames import DOCKER_HUB
from ...reference import DockerReference
from ..errors import (
    BlobNotFound,
    DigestMismatch,
    ImageNotFound,
    PlatformNotFound,
    RegistryError,
    RegistryUnavailable,
    UnsupportedManifest,
)
from ..limits import Deadline, clean_text
from ..oci import (
    CONFIG_TYPES,
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    LAYER_COMPRESSION,
    MANIFEST_ACCEPT,
    SCHEMA1_TYPES,
    Descriptor,
    ImageConfig,
    Platform,
    available_platforms,
    compute_digest,
    detect_manifest_type,
    select_platform,
    split_digest,
)
from .auth import RegistryAuth
from .settings import Endpoint, RegistrySettings
from .transport import Transport, deadline_scope, describe, error_codes, iter_raw

if TYPE_CHECKING:
    from ..layercache import LayerCache
    from .credentials import CredentialSource

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 16 << 20

ProgressCallback = Callable[[str, int, int], None]


class _Cancelled(Exception):
    """Another layer of the same pull failed; stop this download."""


@dataclass(frozen=True)
class ResolvedImage:
    """An image resolved to one platform: what to download and how to run it."""

    reference: DockerReference
    name: str
    endpoint: Endpoint
    digest: str
    media_type: str
    manifest: Mapping[str, Any] = field(repr=False)
    manifest_bytes: bytes = field(repr=False)
    config_descriptor: Descriptor
    config: ImageConfig
    layers: tuple[Descriptor, ...]
    platform: Platform
    index_digest: str | None = None
    index_media_type: str | None = None

    @property
    def id(self) -> str:
        """The image id: hex of the platform manifest's sha256 digest."""
        return split_digest(self.digest)[1]

    @property
    def registry(self) -> str:
        """The registry's name (``docker.io``), even when a mirror served the image."""
        return self.reference.registry

    @property
    def size(self) -> int:
        """Total compressed size of the layers in bytes."""
        return sum(layer.size for layer in self.layers)


def familiar_name(ref: DockerReference) -> str:
    """The short name users type: ``ubuntu:22.04`` rather than ``docker.io/library/...``."""
    name = f"{ref.registry}/{ref.repository}"
    if ref.registry == DOCKER_HUB:
        name = ref.repository.removeprefix("library/")
    if ref.tag:
        name += f":{ref.tag}"
    if ref.digest:
        name += f"@{ref.digest}"
    return name


class RegistryClient:
    """A thread-safe registry client; one per process is enough (it caches auth tokens).

    ``transport``, ``sleep`` and ``clock`` exist for tests (``httpx.MockTransport``, a fake
    sleep, a fake monotonic clock).
    """

    def __init__(
        self,
        settings: RegistrySettings | None = None,
        credentials: CredentialSource | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or RegistrySettings()
        self._transport = Transport(self.settings, transport=transport, sleep=sleep)
        self._auth = RegistryAuth(self.settings, credentials, self._transport, clock)

    @property
    def token_requests(self) -> int:
        """How many tokens this client has asked token services for."""
        return self._auth.token_requests

    def close(self) -> None:
        """Close the connection pool."""
        self._transport.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- manifests ----------------------------------------------------------------------------

    def _fetch_manifest(
        self, endpoint: Endpoint, ref: DockerReference, reference: str, name: str
    ) -> tuple[bytes, dict[str, Any], str, str]:
        """(bytes, parsed, media type, digest) of a manifest, verified when *reference* is a
        digest."""
        scope = f"repository:{ref.repository}:pull"
        response = self._auth.get(
            endpoint,
            f"/v2/{ref.repository}/manifests/{reference}",
            scope=scope,
            name=name,
            headers={"Accept": MANIFEST_ACCEPT},
        )
        try:
            if response.status_code != 200:
                body = self._transport.read_error(response)
                codes = {c for c, _ in error_codes(body)}
                if response.status_code == 404 or codes & {"MANIFEST_UNKNOWN", "NAME_UNKNOWN"}:
                    raise self._not_found(endpoint, ref, name, codes)
                raise RegistryError(
                    f"registry {endpoint.registry} refused the manifest of '{name}': "
                    f"{describe(response.status_code, body)}"
                )
            content = self._transport.read_raw(
                response,
                self.settings.limits.max_manifest_bytes or MAX_MANIFEST_BYTES,
                f"manifest of '{name}'",
            )
            content_type = response.headers.get("content-type")
            header_digest = response.headers.get("docker-content-digest")
        finally:
            response.close()
        if reference.startswith(("sha256:", "sha512:")):
            algo, _ = split_digest(reference)
            actual = compute_digest(content, algo)
            if actual != reference:
                raise DigestMismatch(
                    f"manifest of '{name}' from {endpoint.url} does not match its digest: "
                    f"expected {reference}, got {actual}",
                    hint="the registry or a proxy altered it; try again or use another mirror",
                    blob=reference,
                    expected=reference,
                    actual=actual,
                )
            digest = reference
        else:
            digest = compute_digest(content)
            if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
                log.warning(
                    "%s: Docker-Content-Digest %s differs from the received manifest's %s",
                    name,
                    header_digest,
                    digest,
                )
        try:
            doc = json.loads(content)
        except ValueError as exc:
            raise UnsupportedManifest(f"manifest of '{name}' is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise UnsupportedManifest(f"manifest of '{name}' is not a JSON object")
        media_type = detect_manifest_type(doc, content_type)
        if media_type in SCHEMA1_TYPES:
            raise UnsupportedManifest(
                f"image '{name}' uses the Docker image manifest schema 1, which Shifter does "
                "not support (deprecated since 2017)",
                hint="push the image again with a current docker, podman or skopeo "
                "(e.g. skopeo copy --format v2s2)",
            )
        if media_type not in IMAGE_MANIFEST_TYPES and media_type not in INDEX_TYPES:
            raise UnsupportedManifest(
                f"'{name}' is not a container image (manifest media type {media_type!r})"
            )
        return content, doc, media_type, digest

    def _not_found(
        self, endpoint: Endpoint, ref: DockerReference, name: str, codes: set[str]
    ) -> ImageNotFound:
        hint = "check the name and the tag"
        if ref.tag and not ref.digest and "NAME_UNKNOWN" not in codes:
            suggestion = self._suggest_tag(endpoint, ref, name)
            if suggestion:
                hint = f"did you mean {suggestion}?"
        return ImageNotFound(f"image '{name}' not found in registry {ref.registry}", hint=hint)

    def _suggest_tag(self, endpoint: Endpoint, ref: DockerReference, name: str) -> str | None:
        try:
            tags = self._list_tags(endpoint, ref, name, limit=1000)
        except (RegistryError, httpx.HTTPError) as exc:
            log.debug("no tag suggestions for %s: %s", name, exc)
            return None
        close = difflib.get_close_matches(ref.tag or "", tags, n=1, cutoff=0.6)
        if not close:
            return None
        return familiar_name(DockerReference(ref.registry, ref.repository, close[0]))

    def _list_tags(
        self, endpoint: Endpoint, ref: DockerReference, name: str, limit: int
    ) -> list[str]:
        tags: list[str] = []
        path: str | None = f"/v2/{ref.repository}/tags/list?n={min(limit, 1000)}"
        while path and len(tags) < limit:
            response = self._auth.get(
                endpoint, path, scope=f"repository:{ref.repository}:pull", name=name
            )
            try:
                if response.status_code != 200:
                    body = self._transport.read_error(response)
                    codes = {c for c, _ in error_codes(body)}
                    if response.status_code == 404 or "NAME_UNKNOWN" in codes:
                        raise ImageNotFound(
                            f"repository '{name}' not found in registry {ref.registry}"
                        )
                    raise RegistryError(
                        f"listing tags of '{name}' failed: {describe(response.status_code, body)}"
                    )
                doc = json.loads(self._transport.read_raw(response, MAX_MANIFEST_BYTES, "tag list"))
                link = response.headers.get("link", "")
            finally:
                response.close()
            tags.extend(str(t) for t in doc.get("tags") or ())
            match = re.search(r"<([^>]+)>\s*;\s*rel=\"?next\"?", link)
            path = None
            if match:
                nxt = urlsplit(urljoin(endpoint.url + "/", match.group(1)))
                path = nxt.path + (f"?{nxt.query}" if nxt.query else "")
        return tags[:limit]

    # -- resolving ----------------------------------------------------------------------------

    def resolve(
        self,
        reference: str | DockerReference,
        platform: str | Platform | None = None,
        deadline: Deadline | None = None,
    ) -> ResolvedImage:
        """Resolve *reference* to one platform image: manifest, config, layer descriptors.

        *platform* defaults to this node's (:meth:`Platform.host`); given explicitly, a
        single-platform image for another platform is an error (otherwise only a warning).
        Mirrors are tried first; each failure there is logged and the next endpoint tried.
        Past *deadline* (checked per request and per chunk read) it raises LimitExceeded.
        """
        with deadline_scope(deadline):
            return self._resolve(reference, platform)

    def _resolve(
        self, reference: str | DockerReference, platform: str | Platform | None
    ) -> ResolvedImage:
        ref = _as_reference(reference)
        want = Platform.parse(platform) if isinstance(platform, str) else platform
        strict = want is not None
        want = want or Platform.host()
        name = familiar_name(ref)
        failures: list[tuple[Endpoint, RegistryError]] = []
        for endpoint in self.settings.endpoints(ref.registry):
            try:
                return self._resolve_at(endpoint, ref, name, want, strict)
            except RegistryError as exc:
                if not endpoint.mirror:
                    if failures and not isinstance(exc, ImageNotFound):
                        notes = "; ".join(f"mirror {e.url}: {err}" for e, err in failures)
                        exc.message = f"{exc.message} (also tried {notes})"
                        exc.args = (exc.message,)
                    raise
                log.warning("mirror %s could not serve %s: %s", endpoint.url, name, exc)
                failures.append((endpoint, exc))
        raise AssertionError("unreachable: the registry itself is always the last endpoint")

    def _resolve_at(
        self,
        endpoint: Endpoint,
        ref: DockerReference,
        name: str,
        want: Platform,
        strict: bool,
    ) -> ResolvedImage:
        content, doc, media_type, digest = self._fetch_manifest(endpoint, ref, ref.reference, name)
        index_digest: str | None = None
        index_type: str | None = None
        if media_type in INDEX_TYPES:
            entries = doc.get("manifests")
            if not isinstance(entries, list):
                raise UnsupportedManifest(f"index of '{name}' has no manifests array")
            entries = [e for e in entries if isinstance(e, Mapping)]
            entry = select_platform(entries, want)
            if entry is None:
                available = available_platforms(entries)
                raise PlatformNotFound(
                    f"image '{name}' has no variant for platform {want}; it offers: "
                    f"{clean_text(', '.join(available) or 'nothing runnable')}",
                    hint="choose one of those platforms",
                    available=available,
                )
            chosen = Descriptor.from_json(entry, f"the {want} entry of the index of '{name}'")
            index_digest, index_type = digest, media_type
            content, doc, media_type, digest = self._fetch_manifest(
                endpoint, ref, chosen.digest, name
            )
            if media_type not in IMAGE_MANIFEST_TYPES:
                raise UnsupportedManifest(
                    f"the {want} entry of '{name}' is a {media_type}, not an image manifest"
                )
        config_desc = Descriptor.from_json(doc.get("config"), f"config of '{name}'")
        if config_desc.media_type and config_desc.media_type not in CONFIG_TYPES:
            raise UnsupportedManifest(
                f"'{name}' is not a container image (its config has media type "
                f"{config_desc.media_type!r})",
                hint="artifacts (e.g. pushed with oras) cannot be run as images",
            )
        raw_layers = doc.get("layers")
        if not isinstance(raw_layers, list):
            raise UnsupportedManifest(f"manifest of '{name}' has no layers array")
        layers = tuple(
            Descriptor.from_json(layer, f"layer {i} of '{name}'")
            for i, layer in enumerate(raw_layers)
        )
        self.settings.limits.check_layers(name, [layer.size for layer in layers])
        for i, layer in enumerate(layers):
            if layer.media_type not in LAYER_COMPRESSION:
                raise UnsupportedManifest(
                    f"layer {i} of '{name}' has media type {layer.media_type!r}, which Shifter "
                    "cannot unpack",
                    hint="only tar layers (uncompressed, gzip or zstd) are supported",
                )
        config_bytes = self._fetch_small_blob(endpoint, ref, name, config_desc, MAX_CONFIG_BYTES)
        try:
            config_doc = json.loads(config_bytes)
            config = ImageConfig.from_json(config_doc)
        except (ValueError, AttributeError, TypeError) as exc:
            raise UnsupportedManifest(f"config of '{name}' is not a valid image config") from exc
        if config.diff_ids and len(config.diff_ids) != len(layers):
            raise UnsupportedManifest(
                f"image '{name}' is inconsistent: {len(layers)} layers but "
                f"{len(config.diff_ids)} diff_ids in its config"
            )
        actual_platform = config.platform
        if index_digest is None and config.architecture and not want.matches(actual_platform):
            if strict:
                raise PlatformNotFound(
                    f"image '{name}' is for {actual_platform} only, not {want}",
                    hint="choose that platform or another image",
                    available=[str(actual_platform)],
                )
            log.warning("image %s is for %s, this node is %s", name, actual_platform, want)
        resolved = ResolvedImage(
            reference=ref,
            name=name,
            endpoint=endpoint,
            digest=digest,
            media_type=media_type,
            manifest=doc,
            manifest_bytes=content,
            config_descriptor=config_desc,
            config=config,
            layers=layers,
            platform=actual_platform if config.architecture else want,
            index_digest=index_digest,
            index_media_type=index_type,
        )
        log.info(
            "resolved %s to %s (%s, %d layers, %d bytes) via %s",
            name,
            digest,
            resolved.platform,
            len(layers),
            resolved.size,
            endpoint.url,
        )
        return resolved

    # -- blobs --------------------------------------------------------------------------------

    def _fetch_small_blob(
        self, endpoint: Endpoint, ref: DockerReference, name: str, desc: Descriptor, limit: int
    ) -> bytes:
        if desc.size > limit:
            raise UnsupportedManifest(f"blob {desc.digest} of '{name}' is too large ({desc.size})")
        sink = io.BytesIO()
        self._download(endpoint, ref, name, desc, sink)
        return sink.getvalue()

    def _download(
        self,
        endpoint: Endpoint,
        ref: DockerReference,
        name: str,
        desc: Descriptor,
        sink: IO[bytes] | io.RawIOBase,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        deadline: Deadline | None = None,
    ) -> int:
        """Stream blob *desc* into *sink*, verifying size and digest on the way.

        An interrupted transfer is resumed with a ``Range`` request (or restarted when the
        server ignores it). Returns the number of bytes written.
        """
        algo, _ = split_digest(desc.digest)
        path = f"/v2/{ref.repository}/blobs/{desc.digest}"
        scope = f"repository:{ref.repository}:pull"
        start = sink.tell()
        hasher = hashlib.new(algo)
        done = 0
        failures = 0
        if progress:
            progress(desc.digest, 0, desc.size)
        while True:
            headers = {"Range": f"bytes={done}-"} if done else {}
            response = self._auth.get(endpoint, path, scope=scope, name=name, headers=headers)
            try:
                status = response.status_code
                if (
                    status == 206
                    and done
                    and response.headers.get("content-range", "").startswith(f"bytes {done}-")
                ):
                    log.info("resuming %s at byte %d", desc.digest, done)
                elif status == 200:
                    if done:
                        log.info("restarting %s (no range support)", desc.digest)
                        sink.seek(start)
                        sink.truncate()
                        hasher, done = hashlib.new(algo), 0
                else:
                    body = self._transport.read_error(response)
                    codes = {c for c, _ in error_codes(body)}
                    if status == 404 or "BLOB_UNKNOWN" in codes:
                        raise BlobNotFound(
                            f"blob {desc.digest} of '{name}' is missing from registry "
                            f"{endpoint.registry} ({endpoint.url})",
                            hint="the image in the registry is incomplete; push it again",
                        )
                    raise RegistryError(
                        f"registry {endpoint.registry} refused blob {desc.digest} of '{name}': "
                        f"{describe(status, body)}"
                    )
                for chunk in iter_raw(response):
                    if cancel is not None and cancel.is_set():
                        raise _Cancelled
                    if deadline is not None:
                        deadline.check()
                    done += len(chunk)
                    if done > desc.size:
                        raise DigestMismatch(
                            f"blob {desc.digest} of '{name}' from {endpoint.url} is larger than "
                            f"the {desc.size} bytes its manifest says",
                            hint="nothing was kept; the registry's copy is damaged",
                            blob=desc.digest,
                            expected=desc.digest,
                            actual=None,
                        )
                    hasher.update(chunk)
                    sink.write(chunk)
                    if progress:
                        progress(desc.digest, done, desc.size)
                break
            except httpx.TransportError as exc:
                failures += 1
                if failures > self.settings.retries:
                    raise RegistryUnavailable(
                        f"downloading blob {desc.digest} of '{name}' from {endpoint.registry} "
                        f"failed: {exc or type(exc).__name__} (after {failures} attempts)",
                        hint="check the network; try again later",
                    ) from exc
                delay = self._transport.backoff(failures - 1)
                log.warning(
                    "blob %s interrupted at %d bytes (%s); retrying in %.1f s",
                    desc.digest,
                    done,
                    exc,
                    delay,
                )
                self._transport.sleep(delay)
            finally:
                response.close()
        actual = f"{algo}:{hasher.hexdigest()}"
        if actual != desc.digest or done != desc.size:
            raise DigestMismatch(
                f"blob {desc.digest} of '{name}' from {endpoint.url} is corrupt: expected "
                f"{desc.digest} ({desc.size} bytes), got {actual} ({done} bytes)",
                hint="nothing was kept; the registry's copy (or something between) is damaged, "
                "ask its administrator or push the image again",
                blob=desc.digest,
                expected=desc.digest,
                actual=actual,
            )
        return done

    def download_blob(
        self,
        resolved: ResolvedImage,
        descriptor: Descriptor,
        sink: IO[bytes],
        progress_callback: ProgressCallback | None = None,
    ) -> int:
        """Stream one blob of *resolved* into *sink* (verified); returns its size."""
        return self._download(
            resolved.endpoint,
            resolved.reference,
            resolved.name,
            descriptor,
            sink,
            progress_callback,
        )

    def prove_access(
        self,
        resolved: ResolvedImage,
        desc: Descriptor,
        origin: str,
        deadline: Deadline | None = None,
    ) -> None:
        """Prove that this client (its credentials) may pull blob *desc* of *resolved*.

        For a layer that a pull with credentials put in the cache (from registry *origin*):
        its own registry answers a ``HEAD`` on the blob in this repository; any other registry
        must send the blob itself, whose digest is the proof (a registry may lie about a
        ``HEAD``, not about content). Raises :class:`BlobNotFound` or an auth error.
        """
        endpoint, ref, name = resolved.endpoint, resolved.reference, resolved.name
        if endpoint.registry != origin:
            log.info("%s: proving access to %s by downloading it again", name, desc.digest)
            self._download(endpoint, ref, name, desc, _HashSink(), deadline=deadline)
            return
        response = self._auth.get(
            endpoint,
            f"/v2/{ref.repository}/blobs/{desc.digest}",
            scope=f"repository:{ref.repository}:pull",
            name=name,
            method="HEAD",
        )
        status = response.status_code
        response.close()
        if status != 200:
            raise BlobNotFound(
                f"blob {desc.digest} of '{name}' is missing from registry {endpoint.registry} "
                f"({endpoint.url}): HTTP {status}",
                hint="the image in the registry is incomplete, or not yours to pull",
            )

    def pull_layers(
        self,
        resolved: ResolvedImage,
        cache: LayerCache,
        progress_callback: ProgressCallback | None = None,
        deadline: Deadline | None = None,
    ) -> list[Path]:
        """Make sure every layer of *resolved* is in *cache*; return their paths in order.

        Missing layers are downloaded in parallel (``settings.max_parallel`` threads), each
        verified while streaming and published atomically; a layer another thread or process
        is already downloading is waited for, not fetched twice. *progress_callback*
        ``(digest, bytes_done, total)`` is called from the worker threads (once with
        ``done == total`` for a layer that was already cached). On the first failure the other
        downloads stop and that error is raised.

        A cached layer that a pull with credentials fetched is reused only after
        :meth:`prove_access`; layers this client fetches with credentials are marked so.
        *deadline* stops the pull once it is past.
        """
        unique: dict[str, Descriptor] = {}
        for layer in resolved.layers:
            unique.setdefault(layer.digest, layer)
        if not unique:
            return []
        cancel = threading.Event()

        credentialed = self._auth.credentials_for(resolved.endpoint) is not None
        private = resolved.endpoint.registry if credentialed else None

        def fetch(desc: Descriptor) -> Path:
            if cancel.is_set():
                raise _Cancelled
            if deadline is not None:
                deadline.check()
            origin = cache.private_origin(desc.digest) if desc.digest in cache else None
            if origin is not None:
                self.prove_access(resolved, desc, origin, deadline)
                if private is None:
                    cache.mark_public(desc.digest)  # anonymous access works: it is public
            wrote = False

            def writer(fh: IO[bytes]) -> None:
                nonlocal wrote
                wrote = True
                self._download(
                    resolved.endpoint,
                    resolved.reference,
                    resolved.name,
                    desc,
                    fh,
                    progress_callback,
                    cancel,
                    deadline,
                )

            path = cache.put(desc.digest, writer, size=desc.size, verify=False, private=private)
            if not wrote and progress_callback:
                progress_callback(desc.digest, desc.size, desc.size)
            return path

        workers = min(self.settings.max_parallel, len(unique))
        with ThreadPoolExecutor(workers, thread_name_prefix="shifter-pull") as pool:
            futures: dict[str, Future[Path]] = {
                digest: pool.submit(fetch, desc) for digest, desc in unique.items()
            }
            done, _ = wait(futures.values(), return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                cancel.set()
                for future in futures.values():
                    future.cancel()
        if failed:
            candidates = [*failed, *(f for f in futures.values() if not f.cancelled())]
            errors = [e for f in candidates if (e := f.exception()) is not None]
            real = [e for e in errors if not isinstance(e, _Cancelled)]
            raise (real or errors)[0]
        return [futures[layer.digest].result() for layer in resolved.layers]


class _HashSink(io.RawIOBase):
    """A sink that keeps nothing (the download verifies the digest as it streams)."""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return len(data)

    def tell(self) -> int:
        return 0

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def truncate(self, size: int | None = None) -> int:
        return 0


def _as_reference(reference: str | DockerReference) -> DockerReference:
    return reference if isinstance(reference, DockerReference) else DockerReference.parse(reference)
