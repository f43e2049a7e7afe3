"""Registry authentication: anonymous, Basic, and Bearer tokens per scope.

Bearer tokens are obtained by following the ``WWW-Authenticate`` challenge (realm, service,
scope) like Docker clients do, with credentials sent to the token service as Basic auth; the
realm may point only where a redirect could (:func:`~shifter_core.image.limits.check_redirect`).
Tokens are cached per scope (``repository:NAME:pull``) and refreshed when they expire or when a
401 comes back. A wrong password fails at once. Credentials are never sent over plain http
unless the registry is listed as insecure. Credentials of a mirror are looked up by its host,
those of a registry by its name.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from ..errors import AuthenticationError, RegistryError
from ..limits import RedirectRefused, check_redirect
from .settings import Endpoint, RegistrySettings
from .transport import Transport, describe, url_origin, with_auth

if TYPE_CHECKING:
    from .credentials import CredentialSource

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME = 60.0


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


@dataclass
class _Token:
    value: str
    expires_at: float


class RegistryAuth:
    """The ``Authorization`` of each request of a :class:`~.client.RegistryClient`:
    challenges per endpoint, tokens per endpoint and scope (thread-safe)."""

    def __init__(
        self,
        settings: RegistrySettings,
        credentials: CredentialSource | None,
        transport: Transport,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.credentials = credentials
        self._transport = transport
        self._clock = clock
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str], _Token] = {}
        self.token_requests = 0

    def credentials_for(self, endpoint: Endpoint) -> tuple[str, str] | None:
        """``(user, password)`` for *endpoint*: a mirror's by its host, a registry's by its
        name; None for anonymous access."""
        if self.credentials is None:
            return None
        key = endpoint.host if endpoint.mirror else endpoint.registry
        return self.credentials.get(key)

    def _may_send_credentials(self, url: str, endpoint: Endpoint) -> bool:
        scheme, host = url_origin(url)
        if scheme == "https":
            return True
        insecure = self.settings.insecure
        return (
            host in insecure
            or endpoint.host in insecure
            or (not endpoint.mirror and endpoint.registry in insecure)
        )

    def _refuse_plain_http(self, url: str, endpoint: Endpoint) -> RegistryError:
        host = url_origin(url)[1]
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
        creds = self.credentials_for(endpoint)
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
        params: list[tuple[str, str | int | float | bool | None]] = []
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
        response = self._transport.send("GET", url, headers, registry=endpoint.registry)
        body = self._transport.read_error(response)  # reads (small) body and closes
        if response.status_code in (401, 403):
            if creds is not None:
                raise AuthenticationError(
                    f"registry {endpoint.registry} rejected the username or password of user "
                    f"{creds[0]!r} ({describe(response.status_code, body)})",
                    hint=f"run: shifterimg login {endpoint.registry}",
                )
            raise AuthenticationError(
                f"registry {endpoint.registry} refused an anonymous token for {scope}",
                hint=f"it needs credentials; run: shifterimg login {endpoint.registry}",
            )
        if response.status_code != 200:
            raise AuthenticationError(
                f"token service {realm} of registry {endpoint.registry} failed: "
                f"{describe(response.status_code, body)}"
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
        creds = self.credentials_for(endpoint)
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

    def get(
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
        response = self._transport.send(
            method, url, with_auth(base, auth), registry=endpoint.registry
        )
        if response.status_code == 401:
            challenges = parse_challenges(response.headers.get_list("www-authenticate"))
            self._transport.read_error(response)
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
            response = self._transport.send(
                method, url, with_auth(base, auth), registry=endpoint.registry
            )
            if response.status_code == 401:
                self._transport.read_error(response)
                raise self._denied(endpoint, name, challenge)
        if response.status_code == 403:
            self._transport.read_error(response)
            raise self._denied(endpoint, name, self._challenges.get(endpoint.url))
        return response
