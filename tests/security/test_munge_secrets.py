"""The real gateway refuses registry secrets in a munge credential any uid could decode."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.slurm import run_as

pytestmark = pytest.mark.usefixtures("box")

LOOSE_CLIENT = """
from shifter_core import munge
from shifter_core.client import GatewayClient, GatewayError
client = GatewayClient("http://127.0.0.1:7080", encoder=lambda payload: munge.encode(payload))
try:
    client.login("docker.io", "alice", "not-her-password")
except GatewayError as err:
    print(err)
"""


def test_an_unrestricted_secret_is_refused(tmp_path: Path):
    python = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"
    result = run_as([str(python), "-c", LOOSE_CLIENT])
    assert result.returncode == 0, result.stderr
    assert "only the image gateway's user can decode" in result.stdout
