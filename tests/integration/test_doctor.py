"""``shifteradm doctor`` on the box's nodes: it passes there, and fails with one clear line
each when /dev/fuse is 0600, when the configuration has an unknown key, or when the gateway
is down; leftovers of a dead job are reported; ``--json`` carries every finding."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Box

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the node check runs as root")

SHIFTERADM = str(Path(sys.executable).parent / "shifteradm")


def doctor(box: Box, *args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    argv = [SHIFTERADM, "doctor", "--config", str(config or box.shifter_config),
            "--slurm-conf", str(box.slurm_conf), *args]  # fmt: skip
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("node", ["n1", "n2", "n3"])
def test_the_box_nodes_pass(box: Box, node: str):
    result = doctor(box, "--node", node)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith(f"node {node}: passed")
    assert "ERROR" not in result.stdout and result.stderr == ""


def test_json_carries_every_finding(box: Box):
    result = doctor(box, "--node", "n1", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["node"] == "n1"
    checks = {f["check"] for f in report["findings"]}
    assert {"kernel", "fuse", "config", "plugin", "store", "gateway", "run_dir"} <= checks
    assert all(f["level"] == "ok" for f in report["findings"] if f["check"] == "gateway")


def test_dev_fuse_0600_fails(box: Box):
    mode = os.stat("/dev/fuse").st_mode & 0o7777
    os.chmod("/dev/fuse", 0o600)
    try:
        result = doctor(box, "--node", "n1")
    finally:
        os.chmod("/dev/fuse", mode)
    assert result.returncode == 1
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert line.startswith("ERROR   fuse: /dev/fuse is mode 0600") and "chmod 0666" in line


def test_an_unknown_key_fails(box: Box, tmp_path: Path):
    config = tmp_path / "shifter.yaml"
    config.write_text(box.shifter_config.read_text() + "no_such_setting: 1\n")
    result = doctor(box, "--node", "n1", config=config)
    assert result.returncode == 1
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert "config:" in line and "no_such_setting" in line


def test_a_gateway_that_is_down_fails(box: Box, tmp_path: Path):
    config = tmp_path / "shifter.yaml"
    text = box.shifter_config.read_text()
    assert "http://127.0.0.1:7080" in text
    config.write_text(text.replace("http://127.0.0.1:7080", "http://127.0.0.1:9"))
    result = doctor(box, "--node", "n1", config=config)
    assert result.returncode == 1
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert line.startswith("ERROR   gateway: http://127.0.0.1:9")


def test_leftovers_of_a_dead_job_are_reported(box: Box):
    from shifter_core import config as config_module

    run_dir = Path(config_module.load(str(box.shifter_config)).runtime.run_dir)
    made = not run_dir.exists()
    left = run_dir / "n2" / "999999"
    left.mkdir(parents=True)
    try:
        result = doctor(box, "--node", "n2")
    finally:
        shutil.rmtree(run_dir / "n2" / "999999")
        if made:
            shutil.rmtree(run_dir)
    assert result.returncode == 0, result.stdout  # a warning: no job needs it gone
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("WARNING")]
    assert f"leftovers: {left}: job 999999 is no longer on this node" in line
