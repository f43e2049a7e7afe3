"""Errors the gateway answers with: a user-facing message and an HTTP status."""

from __future__ import annotations

from ..errors import ShifterError


class GatewayError(ShifterError):
    """A request the gateway refuses; ``status`` is the HTTP status it answers with.

    The client raises it too, with the gateway's message and status (0: no HTTP status).
    """

    status = 400

    def __init__(self, message: str, hint: str | None = None, *, status: int | None = None) -> None:
        super().__init__(message, hint)
        if status is not None:
            self.status = status


class BadRequest(GatewayError):
    status = 400


class Unauthenticated(GatewayError):
    status = 401


class Forbidden(GatewayError):
    status = 403


class NotFound(GatewayError):
    status = 404


class TooLarge(GatewayError):
    status = 413


class Unavailable(GatewayError):
    status = 503


class GatewayUnreachable(GatewayError):
    """No answer from the gateway (not running, wrong URL, network): raised by the client."""

    status = 0
