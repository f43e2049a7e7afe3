"""A client of the image gateway's HTTP API (see :mod:`shifter_core.gateway` for the protocol).

Requests and answers are the server's own types (:mod:`shifter_core.gateway.models`): each
call returns a model, read and checked from the JSON (an answer of another shape is a
:class:`GatewayError`); refusals are the gateway's :class:`GatewayError` with its status.

Each request gets a fresh munge credential whose payload binds it to that request (method,
path with query, sha256 of the body); registry credentials travel inside that payload, which
munge encrypts, never in the body. A credential that carries registry credentials is
restricted to the gateway's uid (``MUNGE_OPT_UID_RESTRICTION``): munged decodes it for the
gateway only, so whoever else gets hold of it (a process listening on the gateway's port
while the gateway is down, the network) learns nothing. The gateway's user is the site
config's (``gateway.user`` where the config has it, else the service user ``shifter``),
never what an answer from the network claims.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pwd
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from . import munge
from ._httpx import httpx
from .gateway.errors import GatewayError, GatewayUnreachable
from .gateway.models import (
    FINAL_STATES,
    ExpireRequest,
    GatewayStats,
    Identity,
    ImageEntry,
    ImageInfo,
    InvalidAnswer,
    JobInfo,
    JobQuery,
    JobState,
    LoginRequest,
    LoginResult,
    LookupQuery,
    PullRequest,
    RemoveRequest,
    strings,
)

__all__ = ["GatewayClient", "GatewayError", "GatewayUnreachable"]

log = logging.getLogger(__name__)

API = "/api/v1"
_CHUNK = 1 << 20
SERVICE_USER = "shifter"  # the gateway's user unless the site config names another

Encoder = Callable[[bytes], str]
T = TypeVar("T")


def _items(data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise InvalidAnswer("the answer holds no list")
    return data


class GatewayClient:
    """Calls to one gateway.

    ``encoder`` makes every munge credential (tests replace it); by default munge does, and
    a credential that carries a secret is restricted to the uid of ``gateway_user`` (a
    name or a uid; default :data:`SERVICE_USER`).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        encoder: Encoder | None = None,
        transport: httpx.BaseTransport | None = None,
        gateway_user: str | int | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._encoder = encoder
        self._gateway_user = SERVICE_USER if gateway_user is None else gateway_user
        base = self.url
        if transport is None:  # http, https (the system's CAs) or unix:/PATH
            from .gateway.transport import gateway_transport

            base, transport = gateway_transport(self.url)
        # The gateway is a site service: no proxy from the user's environment in between.
        # An https transport verifies with its own context; this one (no CA bundle loaded,
        # which costs ~100 ms) is never used to verify anything.
        verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._http = httpx.Client(
            base_url=base,
            timeout=timeout,
            trust_env=False,
            transport=transport,
            verify=verify,
        )

    def close(self) -> None:
        self._http.close()

    def gateway_uid(self) -> int:
        """The uid the gateway runs as: the only one that may decode a secret we send."""
        user = self._gateway_user
        if isinstance(user, int) or user.isdigit():
            return int(user)
        try:
            return pwd.getpwnam(user).pw_uid
        except KeyError:
            raise GatewayError(
                f"registry credentials go only to the image gateway's user, and user "
                f"{user!r} does not exist on this host",
                hint="the site config must name the user shifter-gateway runs as",
                status=0,
            ) from None

    def _credential(self, payload: bytes, secret: bool) -> str:
        if self._encoder is not None:
            return self._encoder(payload)
        return munge.encode(payload, uid_restriction=self.gateway_uid() if secret else None)

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        secret: dict[str, str] | None = None,
        content: Iterator[bytes] | None = None,
        content_sha256: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send one authenticated request; the decoded JSON answer, or a GatewayError."""
        raw = b"" if body is None else json.dumps(body).encode()
        extra = dict(headers or {})
        if body is not None:
            extra["Content-Type"] = "application/json"
        request = self._http.build_request(
            method,
            API + path,
            params=params,
            content=content if content is not None else raw,
            headers=extra,
            timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
        digest = content_sha256 if content is not None else munge.body_digest(raw)
        assert digest is not None
        target = request.url.raw_path.decode("ascii")
        payload = munge.request_payload(method, target, digest, secret)
        credential = self._credential(payload, secret is not None)
        request.headers["Authorization"] = f"Munge {credential}"
        try:
            response = self._http.send(request)
        except httpx.TransportError as err:
            raise GatewayUnreachable(
                f"cannot reach the image gateway at {self.url}: {err or type(err).__name__}",
                hint="is shifter-gateway running? (gateway.url in the site config)",
            ) from None
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code in (502, 503, 504) and not isinstance(data, dict):
            # A proxy in front of a gateway that is down: as good as no answer.
            raise GatewayUnreachable(
                f"cannot reach the image gateway at {self.url}: "
                f"HTTP {response.status_code} from a proxy",
                hint="is shifter-gateway running? (gateway.url in the site config)",
                status=response.status_code,
            )
        if response.status_code >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            raise GatewayError(
                message or f"the image gateway answered HTTP {response.status_code}",
                status=response.status_code,
            )
        if not isinstance(data, dict):
            raise GatewayError(
                f"the image gateway at {self.url} sent an answer that is not JSON", status=0
            )
        return data

    # -- API -----------------------------------------------------------------------------------

    def _answer(self, parse: Callable[[Any], T], data: Any) -> T:
        """``data`` of an answer read as its model; a GatewayError when it does not fit."""
        try:
            return parse(data)
        except InvalidAnswer as err:
            raise GatewayError(
                f"the image gateway at {self.url} sent an invalid answer: {err}", status=0
            ) from None

    def ping(self) -> Identity:
        return self._answer(Identity.from_dict, self.request("GET", "/ping"))

    def pull(
        self,
        reference: str,
        *,
        platform: str | None = None,
        users: list[str] | None = None,
        groups: list[str] | None = None,
        secret: dict[str, str] | None = None,
    ) -> JobInfo:
        body = PullRequest(reference, platform, tuple(users or ()), tuple(groups or ()))
        answer = self.request("POST", "/pull", body=body.to_dict(), secret=secret)
        return self._answer(JobInfo.from_dict, answer.get("job"))

    def job(self, job_id: str, *, wait: float = 0, state: str | None = None) -> JobInfo:
        """The job; with ``wait`` and ``state``, the gateway answers when the job leaves
        ``state`` (or any job changes state) or after ``wait`` seconds."""
        params = JobQuery(wait, state).to_params()
        timeout = self._http.timeout.read
        if params and timeout is not None:
            timeout += wait
        answer = self.request("GET", f"/jobs/{job_id}", params=params, timeout=timeout)
        return self._answer(JobInfo.from_dict, answer.get("job"))

    def jobs(self) -> list[JobInfo]:
        answer = self.request("GET", "/jobs")
        return self._answer(lambda d: [JobInfo.from_dict(j) for j in _items(d)], answer.get("jobs"))

    def lookup(self, reference: str, platform: str | None = None) -> ImageInfo:
        params = LookupQuery(reference, platform).to_params()
        answer = self.request("GET", "/lookup", params=params)
        return self._answer(ImageInfo.from_dict, answer.get("image"))

    def images(self) -> list[ImageEntry]:
        answer = self.request("GET", "/images")
        return self._answer(
            lambda d: [ImageEntry.from_dict(i) for i in _items(d)], answer.get("images")
        )

    def import_file(self, path: str | os.PathLike[str], name: str) -> JobInfo:
        """Upload an image file (streamed; hashed first for the credential)."""
        file = Path(path)
        hasher = hashlib.sha256()
        with open(file, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                hasher.update(chunk)
        size = file.stat().st_size

        def chunks() -> Iterator[bytes]:
            with open(file, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    yield chunk

        answer = self.request(
            "POST",
            "/import",
            params={"name": name},
            content=chunks(),
            content_sha256=hasher.hexdigest(),
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
            timeout=600.0,
        )
        return self._answer(JobInfo.from_dict, answer.get("job"))

    def expire(self, *, days: float | None = None, ids: list[str] | None = None) -> list[str]:
        body = ExpireRequest(days, tuple(ids or ()))
        answer = self.request("POST", "/expire", body=body.to_dict())
        return list(self._answer(lambda d: strings(d, "removed"), answer.get("removed")))

    def remove(self, image: str, platform: str | None = None) -> list[str]:
        body = RemoveRequest(image, platform)
        answer = self.request("POST", "/remove", body=body.to_dict())
        return list(self._answer(lambda d: strings(d, "removed"), answer.get("removed")))

    def login(self, registry: str, username: str, password: str) -> LoginResult:
        secret = {"registry": registry, "username": username, "password": password}
        body = LoginRequest(registry).to_dict()
        return self._answer(
            LoginResult.from_dict, self.request("POST", "/login", body=body, secret=secret)
        )

    def stats(self) -> GatewayStats:
        return self._answer(GatewayStats.from_dict, self.request("GET", "/stats"))

    def wait(
        self,
        job_id: str,
        on_update: Callable[[JobInfo], None] | None = None,
        *,
        interval: float = 0.5,
        reconnect_timeout: float = 60.0,
        on_disconnect: Callable[[GatewayUnreachable], None] | None = None,
    ) -> JobInfo:
        """Follow a job until it is READY or FAILED; returns the final job.

        Each status request waits at the gateway up to ``interval`` seconds for the job to
        change state, so a change is seen at once and progress still comes every
        ``interval``.  A gateway that goes away meanwhile (a restart) is retried for
        ``reconnect_timeout`` seconds: jobs survive restarts.
        """
        lost: float | None = None
        state: JobState | None = None
        while True:
            asked = time.monotonic()
            try:
                job = self.job(job_id, wait=interval, state=state)
            except GatewayUnreachable as err:
                now = time.monotonic()
                if lost is None:
                    lost = now
                    if on_disconnect:
                        on_disconnect(err)
                elif now - lost > reconnect_timeout:
                    raise
                time.sleep(interval)
                continue
            lost = None
            if on_update:
                on_update(job)
            if job.state in FINAL_STATES:
                return job
            if job.state == state:
                # Another job's change woke the request early: do not spin on it.
                time.sleep(max(0.0, min(0.05, interval - (time.monotonic() - asked))))
            state = job.state
