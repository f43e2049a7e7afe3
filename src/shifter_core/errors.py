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
