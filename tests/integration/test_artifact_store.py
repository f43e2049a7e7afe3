"""The box with its nodes switched to the artifact registry (``slurm.image_source:
registry``), the acceptance of issue 12: the gateway publishes every image to the box's
artifact registry (127.0.0.1:5002, htpasswd), the nodes' ``image_path`` points at a
directory that does not exist (the store is not there for them), and ``srun -N3
--image=busybox`` works, each node reading the image once from the registry; a private
image runs for its owner only, and users cannot read the registry."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from shifter_core.config import load
from shifter_core.image.store import ImageStore
from shifter_core.slurm.container import node_artifacts

from .conftest import Box
from .slurm import OTHER_USER, USER, run_as, wait_for_idle_cluster
from .test_slurm_containers import BUSYBOX_TEXT, NODE_CACHE, _private_test_image, pull

pytestmark = pytest.mark.usefixtures("box")

LOGS = Path(__file__).resolve().parents[2] / ".box" / "log"
ARTIFACTS_LOG = LOGS / "registry-artifacts.log"  # the registry the gateway publishes to
TOKEN_FRONT_LOG = LOGS / "registry-artifacts-token.log"  # its storage, as the mirror reads it
MIRROR_LOG = LOGS / "registry-mirror.log"  # the box's rack mirror


def blob_gets(digest: str, log: Path = ARTIFACTS_LOG) -> int:
    """Blob GETs a registry answered with 200 (its access log)."""
    pattern = re.compile(rf'"GET /v2/[^ ]*/blobs/{re.escape(digest)} HTTP/[0-9.]+" 200 ')
    return len(pattern.findall(log.read_text(errors="replace")))


def write_config(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    partial.write_text(text)
    partial.chmod(0o644)
    partial.replace(path)


@contextlib.contextmanager
def nodes_read_the_registry(box: Box, through: str = "") -> Iterator[Path]:
    """The box's shifter.yaml as nodes without the store have it (the gateway keeps the
    configuration it started with), reading ``through`` a mirror if given; restored
    afterwards."""
    original = box.shifter_config.read_text()
    data = yaml.safe_load(original)
    data.setdefault("slurm", {})["image_source"] = "registry"
    if through:
        data.setdefault("artifacts", {})["node_registry"] = through
    nowhere = box.root / "no-store-on-the-nodes"
    data["image_path"] = str(nowhere)
    write_config(box.shifter_config, yaml.safe_dump(data))
    try:
        assert not nowhere.exists()
        yield nowhere
    finally:
        write_config(box.shifter_config, original)


def drop_from_node_caches(image_id: str) -> None:
    wait_for_idle_cluster()
    for copy in NODE_CACHE.glob(f"*/{image_id}.squashfs"):
        copy.unlink()


def test_the_gateway_publishes_each_image_as_an_artifact(box: Box):
    image_id = pull("busybox")
    config = load(str(box.shifter_config), privileged=True)
    published = node_artifacts(config).metadata(image_id)
    assert published is not None
    assert published == ImageStore(box.image_path).get(image_id)


def test_jobs_run_from_the_registry_without_the_store(box: Box):
    image_id = pull("busybox")
    sha256 = ImageStore(box.image_path).get(image_id).sha256  # type: ignore[union-attr]
    drop_from_node_caches(image_id)
    before = blob_gets(f"sha256:{sha256}")
    with nodes_read_the_registry(box):
        result = run_as(["srun", "-N3", "--image=busybox", "cat", "/etc/shifter-test-image"])
        assert result.returncode == 0, result.stderr
        assert result.stdout.split("\n")[:3] == [BUSYBOX_TEXT] * 3
        assert blob_gets(f"sha256:{sha256}") == before + 3  # once per node
        again = run_as(["srun", "-N3", "--image=busybox", "true"])
        assert again.returncode == 0, again.stderr
        assert blob_gets(f"sha256:{sha256}") == before + 3  # the node caches serve it now
    for node in box.nodes:
        assert (NODE_CACHE / node / f"{image_id}.squashfs").stat().st_size > 0


def test_a_private_image_stays_private(box: Box):
    name = _private_test_image()
    module = box.module
    user, password = module.push_credentials()
    ref = f"{module.REGISTRY_PUSH_ADDR}/library/{name}:latest"
    login = run_as(["shifterimg", "login", "-u", user, "--password-stdin",
                    module.REGISTRY_PUSH_ADDR], input_text=password + "\n")  # fmt: skip
    assert login.returncode == 0, login.stderr
    image_id = pull(ref)
    meta = ImageStore(box.image_path).get(image_id)
    assert meta is not None and meta.private
    with nodes_read_the_registry(box):
        cat = ["/bin/busybox", "cat", "/etc/shifter-test-image"]
        own = run_as(["srun", "-N3", f"--image={ref}", *cat])
        assert own.returncode == 0, own.stderr
        assert own.stdout.split() == [f"library/{name}"] * 3
        theirs = run_as(["srun", "-N1", f"--image=id:{image_id}", "true"], user=OTHER_USER)
        assert theirs.returncode != 0
        assert "not found" in theirs.stderr or "not shared" in theirs.stderr, theirs.stderr
    # Users have no credential for the registry, and cannot read the nodes'.
    node_credential = load(str(box.shifter_config)).artifacts.node_credentials
    for who in (USER, OTHER_USER):
        read = run_as(["cat", node_credential], user=who)
        assert read.returncode != 0 and "Permission denied" in read.stderr
        anonymous = run_as(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
             f"http://127.0.0.1:5002/v2/shifter/images/manifests/{image_id}"],
            user=who,
        )  # fmt: skip
        assert anonymous.stdout == "401"
    assert os.stat(node_credential).st_mode & 0o777 == 0o600


def test_shifter_on_a_node_uses_the_node_cache_copy(box: Box):
    """Nodes without the store: `shifter` runs images the node has a copy of (the prolog
    of a job asking for it made one) and says what to do for others."""
    pull("busybox")
    other = pull("mpich-hello")
    drop_from_node_caches(other)
    with nodes_read_the_registry(box):
        cat = ["shifter", "--image=busybox", "cat", "/etc/shifter-test-image"]
        inside = run_as(["srun", "-N1", "-w", "n1", "--image=busybox", *cat])
        assert inside.returncode == 0 and inside.stdout.strip() == BUSYBOX_TEXT, inside.stderr
        copy = run_as(["srun", "-N1", "-w", "n1", *cat])  # no --image: the cached copy
        assert copy.returncode == 0 and copy.stdout.strip() == BUSYBOX_TEXT, copy.stderr
        missing = run_as(["srun", "-N1", "-w", "n1", "shifter", "--image=mpich-hello", "true"])
        assert missing.returncode != 0
        assert "is not on this node" in missing.stderr and "srun --image" in missing.stderr


def test_a_rack_mirror_serves_the_nodes(box: Box):
    """Nodes reading the box's rack mirror (artifacts.node_registry): a job on cold nodes
    makes the mirror fetch the image from the artifact storage (distribution 2.8 does not
    merge simultaneous fetches: at most once per node, plus one for its own storage); the
    next job on cold nodes reads nothing from the storage: the mirror serves it."""
    from .test_pull_on_submit import push_image

    name, marker = push_image()
    image_id = pull(name)
    digest = f"sha256:{ImageStore(box.image_path).get(image_id).sha256}"  # type: ignore[union-attr]
    mirror = f"http://{box.module.MIRROR_ADDR}"
    with nodes_read_the_registry(box, through=mirror):
        first = run_as(["srun", "-N3", f"--image={name}", "cat", "/marker"])
        assert first.returncode == 0, first.stderr
        assert first.stdout.split("\n")[:3] == [marker] * 3
        fetched = blob_gets(digest, TOKEN_FRONT_LOG)
        assert 1 <= fetched <= 4 and blob_gets(digest, ARTIFACTS_LOG) == 0
        drop_from_node_caches(image_id)
        served = blob_gets(digest, MIRROR_LOG)
        again = run_as(["srun", "-N3", f"--image={name}", "cat", "/marker"])
        assert again.returncode == 0, again.stderr
        assert blob_gets(digest, MIRROR_LOG) == served + 3  # once per node
        assert blob_gets(digest, TOKEN_FRONT_LOG) == fetched  # nothing more from storage
    # The mirror takes the nodes' credential and no other.
    anonymous = run_as(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                        f"{mirror}/v2/shifter/images/manifests/{image_id}"])  # fmt: skip
    assert anonymous.stdout == "401"
