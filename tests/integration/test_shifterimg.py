"""``shifterimg`` against the box's own image gateway, as the box's test users."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from shifter_core.cli.shifterimg import _human_size
from shifter_core.gateway.models import ImageEntry
from tests.integration.slurm import OTHER_USER, USER, run_as

pytestmark = pytest.mark.usefixtures("box")


def test_pull_busybox_then_images_lists_it_ready(box) -> None:
    pull = run_as(["shifterimg", "pull", "busybox"])
    assert pull.returncode == 0, pull.stdout + pull.stderr
    match = re.search(
        r"image docker\.io/library/busybox:latest is READY: ([0-9a-f]{64})", pull.stdout
    )
    assert match, pull.stdout
    image_id = match.group(1)
    images = run_as(["shifterimg", "images"])
    assert images.returncode == 0, images.stderr
    line = (
        rf"^READY\s+{image_id[:12]}\s+\S+\s+(\S+)\s+no\s+linux/amd64\s+"
        r"docker\.io/library/busybox:latest$"
    )
    listed = re.search(line, images.stdout, re.M)
    assert listed, images.stdout
    for user in (USER, OTHER_USER):
        lookup = run_as(["shifterimg", "lookup", "busybox"], user=user)
        assert lookup.returncode == 0 and lookup.stdout.strip() == image_id, lookup.stderr
    squashfs = Path(box.image_path) / f"{image_id}.squashfs"
    st = squashfs.stat()
    assert st.st_size > 0 and st.st_mode & 0o777 == 0o644
    # The listing's size is the squashfs's, in the table (like ls -h) and, exactly, in JSON.
    assert listed.group(1) == _human_size(st.st_size), images.stdout
    as_json = run_as(["shifterimg", "images", "--json"])
    assert as_json.returncode == 0, as_json.stderr
    entries = [e for e in json.loads(as_json.stdout) if e["id"] == image_id]
    assert entries and all(e["size"] == st.st_size for e in entries), as_json.stdout
    assert all(set(e) == set(ImageEntry._fields) for e in entries), as_json.stdout
    # every field the gateway knows: the store's record, as on disk (<id>.json)
    stored = json.loads((Path(box.image_path) / f"{image_id}.json").read_text())
    for entry in entries:
        assert entry["record"]["id"] == image_id and entry["record"]["env"] == stored["env"]
        assert entry["record"]["digest"] == stored["digest"]
    assert pwd.getpwuid(st.st_uid).pw_name == "shifter"
    assert (Path(box.image_path) / f"{image_id}.json").exists()


def test_the_gateway_runs_as_the_service_user(box) -> None:
    pid = int((box.root / "run" / "gateway.pid").read_text())
    status = Path(f"/proc/{pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", status, re.M)
    assert uids is not None
    shifter = pwd.getpwnam("shifter").pw_uid
    assert {int(u) for u in uids.groups()} == {shifter}
    assert re.search(r"^CapEff:\s+0+$", status, re.M)
    config = box.shifter_config.stat()
    assert config.st_uid == 0 and not config.st_mode & 0o022
    assert (box.log_dir / "gateway.log").exists()
    assert os.stat(box.root / "gateway").st_uid == shifter


def test_failures_exit_non_zero_with_the_gateways_message(box) -> None:
    cases = [
        (
            # The box registry itself (the docker.io mirror would go on to docker.io, which
            # this machine cannot reach: that takes the registry client's retries).
            ["pull", "127.0.0.1:5000/library/busybox:lates"],
            "image '127.0.0.1:5000/library/busybox:lates' not found in registry 127.0.0.1:5000; "
            "did you mean 127.0.0.1:5000/library/busybox:latest?",
        ),
        (["lookup", "no-such-image:1"], "image 'no-such-image:1' not found on the image gateway"),
        (["pull", "Bad Image"], "invalid image reference"),
        (["rm", "busybox"], "only image gateway admins may remove images; user alice is not one"),
        (["expire", "--days", "1"], "only image gateway admins may expire images"),
        (["import", "/etc/hostname", "x:1"], "user alice may not import images"),
        (
            ["--gateway", "http://127.0.0.1:9", "images"],
            "cannot reach the image gateway at http://127.0.0.1:9",
        ),
    ]
    for argv, message in cases:
        result = run_as(["shifterimg", *argv])
        assert result.returncode == 1, (argv, result.stdout, result.stderr)
        assert result.stderr.startswith("shifterimg: ") and message in result.stderr, (
            argv,
            result.stderr,
        )
    usage = run_as(["shifterimg", "frobnicate"])
    assert usage.returncode == 2


@pytest.mark.skipif(shutil.which("script") is None, reason="script(1) is not installed")
def test_pull_on_a_terminal_shows_a_progress_bar(box) -> None:
    # script(1) gives shifterimg a pseudo-terminal: the rich progress display is used.
    result = run_as(["script", "-qec", "shifterimg pull busybox", "/dev/null"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "READY" in result.stdout and "\x1b[" in result.stdout


def test_status_lists_the_callers_jobs(box) -> None:
    run_as(["shifterimg", "pull", "busybox"])
    result = run_as(["shifterimg", "status"])
    assert result.returncode == 0, result.stderr
    match = re.search(
        r"^([0-9a-f]{16})\s+READY\s+.*docker\.io/library/busybox:latest", result.stdout, re.M
    )
    assert match, result.stdout
    job = match.group(1)
    single = subprocess.run(
        [
            "runuser",
            "-u",
            USER,
            "--",
            "env",
            "-i",
            f"SHIFTER_CONFIG={box.shifter_config}",
            str(box.checkout / ".venv" / "bin" / "shifterimg"),
            "status",
            job,
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd="/tmp",
    )
    assert single.returncode == 0 and re.search(r"^state:\s+READY$", single.stdout, re.M)
