"""Image references: what a user types after ``--image=`` and what it means.

Two layers:

- :class:`ImageRequest` is the user's request: a *type* (``docker`` or ``id``) and a
  *tag*, as Shifter spells them (``docker:ubuntu:22.04``, ``ubuntu:22.04``, ``id:3f2a…``).
- :class:`DockerReference` is a parsed Docker/OCI reference with Docker Hub's naming
  rules applied (``ubuntu`` is ``docker.io/library/ubuntu:latest``).

The grammar is distribution/reference's (``regexp.go``, ``reference.go`` and
``normalize.go`` as they are today): registry hosts are DNS-like names, IPv4 addresses or
IPv6 addresses in brackets (``[2001:db8::1]:5000/repo``); a digest's algorithm must be one
Shifter pulls (sha256: 64, sha512: 128 lower-case hexadecimal digits; others are refused as
go-digest refuses an unregistered algorithm); a bare 64-digit hexadecimal string is an image
id, not a name (``docker`` refuses it too), so it is refused with a hint to write ``id:HEX``.
Anything else is refused with a message that says what was wrong.

Bounds (checked first, also by root on the nodes): a whole request at most
:data:`MAX_REFERENCE_LENGTH` characters; the repository path at most
:data:`MAX_NAME_LENGTH` characters, counted as distribution/reference counts it since its
PR #9 (2024): without the registry, after Docker Hub's normalisation (``ubuntu`` counts as
``library/ubuntu``); a tag at most 128; only printable ASCII.
"""

from __future__ import annotations

import re
from collections import namedtuple

from .errors import OptionError
from .hubnames import DEFAULT_TAG, split_name
from .options import shown

IMAGE_TYPES = ("docker", "id")
UNSUPPORTED_TYPES = ("custom", "local")

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6_ADDRESS = r"\[[a-fA-F0-9:]+\]"  # no zone (RFC 6874), as distribution/reference
_DOMAIN = rf"(?:{_DOMAIN_NAME}|{_IPV6_ADDRESS})(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE_RE = re.compile(
    rf"^(?P<name>(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$",
    re.ASCII,
)
REPOSITORY_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*", re.ASCII)  # fullmatch
_ID_RE = re.compile(r"^(?:sha256:)?(?P<hex>[0-9a-f]{12,64})$", re.ASCII)
_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}", re.ASCII)  # fullmatch: an image id, not a name
_DIGEST_HEX_RE = re.compile(r"[a-f0-9]+", re.ASCII)  # fullmatch
# The algorithms Shifter pulls (image.oci checks the same two); go-digest also registers
# sha384, which no registry serves in practice and Shifter's registry client refuses.
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
MAX_NAME_LENGTH = 255
# A bound of our own, against hostile input: path (255) + ":" + tag (128) + "@sha256:" +
# 64 hex digits = 455, which leaves 57 characters for a registry (a bracketed IPv6 address
# and port is at most 47); a tag and a sha512 pin together may need more than this.
MAX_REFERENCE_LENGTH = 512


# Named tuples, not dataclasses: this module is on the start-up path of every Shifter srun,
# where importing ``dataclasses`` (or ``typing``) costs more than the parsing itself.
_DockerReference = namedtuple(
    "_DockerReference", "registry repository tag digest", defaults=(None, None)
)


class DockerReference(_DockerReference):
    """A Docker/OCI image reference, normalised to registry, repository, tag, digest.

    ``registry: str``, ``repository: str``, ``tag: str | None``, ``digest: str | None``.
    """

    __slots__ = ()
    # For the type checker only (annotations without values create no attribute).
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, text: str) -> DockerReference:
        """Parse ``[registry/]repo[:tag][@digest]``; Docker Hub rules apply."""
        _check_length(text)
        if _IDENTIFIER_RE.fullmatch(text):
            raise OptionError(
                f"invalid image reference {shown(text)}: 64 hexadecimal digits are an image "
                "id, not an image name",
                hint=f"write id:{text} to use the image with this id",
            )
        match = _REFERENCE_RE.fullmatch(text)
        if match is None:
            hint = "expected [REGISTRY/]NAME[:TAG][@DIGEST] with a lower-case NAME, e.g. "
            hint += "ubuntu:22.04"
            if "@" in text:
                hint += "; a digest is sha256: and 64 lower-case hexadecimal digits"
            raise OptionError(f"invalid image reference {shown(text)}", hint=hint)
        registry, repository = split_name(match.group("name"))
        if len(repository) > MAX_NAME_LENGTH:
            raise OptionError(
                f"invalid image reference {shown(text)}: the repository path "
                f"{shown(repository, 40)} is {len(repository)} characters long, longer than "
                f"{MAX_NAME_LENGTH}",
                hint="registries limit the path (without the registry; Docker Hub's official "
                "images count 'library/') to 255 characters",
            )
        tag = match.group("tag")
        digest = match.group("digest")
        if digest is not None:
            _check_digest(text, digest)
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry=registry, repository=repository, tag=tag, digest=digest)

    @property
    def reference(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _check_digest(text: str, digest: str) -> None:
    """Refuse a digest Shifter cannot pull, as go-digest's ``Digest.Validate`` does: an
    algorithm that is not registered, or a hex part of the wrong length or case."""
    algorithm, _, encoded = digest.partition(":")
    length = DIGEST_HEX_LENGTHS.get(algorithm)
    if length is None:
        raise OptionError(
            f"invalid image reference {shown(text)}: unsupported digest algorithm {algorithm!r}",
            hint="use the image's sha256 digest (sha256: and 64 lower-case hexadecimal digits)",
        )
    if len(encoded) != length or not _DIGEST_HEX_RE.fullmatch(encoded):
        raise OptionError(
            f"invalid image reference {shown(text)}: a {algorithm} digest is {length} lower-case "
            f"hexadecimal digits, got {len(encoded)} characters: {shown(encoded, 16)}",
            hint="copy the whole digest, e.g. from shifterimg images or the registry",
        )


def _check_length(text: str) -> None:
    if len(text) > MAX_REFERENCE_LENGTH:
        raise OptionError(
            f"invalid image reference {shown(text)}: longer than {MAX_REFERENCE_LENGTH} characters",
            hint="repository paths have at most 255 characters and tags at most 128",
        )


class ImageRequest(namedtuple("_ImageRequest", "type tag")):
    """An image as a user asked for it: ``type`` (``docker`` or ``id``) and ``tag``."""

    __slots__ = ()

    @classmethod
    def parse(cls, text: str, default_type: str = "docker") -> ImageRequest:
        """Parse ``[TYPE:]TAG`` as Shifter does; a bare tag gets ``default_type``."""
        if not text or not text.strip():
            raise OptionError(
                "empty image name", hint="give an image such as --image=docker:ubuntu:22.04"
            )
        _check_length(text)
        if not (text.isascii() and text.isprintable()) or " " in text:
            raise OptionError(
                f"invalid image reference {shown(text)}: it contains white space, control "
                "or non-ASCII characters",
                hint="image names are like docker:ubuntu:22.04",
            )
        prefix, sep, rest = text.partition(":")
        if sep and prefix in UNSUPPORTED_TYPES:
            raise OptionError(
                f"image type {shown(prefix)} is not supported",
                hint=f"use one of: {', '.join(IMAGE_TYPES)}",
            )
        if sep and prefix in IMAGE_TYPES:
            image_type, tag = prefix, rest
        else:
            image_type, tag = default_type, text
        if image_type == "id":
            match = _ID_RE.fullmatch(tag)
            if match is None:
                raise OptionError(
                    f"invalid image id {shown(tag)}",
                    hint="an id is 12 to 64 lower-case hexadecimal digits (see shifterimg lookup)",
                )
            return cls("id", match.group("hex"))
        if not tag:
            raise OptionError("empty image name", hint="e.g. --image=docker:ubuntu:22.04")
        DockerReference.parse(tag)
        return cls("docker", tag)

    @property
    def docker(self) -> DockerReference:
        """The parsed reference of a ``docker`` request."""
        if self.type != "docker":
            raise ValueError(f"{self} is not a docker image request")
        return DockerReference.parse(self.tag)

    def __str__(self) -> str:
        return f"{self.type}:{self.tag}"
