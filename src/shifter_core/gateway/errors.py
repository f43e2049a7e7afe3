"""Errors the gateway answers with: a user-facing message and an HTTP status."""

from __future__ import annotations

from ..errors import ShifterError


class GatewayError(ShifterError):
    """A request the gateway refuses; ``status`` is the HTTP status it answers with."""

    status = 400


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
