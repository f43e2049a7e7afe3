"""Images as OCI artifacts in a site registry, through oras.

For sites whose nodes cannot read the image store (no shared file system, or a store kept
off the nodes to spread the load), the gateway publishes every image to a registry as an
OCI artifact, and the prolog pulls it from there into the node cache. A site spreads the
load with the registry's own pull-through mirrors (``artifacts.node_registry``, one per
rack); nothing here distributes bytes.

One artifact per image, in ``artifacts.repository``, tagged with the image id::

    manifest   application/vnd.oci.image.manifest.v1+json (schemaVersion 2)
    config     application/vnd.shifter.image.config.v1+json
               the store's record of the image (<id>.json: env, entrypoint, ACL, sha256...)
    layers[0]  application/vnd.shifter.image.squashfs.v1
               the squashfs, byte for byte the store's <id>.squashfs

The config's and the squashfs's digests are checked by the node while it reads them (a
registry's storage may serve corrupted blobs); the record must name the tag's image and
the squashfs's sha256. The registry is the nodes', not the users': they read it with a
credential only root can read, and the prolog applies the image's ACL, so a private image
stays private.

oras-py provides the protocol (manifests, blobs, uploads). Three of its defaults do not
suit root on a node and are replaced here: it reads ``~/.docker/config.json`` and runs
credential helpers (only the site's credential file counts), it retries a failed request
for about two minutes (one attempt: the prolog fails at once with a clear error), and it
sets no network timeout.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import urlsplit

import oras.auth.base
import oras.auth.basic
import oras.auth.token
import oras.container
import oras.oci
import oras.provider
import requests
import requests.adapters

from ..errors import ShifterError
from .content import MAX_METADATA_TEXT, ImageContentError
from .store import ImageMetadata, check_image_id

log = logging.getLogger(__name__)

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.shifter.image.config.v1+json"
SQUASHFS_MEDIA_TYPE = "application/vnd.shifter.image.squashfs.v1"
MAX_MANIFEST = 64 << 10
CHUNK = 1 << 20
# A registry's or mirror's passing 5xx (distribution 2.8's proxy answers some simultaneous
# first fetches of a blob with 500) is asked again after these pauses; nothing else is.
RETRY_PAUSES = (0.2, 0.5, 1.0)


class ArtifactError(ShifterError):
    """The artifact registry could not be used (unreachable, refused, damaged content)."""


class CredentialError(ShifterError):
    """A credential file is missing, unsafe or malformed."""


def read_credential(path: str, owner: int) -> tuple[str, str]:
    """``USER:PASSWORD`` from the first line of ``path``, which must be a regular file of
    ``owner`` that nobody else can read or write (a symlink is refused)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise CredentialError(
            f"cannot read the artifact registry credential {path}: {err.strerror}",
            hint="create it as USER:PASSWORD, mode 0600 (see artifacts in shifter.yaml)",
        ) from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner or st.st_mode & 0o077:
            raise CredentialError(
                f"the artifact registry credential {path} is not safe: it must be a regular "
                f"file of uid {owner} with mode 0600 (it is uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):04o})",
                hint=f"chown {owner} {path}; chmod 0600 {path}",
            )
        line = fh.read(4096).decode("utf-8", "replace").splitlines()[:1]
    user, sep, password = (line[0] if line else "").partition(":")
    if not sep or not user or not password:
        raise CredentialError(
            f"the artifact registry credential {path} is not USER:PASSWORD on its first line"
        )
    return user, password


class _Timeout(requests.adapters.HTTPAdapter):
    """Every request of the session gets ``timeout`` seconds (oras sets none)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float | None, float | None] | None = None,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
        proxies: dict[str, str] | None = None,
    ) -> requests.Response:
        return super().send(request, stream, timeout or self.timeout, verify, cert, proxies)


class _SiteCredential(oras.auth.basic.BasicAuth):  # type: ignore[misc]
    """Basic auth with the site's credential only: never ``~/.docker``, a credential
    helper or ``ORAS_USER`` from the environment; none at all when the site gives none."""

    def __init__(self) -> None:
        oras.auth.base.AuthBackend.__init__(self)
        self._basic_auth: str | None = None

    def get_auth_header(self) -> dict[str, str]:
        return {} if self._basic_auth is None else {"Authorization": f"Basic {self._basic_auth}"}

    def load_configs(self, container: Any, configs: Any = None) -> None:
        return None


class _SiteToken(oras.auth.token.TokenAuth):  # type: ignore[misc]
    """Bearer tokens (a registry with ``auth: token``, Harbor, a cloud registry), fetched
    from the registry's token service with the site's credential only (never
    ``~/.docker``). oras keeps one token for every scope and asks again only on a 403;
    distribution answers 401 to a token of another scope (a pull token for a push), so
    every challenge gets a fresh token for what it asks."""

    def __init__(self) -> None:
        oras.auth.base.AuthBackend.__init__(self)
        self.token: str | None = None
        self._basic_auth: str | None = None

    def load_configs(self, container: Any, configs: Any = None) -> None:
        return None

    def authenticate_request(
        self, original: requests.Response, headers: dict[str, str], refresh: bool = False
    ) -> tuple[dict[str, str], bool]:
        result: tuple[dict[str, str], bool] = super().authenticate_request(
            original, headers, refresh=True
        )
        # No token (no or a wrong credential): ask again without one, so that the answer
        # is the registry's 401, not oras's "cannot respond".
        return result[0], True


class _Registry(oras.provider.Registry):  # type: ignore[misc]
    # One attempt per request (oras retries for about two minutes).
    do_request = oras.provider.Registry.do_request.__wrapped__


@dataclass(frozen=True)
class ArtifactRegistry:
    """The registry at ``url`` (http:// or https://), holding images in ``repository``."""

    url: str
    repository: str
    credential: tuple[str, str] | None = None
    timeout: float = 60.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
            raise ArtifactError(f"the artifact registry {self.url!r} is not http(s)://HOST[:PORT]")

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    @functools.cached_property
    def _bearer(self) -> bool:
        """Whether the registry asks for bearer tokens (its answer to ``GET /v2/``), else
        basic auth or none."""
        try:
            response = requests.get(f"{self.url}/v2/", timeout=self.timeout)
        except requests.RequestException as err:
            raise ArtifactError(
                f"cannot reach the artifact registry {self.url}: {err}",
                hint="check that the registry runs and this host reaches it",
            ) from None
        return response.headers.get("Www-Authenticate", "").lower().startswith("bearer")

    def _client(self) -> oras.provider.Registry:
        secure = urlsplit(self.url).scheme == "https"
        registry = _Registry(hostname=self.host, insecure=not secure, auth_backend="basic")
        registry.session.mount("http://", _Timeout(self.timeout))
        registry.session.mount("https://", _Timeout(self.timeout))
        auth = _SiteToken() if self._bearer else _SiteCredential()
        auth.session, auth.prefix, auth._tls_verify = registry.session, registry.prefix, True
        if self.credential is not None:
            auth.set_basic_auth(*self.credential)
            if not self._bearer:
                # Sent with every request, not after a 401 (oras waits for one: twice the
                # trips).
                registry.session.auth = self.credential
        registry.auth = auth
        return registry

    def _container(self, image_id: str) -> oras.container.Container:
        return oras.container.Container(f"{self.host}/{self.repository}:{check_image_id(image_id)}")

    @contextlib.contextmanager
    def _talking(self, what: str) -> Iterator[None]:
        """Turn what oras and requests raise into an :class:`ArtifactError`."""
        try:
            yield
        except (requests.RequestException, ValueError, OSError) as err:
            if isinstance(err, ShifterError):
                raise
            raise ArtifactError(
                f"cannot {what} at the artifact registry {self.url}: {err}",
                hint="check that the registry runs and accepts the site's credential",
            ) from None

    @staticmethod
    def _check(response: requests.Response, what: str) -> requests.Response:
        if response.status_code in (401, 403):
            raise ArtifactError(
                f"the artifact registry refused to {what} (HTTP {response.status_code})",
                hint="check the credential in artifacts.node_credentials / push_credentials",
            )
        if response.status_code >= 300:
            raise ArtifactError(f"cannot {what}: HTTP {response.status_code} {response.reason}")
        return response

    # -- the gateway's side ---------------------------------------------------------------

    def publish(self, metadata: ImageMetadata, squashfs: Path) -> str:
        """Push ``squashfs`` and its record as the artifact of ``metadata.id``; returns the
        manifest's digest. A blob the registry has already is not sent again (a changed
        ACL re-pushes only the record)."""
        if not metadata.sha256:
            raise ArtifactError(f"image {metadata.id} has no sha256 in its record")
        registry = self._client()
        container = self._container(metadata.id)
        record = metadata.to_json().encode()
        with tempfile.NamedTemporaryFile(prefix=".shifter-artifact-", suffix=".json") as cfg:
            cfg.write(record)
            cfg.flush()
            config = oras.oci.ManifestConfig(cfg.name, CONFIG_MEDIA_TYPE)[0]
            layer = {
                "mediaType": SQUASHFS_MEDIA_TYPE,
                "digest": f"sha256:{metadata.sha256}",
                "size": metadata.size or squashfs.stat().st_size,
                "annotations": {"org.opencontainers.image.title": f"{metadata.id}.squashfs"},
            }
            manifest = {
                "schemaVersion": 2,
                "mediaType": MANIFEST_MEDIA_TYPE,
                "config": config,
                "layers": [layer],
                "annotations": {"org.opencontainers.image.ref.name": metadata.source},
            }
            with self._talking(f"publish image {metadata.id[:12]}"):
                what = f"upload the squashfs of image {metadata.id[:12]}"
                self._check(registry.upload_blob(str(squashfs), container, layer), what)
                what = f"upload the record of image {metadata.id[:12]}"
                self._check(registry.upload_blob(cfg.name, container, config), what)
                response = self._check(
                    registry.upload_manifest(manifest, container),
                    f"publish the manifest of image {metadata.id[:12]}",
                )
        digest = response.headers.get("Docker-Content-Digest", "")
        log.info("published image %s as an artifact to %s (%s)", metadata.id, self.url, digest)
        return digest

    def withdraw(self, image_id: str) -> bool:
        """Delete the artifact of ``image_id`` (its manifest); whether there was one."""
        registry = self._client()
        container = self._container(image_id)
        with self._talking(f"withdraw image {image_id[:12]}"):
            head = registry.do_request(
                f"{registry.prefix}://{container.manifest_url()}", "HEAD",
                headers={"Accept": MANIFEST_MEDIA_TYPE},
            )  # fmt: skip
            if head.status_code == 404:
                return False
            self._check(head, f"find the artifact of image {image_id[:12]}")
            digest = head.headers.get("Docker-Content-Digest", "")
            response = registry.do_request(
                f"{registry.prefix}://{container.manifest_url(digest)}", "DELETE"
            )
            self._check(response, f"delete the artifact of image {image_id[:12]}")
        log.info("withdrew image %s from the artifact registry %s", image_id, self.url)
        return True

    # -- the nodes' side ------------------------------------------------------------------

    def metadata(self, image_id: str) -> ImageMetadata | None:
        """The record of ``image_id`` as published (None: no such artifact), checked: the
        manifest is a Shifter image, the record has the digest the manifest names, names
        ``image_id`` and the squashfs the manifest carries."""
        registry = self._client()
        container = self._container(image_id)
        with self._talking(f"look up image {image_id[:12]}"):
            response = _again_on_5xx(lambda: registry.do_request(
                f"{registry.prefix}://{container.manifest_url()}", "GET",
                headers={"Accept": MANIFEST_MEDIA_TYPE},
            ))  # fmt: skip
            if response.status_code == 404:
                return None
            self._check(response, f"look up image {image_id[:12]}")
            manifest = self._manifest(response.content[: MAX_MANIFEST + 1], image_id)
            config, layer = manifest["config"], manifest["layers"][0]
            if config["size"] > MAX_METADATA_TEXT:
                raise self._damaged(image_id, "its record is too large")
            blob = self._check(
                _again_on_5xx(lambda: registry.get_blob(container, config["digest"])),
                "read a record",
            )
        text = blob.content
        if len(text) != config["size"] or _sha256(text) != config["digest"]:
            raise self._damaged(image_id, "its record does not match its digest")
        try:
            meta = ImageMetadata.from_json(text)
        except ImageContentError as err:
            raise self._damaged(image_id, str(err)) from None
        if meta.id != image_id or f"sha256:{meta.sha256}" != layer["digest"]:
            raise self._damaged(image_id, "its record names another image or squashfs")
        return meta

    def squashfs(self, meta: ImageMetadata) -> ArtifactBlob:
        """The squashfs of ``meta``, for :meth:`NodeCache.stage <shifter_core.image.nodecache
        .NodeCache.stage>`, which verifies its sha256 as it copies."""
        return ArtifactBlob(self, meta)

    @contextlib.contextmanager
    def open_squashfs(self, meta: ImageMetadata) -> Iterator[IO[bytes]]:
        """A stream of the squashfs of ``meta`` (the caller verifies its sha256 as it
        reads: see :class:`~shifter_core.image.nodecache.NodeCache`)."""
        registry = self._client()
        container = self._container(meta.id)
        with self._talking(f"read the squashfs of image {meta.id[:12]}"):
            response = _again_on_5xx(
                lambda: registry.get_blob(container, f"sha256:{meta.sha256}", stream=True)
            )
            self._check(response, f"read the squashfs of image {meta.id[:12]}")
        try:
            response.raw.decode_content = True
            with self._talking(f"read the squashfs of image {meta.id[:12]}"):
                yield cast(IO[bytes], response.raw)
        finally:
            response.close()

    def _manifest(self, content: bytes, image_id: str) -> dict[str, Any]:
        try:
            manifest = json.loads(content)
            config, layers = manifest["config"], manifest["layers"]
            ok = (
                len(content) <= MAX_MANIFEST
                and manifest.get("schemaVersion") == 2
                and config["mediaType"] == CONFIG_MEDIA_TYPE
                and len(layers) == 1
                and layers[0]["mediaType"] == SQUASHFS_MEDIA_TYPE
                and all(
                    isinstance(d.get("digest"), str) and d["digest"].startswith("sha256:")
                    and type(d.get("size")) is int and d["size"] >= 0
                    for d in (config, layers[0])
                )
            )  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise self._damaged(image_id, "its manifest is not a Shifter image artifact")
        return cast(dict[str, Any], manifest)

    def _damaged(self, image_id: str, why: str) -> ArtifactError:
        return ArtifactError(
            f"the artifact of image {image_id[:12]} at {self.url} is damaged: {why}",
            hint="ask an administrator to publish it again (shifteradm publish)",
        )


@dataclass(frozen=True)
class ArtifactBlob:
    """An image's squashfs in the artifact registry (a :class:`~.nodecache.Blob`)."""

    registry: ArtifactRegistry
    meta: ImageMetadata

    @property
    def size(self) -> int:
        return self.meta.size

    @property
    def public(self) -> bool:
        return not self.meta.private

    def __str__(self) -> str:
        return f"{self.registry.url}/{self.registry.repository}:{self.meta.id[:12]}"

    def open(self) -> contextlib.AbstractContextManager[IO[bytes]]:
        return self.registry.open_squashfs(self.meta)


def _again_on_5xx(request: Callable[[], requests.Response]) -> requests.Response:
    """``request()``, made again after each of :data:`RETRY_PAUSES` while it answers 5xx."""
    response = request()
    for pause in RETRY_PAUSES:
        if response.status_code < 500:
            break
        log.info("the artifact registry answered %d; asking again", response.status_code)
        response.close()
        time.sleep(pause)
        response = request()
    return response


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"
