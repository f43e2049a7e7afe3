"""The OCI image model: media types, digests, platforms, descriptors and the image config.

Data and parsing only, no I/O: what a manifest, an index and an image config say, read
defensively (registries and image files are hostile). The registry client
(:mod:`.registry.client`), the gateway's importer of image files and the store build on it.
Docker v2 schema 2 and OCI names are both understood; Docker schema 1 is recognised only to be
refused.
"""

from __future__ import annotations

import hashlib
import platform as _platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import OptionError
from .content import ImageContentError
from .errors import RegistryError, UnsupportedManifest

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

_DIGEST_RE = re.compile(r"^(?P<algo>sha256|sha512):(?P<hex>[0-9a-f]+)$")
_HEX_LENGTH = {"sha256": 64, "sha512": 128}


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

    def full_name(self) -> str:
        """``os/arch[/variant]`` with the default variant filled in where it is ever written
        (``linux/arm64/v8``; amd64's ``v1`` is implied, as Docker shows it)."""
        variant = self.variant or _DEFAULT_VARIANT.get(self.architecture)
        if self.architecture == "amd64" and variant == _DEFAULT_VARIANT["amd64"]:
            variant = None
        return str(Platform(self.os, self.architecture, variant))

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


# -- descriptors and image configs-----------------------------------------------------------------


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
