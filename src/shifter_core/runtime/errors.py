"""Errors of the container runtime (all :class:`~shifter_core.errors.ShifterError`)."""

from __future__ import annotations

from ..errors import ShifterError


class ContainerError(ShifterError):
    """The container could not be built or entered."""


class ImageError(ContainerError):
    """The image is unknown, not visible to the user, or its file is unusable."""


class VolumeError(ContainerError):
    """A volume is refused: forbidden target, escaping symlink, unreadable source ..."""


class ModuleError(ContainerError):
    """A module is unknown, conflicts with another, or cannot be set up."""


class PrivilegeError(ContainerError):
    """Something would run as root, or the privileges needed are missing."""


class CommandError(ContainerError):
    """The command cannot be run in the container; ``exit_code`` as a shell would give."""

    def __init__(self, message: str, hint: str | None = None, *, exit_code: int = 126) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code
