"""Images as OCI artifacts (image/artifact.py) against a real ``docker-registry`` with
htpasswd auth: publish, look up, stage into a node cache verified by digest, withdraw; and
what a node must refuse (a wrong or unsafe credential, a damaged blob, root's
``~/.docker``), each failing fast with a clear message."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from shifter_core.gateway.artifacts import Publisher
from shifter_core.image.artifact import (
    CONFIG_MEDIA_TYPE,
    SQUASHFS_MEDIA_TYPE,
    ArtifactError,
    ArtifactRegistry,
    CredentialError,
    read_credential,
)
from shifter_core.image.nodecache import NodeCache, NodeCacheError
from shifter_core.image.store import Acl, ImageMetadata, ImageStore
from tests.fixtures.registries import RegistryProcess, start_registry

USERS = {"gateway": "gateway-secret", "node": "node-secret"}
REPO = "shifter/images"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    reg = start_registry(tmp_path_factory.mktemp("artifacts"), users=USERS)
    yield reg
    reg.stop()


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def fetch_manifest(reg: RegistryProcess, ref: str) -> bytes:
    response = requests.get(
        f"{reg.url}/v2/{REPO}/manifests/{ref}",
        headers={"Accept": OCI_MANIFEST},
        auth=("gateway", USERS["gateway"]),
        timeout=10,
    )
    response.raise_for_status()
    return response.content


def push_manifest(reg: RegistryProcess, ref: str, data: bytes) -> None:
    response = requests.put(
        f"{reg.url}/v2/{REPO}/manifests/{ref}",
        data=data,
        headers={"Content-Type": OCI_MANIFEST},
        auth=("gateway", USERS["gateway"]),
        timeout=10,
    )
    response.raise_for_status()


def make_image(directory: Path, seed: int, size: int = 300_000) -> tuple[ImageMetadata, Path]:
    data = hashlib.shake_256(str(seed).encode()).digest(size)
    image_id = hashlib.sha256(b"id" + data).hexdigest()
    path = directory / f"{image_id}.squashfs"
    path.write_bytes(data)
    meta = ImageMetadata(
        id=image_id, source=f"docker:test/artifact{seed}:latest", digest=f"sha256:{image_id}",
        platform="linux/amd64", env=("PATH=/bin",), size=size,
        sha256=hashlib.sha256(data).hexdigest(),
    )  # fmt: skip
    return meta, path


def as_user(reg: RegistryProcess, user: str | None) -> ArtifactRegistry:
    credential = None if user is None else (user, USERS[user])
    return ArtifactRegistry(reg.url, REPO, credential, timeout=10)


def test_publish_look_up_and_stage(registry: RegistryProcess, tmp_path: Path):
    meta, squashfs = make_image(tmp_path, 1)
    as_user(registry, "gateway").publish(meta, squashfs)

    manifest = json.loads(fetch_manifest(registry, meta.id))
    assert manifest["config"]["mediaType"] == CONFIG_MEDIA_TYPE
    assert [layer["mediaType"] for layer in manifest["layers"]] == [SQUASHFS_MEDIA_TYPE]
    assert manifest["layers"][0]["digest"] == f"sha256:{meta.sha256}"

    node = as_user(registry, "node")
    found = node.metadata(meta.id)
    assert found == meta
    cache = NodeCache(tmp_path / "cache")
    staged = cache.stage(meta.id, node.squashfs(found), found.sha256, "job1")
    assert staged.read_bytes() == squashfs.read_bytes()
    assert staged.stat().st_mode & 0o777 == 0o644  # public image
    assert cache.stats()["copies"] == 1
    # A second job on the node reads nothing from the registry.
    gets = registry.blob_gets(f"sha256:{meta.sha256}")
    assert cache.stage(meta.id, node.squashfs(found), found.sha256, "job2") == staged
    assert registry.blob_gets(f"sha256:{meta.sha256}") == gets


def test_a_private_image_record_carries_its_acl_and_its_copy_stays_roots(
    registry: RegistryProcess, tmp_path: Path
):
    meta, squashfs = make_image(tmp_path, 2)
    private = dataclasses.replace(meta, acl=Acl(users=(1001,), groups=()))
    as_user(registry, "gateway").publish(private, squashfs)
    node = as_user(registry, "node")
    found = node.metadata(meta.id)
    assert found is not None and found.acl == Acl(users=(1001,), groups=())
    assert found.visible_to(1001, []) and not found.visible_to(1002, [])
    staged = NodeCache(tmp_path / "cache").stage(meta.id, node.squashfs(found), meta.sha256, "j")
    assert staged.stat().st_mode & 0o777 == 0o600


def test_republishing_a_new_acl_sends_only_the_record(registry: RegistryProcess, tmp_path: Path):
    meta, squashfs = make_image(tmp_path, 3)
    gateway = as_user(registry, "gateway")
    gateway.publish(meta, squashfs)
    uploads = re.compile(r'"PUT /v2/shifter/images/blobs/uploads/\S* HTTP/1.1" 201 ')
    start = len(registry.log())
    gateway.publish(dataclasses.replace(meta, acl=Acl(users=(1001,), groups=(1000,))), squashfs)
    log = registry.log()[start:]
    assert len(uploads.findall(log)) == 1  # the record; the squashfs was there
    assert '" 401 ' not in log  # the credential goes with every request, not after a 401
    found = as_user(registry, "node").metadata(meta.id)
    assert found is not None and found.acl == Acl(users=(1001,), groups=(1000,))


def test_withdraw(registry: RegistryProcess, tmp_path: Path):
    meta, squashfs = make_image(tmp_path, 4)
    gateway = as_user(registry, "gateway")
    gateway.publish(meta, squashfs)
    assert gateway.withdraw(meta.id)
    assert as_user(registry, "node").metadata(meta.id) is None
    assert not gateway.withdraw(meta.id)


def test_unknown_image_is_none(registry: RegistryProcess):
    assert as_user(registry, "node").metadata("e" * 64) is None


def test_a_wrong_credential_fails_at_once(registry: RegistryProcess):
    node = ArtifactRegistry(registry.url, REPO, ("node", "wrong"), timeout=10)
    started = time.monotonic()
    with pytest.raises(ArtifactError, match=r"refused .*HTTP 401"):
        node.metadata("e" * 64)
    assert time.monotonic() - started < 5  # no retries for minutes


def test_roots_docker_config_grants_nothing(
    registry: RegistryProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Only the site's credential file counts: a ~/.docker/config.json with a valid login
    (or an ORAS_USER in the environment) does not authenticate the node."""
    auth = base64.b64encode(b"node:node-secret").decode()
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker" / "config.json").write_text(
        json.dumps({"auths": {registry.name: {"auth": auth}}})
    )
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / ".docker"))
    with pytest.raises(ArtifactError, match="HTTP 401"):
        as_user(registry, None).metadata("e" * 64)


def test_a_registry_that_is_down_fails_at_once(tmp_path: Path):
    from tests.fixtures.registries import free_port

    node = ArtifactRegistry(f"http://127.0.0.1:{free_port()}", REPO, ("node", "x"), timeout=5)
    started = time.monotonic()
    with pytest.raises(ArtifactError, match="cannot reach the artifact registry http://127"):
        node.metadata("e" * 64)
    assert time.monotonic() - started < 5


def test_a_corrupted_squashfs_never_enters_the_cache(registry: RegistryProcess, tmp_path: Path):
    meta, squashfs = make_image(tmp_path, 5)
    as_user(registry, "gateway").publish(meta, squashfs)
    blob = registry.blob_path(f"sha256:{meta.sha256}")
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0xFF
    blob.write_bytes(bytes(data))
    node = as_user(registry, "node")
    found = node.metadata(meta.id)
    assert found is not None
    cache = NodeCache(tmp_path / "cache")
    with pytest.raises(NodeCacheError, match="is corrupt"):
        cache.stage(meta.id, node.squashfs(found), found.sha256, "job1")
    assert not cache.path(meta.id).exists()
    assert list((tmp_path / "cache").glob(".*.partial")) == []


def test_a_damaged_record_is_refused(registry: RegistryProcess, tmp_path: Path):
    meta, squashfs = make_image(tmp_path, 6)
    as_user(registry, "gateway").publish(meta, squashfs)
    manifest = json.loads(fetch_manifest(registry, meta.id))
    record = registry.blob_path(manifest["config"]["digest"])
    record.write_bytes(record.read_bytes().replace(b"PATH=/bin", b"PATH=/xyz"))
    with pytest.raises(ArtifactError, match="does not match its digest"):
        as_user(registry, "node").metadata(meta.id)


def test_a_record_under_another_images_tag_is_refused(registry: RegistryProcess, tmp_path: Path):
    """Whoever can push to the registry cannot make one image id serve another's record."""
    meta, squashfs = make_image(tmp_path, 7)
    other = "f" * 64
    gateway = as_user(registry, "gateway")
    gateway.publish(meta, squashfs)
    manifest = fetch_manifest(registry, meta.id)
    push_manifest(registry, other, manifest)
    with pytest.raises(ArtifactError, match="names another image"):
        as_user(registry, "node").metadata(other)


@pytest.mark.parametrize(
    ("mode", "owner", "symlink", "error"),
    [
        (0o644, None, False, "not safe"),
        (0o640, None, False, "not safe"),
        (0o600, 12345, False, "not safe"),
        (0o600, None, True, "cannot read"),
    ],
)
def test_an_unsafe_credential_is_refused(
    tmp_path: Path, mode: int, owner: int | None, symlink: bool, error: str
):
    real = tmp_path / "real"
    real.write_text("node:node-secret\n")
    real.chmod(mode)
    if owner is not None:
        os.chown(real, owner, -1)
    path = tmp_path / "link" if symlink else real
    if symlink:
        path.symlink_to(real)
    with pytest.raises(CredentialError, match=error):
        read_credential(str(path), owner=os.geteuid())


def test_a_credential_file(tmp_path: Path):
    path = tmp_path / "cred"
    path.write_text("node:pass:with:colons\n")
    path.chmod(0o600)
    assert read_credential(str(path), owner=os.geteuid()) == ("node", "pass:with:colons")
    path.write_text("no-colon\n")
    with pytest.raises(CredentialError, match="USER:PASSWORD"):
        read_credential(str(path), owner=os.geteuid())


# -- the gateway's publisher ------------------------------------------------------------------


def stored_image(store: ImageStore, tmp_path: Path, seed: int) -> ImageMetadata:
    meta, squashfs = make_image(tmp_path, seed)
    partial = store.new_partial(meta.id)
    squashfs.replace(partial)
    return store.publish(meta, partial)


def test_reconcile_publishes_what_the_registry_lacks_or_holds_stale(
    registry: RegistryProcess, tmp_path: Path
):
    store = ImageStore(tmp_path / "store")
    store.create()
    images = [stored_image(store, tmp_path, seed) for seed in (20, 21, 22)]
    publisher = Publisher(as_user(registry, "gateway"), store)
    publisher.publish(images[0])
    stale = dataclasses.replace(images[1], acl=Acl(users=(1001,), groups=()))
    publisher.publish(stale)
    assert publisher.reconcile(store) == 2  # images[1] (stale record) and images[2] (missing)
    node = as_user(registry, "node")
    assert [node.metadata(m.id) for m in images] == images
    assert publisher.reconcile(store) == 0


def test_withdraw_of_an_unreachable_registry_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    from tests.fixtures.registries import free_port

    down = ArtifactRegistry(f"http://127.0.0.1:{free_port()}", REPO, None, timeout=2)
    Publisher(down, ImageStore(tmp_path)).withdraw("e" * 64)
    assert "stays in the artifact registry" in caplog.text


def test_no_registry_no_artifacts(tmp_path: Path):
    publisher = Publisher(None, ImageStore(tmp_path))
    meta, _ = make_image(tmp_path, 30)
    publisher.publish(meta)
    publisher.withdraw(meta.id)
    assert publisher.reconcile([meta]) == 0 and publisher.start_reconciling() is None


# -- shifteradm doctor in registry mode -----------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="the node credential is root's")
@pytest.mark.parametrize(
    ("password", "mode", "level", "says"),
    [
        ("node-secret", 0o600, "ok", "takes the node's credential"),
        ("node-secret", 0o644, "error", "is not safe"),
        ("wrong", 0o600, "error", "refused"),
    ],
)
def test_doctor_checks_the_node_credential(
    registry: RegistryProcess, tmp_path: Path, password: str, mode: int, level: str, says: str
):
    from shifter_core import doctor
    from shifter_core.config import load

    credential = tmp_path / "node.credential"
    credential.write_text(f"node:{password}\n")
    credential.chmod(mode)
    config = tmp_path / "shifter.yaml"
    config.write_text(
        f"artifacts: {{registry: {registry.url}, node_credentials: {credential}}}\n"
        "slurm: {image_source: registry}\n"
    )
    finding = doctor.artifact_registry(load(str(config)))
    assert finding.level == level and says in finding.line(), finding.line()


# -- a rack's pull-through mirror (artifacts.node_registry) ---------------------------------------


def start_mirror(directory: Path, upstream: RegistryProcess) -> RegistryProcess:
    """A docker-registry pull-through cache of ``upstream``, taking the nodes' credential.
    Its upstream is anonymous: distribution 2.8's proxy cannot authenticate to an htpasswd
    registry (it looks basic credentials up by the request's URL, not the realm)."""
    import json as _json
    import subprocess as _subprocess

    from tests.fixtures.registries import free_port

    directory.mkdir(parents=True)
    htpasswd = directory / "htpasswd"
    _subprocess.run(["htpasswd", "-Bbc", str(htpasswd), "node", USERS["node"]],
                    check=True, capture_output=True)  # fmt: skip
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(directory / "storage")}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "not-secret"},
        "auth": {"htpasswd": {"realm": "mirror", "path": str(htpasswd)}},
        "proxy": {"remoteurl": upstream.url},
    }
    (directory / "config.yml").write_text(_json.dumps(config))
    log_path = directory / "registry.log"
    with open(log_path, "wb") as sink:
        process = _subprocess.Popen(["docker-registry", "serve", str(directory / "config.yml")],
                                    stdout=sink, stderr=_subprocess.STDOUT)  # fmt: skip
    mirror = RegistryProcess(port, directory, log_path, process, {"node": USERS["node"]})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            requests.get(f"{mirror.url}/v2/", timeout=1)
            return mirror
        except requests.ConnectionError:
            time.sleep(0.05)
    mirror.stop()
    raise RuntimeError(f"the mirror did not start: {mirror.log()[-2000:]}")


def test_nodes_behind_a_rack_mirror_read_the_image_from_the_site_registry_once_or_twice(
    tmp_path: Path,
):
    site = start_registry(tmp_path / "site")  # anonymous: see start_mirror
    try:
        mirror = start_mirror(tmp_path / "mirror", site)
        try:
            meta, squashfs = make_image(tmp_path, 40, size=4_000_000)
            ArtifactRegistry(site.url, REPO, None).publish(meta, squashfs)
            rack = ArtifactRegistry(mirror.url, REPO, ("node", USERS["node"]))
            for node in range(6):
                found = rack.metadata(meta.id)
                assert found == meta
                cache = NodeCache(tmp_path / f"n{node}")
                copy = cache.stage(meta.id, rack.squashfs(found), found.sha256, "job")
                assert copy.read_bytes() == squashfs.read_bytes()
            # distribution 2.8's proxy fetches a new blob twice (one stream to the client,
            # one to its storage), then serves it itself: 2 reads, not 6.
            assert site.blob_gets(f"sha256:{meta.sha256}") <= 2
            with pytest.raises(ArtifactError, match="HTTP 401"):
                ArtifactRegistry(mirror.url, REPO, None).metadata(meta.id)  # users: no
        finally:
            mirror.stop()
    finally:
        site.stop()


def test_nodes_use_node_registry_when_set(tmp_path: Path):
    from shifter_core.config import load
    from shifter_core.slurm.container import node_artifacts

    config = tmp_path / "shifter.yaml"
    config.write_text(
        "artifacts: {registry: 'http://site:5000', node_registry: 'http://rack7-mirror:5000'}\n"
    )
    assert node_artifacts(load(str(config))).url == "http://rack7-mirror:5000"
    config.write_text("artifacts: {registry: 'http://site:5000'}\n")
    assert node_artifacts(load(str(config))).url == "http://site:5000"


# -- a registry with bearer tokens (auth: token, as Harbor or a cloud registry) ---------------


def gateway_pushes_nodes_pull(user: str | None, repository: str, actions: list[str]) -> list[str]:
    if user == "gateway":
        return list(actions)
    return ["pull"] if user == "node" and "pull" in actions else []


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    from tests.fixtures.registries import TokenServer

    directory = tmp_path_factory.mktemp("token-artifacts")
    server = TokenServer(directory, users=dict(USERS), policy=gateway_pushes_nodes_pull).start()
    reg = start_registry(directory / "registry", token_server=server)
    yield reg
    reg.stop()
    server.stop()


def test_a_token_registry_takes_the_gateways_pushes_and_the_nodes_pulls(
    token_registry: RegistryProcess, tmp_path: Path
):
    meta, squashfs = make_image(tmp_path, 50)
    gateway = ArtifactRegistry(token_registry.url, REPO, ("gateway", USERS["gateway"]))
    gateway.publish(meta, squashfs)  # pull then push scopes: a fresh token for each
    gateway.publish(dataclasses.replace(meta, acl=Acl(users=(1001,), groups=())), squashfs)
    node = ArtifactRegistry(token_registry.url, REPO, ("node", USERS["node"]))
    found = node.metadata(meta.id)
    assert found is not None and found.acl == Acl(users=(1001,), groups=())
    staged = NodeCache(tmp_path / "cache").stage(meta.id, node.squashfs(found), found.sha256, "j")
    assert staged.read_bytes() == squashfs.read_bytes()
    # The nodes' credential reads and never writes; no credential, or a wrong one, reads nothing.
    with pytest.raises(ArtifactError):
        node.publish(dataclasses.replace(meta, acl=None), squashfs)
    for credential in (None, ("node", "wrong")):
        with pytest.raises(ArtifactError, match="HTTP 401"):
            ArtifactRegistry(token_registry.url, REPO, credential).metadata(meta.id)
    assert gateway.withdraw(meta.id) and node.metadata(meta.id) is None
