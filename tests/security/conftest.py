"""Fixtures of the security tests: they run as ordinary users against the running box."""

from __future__ import annotations

from tests.integration.conftest import (  # noqa: F401 - fixtures used by name
    box,
    no_job_outlives_its_test,
)
