"""The gateway may go down: images already in the store keep working, per their ACL.

As ordinary users against the box, with the box's gateway stopped for the length of one
test (always started again): ``shifter``, ``srun --image`` and ``sbatch --image`` use the
image store, say so in one warning line, and never show a Python traceback. A private
image of bob's in the store (its files readable by its ACL only) is what made ``shifter``
crash with a traceback for everyone else before.

The submission side also never takes the job's ``SHIFTER_IMAGE`` on trust: a forged id
in srun's environment does not become the step's image.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shifter_core.image.store import Acl, set_image_access

from ..integration.slurm import OTHER_USER, USER, jobs_named, run_as, unique_name

GATEWAY_URL = "http://127.0.0.1:7080"
WARNING = f"warning: the image gateway at {GATEWAY_URL} cannot be reached; using image"
RUN_DIR = Path("/run/shifter-box")


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    for stream in (result.stdout, result.stderr):
        assert "Traceback" not in stream, stream
        assert 'File "' not in stream, stream


def leftovers(marker: str) -> list[str]:
    """Mounts and processes that mention ``marker`` (a test's unique word)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        found = [line.strip() for line in fh if marker in line]
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=False)
    found += [line for line in ps.stdout.splitlines() if marker in line and "ps -eo" not in line]
    return found


def wait_for_no_job_dirs(job: str, timeout: float = 30) -> list[Path]:
    """The job's directories below the box's run directory, once its epilogs had time."""
    deadline = time.monotonic() + timeout
    while (left := list(RUN_DIR.glob(f"*/{job}"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@dataclass(frozen=True)
class StoreImages:
    """busybox (public, pulled through the gateway) and a private image of bob's."""

    busybox: str  # id
    private: str  # id
    private_name: str  # what bob asks for: --image=NAME


@pytest.fixture(scope="module")
def images(box) -> Iterator[StoreImages]:
    """busybox pulled through the gateway, and a private copy of it, readable by bob only,
    written into the store as the gateway writes private images (POSIX ACL on its files)."""
    pull = run_as(["shifterimg", "pull", "busybox"], timeout=300)
    assert pull.returncode == 0, pull.stderr
    busybox = pull.stdout.split()[-1]
    store = Path(box.image_path)
    meta = json.loads((store / f"{busybox}.json").read_text())
    name = f"shifter-security-private-{uuid.uuid4().hex[:8]}"
    private = hashlib.sha256(name.encode()).hexdigest()
    bob = pwd.getpwnam(OTHER_USER)
    service = pwd.getpwnam("shifter")
    acl = Acl(users=(bob.pw_uid,), groups=())
    meta.update(
        id=private,
        source=f"docker.io/library/{name}:latest",
        acl={"users": list(acl.users), "groups": []},
    )
    squashfs, record = store / f"{private}.squashfs", store / f"{private}.json"
    shutil.copyfile(store / f"{busybox}.squashfs", squashfs)
    record.write_text(json.dumps(meta, indent=2, sort_keys=True))
    for path in (squashfs, record):
        os.chown(path, service.pw_uid, service.pw_gid)
        set_image_access(path, acl)
    try:
        yield StoreImages(busybox, private, name)
    finally:
        record.unlink(missing_ok=True)
        squashfs.unlink(missing_ok=True)


@pytest.fixture
def gateway_down(box) -> Iterator[None]:
    """The box's gateway stopped for one test (seconds), and always started again."""
    with box.module.gateway_stopped():
        yield
    assert box.module.gateway_ok()


def test_alice_cannot_read_bobs_private_record(box, images):
    """The premise: the store holds a record that alice may not even read."""
    result = run_as(["cat", str(Path(box.image_path) / f"{images.private}.json")])
    assert result.returncode != 0


def test_shifter_uses_the_store_when_the_gateway_is_down(images, gateway_down):
    marker = f"gwdown-{uuid.uuid4().hex[:8]}"
    # A unique option: the C launcher has no recipe for it, so the image is resolved now.
    argv = ["shifter", "--image=busybox", f"--env=M={marker}", "sh", "-c", "echo $M $SHIFTER_IMAGE"]
    result = run_as(argv)
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [marker, images.busybox]
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith(f"shifter: {WARNING} busybox ({images.busybox[:12]})")
    assert leftovers(marker) == []
    for argv in (["shifter", "--image=busybox", "true"], ["srun", "--image=busybox", "true"]):
        result = run_as(argv)  # the acceptance's words (the launcher may replay a recipe)
        no_traceback(result)
        assert result.returncode == 0, result.stderr


def test_private_images_follow_their_acl_when_the_gateway_is_down(images, gateway_down):
    marker = f"gwdown-{uuid.uuid4().hex[:8]}"
    argv = ["shifter", f"--image={images.private_name}", f"--env=M={marker}", "sh", "-c", "echo $M"]
    mine = run_as(argv, user=OTHER_USER)
    no_traceback(mine)
    assert mine.returncode == 0, mine.stderr
    assert mine.stdout.split() == [marker]
    assert f"{WARNING} {images.private_name} ({images.private[:12]})" in mine.stderr
    theirs = run_as(argv, user=USER)
    no_traceback(theirs)
    assert theirs.returncode == 125
    assert theirs.stdout == ""
    assert theirs.stderr.strip() == (
        f"shifter: image {images.private_name!r} is not in the image store, and the image "
        f"gateway at {GATEWAY_URL} cannot be reached; try again later, or tell your site's "
        "support that the gateway is down"
    )
    by_id = run_as(["shifter", f"--image=id:{images.private}", "true"], user=USER)
    no_traceback(by_id)
    assert by_id.returncode == 125
    assert images.private not in by_id.stderr.replace(f"id:{images.private}", "")
    assert leftovers(marker) == []


def test_unknown_image_when_the_gateway_is_down(images, gateway_down):
    result = run_as(["shifter", "--image=no-such-image:1", "true"])
    no_traceback(result)
    assert result.returncode == 125
    assert "is not in the image store, and the image gateway" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    for argv in (["pull", "busybox"], ["images"], ["lookup", "busybox"]):
        result = run_as(["shifterimg", *argv])
        no_traceback(result)
        assert result.returncode == 1
        assert result.stderr.startswith(
            f"shifterimg: cannot reach the image gateway at {GATEWAY_URL}: "
        ), result.stderr
        assert result.stderr.rstrip().endswith(
            "is shifter-gateway running? (gateway.url in the site config)"
        )


def test_srun_and_sbatch_use_the_store_when_the_gateway_is_down(images, gateway_down, tmp_path):
    name = unique_name("gwdown")
    srun = run_as(["srun", "-J", name, "-N1", "--image=busybox", "sh", "-c", "echo $SHIFTER_IMAGE"])
    no_traceback(srun)
    assert srun.returncode == 0, srun.stderr
    assert srun.stdout.split() == [images.busybox]
    assert WARNING in srun.stderr
    (job,) = jobs_named(name)
    assert wait_for_no_job_dirs(job) == []
    name = unique_name("gwdown")
    denied = run_as(["srun", "-J", name, "-N1", f"--image={images.private_name}", "true"])
    no_traceback(denied)
    assert denied.returncode != 0
    assert "is not in the image store, and the image gateway" in denied.stderr
    assert jobs_named(name) == []  # refused at submission: no job at all
    out = Path("/tmp") / f"gwdown-{uuid.uuid4().hex[:8]}.out"
    try:
        batch = run_as(
            [
                "sbatch", "--wait", "-N1", "-o", str(out), "--image=busybox", "--wrap",
                "srun --image=busybox sh -c 'echo step $SHIFTER_IMAGE'; echo batch $SHIFTER_IMAGE",
            ],
            timeout=120,
        )  # fmt: skip
        no_traceback(batch)
        assert batch.returncode == 0, batch.stderr
        assert WARNING in batch.stderr
        text = out.read_text()
        no_traceback(subprocess.CompletedProcess([], 0, text, ""))
        assert f"step {images.busybox}" in text and f"batch {images.busybox}" in text, text
        job = batch.stdout.split()[-1]
        assert wait_for_no_job_dirs(job) == []
    finally:
        out.unlink(missing_ok=True)


def test_a_forged_image_id_in_the_environment_is_not_trusted(images):
    """alice claims that her job's busybox is bob's private image: srun looks it up."""
    result = run_as(
        ["srun", "-N1", "--image=busybox", "sh", "-c", "echo $SHIFTER_IMAGE"],
        SHIFTER_IMAGE=images.private,
        SHIFTER_IMAGEREQUEST="docker:busybox",
    )
    no_traceback(result)
    assert images.private not in result.stdout
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [images.busybox]


def test_a_forged_image_id_is_not_trusted_when_the_gateway_is_down(images, gateway_down):
    result = run_as(
        ["srun", "-N1", "--image=busybox", "sh", "-c", "echo $SHIFTER_IMAGE"],
        SHIFTER_IMAGE=images.private,
        SHIFTER_IMAGEREQUEST="docker:busybox",
    )
    no_traceback(result)
    assert images.private not in result.stdout
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [images.busybox]


@pytest.mark.parametrize(
    "text",
    [
        "busybox",
        "busybox:1.36",
        "library/busybox",
        "docker.io/library/busybox:latest",
        "someone/app",
        "ghcr.io/org/app:2",
        "localhost/app",
        "127.0.0.1:5000/library/busybox",
        "busybox@sha256:" + "a" * 64,
        "library/library/busybox",
    ],
)
def test_the_submission_check_names_sources_as_the_gateway_does(tmp_path, monkeypatch, text):
    """The verified shortcut of slurm.submit.resolve_image accepts a job's recorded id for exactly
    the source DockerReference gives ``text`` (anything else would go to the gateway)."""
    from shifter_core.config_cache import view
    from shifter_core.reference import ImageRequest
    from shifter_core.slurm import submit as spank

    request = str(ImageRequest.parse(text, "docker"))
    image_id = "c" * 64
    record = {"id": image_id, "source": str(ImageRequest.parse(text, "docker").docker)}
    (tmp_path / f"{image_id}.json").write_text(json.dumps(record))
    (tmp_path / f"{image_id}.squashfs").write_bytes(b"")
    site = {
        "image_path": str(tmp_path),
        "default_image_type": "docker",
        "runtime": {},
        "gateway": {"url": "http://127.0.0.1:9", "user": "shifter"},  # nothing listens there
    }
    monkeypatch.setattr(spank.state, "config", view(site))
    monkeypatch.setenv("SHIFTER_IMAGE", image_id)
    monkeypatch.setenv("SHIFTER_IMAGEREQUEST", request)
    assert spank.resolve_image(request) == image_id
    for other in ("docker.io/library/other:latest", record["source"] + "x"):
        (tmp_path / f"{image_id}.json").write_text(json.dumps({**record, "source": other}))
        with pytest.raises(Exception) as err:  # to the gateway, which is not there
            spank.resolve_image(request)
        assert "image gateway" in str(err.value)
