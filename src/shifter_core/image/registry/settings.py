"""How to reach registries: the ``registries:`` settings, mirrors and endpoints.

A registry's name (``docker.io``, ``host:5000``) is what references, credentials and settings
are keyed by; :func:`registry_host` is the one rule that turns any spelling of it (a URL,
Docker Hub's aliases, upper case) into that name. An :class:`Endpoint` is one place to ask for
a registry's content: each of its mirrors first, then the registry itself (Docker Hub's API
host is ``registry-1.docker.io``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ...hubnames import DOCKER_HUB, DOCKER_HUB_ALIASES
from ..limits import PullLimits

DOCKER_HUB_API_HOST = "registry-1.docker.io"


def registry_host(name: str) -> str:
    """The name of registry *name*: ``host[:port]``, lower case, Docker Hub's aliases folded
    to ``docker.io`` (``https://index.docker.io/v1/`` -> ``docker.io``; ``""`` for a blank)."""
    text = name.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.split("/", 1)[0].lower()
    return DOCKER_HUB if text in DOCKER_HUB_ALIASES else text


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
            registry_host(name): tuple(u.rstrip("/") for u in urls)
            for name, urls in dict(self.mirrors).items()
        }
        object.__setattr__(self, "mirrors", mirrors)
        object.__setattr__(self, "insecure", frozenset(registry_host(h) for h in self.insecure))
        if self.retries < 0 or self.max_parallel < 1 or self.timeout <= 0:
            raise ValueError("retries must be >= 0, max_parallel >= 1 and timeout > 0")

    def endpoints(self, registry: str) -> list[Endpoint]:
        """Mirrors of *registry* (in order), then the registry itself."""
        registry = registry_host(registry)
        found = []
        for url in self.mirrors.get(registry, ()):
            if "://" not in url:
                url = f"{'http' if registry_host(url) in self.insecure else 'https'}://{url}"
            found.append(Endpoint(registry, url, mirror=True))
        host = DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry
        scheme = "http" if registry in self.insecure else "https"
        found.append(Endpoint(registry, f"{scheme}://{host}"))
        return found
