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
- Auth: anonymous, Basic, and Bearer tokens obtained by following the ``WWW-Authenticate``
  challenge (realm, service, scope) like Docker clients do, with credentials sent to the token
  service as Basic auth. Tokens are cached per scope (``repository:NAME:pull``) and refreshed
  when they expire or when a 401 comes back. A wrong password fails at once.
  Credentials are never sent over plain http unless the registry is listed as insecure.
- Blobs: streamed to a file and verified (sha256) while streaming; a corrupt blob raises
  :class:`DigestMismatch` and leaves nothing behind. Redirects to another host (blob storage)
  are followed without the ``Authorization`` header, only to http(s), never from https to
  http unless the registry is insecure, never to a loopback or link-local address unless the
  registry is on one (:func:`~shifter_core.image.limits.check_redirect`; token realms likewise).
  Registry error texts are cut and escaped before they reach messages and logs.
  Connection errors and 5xx are retried with exponential backoff (an interrupted download
  resumes with a ``Range`` request); 4xx are not. HTTP 429 honours ``Retry-After`` a few
  times, then fails with "rate limited by R".
- Privacy: a cached layer that a pull with credentials fetched is reused for another pull only
  after that pull's own request proves access (:meth:`RegistryClient.prove_access`).
- Mirrors: a registry name (``docker.io``) can map to mirror base URLs tried before it.

Docker Hub's API host is ``registry-1.docker.io``; ``docker.io`` is the registry's name.
"""

from __future__ import annotations

import base64
import difflib
import email.utils
import hashlib
import io
import json
import logging
import math
import platform as _platform
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import httpx

from ...errors import OptionError, ShifterError
from ...reference import DOCKER_HUB, DOCKER_HUB_ALIASES, DockerReference
from ..content import ImageContentError
from ..limits import Deadline, PullLimits, RedirectRefused, check_redirect, clean_text

if TYPE_CHECKING:
    from ..layercache import LayerCache
    from .credentials import CredentialSource

log = logging.getLogger(__name__)

# -- media types ------------------------------------------------------------------------------

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})
IMAGE_MANIFEST_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
MANIFEST_ACCEPT = ", ".join((DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX))

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
CONFIG_TYPES = frozenset({DOCKER_CONFIG, OCI_CONFIG})

GZIP = "gzip"
ZSTD = "zstd"
UNCOMPRESSED = "none"
LAYER_COMPRESSION: dict[str, str] = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": GZIP,
    "application/vnd.docker.image.rootfs.diff.tar": UNCOMPRESSED,
    "application/vnd.oci.image.layer.v1.tar": UNCOMPRESSED,
    "application/vnd.oci.image.layer.v1.tar+gzip": GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": UNCOMPRESSED,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": ZSTD,
}

DOCKER_HUB_API_HOST = "registry-1.docker.io"
DEFAULT_TOKEN_LIFETIME = 60.0
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 16 << 20
MAX_REDIRECTS = 10
MAX_BACKOFF = 30.0
_CHUNK = 1 << 16
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DIGEST_RE = re.compile(r"^(?P<algo>sha256|sha512):(?P<hex>[0-9a-f]+)$")
_HEX_LENGTH = {"sha256": 64, "sha512": 128}

ProgressCallback = Callable[[str, int, int], None]

# -- errors -----------------------------------------------------------------------------------


class RegistryError(ShifterError):
    """Anything that went wrong talking to a registry."""


class ImageNotFound(RegistryError):
    """The registry has no such repository or tag (404, MANIFEST_UNKNOWN, NAME_UNKNOWN)."""


class AuthenticationError(RegistryError):
    """Credentials are missing or wrong, or they do not grant pull access."""


class RateLimited(RegistryError):
    """HTTP 429 persisted; ``retry_after`` is the registry's last advice in seconds."""

    def __init__(self, message: str, hint: str | None = None, *, retry_after: float = 0) -> None:
        super().__init__(message, hint)
        self.retry_after = retry_after


class RegistryUnavailable(RegistryError):
    """Connection errors or 5xx answers persisted through every retry."""


class UnsupportedManifest(RegistryError):
    """A manifest or layer Shifter cannot use (schema 1, an artifact, an unknown type)."""


class PlatformNotFound(RegistryError):
    """A list or index has no entry for the wanted platform."""

    def __init__(
        self, message: str, hint: str | None = None, *, available: Sequence[str] = ()
    ) -> None:
        super().__init__(message, hint)
        self.available = list(available)


class BlobNotFound(RegistryError):
    """The registry does not have a blob that the manifest names."""


class DigestMismatch(RegistryError):
    """Downloaded bytes do not match their digest (or size): nothing was kept."""

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        blob: str,
        expected: str,
        actual: str | None,
    ) -> None:
        super().__init__(message, hint)
        self.blob = blob
        self.expected = expected
        self.actual = actual


class _Cancelled(Exception):
    """Another layer of the same pull failed; stop this download."""


def split_digest(digest: str) -> tuple[str, str]:
    """``(algorithm, hex)`` of a well-formed sha256/sha512 digest, else :class:`RegistryError`.

    Digests name files in caches: validating them keeps a hostile one from naming a path.
    """
    match = _DIGEST_RE.match(digest) if isinstance(digest, str) else None
    if match is None or len(match.group("hex")) != _HEX_LENGTH[match.group("algo")]:
        raise RegistryError(f"invalid digest {digest!r}", hint="expected sha256:<64 hex digits>")
    return match.group("algo"), match.group("hex")


def compute_digest(data: bytes, algo: str = "sha256") -> str:
    """``algo:hex`` of *data*."""
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


# -- platforms --------------------------------------------------------------------------------

_ARCH_ALIASES: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "x86-64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "i386": ("386", None),
    "i486": ("386", None),
    "i586": ("386", None),
    "i686": ("386", None),
}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7", "amd64": "v1"}
_PLATFORM_PART = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class Platform:
    """An OCI platform: ``os``, ``architecture`` and optional ``variant`` (Go's names)."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch[/variant]`` (``linux/arm64/v8``) or a bare ``arch`` (linux assumed).

        Common aliases are normalised: ``x86_64`` is ``amd64``, ``aarch64`` is ``arm64``,
        ``armhf`` is ``arm/v7``.
        """
        parts = text.strip().lower().split("/")
        if len(parts) == 1:
            parts = ["linux", *parts]
        if len(parts) not in (2, 3) or not all(_PLATFORM_PART.match(p) for p in parts):
            raise OptionError(
                f"invalid platform {text!r}",
                hint="expected OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm64/v8",
            )
        os_name, arch = parts[0], parts[1]
        variant = parts[2] if len(parts) == 3 else None
        arch, alias_variant = _ARCH_ALIASES.get(arch, (arch, None))
        return cls(os_name, arch, variant or alias_variant)

    @classmethod
    def host(cls) -> Platform:
        """The platform of this machine: amd64 for x86_64, arm64/v8 for aarch64, ..."""
        machine = _platform.machine().lower()
        arch, variant = _ARCH_ALIASES.get(machine, (machine, None))
        if arch == "arm64":
            variant = "v8"
        return cls("linux", arch, variant)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Platform:
        """From an OCI/Docker ``platform`` object (or an image config)."""
        arch = str(data.get("architecture") or "")
        arch, alias_variant = _ARCH_ALIASES.get(arch, (arch, None))
        variant = data.get("variant") or alias_variant
        return cls(str(data.get("os") or ""), arch, str(variant) if variant else None)

    def _key(self) -> tuple[str, str, str | None]:
        return self.os, self.architecture, self.variant or _DEFAULT_VARIANT.get(self.architecture)

    def matches(self, other: Platform) -> bool:
        """True when *other* satisfies this (wanted) platform.

        A wanted variant must match (``arm64`` without a variant counts as ``v8``, ``arm`` as
        ``v7``, ``amd64`` as ``v1``); without a wanted variant any variant of the architecture
        matches.
        """
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return self.variant is None or self._key() == other._key()

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


def select_platform(
    entries: Sequence[Mapping[str, Any]], want: Platform
) -> Mapping[str, Any] | None:
    """The entry of a list/index ``manifests`` array that best matches *want*, or None.

    Exact matches (including the default variant) are preferred to other variants of the
    same architecture; entries without a platform are ignored.
    """
    matching = [
        e
        for e in entries
        if isinstance(e.get("platform"), Mapping)
        and want.matches(Platform.from_json(e["platform"]))
    ]
    if not matching:
        return None
    for entry in matching:
        if Platform.from_json(entry["platform"])._key() == want._key():
            return entry
    return matching[0]


def available_platforms(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """``os/arch[/variant]`` of each runnable entry (attestations, ``unknown/unknown``, skipped)."""
    seen: list[str] = []
    for entry in entries:
        plat = entry.get("platform")
        if not isinstance(plat, Mapping):
            continue
        p = Platform.from_json(plat)
        if not p.os or p.os == "unknown" or p.architecture == "unknown":
            continue
        if str(p) not in seen:
            seen.append(str(p))
    return seen


# -- manifests and images ---------------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says about a blob."""

    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, data: Any, what: str) -> Descriptor:
        """Parse and validate a descriptor object; *what* names it in errors."""
        if not isinstance(data, Mapping):
            raise UnsupportedManifest(f"{what} is not a descriptor object")
        digest = data.get("digest")
        size = data.get("size")
        try:
            split_digest(str(digest))
        except RegistryError as exc:
            raise UnsupportedManifest(f"{what} has an invalid digest {digest!r}") from exc
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise UnsupportedManifest(f"{what} has an invalid size {size!r}")
        return cls(
            media_type=str(data.get("mediaType") or ""),
            digest=str(digest),
            size=size,
            urls=tuple(str(u) for u in data.get("urls") or ()),
            annotations=dict(data.get("annotations") or {}),
        )

    @property
    def compression(self) -> str:
        """``gzip``, ``zstd`` or ``none`` (uncompressed tar), from the layer media type."""
        try:
            return LAYER_COMPRESSION[self.media_type]
        except KeyError:
            raise UnsupportedManifest(
                f"layer {self.digest} has unsupported media type {self.media_type!r}"
            ) from None


def _str_tuple(value: Any, what: str = "list") -> tuple[str, ...] | None:
    """A JSON string or list of strings as a tuple (None for null); else the image's error."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageContentError(f"the image config's {what} is not a list of strings")
    return tuple(value)


def _json_object(value: object, what: str) -> Mapping[str, Any]:
    """``value`` if it is a JSON object ({} for null or missing)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ImageContentError(f"the image's {what} is not a JSON object")
    return value


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config JSON that running the image needs."""

    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    workdir: str = ""
    user: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    os: str = ""
    architecture: str = ""
    variant: str | None = None
    diff_ids: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImageConfig:
        """Parse an OCI/Docker image config (``config`` may be missing or null); a config
        whose parts have the wrong JSON types is an :class:`ImageContentError`."""
        data = _json_object(data, "config JSON")
        cfg = _json_object(data.get("config"), "'config'")
        rootfs = _json_object(data.get("rootfs"), "'rootfs'")
        if not isinstance(cfg.get("Labels") or {}, Mapping):
            raise ImageContentError("the image config's 'Labels' is not a JSON object")
        return cls(
            env=_str_tuple(cfg.get("Env") or [], "'Env'") or (),
            entrypoint=_str_tuple(cfg.get("Entrypoint"), "'Entrypoint'"),
            cmd=_str_tuple(cfg.get("Cmd"), "'Cmd'"),
            workdir=str(cfg.get("WorkingDir") or ""),
            user=str(cfg.get("User") or ""),
            labels={str(k): str(v) for k, v in (cfg.get("Labels") or {}).items()},
            os=str(data.get("os") or ""),
            architecture=str(data.get("architecture") or ""),
            variant=data.get("variant") or None,
            diff_ids=_str_tuple(rootfs.get("diff_ids") or [], "'rootfs.diff_ids'") or (),
            raw=dict(data),
        )

    @property
    def platform(self) -> Platform:
        """The platform the config declares."""
        return Platform.from_json(
            {"os": self.os, "architecture": self.architecture, "variant": self.variant}
        )


@dataclass(frozen=True)
class Endpoint:
    """One place to ask for a registry's content: the registry itself or one of its mirrors."""

    registry: str
    url: str
    mirror: bool = False

    @property
    def host(self) -> str:
        """``host[:port]`` of the endpoint."""
        return urlsplit(self.url).netloc


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


def detect_manifest_type(doc: Mapping[str, Any], content_type: str | None) -> str:
    """The media type of a parsed manifest: its ``mediaType``, else ``Content-Type``, else shape.

    Shape: ``schemaVersion: 1`` or ``fsLayers`` is schema 1, ``manifests`` an OCI index,
    ``layers``/``config`` an OCI manifest.
    """
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if doc.get("schemaVersion") == 1 or "fsLayers" in doc:
        return DOCKER_SCHEMA1
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    if ctype in IMAGE_MANIFEST_TYPES or ctype in INDEX_TYPES or ctype in SCHEMA1_TYPES:
        return ctype
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc or "config" in doc:
        return OCI_MANIFEST
    raise UnsupportedManifest(
        f"cannot tell what kind of manifest this is (Content-Type {content_type!r}, "
        f"keys {sorted(doc)})"
    )


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


# -- auth -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: scheme (lower case) and its parameters."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM_RE = re.compile(rf'\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*')
_SCHEME_RE = re.compile(rf"\s*({_TOKEN})(?=\s|,|$)\s*")


def parse_challenges(headers: Iterable[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` values (RFC 7235): several challenges, quoted parameters.

    ``Bearer realm="https://auth.docker.io/token",service="registry.docker.io"`` gives
    ``Challenge("bearer", {"realm": ..., "service": ...})``.
    """
    found: list[Challenge] = []
    for header in headers:
        pos = 0
        scheme: str | None = None
        params: dict[str, str] = {}
        while pos < len(header):
            if header[pos] in ", \t":
                pos += 1
                continue
            param = _PARAM_RE.match(header, pos)
            if param and scheme is not None:
                value = param.group(2)
                if value.startswith('"'):
                    value = re.sub(r"\\(.)", r"\1", value[1:-1])
                params[param.group(1).lower()] = value
                pos = param.end()
                continue
            token = _SCHEME_RE.match(header, pos)
            if token is None:  # token68 or garbage: skip to the next comma
                nxt = header.find(",", pos)
                pos = len(header) if nxt < 0 else nxt + 1
                continue
            if scheme is not None:
                found.append(Challenge(scheme, params))
            scheme, params = token.group(1).lower(), {}
            pos = token.end()
        if scheme is not None:
            found.append(Challenge(scheme, params))
    return found


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass
class _Token:
    value: str
    expires_at: float


# -- settings ---------------------------------------------------------------------------------


def _normalize_host(name: str) -> str:
    text = name.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.split("/", 1)[0].lower()
    return DOCKER_HUB if text in DOCKER_HUB_ALIASES else text


@dataclass(frozen=True)
class RegistrySettings:
    """How to reach registries (the ``registries:`` part of the site config).

    - ``mirrors``: registry name -> mirror base URLs tried first, in order
      (``{"docker.io": ["http://127.0.0.1:5000"]}``); a mirror URL without a scheme follows
      the ``insecure`` rule.
    - ``insecure``: registries (``host[:port]``) contacted over plain http; every other one is
      contacted over https. Credentials go over http only to these.
    - ``timeout`` (seconds, per network operation), ``retries`` (extra attempts after
      connection errors and 5xx), ``backoff`` (first retry delay, doubled each time),
      ``max_parallel`` (concurrent layer downloads), ``rate_limit_retries`` and
      ``max_retry_after`` (how often and how long a 429's ``Retry-After`` is honoured),
      ``ca_bundle`` (CA file for https; default: the system's), ``trust_env`` (use proxy
      variables from the environment), ``limits`` (manifest size, layer count and sizes:
      :class:`~shifter_core.image.limits.PullLimits`).
    """

    mirrors: Mapping[str, Sequence[str]] = field(default_factory=dict)
    insecure: frozenset[str] = frozenset()
    timeout: float = 30.0
    retries: int = 3
    max_parallel: int = 4
    backoff: float = 1.0
    rate_limit_retries: int = 3
    max_retry_after: float = 60.0
    ca_bundle: str | None = None
    trust_env: bool = True
    user_agent: str = "shifter/0.1 (+https://github.com/NERSC/shifter)"
    limits: PullLimits = field(default_factory=PullLimits)

    def __post_init__(self) -> None:
        mirrors = {
            _normalize_host(name): tuple(u.rstrip("/") for u in urls)
            for name, urls in dict(self.mirrors).items()
        }
        object.__setattr__(self, "mirrors", mirrors)
        object.__setattr__(self, "insecure", frozenset(_normalize_host(h) for h in self.insecure))
        if self.retries < 0 or self.max_parallel < 1 or self.timeout <= 0:
            raise ValueError("retries must be >= 0, max_parallel >= 1 and timeout > 0")

    def endpoints(self, registry: str) -> list[Endpoint]:
        """Mirrors of *registry* (in order), then the registry itself."""
        registry = _normalize_host(registry)
        found = []
        for url in self.mirrors.get(registry, ()):
            if "://" not in url:
                url = f"{'http' if _normalize_host(url) in self.insecure else 'https'}://{url}"
            found.append(Endpoint(registry, url, mirror=True))
        host = DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry
        scheme = "http" if registry in self.insecure else "https"
        found.append(Endpoint(registry, f"{scheme}://{host}"))
        return found


# -- the client -------------------------------------------------------------------------------


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def _error_codes(body: bytes) -> list[tuple[str, str]]:
    """``(code, message)`` pairs of a registry error body (``{"errors": [...]}``)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list):
        return []
    return [
        (str(e.get("code", "")), str(e.get("message", ""))) for e in errors if isinstance(e, dict)
    ]


def _describe(status: int, body: bytes) -> str:
    """``HTTP 400 CODE: message`` from an error answer, cut and escaped (registry text is
    hostile: it reaches users and logs)."""
    codes = _error_codes(body)
    if codes:
        text = "; ".join(f"{c}: {m}" if m else c for c, m in codes[:5])
        return f"HTTP {status} " + clean_text(text)
    text = body[:1000].decode("utf-8", "replace").strip()
    return f"HTTP {status}" + (f" ({clean_text(text)})" if text else "")


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
        self.credentials = credentials
        self._sleep = sleep
        self._clock = clock
        self._http = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(self.settings.timeout),
            verify=self.settings.ca_bundle or True,
            follow_redirects=False,
            trust_env=self.settings.trust_env,
            headers={"User-Agent": self.settings.user_agent},
            limits=httpx.Limits(max_connections=max(10, 2 * self.settings.max_parallel)),
        )
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str], _Token] = {}
        self.token_requests = 0

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport: redirects, retries, rate limits -------------------------------------------

    def _follow(
        self, method: str, url: str, headers: dict[str, str], registry: str
    ) -> httpx.Response:
        """Send, following redirects; drop ``Authorization`` once the origin changes.

        Redirects go only where :func:`~shifter_core.image.limits.check_redirect` allows: http(s),
        https unless the registry is insecure, no loopback or link-local address unless the
        registry is on one.
        """
        origin = _origin(url)
        home = url
        insecure = _normalize_host(registry) in self.settings.insecure or origin[1] in (
            self.settings.insecure
        )
        for _ in range(MAX_REDIRECTS + 1):
            request = self._http.build_request(method, url, headers=headers)
            response = self._http.send(request, stream=True)
            location = response.headers.get("location")
            if response.status_code not in _REDIRECTS or not location:
                return response
            response.close()
            try:
                url = urljoin(url, location)
                check_redirect(url, home, registry, insecure)
            except (ValueError, RedirectRefused) as err:
                raise RegistryError(
                    str(err)
                    if isinstance(err, RedirectRefused)
                    else f"registry {registry} redirected to an invalid URL "
                    f"{clean_text(location, 200)}",
                    hint="the registry (or something in between) is misconfigured or hostile",
                ) from None
            if _origin(url) != origin and any(k.lower() == "authorization" for k in headers):
                log.debug("redirect to %s: not forwarding the Authorization header", _origin(url))
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            if response.status_code == 303:
                method = "GET"
        raise RegistryError(f"too many redirects fetching {url}")

    def _backoff(self, attempt: int) -> float:
        return min(MAX_BACKOFF, self.settings.backoff * (2**attempt))

    def _send(
        self, method: str, url: str, headers: dict[str, str], *, registry: str
    ) -> httpx.Response:
        """One logical request (streamed response): retries connection errors and 5xx with
        exponential backoff, honours 429 ``Retry-After`` a few times; 4xx are returned."""
        attempt = 0
        limited = 0
        deadline = getattr(_LOCAL, "deadline", None)
        while True:
            if deadline is not None:
                deadline.check()
            try:
                response = self._follow(method, url, headers, registry)
            except httpx.TransportError as exc:
                if attempt >= self.settings.retries:
                    raise RegistryUnavailable(
                        f"cannot reach registry {registry} at {_origin(url)[1]}: "
                        f"{exc or type(exc).__name__} (after {attempt + 1} attempts)",
                        hint="check the network, proxy and registry address",
                    ) from exc
                delay = self._backoff(attempt)
                log.warning("%s %s: %s; retrying in %.1f s", method, url, exc, delay)
                self._sleep(delay)
                attempt += 1
                continue
            status = response.status_code
            if status >= 500:
                body = self._read_error(response)
                if attempt >= self.settings.retries:
                    raise RegistryUnavailable(
                        f"registry {registry} failed: {_describe(status, body)} for {url} "
                        f"(after {attempt + 1} attempts)",
                        hint="the registry has a problem; try again later",
                    )
                delay = self._backoff(attempt)
                log.warning("%s %s: HTTP %d; retrying in %.1f s", method, url, status, delay)
                self._sleep(delay)
                attempt += 1
                continue
            if status == 429:
                advised = parse_retry_after(response.headers.get("retry-after"))
                self._read_error(response)
                wait_s = advised if advised is not None else self._backoff(limited)
                if limited >= self.settings.rate_limit_retries or (
                    wait_s > self.settings.max_retry_after
                ):
                    raise RateLimited(
                        f"rate limited by {registry}; retry after {math.ceil(wait_s)} s",
                        hint="the registry limits how many requests or pulls you may make",
                        retry_after=wait_s,
                    )
                log.warning(
                    "rate limited by %s; retrying after %.1f s (%d/%d)",
                    registry,
                    wait_s,
                    limited + 1,
                    self.settings.rate_limit_retries,
                )
                self._sleep(wait_s)
                limited += 1
                continue
            return response

    @staticmethod
    def _read_raw(response: httpx.Response, limit: int, what: str) -> bytes:
        chunks = []
        total = 0
        deadline = getattr(_LOCAL, "deadline", None)
        for chunk in _iter_raw(response):
            if deadline is not None:
                deadline.check()
            total += len(chunk)
            if total > limit:
                raise RegistryError(f"{what} is larger than {limit} bytes; refusing it")
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _read_error(response: httpx.Response) -> bytes:
        try:
            return RegistryClient._read_raw(response, 1 << 16, "error body")
        except (httpx.HTTPError, RegistryError):
            return b""
        finally:
            response.close()

    # -- auth ---------------------------------------------------------------------------------

    def _credentials_for(self, endpoint: Endpoint) -> tuple[str, str] | None:
        if self.credentials is None:
            return None
        key = endpoint.host if endpoint.mirror else endpoint.registry
        return self.credentials.get(key)

    def _may_send_credentials(self, url: str, endpoint: Endpoint) -> bool:
        scheme, host = _origin(url)
        if scheme == "https":
            return True
        insecure = self.settings.insecure
        return (
            host in insecure
            or endpoint.host in insecure
            or (not endpoint.mirror and endpoint.registry in insecure)
        )

    def _refuse_plain_http(self, url: str, endpoint: Endpoint) -> RegistryError:
        host = _origin(url)[1]
        return AuthenticationError(
            f"refusing to send credentials for {endpoint.registry} over plain http to {host}",
            hint=f"use https, or list {host} under registries.insecure in the site config",
        )

    def _authorization(
        self,
        endpoint: Endpoint,
        scope: str,
        *,
        rejected: str | None = None,
        extra_scope: str = "",
    ) -> str | None:
        """The ``Authorization`` value for *scope* at *endpoint*, per its known challenge.

        Bearer tokens come from the per-scope cache while unexpired; *rejected* is a value the
        registry just answered 401 to: it is replaced by a fresh token unless another thread
        already did that.
        """
        challenge = self._challenges.get(endpoint.url)
        if challenge is None:
            return None
        creds = self._credentials_for(endpoint)
        if challenge.scheme == "basic":
            if creds is None:
                return None
            if not self._may_send_credentials(endpoint.url, endpoint):
                raise self._refuse_plain_http(endpoint.url, endpoint)
            raw = f"{creds[0]}:{creds[1]}".encode()
            return "Basic " + base64.b64encode(raw).decode("ascii")
        if challenge.scheme != "bearer":
            raise AuthenticationError(
                f"registry {endpoint.registry} asks for unsupported authentication "
                f"{challenge.scheme!r}"
            )
        key = (endpoint.url, scope)
        with self._lock:
            token = self._tokens.get(key)
            if (
                token is not None
                and self._clock() < token.expires_at
                and f"Bearer {token.value}" != rejected
            ):
                return f"Bearer {token.value}"
            token = self._fetch_token(endpoint, challenge, scope, creds, extra_scope)
            self._tokens[key] = token
            return f"Bearer {token.value}"

    def _fetch_token(
        self,
        endpoint: Endpoint,
        challenge: Challenge,
        scope: str,
        creds: tuple[str, str] | None,
        extra_scope: str,
    ) -> _Token:
        realm = challenge.params.get("realm")
        if not realm or not realm.startswith(("http://", "https://")):
            raise AuthenticationError(
                f"registry {endpoint.registry} sent a Bearer challenge without a usable realm "
                f"({realm!r})"
            )
        params: list[tuple[str, str]] = []
        if challenge.params.get("service"):
            params.append(("service", challenge.params["service"]))
        params.append(("scope", scope))
        for other in extra_scope.split():
            if other != scope:
                params.append(("scope", other))
        try:  # the realm is the registry's to choose, within the rules for redirects
            check_redirect(
                realm,
                endpoint.url,
                endpoint.registry,
                endpoint.registry in (self.settings.insecure),
            )
        except RedirectRefused as err:
            raise AuthenticationError(
                str(err).replace("redirected to", "sent a token realm"), hint=err.hint
            ) from None
        headers: dict[str, str] = {"Accept-Encoding": "identity"}
        if creds is not None:
            if not self._may_send_credentials(realm, endpoint):
                raise self._refuse_plain_http(realm, endpoint)
            params.append(("account", creds[0]))
            raw = f"{creds[0]}:{creds[1]}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode("ascii")
        url = str(httpx.URL(realm).copy_merge_params(params))
        log.debug("requesting a token for %s from %s", scope, realm)
        self.token_requests += 1
        response = self._send("GET", url, headers, registry=endpoint.registry)
        body = self._read_error(response)  # reads (small) body and closes
        if response.status_code in (401, 403):
            if creds is not None:
                raise AuthenticationError(
                    f"registry {endpoint.registry} rejected the username or password of user "
                    f"{creds[0]!r} ({_describe(response.status_code, body)})",
                    hint=f"run: shifterimg login {endpoint.registry}",
                )
            raise AuthenticationError(
                f"registry {endpoint.registry} refused an anonymous token for {scope}",
                hint=f"it needs credentials; run: shifterimg login {endpoint.registry}",
            )
        if response.status_code != 200:
            raise AuthenticationError(
                f"token service {realm} of registry {endpoint.registry} failed: "
                f"{_describe(response.status_code, body)}"
            )
        try:
            doc = json.loads(body)
            value = doc.get("token") or doc.get("access_token")
            lifetime = float(doc.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            value, lifetime = None, 0.0
        if not isinstance(value, str) or not value:
            raise AuthenticationError(
                f"token service {realm} of registry {endpoint.registry} sent no token"
            )
        margin = min(5.0, lifetime / 10)
        return _Token(value, self._clock() + lifetime - margin)

    def _denied(
        self, endpoint: Endpoint, name: str, challenge: Challenge | None
    ) -> AuthenticationError:
        creds = self._credentials_for(endpoint)
        registry = endpoint.registry
        if creds is None:
            return AuthenticationError(
                f"access to '{name}' denied by registry {registry}: it needs credentials, "
                "or the repository does not exist",
                hint=f"check the name; if the image is private, run: shifterimg login {registry}",
            )
        if challenge is not None and challenge.scheme == "basic":
            return AuthenticationError(
                f"registry {registry} rejected the username or password of user {creds[0]!r}",
                hint=f"run: shifterimg login {registry}",
            )
        return AuthenticationError(
            f"registry {registry} denied user {creds[0]!r} access to '{name}'",
            hint=f"check the name and that this account may pull it "
            f"(shifterimg login {registry} to use another account)",
        )

    def _get(
        self,
        endpoint: Endpoint,
        path: str,
        *,
        scope: str,
        name: str,
        headers: Mapping[str, str] | None = None,
        method: str = "GET",
    ) -> httpx.Response:
        """GET (or HEAD) ``endpoint.url + path`` with auth; returns a streamed response (not
        401/403)."""
        url = endpoint.url + path
        base = {"Accept-Encoding": "identity", **(headers or {})}
        auth = self._authorization(endpoint, scope)
        response = self._send(method, url, _with_auth(base, auth), registry=endpoint.registry)
        if response.status_code == 401:
            challenges = parse_challenges(response.headers.get_list("www-authenticate"))
            self._read_error(response)
            by_scheme = {c.scheme: c for c in challenges}
            challenge = by_scheme.get("bearer") or by_scheme.get("basic")
            if challenge is None:
                raise AuthenticationError(
                    f"registry {endpoint.registry} requires authentication but offers no "
                    f"supported scheme ({', '.join(by_scheme) or 'no WWW-Authenticate'})"
                )
            sent_before = auth is not None
            self._challenges[endpoint.url] = challenge
            auth = self._authorization(
                endpoint,
                scope,
                rejected=auth or "",
                extra_scope=challenge.params.get("scope", ""),
            )
            if auth is None or (challenge.scheme == "basic" and sent_before):
                raise self._denied(endpoint, name, challenge)
            response = self._send(method, url, _with_auth(base, auth), registry=endpoint.registry)
            if response.status_code == 401:
                self._read_error(response)
                raise self._denied(endpoint, name, challenge)
        if response.status_code == 403:
            self._read_error(response)
            raise self._denied(endpoint, name, self._challenges.get(endpoint.url))
        return response

    # -- manifests ----------------------------------------------------------------------------

    def _fetch_manifest(
        self, endpoint: Endpoint, ref: DockerReference, reference: str, name: str
    ) -> tuple[bytes, dict[str, Any], str, str]:
        """(bytes, parsed, media type, digest) of a manifest, verified when *reference* is a
        digest."""
        scope = f"repository:{ref.repository}:pull"
        response = self._get(
            endpoint,
            f"/v2/{ref.repository}/manifests/{reference}",
            scope=scope,
            name=name,
            headers={"Accept": MANIFEST_ACCEPT},
        )
        try:
            if response.status_code != 200:
                body = self._read_error(response)
                codes = {c for c, _ in _error_codes(body)}
                if response.status_code == 404 or codes & {"MANIFEST_UNKNOWN", "NAME_UNKNOWN"}:
                    raise self._not_found(endpoint, ref, name, codes)
                raise RegistryError(
                    f"registry {endpoint.registry} refused the manifest of '{name}': "
                    f"{_describe(response.status_code, body)}"
                )
            content = self._read_raw(
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
            response = self._get(
                endpoint, path, scope=f"repository:{ref.repository}:pull", name=name
            )
            try:
                if response.status_code != 200:
                    body = self._read_error(response)
                    codes = {c for c, _ in _error_codes(body)}
                    if response.status_code == 404 or "NAME_UNKNOWN" in codes:
                        raise ImageNotFound(
                            f"repository '{name}' not found in registry {ref.registry}"
                        )
                    raise RegistryError(
                        f"listing tags of '{name}' failed: {_describe(response.status_code, body)}"
                    )
                doc = json.loads(self._read_raw(response, MAX_MANIFEST_BYTES, "tag list"))
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

    def list_tags(self, reference: str | DockerReference, limit: int = 10000) -> list[str]:
        """The tags of the repository of *reference* (first endpoint that answers)."""
        ref = _as_reference(reference)
        name = familiar_name(ref)
        errors: list[RegistryError] = []
        for endpoint in self.settings.endpoints(ref.registry):
            try:
                return self._list_tags(endpoint, ref, name, limit)
            except RegistryError as exc:
                if not endpoint.mirror:
                    raise
                errors.append(exc)
        raise errors[-1]  # pragma: no cover - the upstream endpoint always comes last

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
        _LOCAL.deadline = deadline
        try:
            return self._resolve(reference, platform)
        finally:
            _LOCAL.deadline = None

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
        sink: IO[bytes],
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
            response = self._get(endpoint, path, scope=scope, name=name, headers=headers)
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
                    body = self._read_error(response)
                    codes = {c for c, _ in _error_codes(body)}
                    if status == 404 or "BLOB_UNKNOWN" in codes:
                        raise BlobNotFound(
                            f"blob {desc.digest} of '{name}' is missing from registry "
                            f"{endpoint.registry} ({endpoint.url})",
                            hint="the image in the registry is incomplete; push it again",
                        )
                    raise RegistryError(
                        f"registry {endpoint.registry} refused blob {desc.digest} of '{name}': "
                        f"{_describe(status, body)}"
                    )
                for chunk in _iter_raw(response):
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
                delay = self._backoff(failures - 1)
                log.warning(
                    "blob %s interrupted at %d bytes (%s); retrying in %.1f s",
                    desc.digest,
                    done,
                    exc,
                    delay,
                )
                self._sleep(delay)
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
        response = self._get(
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

        credentialed = self._credentials_for(resolved.endpoint) is not None
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


_LOCAL = threading.local()  # .deadline: the Deadline of the resolve running in this thread


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


def _iter_raw(response: httpx.Response) -> Iterator[bytes]:
    """The body exactly as sent (no Content-Encoding decoding), in chunks.

    A response whose body was loaded already (``httpx.MockTransport`` builds those) yields it
    in one piece.
    """
    if response.is_stream_consumed and hasattr(response, "_content"):
        yield response.content
        return
    yield from response.iter_raw(_CHUNK)


def _with_auth(headers: Mapping[str, str], auth: str | None) -> dict[str, str]:
    result = dict(headers)
    if auth:
        result["Authorization"] = auth
    return result


def _as_reference(reference: str | DockerReference) -> DockerReference:
    return reference if isinstance(reference, DockerReference) else DockerReference.parse(reference)


__all__ = [
    "CONFIG_TYPES",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "GZIP",
    "MANIFEST_ACCEPT",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "UNCOMPRESSED",
    "ZSTD",
    "AuthenticationError",
    "BlobNotFound",
    "Challenge",
    "Descriptor",
    "DigestMismatch",
    "Endpoint",
    "ImageConfig",
    "ImageNotFound",
    "Platform",
    "PlatformNotFound",
    "RateLimited",
    "RegistryClient",
    "RegistryError",
    "RegistrySettings",
    "RegistryUnavailable",
    "ResolvedImage",
    "UnsupportedManifest",
    "available_platforms",
    "compute_digest",
    "detect_manifest_type",
    "familiar_name",
    "parse_challenges",
    "parse_retry_after",
    "select_platform",
    "split_digest",
]
