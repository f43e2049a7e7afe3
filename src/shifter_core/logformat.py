"""How a service writes its log lines: ``text`` (for people), ``json`` or ``keyvalue`` (one
line per event, for a log pipeline). Chosen in the configuration (``gateway.log_format``)."""

from __future__ import annotations

import json
import logging
import time

LOG_FORMATS = ("text", "json", "keyvalue")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _fields(record: logging.LogRecord) -> dict[str, object]:
    """The event: time (UTC, ISO 8601), level, logger, message (and the exception's text)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    fields: dict[str, object] = {
        "time": f"{stamp}.{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    if record.exc_info:
        fields["error"] = logging.Formatter().formatException(record.exc_info)
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), ensure_ascii=False, default=str)


class KeyValueFormatter(logging.Formatter):
    """``key=value`` pairs (logfmt): values with spaces, quotes or ``=`` are quoted, newlines
    escaped, so an event stays on one line."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt(str(v))}" for k, v in _fields(record).items())


def _logfmt(value: str) -> str:
    if value and not any(c in value for c in ' ="\\\n\r\t'):
        return value
    return json.dumps(value, ensure_ascii=False)


def formatter(style: str) -> logging.Formatter:
    """The formatter of a :data:`LOG_FORMATS` style."""
    if style == "json":
        return JsonFormatter()
    if style == "keyvalue":
        return KeyValueFormatter()
    return logging.Formatter(TEXT_FORMAT)


def apply(style: str) -> None:
    """Use ``style`` for every handler of the root logger."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter(style))
