"""Loggers that import :mod:`logging` only when something is to be logged.

``shifter`` starts for every container; importing :mod:`logging` costs about as much as the
container setup itself. A :class:`LazyLogger` forwards to ``logging.getLogger(name)`` as soon
as :mod:`logging` is in use (the CLI with ``-v``, the Slurm plugin, tests); before that it
drops debug and info records (nothing could have enabled them) and imports :mod:`logging`
for warnings and errors, calling :data:`on_first_use` first so the program can set up its
handler.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

#: Called once, before :mod:`logging` is imported for a warning (e.g. to add a handler).
on_first_use: Callable[[], None] | None = None

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time

if TYPE_CHECKING:
    from typing import Any

_DEBUG, _INFO, _WARNING, _ERROR = 10, 20, 30, 40


class LazyLogger:
    """The subset of :class:`logging.Logger` the runtime uses."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def _log(self, level: int, msg: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        global on_first_use
        if "logging" not in sys.modules:
            if level < _WARNING:
                return
            hook, on_first_use = on_first_use, None
            if hook is not None:
                hook()
        import logging

        logging.getLogger(self.name).log(level, msg, *args, **kwargs)

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._log(_DEBUG, msg, args, kwargs)

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._log(_INFO, msg, args, kwargs)

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._log(_WARNING, msg, args, kwargs)

    def error(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._log(_ERROR, msg, args, kwargs)


def get_logger(name: str) -> LazyLogger:
    return LazyLogger(name)
