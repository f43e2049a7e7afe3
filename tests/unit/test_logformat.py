"""Structured log lines: one event per line, as JSON or key=value (logformat.py), chosen by
gateway.log_format."""

from __future__ import annotations

import json
import logging
import shlex

import pytest

from shifter_core import config, logformat


def _record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("shifter_core.gateway", logging.WARNING, __file__, 1, message,
                             args, None)  # fmt: skip


def test_json_is_one_object_per_line():
    line = logformat.formatter("json").format(_record("job %s failed:\n%s", "j1", 'bad "x"'))
    assert "\n" not in line
    event = json.loads(line)
    assert event["level"] == "warning" and event["logger"] == "shifter_core.gateway"
    assert event["msg"] == 'job j1 failed:\nbad "x"'
    assert event["time"].endswith("Z") and "T" in event["time"]


def test_keyvalue_quotes_what_needs_it_and_stays_on_one_line():
    line = logformat.formatter("keyvalue").format(_record("pull of a b=c\nd"))
    assert "\n" not in line
    pairs = dict(part.split("=", 1) for part in shlex.split(line))
    assert pairs["level"] == "warning" and pairs["logger"] == "shifter_core.gateway"
    assert json.loads(line.split("msg=", 1)[1]) == "pull of a b=c\nd"


def test_an_exception_stays_in_the_event():
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed")
        import sys

        record.exc_info = sys.exc_info()
    event = json.loads(logformat.formatter("json").format(record))
    assert "ValueError: boom" in event["error"]


def test_the_configuration_chooses_and_checks_the_format():
    assert config.parse("gateway:\n  log_format: json\n").gateway.log_format == "json"
    assert config.parse("").gateway.log_format == "text"
    with pytest.raises(config.ConfigError, match=r"log_format.*must be one of text, json"):
        config.parse("gateway:\n  log_format: xml\n")
