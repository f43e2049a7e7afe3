"""HTTP to registries: redirects, retries with backoff, rate limits and bounded reads.

:class:`Transport` sends one logical request and returns the streamed response (4xx included,
for the caller to judge). Connection errors and 5xx are retried with exponential backoff; HTTP
429 honours ``Retry-After`` a few times, then fails with "rate limited by R". Redirects are
followed only where :func:`~shifter_core.image.limits.check_redirect` allows (http(s), never
from https to http unless the registry is insecure, never to a loopback or link-local address
unless the registry is on one), and without the ``Authorization`` header once the origin
changes. Registry error texts are cut and escaped (:func:`describe`) before they reach
messages and logs. The deadline of the resolve running in a thread (:func:`deadline_scope`)
stops requests and reads once it is past. Authentication is :mod:`.auth`'s.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from urllib.parse import urljoin, urlsplit

import httpx

from ..errors import RateLimited, RegistryError, RegistryUnavailable
from ..limits import Deadline, RedirectRefused, check_redirect, clean_text
from .settings import RegistrySettings, registry_host

log = logging.getLogger(__name__)

MAX_REDIRECTS = 10
MAX_BACKOFF = 30.0
_CHUNK = 1 << 16
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

_LOCAL = threading.local()  # .deadline: the Deadline of the resolve running in this thread


@contextlib.contextmanager
def deadline_scope(deadline: Deadline | None) -> Iterator[None]:
    """Bound every request and read of this thread by *deadline* while the block runs."""
    _LOCAL.deadline = deadline
    try:
        yield
    finally:
        _LOCAL.deadline = None


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


def url_origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def error_codes(body: bytes) -> list[tuple[str, str]]:
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


def describe(status: int, body: bytes) -> str:
    """``HTTP 400 CODE: message`` from an error answer, cut and escaped (registry text is
    hostile: it reaches users and logs)."""
    codes = error_codes(body)
    if codes:
        text = "; ".join(f"{c}: {m}" if m else c for c, m in codes[:5])
        return f"HTTP {status} " + clean_text(text)
    text = body[:1000].decode("utf-8", "replace").strip()
    return f"HTTP {status}" + (f" ({clean_text(text)})" if text else "")


def iter_raw(response: httpx.Response) -> Iterator[bytes]:
    """The body exactly as sent (no Content-Encoding decoding), in chunks.

    A response whose body was loaded already (``httpx.MockTransport`` builds those) yields it
    in one piece.
    """
    if response.is_stream_consumed and hasattr(response, "_content"):
        yield response.content
        return
    yield from response.iter_raw(_CHUNK)


def with_auth(headers: Mapping[str, str], auth: str | None) -> dict[str, str]:
    result = dict(headers)
    if auth:
        result["Authorization"] = auth
    return result


class Transport:
    """The HTTP side of a :class:`~.client.RegistryClient`: a connection pool and the rules
    above. ``transport`` and ``sleep`` exist for tests (``httpx.MockTransport``, a fake
    sleep)."""

    def __init__(
        self,
        settings: RegistrySettings,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.sleep = sleep
        self.http = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(settings.timeout),
            verify=settings.ca_bundle or True,
            follow_redirects=False,
            trust_env=settings.trust_env,
            headers={"User-Agent": settings.user_agent},
            limits=httpx.Limits(max_connections=max(10, 2 * settings.max_parallel)),
        )

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def _follow(
        self, method: str, url: str, headers: dict[str, str], registry: str
    ) -> httpx.Response:
        """Send, following redirects; drop ``Authorization`` once the origin changes.

        Redirects go only where :func:`~shifter_core.image.limits.check_redirect` allows: http(s),
        https unless the registry is insecure, no loopback or link-local address unless the
        registry is on one.
        """
        origin = url_origin(url)
        home = url
        insecure = registry_host(registry) in self.settings.insecure or origin[1] in (
            self.settings.insecure
        )
        for _ in range(MAX_REDIRECTS + 1):
            request = self.http.build_request(method, url, headers=headers)
            response = self.http.send(request, stream=True)
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
            new_origin = url_origin(url)
            if new_origin != origin and any(k.lower() == "authorization" for k in headers):
                log.debug("redirect to %s: not forwarding the Authorization header", new_origin)
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            if response.status_code == 303:
                method = "GET"
        raise RegistryError(f"too many redirects fetching {url}")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number *attempt* (from 0): doubling, capped."""
        return min(MAX_BACKOFF, self.settings.backoff * 2.0**attempt)

    def send(
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
                        f"cannot reach registry {registry} at {url_origin(url)[1]}: "
                        f"{exc or type(exc).__name__} (after {attempt + 1} attempts)",
                        hint="check the network, proxy and registry address",
                    ) from exc
                delay = self.backoff(attempt)
                log.warning("%s %s: %s; retrying in %.1f s", method, url, exc, delay)
                self.sleep(delay)
                attempt += 1
                continue
            status = response.status_code
            if status >= 500:
                body = self.read_error(response)
                if attempt >= self.settings.retries:
                    raise RegistryUnavailable(
                        f"registry {registry} failed: {describe(status, body)} for {url} "
                        f"(after {attempt + 1} attempts)",
                        hint="the registry has a problem; try again later",
                    )
                delay = self.backoff(attempt)
                log.warning("%s %s: HTTP %d; retrying in %.1f s", method, url, status, delay)
                self.sleep(delay)
                attempt += 1
                continue
            if status == 429:
                advised = parse_retry_after(response.headers.get("retry-after"))
                self.read_error(response)
                wait_s = advised if advised is not None else self.backoff(limited)
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
                self.sleep(wait_s)
                limited += 1
                continue
            return response

    @staticmethod
    def read_raw(response: httpx.Response, limit: int, what: str) -> bytes:
        """The whole body of *response*, refused when larger than *limit* bytes."""
        chunks = []
        total = 0
        deadline = getattr(_LOCAL, "deadline", None)
        for chunk in iter_raw(response):
            if deadline is not None:
                deadline.check()
            total += len(chunk)
            if total > limit:
                raise RegistryError(f"{what} is larger than {limit} bytes; refusing it")
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def read_error(response: httpx.Response) -> bytes:
        """The (small) body of an error answer, b"" when unreadable; closes *response*."""
        try:
            return Transport.read_raw(response, 1 << 16, "error body")
        except (httpx.HTTPError, RegistryError):
            return b""
        finally:
            response.close()
