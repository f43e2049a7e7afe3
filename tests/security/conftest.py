"""Fixtures of the security tests: they run as ordinary users against the running box."""

from __future__ import annotations

from tests.integration.conftest import box  # noqa: F401 - the session fixture 'box'
