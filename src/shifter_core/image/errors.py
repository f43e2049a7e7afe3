"""The errors of getting an image from a registry: the ``RegistryError`` family.

They sit below the OCI model and the registry client because both raise them: a bad digest or
descriptor in a manifest (:mod:`.oci`), a refused or failed request (:mod:`.registry`), bytes
that do not match their digest (:mod:`.registry.client`, :mod:`.layercache`). The other errors
of images live with the module that raises them (``FlattenError``, ``ConversionError``,
``StoreError``, ``LimitExceeded``, ``ImageContentError``, ``CredentialError``,
``NodeCacheError``); every one is a ``ShifterError``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ShifterError


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
