"""Errors with a user-facing message and, where useful, a hint on what to do."""

from __future__ import annotations


class ShifterError(Exception):
    """Base class: ``str(err)`` is a complete message fit for a user."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}; {self.hint}"
        return self.message


class ConfigError(ShifterError):
    """The site configuration file is missing, unsafe or invalid."""


class OptionError(ShifterError):
    """A user-supplied option value (image, volume, module) is malformed."""


class NodeFault(ShifterError):
    """A fault of the node itself (no squashfs in the kernel, no loop device, a run directory
    that cannot be written): the only error a root-side hook may fail on. Every other error
    in the prolog, epilog or a step is the job's, recorded and shown to its user."""


def escape(text: object, limit: int = 512) -> str:
    """``text`` made safe for one log line: characters that are not printable (line breaks,
    control and formatting characters) shown as ``\\xNN``/``\\uNNNN``, cut to ``limit``."""
    value = str(text)
    cut = len(value) > limit
    value = value[:limit]
    if not value.isprintable():
        value = "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)
    return value + "..." if cut else value
