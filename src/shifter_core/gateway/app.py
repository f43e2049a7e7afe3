"""The HTTP layer (Starlette): munge authentication, JSON in and out, the import upload.

Every request must carry ``Authorization: Munge <credential>``; the credential's payload names
the request (method, path with query, sha256 of the body), so it cannot be used for any other
request, and munged refuses it a second time. Anything else is answered ``401`` with a message
saying what was wrong. Errors are ``{"error": message}`` with the status of the error.

Bodies are read only after the credential was checked, and only up to
``gateway.limits.max_request_body`` (imports: ``max_import_size``): a larger ``Content-Length``
is refused (413) unread, a stream is cut off there. An error answered before the body was
read closes the connection, so an unread body is never drained either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__, munge
from ..errors import ShifterError
from ..image.limits import clean_text, human
from .callers import Caller
from .changes import wait_for
from .errors import BadRequest, GatewayError, TooLarge, Unauthenticated, Unavailable
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .models import (
    ExpireRequest,
    Identity,
    JobQuery,
    LoginRequest,
    LookupQuery,
    PullRequest,
    RemoveRequest,
)
from .service import Gateway

log = logging.getLogger(__name__)

Decoder = Callable[[str], munge.Credential]
API = "/api/v1"
_CHUNK = 1 << 20
Json = dict[str, Any]


def request_target(request: Request) -> str:
    """The request's path and query exactly as sent (what the munge payload names)."""
    path = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string") or b""
    target = path.decode("latin-1")
    return f"{target}?{query.decode('latin-1')}" if query else target


async def authenticate(
    gateway: Gateway, decoder: Decoder, request: Request, body_sha256: str | None
) -> tuple[Caller, str]:
    """Check the request's munge credential; return the caller and the payload's body hash.

    With ``body_sha256`` None (a streamed upload) the caller must compare the hash itself.
    """
    header = request.headers.get("authorization", "")
    scheme, _, credential = header.strip().partition(" ")
    if not header:
        raise Unauthenticated(
            "the image gateway accepts no anonymous requests: no munge credential was sent",
            hint="use shifterimg, which sends 'Authorization: Munge <credential>'",
        )
    if scheme.lower() != "munge" or not credential.strip():
        raise Unauthenticated("the Authorization header must be 'Munge <credential>'")
    try:
        decoded = await run_in_threadpool(decoder, credential.strip())
    except munge.MungeAuthError as err:
        raise Unauthenticated(f"refused: {err}") from None
    except munge.MungeError as err:
        raise Unavailable(f"the image gateway cannot verify munge credentials: {err}") from None
    try:
        payload = munge.parse_payload(decoded.payload)
    except munge.MungeAuthError as err:
        raise Unauthenticated(f"refused: {err}") from None
    target = request_target(request)
    if payload["method"].upper() != request.method or payload["path"] != target:
        raise Unauthenticated(
            f"refused: the munge credential was made for {payload['method']} {payload['path']}, "
            f"not for {request.method} {target}"
        )
    if body_sha256 is not None and payload["body_sha256"] != body_sha256:
        raise Unauthenticated("refused: the munge credential was made for another request body")
    secret = payload.get("secret")
    if secret is not None and not isinstance(secret, dict):
        raise BadRequest("the secret in the munge payload must be an object")
    if secret is not None and decoded.uid_restriction != os.getuid():
        raise Unauthenticated(
            "refused: registry credentials must travel in a munge credential that only the "
            "image gateway's user can decode",
            hint="send them with shifterimg, which restricts them to the gateway's uid",
        )
    caller = await run_in_threadpool(gateway.caller, decoded.uid, decoded.gid, secret)
    return caller, str(payload["body_sha256"])


def _too_large(what: str, limit: int) -> str:
    return f"the {what} is larger than {human(limit)}, the most this image gateway accepts"


def check_length(request: Request, limit: int, what: str) -> None:
    """Refuse a request whose ``Content-Length`` is over *limit* (0: no limit) or invalid."""
    header = request.headers.get("content-length")
    if header is None:
        return
    if not header.strip().isdigit():
        raise BadRequest(f"invalid Content-Length {clean_text(header, 40)!r}")
    if limit and int(header) > limit:
        raise TooLarge(_too_large(what, limit), hint="gateway.limits in the site config")


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request's body, read only up to *limit* bytes (413 beyond it, whatever the
    ``Content-Length`` said)."""
    check_length(request, limit, what)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if limit and received > limit:
            raise TooLarge(_too_large(what, limit), hint="gateway.limits in the site config")
        chunks.append(chunk)
    return b"".join(chunks)


def _error(err: ShifterError, status: int, *, unread: bool = False) -> JSONResponse:
    """The error answer; with *unread* (the body may not have been read: refused before,
    or an import) the connection is closed, so an unread body is never drained."""
    headers = {"Connection": "close"} if unread or status in (401, 413) else None
    return JSONResponse({"error": str(err)}, status_code=status, headers=headers)


Handler = Callable[[Request, Gateway, Caller, Json], Awaitable[Json]]


def _gateway(request: Request) -> Gateway:
    gateway = request.app.state.gateway
    assert isinstance(gateway, Gateway)
    return gateway


def _decoder(request: Request) -> Decoder:
    decoder: Decoder = request.app.state.decoder
    return decoder


def json_endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint that authenticates, reads the JSON body (an object) and answers JSON."""

    async def endpoint(request: Request) -> Response:
        gateway = _gateway(request)
        try:
            # Who is asking first: an unauthenticated body is never read.
            caller, expected = await authenticate(gateway, _decoder(request), request, None)
            body = await read_body(request, gateway.limits.max_request_body, "request body")
            if hashlib.sha256(body).hexdigest() != expected:
                raise Unauthenticated(
                    "refused: the munge credential was made for another request body"
                )
            data: Any = None
            if body:
                try:
                    data = json.loads(body)
                except ValueError:
                    raise BadRequest("the request body is not JSON") from None
            if data is not None and not isinstance(data, dict):
                raise BadRequest("the request body must be a JSON object")
            return JSONResponse(await handler(request, gateway, caller, data or {}))
        except GatewayError as err:
            if err.status == 401:
                log.warning("%s %s: %s", request.method, request.url.path, err)
            return _error(err, err.status)
        except ShifterError as err:
            return _error(err, 400)

    return endpoint


# -- handlers: (request, gateway, caller, JSON body) -> JSON answer ----------------------------


async def ping(request: Request, gateway: Gateway, caller: Caller, data: Json) -> Json:
    return Identity(
        __version__, caller.uid, caller.name, caller.gids, caller.admin, caller.may_import
    ).to_dict()


async def pull(request: Request, gateway: Gateway, caller: Caller, data: Json) -> Json:
    req = PullRequest.from_dict(data)
    job = await run_in_threadpool(
        gateway.submit_pull, caller, req.reference, req.platform, req.users, req.groups
    )
    return {"job": job.to_dict()}


async def job(request: Request, gateway: Gateway, caller: Caller, data: Json) -> Json:
    """The job; with ``wait=S&state=STATE``, once it is no longer in STATE or S s passed."""
    job_id = request.path_params["job_id"]
    query = JobQuery.from_params(request.query_params)
    with gateway.changes.watch() as changed:
        view = await run_in_threadpool(gateway.job, caller, job_id)
        if query.wait and view.state == query.state and await wait_for(changed, query.wait):
            view = await run_in_threadpool(gateway.job, caller, job_id)
    return {"job": view.to_dict()}


async def jobs(request: Request, gateway: Gateway, caller: Caller, data: Json) -> Json:
    found = await run_in_threadpool(gateway.jobs, caller)
    return {"jobs": [j.to_dict() for j in found]}


async def lookup(request: Request, gateway: Gateway, caller: Caller, data: Json) -> Json:
    query = LookupQuery.from_params(request.query_params)
    image = await run_in_threadpool(gateway.lookup, caller, query.reference, query.platform)
    return {"image": image.to_dict()}


async def images(request: Request, gateway: Gateway, caller: Caller, data: Json) -> Json:
    found = await run_in_threadpool(gateway.images, caller)
    return {"images": [i.to_dict() for i in found]}


async def expire(request: Request, gateway: Gateway, caller: Caller, data: Json) -> Json:
    req = ExpireRequest.from_dict(data)
    removed = await run_in_threadpool(gateway.expire, caller, req.days, list(req.ids))
    return {"removed": removed}


async def remove(request: Request, gateway: Gateway, caller: Caller, data: Json) -> Json:
    req = RemoveRequest.from_dict(data)
    removed = await run_in_threadpool(gateway.remove, caller, req.image, req.platform)
    return {"removed": removed}


async def login(request: Request, gateway: Gateway, caller: Caller, data: Json) -> Json:
    req = LoginRequest.from_dict(data)
    result = await run_in_threadpool(gateway.check_login, caller, req.registry)
    return result.to_dict()


async def stats(request: Request, gateway: Gateway, caller: Caller, data: Json) -> Json:
    return (await run_in_threadpool(gateway.stats)).to_dict()


async def import_image(request: Request) -> Response:
    """The body is the file itself, streamed into a partial file in the store."""
    gateway = _gateway(request)
    max_import = gateway.limits.max_import_size
    upload = None
    try:
        caller, expected = await authenticate(gateway, _decoder(request), request, None)
        name = gateway.check_import(caller, request.query_params.get("name"))
        check_length(request, max_import, "image file")
        upload = gateway.new_upload()
        hasher = hashlib.sha256()
        received = 0
        with open(upload, "wb") as fh:
            async for chunk in request.stream():
                received += len(chunk)
                if max_import and received > max_import:
                    raise TooLarge(_too_large("image file", max_import))
                hasher.update(chunk)
                await run_in_threadpool(fh.write, chunk)
        digest = hasher.hexdigest()
        if digest != expected:
            raise Unauthenticated("refused: the munge credential was made for another request body")
        job = await run_in_threadpool(gateway.submit_import, caller, name, upload, digest)
        upload = None  # the job owns it now
        return JSONResponse({"job": job.to_dict()})
    except GatewayError as err:
        if err.status == 401:
            log.warning("%s %s: %s", request.method, request.url.path, err)
        return _error(err, err.status, unread=True)
    except ShifterError as err:
        return _error(err, 400, unread=True)
    finally:
        if upload is not None:
            gateway.discard_upload(upload)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (404, 405) as ``{"error": ...}``."""
    assert isinstance(exc, HTTPException)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus' text format (:mod:`.metrics`), for any caller: it holds
    counts and sizes, no name of an image or a user."""
    gateway = _gateway(request)
    body = await run_in_threadpool(gateway.metrics.exposition)
    return Response(body, media_type=METRICS_CONTENT_TYPE)


class _RequestTimer:
    """ASGI middleware: every request's latency, by route template (not path: job ids would
    make a label per job), method and status."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = next(
                (r.path for r in ROUTES if r.matches(scope)[0] == Match.FULL), "other"
            )
            elapsed = time.monotonic() - start
            self.gateway.metrics.request(route, scope["method"], status[0], elapsed)


ROUTES = [
    Route("/metrics", metrics, methods=["GET"]),
    Route(f"{API}/ping", json_endpoint(ping), methods=["GET"]),
    Route(f"{API}/pull", json_endpoint(pull), methods=["POST"]),
    Route(f"{API}/jobs", json_endpoint(jobs), methods=["GET"]),
    Route(f"{API}/jobs/{{job_id}}", json_endpoint(job), methods=["GET"]),
    Route(f"{API}/lookup", json_endpoint(lookup), methods=["GET"]),
    Route(f"{API}/images", json_endpoint(images), methods=["GET"]),
    Route(f"{API}/import", import_image, methods=["POST"]),
    Route(f"{API}/expire", json_endpoint(expire), methods=["POST"]),
    Route(f"{API}/remove", json_endpoint(remove), methods=["POST"]),
    Route(f"{API}/login", json_endpoint(login), methods=["POST"]),
    Route(f"{API}/stats", json_endpoint(stats), methods=["GET"]),
]


def create_app(gateway: Gateway, decoder: Decoder = munge.decode) -> Starlette:
    """The ASGI application around *gateway*; *decoder* verifies munge credentials."""
    app = Starlette(routes=ROUTES, exception_handlers={HTTPException: http_error})
    app.state.gateway = gateway
    app.state.decoder = decoder
    app.add_middleware(_RequestTimer, gateway=gateway)
    return app
