"""While alice's job runs her private image with her volume, bob reads not a byte of either
through anything on the node: the prepared root and its mounts, the node cache, the image
store, /proc of her tasks. Alice herself still enters her job's root with ``shifter``."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.slurm import SLURM_CONF, run_as, wait_for_idle_cluster
from tests.integration.test_slurm_containers import (
    NODE_CACHE,
    RUN_DIR,
    STORE,
    _private_test_image,
    leftovers,
)

pytestmark = pytest.mark.usefixtures("box")


@pytest.fixture
def alice_volume() -> Iterator[Path]:
    """A directory of alice's own (0700) holding a secret."""
    path = Path(tempfile.mkdtemp(prefix="shifter-alice-vol-", dir="/var/tmp"))
    secret = f"alice-secret-{uuid.uuid4().hex}"
    (path / "secret").write_text(secret + "\n")
    uid = int(run_as(["id", "-u"]).stdout)
    gid = int(run_as(["id", "-g"]).stdout)
    for p in (path, path / "secret"):
        os.chown(p, uid, gid)
    path.chmod(0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _wait_for_root(job: str, timeout: float = 60) -> Path:
    root = RUN_DIR / "n1" / job / "root"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (root / "bin").exists() and (root / "data" / "secret").exists():
            return root
        time.sleep(0.2)
    raise TimeoutError(f"no prepared root for job {job}")


def _wait_for_task(timeout: float = 60) -> list[str]:
    """The pids of the job's task (it starts after the prolog prepared the root)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = subprocess.run(
            ["pgrep", "-u", "alice", "-f", "busybox sleep 60"], capture_output=True, text=True
        ).stdout.split()
        if pids:
            return pids
        time.sleep(0.2)
    raise TimeoutError("the job's task never started")


def test_bob_cannot_read_alices_private_image_or_volumes(alice_volume):
    name = _private_test_image()
    pulled = run_as(["shifterimg", "pull", "-u", "alice", name], timeout=300)
    assert pulled.returncode == 0, pulled.stderr
    image_id = run_as(["shifterimg", "lookup", name]).stdout.strip()
    marker = f"library/{name}"
    submitted = run_as(
        [
            "sbatch", "--parsable", "-N1", "-w", "n1", "-o", "/dev/null",
            f"--image={name}", f"--volume={alice_volume}:/data",
            "--wrap", f"srun --image={name} /bin/busybox sleep 60",
        ]
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    try:
        root = _wait_for_root(job)
        secret = (alice_volume / "secret").read_text()
        # alice reaches her own root (her shifter's fast path) ...
        mine = run_as(["cat", str(root / "data" / "secret")])
        assert mine.stdout == secret, mine.stderr
        # ... bob reaches nothing of it, by any path on the node
        pids = _wait_for_task()
        paths = [
            RUN_DIR / "n1" / job,
            root / "etc" / "shifter-test-image",
            root / "data" / "secret",
            root / "tmp",
            STORE / f"{image_id}.squashfs",
            NODE_CACHE / "n1" / f"{image_id}.squashfs",
            *(Path(f"/proc/{pid}/root/data/secret") for pid in pids),
            *(Path(f"/proc/{pid}/root/etc/shifter-test-image") for pid in pids),
        ]
        for path in paths:
            probe = run_as(["cat", str(path)], user="bob")
            assert probe.returncode != 0 and probe.stdout == "", path
            assert "Permission denied" in probe.stderr or "Is a directory" in probe.stderr, (
                path,
                probe.stderr,
            )
        listing = run_as(["ls", str(RUN_DIR / "n1" / job)], user="bob")
        assert "Permission denied" in listing.stderr
        for where in (RUN_DIR, NODE_CACHE, STORE, alice_volume.parent):
            found = run_as(
                ["grep", "-r", "-l", "-s", "-e", secret.strip(), "-e", marker, str(where)],
                user="bob",
                timeout=120,
            )
            assert found.stdout == "", (where, found.stdout)
    finally:
        subprocess.run(["scancel", job], env={"SLURM_CONF": str(SLURM_CONF)}, check=False)
        wait_for_idle_cluster(timeout=120)
    assert leftovers() == []
