"""The prolog with ``slurm.image_source: registry``: the node reads images from the artifact
registry with a credential only root can read, never from the store, and applies each
image's ACL before a byte of its squashfs is fetched.

The prolog is called as slurmd would (root, its environment), against a real
``docker-registry`` with htpasswd auth, with a store directory the node cannot see (the
configured ``image_path`` does not exist).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shifter_core.config import Config, load
from shifter_core.errors import NodeFault
from shifter_core.image.artifact import ArtifactRegistry
from shifter_core.image.store import Acl, ImageMetadata, ImageStore
from shifter_core.jobroot import read_record
from shifter_core.slurm import jobscript as prolog
from tests.fixtures.registries import RegistryProcess, free_port, start_registry

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the prolog runs as root"),
    pytest.mark.skipif(shutil.which("docker-registry") is None, reason="needs docker-registry"),
]

ALICE, BOB = 1001, 1002
PRIVATE = "a" * 64
PUBLIC = "b" * 64
USERS = {"gateway": "gateway-secret", "node": "node-secret"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    reg = start_registry(tmp_path_factory.mktemp("artifact-prolog"), users=USERS)
    yield reg
    reg.stop()


@pytest.fixture(autouse=True)
def run_dir_unmounted(tmp_path: Path) -> Iterator[None]:
    """The prolog makes the run directory a private mount point (as on a node, where it
    stays one); unmount it after each test."""
    yield
    run = tmp_path / "run"
    if any(line.split()[1] == str(run) for line in Path("/proc/mounts").read_text().splitlines()):
        subprocess.run(["umount", "-l", str(run)], check=True)


@pytest.fixture
def site(registry: RegistryProcess, tmp_path: Path) -> tuple[Config, Path, dict[str, str]]:
    """Two images published as artifacts (alice's private one, a public one); a node
    configuration in registry mode whose image_path does not exist."""
    store = ImageStore(tmp_path / "gateway-store")
    gateway = ArtifactRegistry(registry.url, "shifter/images", ("gateway", USERS["gateway"]))
    digests = {}
    for image_id, source, acl in (
        (PRIVATE, "docker.io/library/secret:latest", Acl(users=(ALICE,))),
        (PUBLIC, "docker.io/library/busybox:latest", None),
    ):
        partial = store.new_partial(image_id)
        partial.write_bytes(f"not a squashfs: {image_id}".encode() * 1000)
        meta = store.publish(
            ImageMetadata(image_id, source, "sha256:" + image_id, "linux/amd64", acl=acl), partial
        )
        gateway.publish(meta, store.image_file(image_id))
        digests[image_id] = f"sha256:{meta.sha256}"
    credential = tmp_path / "node.credential"
    credential.write_text(f"node:{USERS['node']}\n")
    credential.chmod(0o600)
    return node_config(tmp_path, registry.url, credential), tmp_path, digests


def node_config(base: Path, url: str, credential: Path) -> Config:
    config = base / "shifter.yaml"
    config.write_text(
        f"image_path: {base / 'no-store-on-this-node'}\n"
        f"artifacts: {{registry: {url}, node_credentials: {credential}}}\n"
        f"runtime: {{run_dir: {base / 'run'}}}\n"
        f"slurm: {{node_cache: {base / 'cache'}/%n, image_source: registry}}\n"
    )
    config.chmod(0o644)
    return load(str(config), privileged=True)


def environ(uid: int, image_id: str, request: str) -> dict[str, str]:
    return {
        "SLURMD_NODENAME": "n1",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_UID": str(uid),
        "SLURM_JOB_GID": str(uid),
        "SPANK_SHIFTER_IMAGE": image_id,
        "SPANK_SHIFTER_IMAGEREQUEST": request,
    }


def test_anothers_private_image_is_refused_before_any_byte_of_it_is_fetched(site, registry):
    config, base, digests = site
    problem = prolog.prolog(config, environ(BOB, PRIVATE, f"id:{PRIVATE}"))
    assert problem is not None and "not shared with" in problem, problem
    assert registry.blob_gets(digests[PRIVATE]) == 0
    assert not list((base / "cache").glob("n1/*.squashfs"))
    assert prolog.epilog(config, "n1", "77") == []


def test_the_owner_gets_a_verified_copy_only_root_can_read(site, registry):
    config, base, digests = site
    before = registry.blob_gets(digests[PRIVATE])
    problem = prolog.prolog(config, environ(ALICE, PRIVATE, "docker:secret:latest"))
    # The test's squashfs is not one: the mount fails, after the copy (the job's error).
    assert problem is not None and "squashfs" in problem.lower(), problem
    copy = base / "cache" / "n1" / f"{PRIVATE}.squashfs"
    assert copy.read_bytes().startswith(b"not a squashfs: " + PRIVATE.encode())
    assert copy.stat().st_mode & 0o777 == 0o600
    assert registry.blob_gets(digests[PRIVATE]) == before + 1
    assert prolog.epilog(config, "n1", "77") == []


def test_a_public_copy_is_readable_by_all(site):
    config, base, _ = site
    prolog.prolog(config, environ(BOB, PUBLIC, "docker:busybox:latest"))
    assert (base / "cache" / "n1" / f"{PUBLIC}.squashfs").stat().st_mode & 0o777 == 0o644
    assert prolog.epilog(config, "n1", "77") == []


def test_an_image_the_registry_lacks_is_the_jobs_error(site):
    config, _, _ = site
    missing = "c" * 64
    problem = prolog.prolog(config, environ(ALICE, missing, f"id:{missing}"))
    assert problem is not None and "no longer in the image store" in problem, problem
    assert prolog.epilog(config, "n1", "77") == []


def test_a_registry_that_is_down_is_the_jobs_error(tmp_path: Path):
    credential = tmp_path / "node.credential"
    credential.write_text("node:x\n")
    credential.chmod(0o600)
    config = node_config(tmp_path, f"http://127.0.0.1:{free_port()}", credential)
    problem = prolog.prolog(config, environ(ALICE, PUBLIC, "busybox"))
    assert problem is not None and "artifact registry" in problem, problem
    assert prolog.epilog(config, "n1", "77") == []


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_node_credential_others_can_read_fails_the_node(site, mode):
    """Anyone who can read it can read every private image: the node is unsafe to use."""
    config, base, _ = site
    (base / "node.credential").chmod(mode)
    with pytest.raises(NodeFault, match="is not safe"):
        prolog.prolog(config, environ(ALICE, PUBLIC, "busybox"))
    record = read_record(str(base / "run" / "n1" / "77"))
    assert record is None or not record.root
    prolog.epilog(config, "n1", "77")


def test_a_wrong_node_credential_is_the_jobs_error_and_says_so(site):
    config, base, _ = site
    (base / "node.credential").write_text("node:wrong\n")
    problem = prolog.prolog(config, environ(ALICE, PUBLIC, "busybox"))
    assert problem is not None and "refused" in problem and "401" in problem, problem
    assert prolog.epilog(config, "n1", "77") == []
