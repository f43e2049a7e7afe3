"""The prolog trusts nothing the submission side sent (``SPANK_SHIFTER_*``: the user's srun
or sbatch, which the user can replace), and a job's error never fails it.

These call the prolog as slurmd would (root, its environment), with what a user who
replaced the submission side could send: another user's private image, an id that is not
the image named, malformed values. Each is recorded as the job's error before anything is
staged; only a fault of the node (no loop device) is raised.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from shifter_core.config import load
from shifter_core.errors import NodeFault
from shifter_core.image.store import (
    ACL_GROUP,
    ACL_USER,
    ACL_XATTR,
    Acl,
    ImageMetadata,
    ImageStore,
    decode_posix_acl,
)
from shifter_core.jobroot import read_record
from shifter_core.runtime import loop, privileged
from shifter_core.slurm import container
from shifter_core.slurm import jobscript as prolog

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the prolog runs as root")

ALICE, BOB = 1001, 1002
PRIVATE = "a" * 64
PUBLIC = "b" * 64


@pytest.fixture
def site(tmp_path: Path):
    store = ImageStore(tmp_path / "images")
    for image_id, source, acl in (
        (PRIVATE, "docker.io/library/secret:latest", Acl(users=(ALICE,))),
        (PUBLIC, "docker.io/library/busybox:latest", None),
    ):
        partial = store.new_partial(image_id)
        partial.write_bytes(b"not a squashfs")
        store.publish(
            ImageMetadata(image_id, source, "sha256:" + image_id, "linux/amd64", acl=acl), partial
        )
    config = tmp_path / "shifter.yaml"
    config.write_text(
        f"image_path: {tmp_path / 'images'}\n"
        f"runtime: {{run_dir: {tmp_path / 'run'}}}\n"
        f"slurm: {{node_cache: {tmp_path / 'cache'}/%n}}\n"
    )
    config.chmod(0o644)
    return load(str(config), privileged=True), tmp_path


def environ(uid: int, **spank: str) -> dict[str, str]:
    env = {
        "SLURMD_NODENAME": "n1",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_UID": str(uid),
        "SLURM_JOB_GID": str(uid),
    }
    env.update({f"SPANK_SHIFTER_{k.upper()}": v for k, v in spank.items()})
    return env


HOSTILE = [
    # bob names alice's private image by id
    (BOB, {"image": PRIVATE, "imagerequest": f"id:{PRIVATE}"}, "no longer in the image store"),
    # bob names a public image but carries the private image's id
    (BOB, {"image": PRIVATE, "imagerequest": "docker:busybox:latest"}, "no longer"),
    (BOB, {"image": "../../etc/passwd", "imagerequest": "busybox"}, "no valid image id"),
    (BOB, {"image": PUBLIC, "imagerequest": "bad image!"}, "invalid image reference"),
    (BOB, {"image": PUBLIC, "imagerequest": "busybox", "volume": "/tmp:/x\n/y"}, "volume"),
    (BOB, {"image": PUBLIC, "imagerequest": "busybox", "volume": "/tmp:/" + "a" * 5000}, "volume"),
    (BOB, {"image": PUBLIC, "imagerequest": "busybox", "module": "a,,b"}, "module"),
]


@pytest.mark.parametrize("uid, spank, expected", HOSTILE)
def test_hostile_requests_are_the_jobs_error_and_stage_nothing(site, uid, spank, expected):
    config, base = site
    problem = prolog.prolog(config, environ(uid, **spank))
    assert problem is not None and expected in problem, problem
    job_dir = base / "run" / "n1" / "77"
    record = read_record(str(job_dir))
    assert record is not None and record.error == problem and not record.root
    # root's, nothing for others; the ACL names the job's user alone (group bits: its mask)
    assert job_dir.stat().st_uid == 0 and stat.S_IMODE(job_dir.stat().st_mode) & 0o007 == 0
    named = [(tag, uid) for tag, _perm, uid in decode_posix_acl(os.getxattr(job_dir, ACL_XATTR))]
    assert [u for tag, u in named if tag in (ACL_USER, ACL_GROUP)] == [uid]
    # nothing staged or copied: the node cache holds no image
    assert not list((base / "cache").glob("n1/*.squashfs"))
    assert not (job_dir / "root").exists()
    assert prolog.epilog(config, "n1", "77") == [] and not job_dir.exists()


def test_an_unexpected_exception_is_the_jobs_error(site, monkeypatch):
    config, _base = site

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(container, "container_plan", broken)
    problem = prolog.prolog(config, environ(ALICE, image=PUBLIC, imagerequest="busybox"))
    assert problem is not None and "internal error (RuntimeError)" in problem
    assert prolog.epilog(config, "n1", "77") == []


def test_no_loop_device_is_a_fault_of_the_node(site, monkeypatch):
    """The one kind of error that may fail the prolog, with a line that says what to fix."""
    _config, base = site
    monkeypatch.setattr(loop, "LOOP_CONTROL", str(base / "no-loop-control"))
    with pytest.raises(NodeFault, match="load the loop module"):
        privileged.mount_image_loop(str(base / "images" / f"{PUBLIC}.squashfs"), str(base), [])


def test_a_full_run_directory_is_the_jobs_error(site):
    """ENOSPC in the run directory fails the job with a message, not the prolog."""
    config, base = site
    run = base / "run"
    run.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=3", "full", str(run)], check=True
    )
    try:
        (run / "n1").mkdir()
        (run / "filler").mkdir()
        problem = prolog.prolog(config, environ(ALICE, image=PUBLIC, imagerequest="busybox"))
        assert problem is not None and "No space left on device" in problem, problem
        assert prolog.epilog(config, "n1", "77") == []
    finally:
        subprocess.run(["umount", str(run)], check=True)
