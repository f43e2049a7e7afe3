"""How a client reaches the gateway at ``gateway.url``: http, https, or a Unix socket.

``unix:/run/shifter/gateway.sock`` is a Unix socket (the gateway's ``listen`` names the same
path); ``https://HOST:PORT`` is verified against the system's CA store (``/etc/ssl/certs``,
where a site installs its own CA), or against *ca_file*.
"""

from __future__ import annotations

import ssl

import httpx

UNIX_PREFIX = "unix:"
UNIX_BASE_URL = "http://shifter-gateway"  # the Host header for requests over a Unix socket


def gateway_transport(
    url: str, *, ca_file: str | None = None
) -> tuple[str, httpx.BaseTransport | None]:
    """``(base_url, transport)`` for an httpx client of the gateway at *url* (transport None:
    httpx's own, for plain http)."""
    if url.startswith(UNIX_PREFIX):
        return UNIX_BASE_URL, httpx.HTTPTransport(uds=url[len(UNIX_PREFIX) :])
    if url.startswith("https:"):
        context = ssl.create_default_context(cafile=ca_file)
        return url.rstrip("/"), httpx.HTTPTransport(verify=context)
    return url.rstrip("/"), None
