"""Checking registry credentials the way ``docker login`` does, for ``shifterimg login``.

``GET /v2/`` at the registry itself (never a mirror: the credentials belong to the registry);
a Basic challenge is answered with the credentials, a Bearer challenge by asking its token
service for a token without a scope. Credentials go over plain http only to registries the
site lists as insecure.
"""

from __future__ import annotations

import base64
import logging

import httpx

from ..image.errors import AuthenticationError, RegistryUnavailable
from ..image.registry.auth import parse_challenges
from ..image.registry.settings import RegistrySettings

log = logging.getLogger(__name__)


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def check_login(settings: RegistrySettings, registry: str, username: str, password: str) -> str:
    """Verify credentials for *registry*; return a short description of what was checked.

    Raises :class:`AuthenticationError` when the registry rejects them and
    :class:`RegistryUnavailable` when it cannot be asked.
    """
    endpoint = settings.endpoints(registry)[-1]
    secure = endpoint.url.startswith("https://")
    rejected = AuthenticationError(
        f"registry {registry} rejected the username or password of user {username!r}",
        hint=f"check them and run: shifterimg login {registry}",
    )
    try:
        with httpx.Client(
            timeout=settings.timeout,
            trust_env=settings.trust_env,
            verify=settings.ca_bundle or True,
            headers={"User-Agent": settings.user_agent},
        ) as http:
            first = http.get(f"{endpoint.url}/v2/")
            if first.status_code == 200:
                return f"registry {registry} does not require authentication"
            challenges = parse_challenges(first.headers.get_list("www-authenticate"))
            if first.status_code != 401 or not challenges:
                raise RegistryUnavailable(
                    f"registry {registry} answered HTTP {first.status_code} at {endpoint.url}/v2/"
                )
            challenge = challenges[0]
            if challenge.scheme == "basic":
                answer = http.get(
                    f"{endpoint.url}/v2/", headers={"Authorization": _basic(username, password)}
                )
                if answer.status_code == 200:
                    return f"logged in to {registry} (basic authentication)"
                raise rejected
            if challenge.scheme != "bearer" or not challenge.params.get("realm"):
                raise AuthenticationError(
                    f"registry {registry} asks for unsupported authentication {challenge.scheme!r}"
                )
            realm = challenge.params["realm"]
            if not secure and endpoint.registry not in settings.insecure:
                raise AuthenticationError(
                    f"refusing to send credentials for {registry} over plain http"
                )
            params = {"account": username}
            if challenge.params.get("service"):
                params["service"] = challenge.params["service"]
            answer = http.get(
                realm, params=params, headers={"Authorization": _basic(username, password)}
            )
            if answer.status_code == 200:
                return f"logged in to {registry} (token service {realm})"
            if answer.status_code in (401, 403):
                raise rejected
            raise RegistryUnavailable(
                f"token service {realm} of registry {registry} answered HTTP {answer.status_code}"
            )
    except httpx.HTTPError as err:
        raise RegistryUnavailable(
            f"cannot reach registry {registry} at {endpoint.url}: {err}"
        ) from err
