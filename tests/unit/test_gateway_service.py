"""The gateway's job logic without HTTP or munge: a registry served by httpx.MockTransport.

Covers job sharing, the re-pull window, private images and their ACLs, restart recovery,
imports, expiry and removal. Conversions run the real tar2sqfs.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from shifter_core import config as config_mod
from shifter_core.gateway import service as service_mod
from shifter_core.gateway.callers import Caller
from shifter_core.gateway.db import Job
from shifter_core.gateway.errors import BadRequest, Forbidden, NotFound
from shifter_core.gateway.models import JobInfo, JobState
from shifter_core.gateway.service import Gateway, platform_name
from shifter_core.image.oci import Platform
from shifter_core.image.store import ACL_XATTR, Acl, encode_posix_acl
from tests.fixtures.registries import OCILayout, make_layer

pytestmark = pytest.mark.skipif(shutil.which("tar2sqfs") is None, reason="needs tar2sqfs")

REGISTRY = "reg.test"
ALICE = Caller(5001, 5001, (5001, 6000), "alice")
BOB = Caller(5002, 5002, (5002, 6000), "bob")
CAROL = Caller(5003, 5003, (5003,), "carol")
ADMIN = Caller(0, 0, (0,), "root", admin=True, may_import=True)
IMPORTER = Caller(5004, 5004, (5004,), "dave", may_import=True)
SECRET = {"registry": REGISTRY, "username": "u", "password": "p"}


class FakeRegistry:
    """An OCI layout served over a mock transport; ``private/*`` needs Basic u:p."""

    def __init__(self, layout: OCILayout) -> None:
        self.layout = layout
        self.tags: dict[str, str] = {}  # "repo:tag" -> digest
        self.blob_gets: dict[str, int] = {}
        self.delay = 0.0
        self.lock = threading.Lock()

    def push(self, repo: str, tag: str, descriptor: dict[str, Any]) -> str:
        self.tags[f"{repo}:{tag}"] = descriptor["digest"]
        return str(descriptor["digest"])

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v2/":
            return httpx.Response(200, json={})
        repo, kind, ref = path[len("/v2/") :].rsplit("/", 2)
        if repo.startswith("private/"):
            auth = request.headers.get("authorization", "")
            if auth != "Basic " + base64.b64encode(b"u:p").decode():
                return httpx.Response(
                    401,
                    headers={"WWW-Authenticate": 'Basic realm="test"'},
                    json={"errors": [{"code": "UNAUTHORIZED"}]},
                )
        digest = ref if ref.startswith("sha256:") else self.tags.get(f"{repo}:{ref}")
        blob = self.layout.path / "blobs" / "sha256" / str(digest).split(":")[-1]
        if digest is None or not blob.exists():
            code = "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN"
            return httpx.Response(404, json={"errors": [{"code": code}]})
        data = blob.read_bytes()
        if kind == "manifests":
            doc = json.loads(data)
            ctype = doc.get("mediaType", "application/vnd.oci.image.manifest.v1+json")
            return httpx.Response(
                200, content=data, headers={"Content-Type": ctype, "Docker-Content-Digest": digest}
            )
        with self.lock:
            self.blob_gets[digest] = self.blob_gets.get(digest, 0) + 1
        if self.delay:
            time.sleep(self.delay)
        return httpx.Response(200, content=data)


@pytest.fixture
def registry(tmp_path: Path) -> FakeRegistry:
    layout = OCILayout(tmp_path / "layout")
    reg = FakeRegistry(layout)
    base = make_layer({"etc/os-release": "ID=unit\n"})
    reg.push("pub/app", "1", layout.add_image([base, make_layer({"app/v": "1\n"})]))
    reg.push("pub/app", "2", layout.add_image([base, make_layer({"app/v": "2\n"})]))
    reg.push("private/app", "1", layout.add_image([base, make_layer({"app/secret": "x\n"})]))
    return reg


def make_config(tmp_path: Path, **gateway: Any) -> config_mod.Config:
    settings = {
        "image_path": str(tmp_path / "images"),
        "gateway": {
            "database": str(tmp_path / "gw" / "db.sqlite"),
            "layer_cache": str(tmp_path / "gw" / "layers"),
            "workers": 2,
            "admins": ["root"],
            **gateway,
        },
        "registries": {"insecure": [REGISTRY], "retries": 0},
    }
    return config_mod.parse(json.dumps(settings))


@pytest.fixture
def make_gateway(tmp_path: Path, registry: FakeRegistry):
    made: list[Gateway] = []

    def make(start: bool = True, **gateway: Any) -> Gateway:
        gw = Gateway(
            make_config(tmp_path, **gateway), transport=httpx.MockTransport(registry.handler)
        )
        if start:
            gw.start()
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.stop()
        gw.db.close()


def wait(gw: Gateway, caller: Caller, job_id: str, timeout: float = 30) -> JobInfo:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = gw.job(caller, job_id)
        if job.state in ("READY", "FAILED"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} not finished: {gw.job(caller, job_id)}")


def pull(gw: Gateway, caller: Caller, ref: str, **kwargs: Any) -> JobInfo:
    job = gw.submit_pull(caller, f"{REGISTRY}/{ref}", **kwargs)
    return wait(gw, caller, job.id)


def test_platform_names_fill_in_default_variants() -> None:
    assert platform_name(Platform.parse("linux/arm64")) == "linux/arm64/v8"
    assert platform_name(Platform.parse("aarch64")) == "linux/arm64/v8"
    assert platform_name(Platform.parse("linux/amd64")) == "linux/amd64"


def test_a_pull_becomes_a_public_image(make_gateway) -> None:
    gw = make_gateway()
    job = pull(gw, ALICE, "pub/app:1")
    assert job.state == "READY" and not job.private, job
    image = gw.lookup(BOB, f"{REGISTRY}/pub/app:1")
    assert image.id == job.image_id and image.status == "READY"
    assert gw.lookup(BOB, f"id:{job.image_id[:12]}").id == job.image_id
    by_digest = gw.lookup(BOB, f"{REGISTRY}/pub/app@sha256:{job.image_id}")
    assert by_digest.id == job.image_id
    assert gw.store.image_file(job.image_id).stat().st_mode & 0o777 == 0o644
    listed = gw.images(CAROL)
    assert [(i.reference, i.status, i.private) for i in listed] == [
        (f"{REGISTRY}/pub/app:1", "READY", False)
    ]
    assert gw.jobs(ALICE)[0].id == job.id and gw.jobs(BOB) == []


def test_concurrent_identical_pulls_share_one_job(make_gateway, registry) -> None:
    registry.delay = 0.2
    gw = make_gateway()
    ids = set()

    def submit() -> None:
        ids.add(gw.submit_pull(ALICE, f"{REGISTRY}/pub/app:1").id)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 1
    (job_id,) = ids
    assert wait(gw, ALICE, job_id).state == "READY"
    # Within the re-pull window the READY job is the answer; the registry is not asked again.
    gets = dict(registry.blob_gets)
    assert gw.submit_pull(BOB, f"{REGISTRY}/pub/app:1").id == job_id
    assert registry.blob_gets == gets
    assert all(n == 1 for n in registry.blob_gets.values())
    # Another platform or visibility is another job.
    other = gw.submit_pull(ALICE, f"{REGISTRY}/pub/app:1", groups=["6000"])
    assert other.id != job_id and other.private


def test_repull_after_the_window_asks_the_registry_again(make_gateway, monkeypatch) -> None:
    gw = make_gateway()
    first = pull(gw, ALICE, "pub/app:1")
    monkeypatch.setattr(service_mod, "REPULL_AFTER", 0.0)
    second = pull(gw, ALICE, "pub/app:1")
    assert second.id != first.id and second.image_id == first.image_id


def test_private_pull_is_visible_only_to_its_acl(make_gateway, registry) -> None:
    gw = make_gateway()
    denied = pull(gw, ALICE, "private/app:1")
    assert denied.state == "FAILED" and "shifterimg login" in denied.message
    job = pull(gw, ALICE.__class__(**{**ALICE.__dict__, "secret": SECRET}), "private/app:1")
    assert job.state == "READY" and job.private, job
    image_id = job.image_id
    meta = gw.store.get(image_id)
    assert meta is not None and meta.acl == Acl((ALICE.uid,), ())
    assert file_access(gw, image_id) == [(0o640, encode_posix_acl(Acl((ALICE.uid,), ())))] * 2
    assert gw.lookup(ALICE, f"{REGISTRY}/private/app:1").id == image_id
    for caller, ref in ((BOB, f"{REGISTRY}/private/app:1"), (BOB, image_id)):
        with pytest.raises(NotFound):
            gw.lookup(caller, ref)
    assert gw.images(BOB) == [] and len(gw.images(ADMIN)) == 1
    with pytest.raises(NotFound):
        gw.job(BOB, job.id)
    # Pulled again with the group: the ACL is widened, bob (in group 6000) sees it.
    alice = Caller(**{**ALICE.__dict__, "secret": SECRET})
    again = pull(gw, alice, "private/app:1", groups=["6000"])
    assert again.image_id == image_id
    assert gw.store.get(image_id).acl == Acl((ALICE.uid,), (6000,))  # type: ignore[union-attr]
    assert file_access(gw, image_id) == [(0o640, encode_posix_acl(Acl((ALICE.uid,), (6000,))))] * 2
    assert gw.lookup(BOB, f"{REGISTRY}/private/app:1").id == image_id
    with pytest.raises(NotFound):
        gw.lookup(CAROL, f"{REGISTRY}/private/app:1")


def test_credentials_must_be_for_the_pulled_registry(make_gateway) -> None:
    gw = make_gateway()
    wrong = Caller(**{**ALICE.__dict__, "secret": {**SECRET, "registry": "other.test"}})
    with pytest.raises(BadRequest, match=r"credentials for registry other\.test"):
        gw.submit_pull(wrong, f"{REGISTRY}/private/app:1")
    with pytest.raises(BadRequest, match="unknown user"):
        gw.submit_pull(ALICE, f"{REGISTRY}/pub/app:1", users=["no-such-user-xyz"])


def test_a_public_pull_makes_a_private_image_public(make_gateway) -> None:
    gw = make_gateway()
    private = pull(gw, ALICE, "pub/app:2", users=["5003"])
    assert private.private
    image_id = private.image_id
    with pytest.raises(NotFound):
        gw.lookup(BOB, f"{REGISTRY}/pub/app:2")
    public = pull(gw, BOB, "pub/app:2")
    assert public.image_id == image_id and not public.private
    assert gw.store.get(image_id).acl is None  # type: ignore[union-attr]
    assert file_access(gw, image_id) == [(0o644, None)] * 2


def file_access(gw: Gateway, image_id: str) -> list[tuple[int, bytes | None]]:
    """(permission bits, POSIX access ACL) of an image's squashfs and metadata."""
    found = []
    for path in (gw.store.image_file(image_id), gw.store.metadata_file(image_id)):
        try:
            acl: bytes | None = os.getxattr(path, ACL_XATTR)
        except OSError as err:
            if err.errno != errno.ENODATA:
                raise
            acl = None
        found.append((path.stat().st_mode & 0o777, acl))
    return found


def _insert(gw: Gateway, job_id: str, state: JobState, **values: Any) -> None:
    now = time.time()
    fields: dict[str, Any] = {
        "id": job_id,
        "kind": "pull",
        "key": f"k-{job_id}",
        "reference": f"{REGISTRY}/pub/app:1",
        "platform": gw.host_platform,
        "platform_explicit": False,
        "requester": ALICE.uid,
        "acl": None,
        "credentialed": False,
        "state": state,
        "message": "",
        "image_id": None,
        "attempts": 1,
        "created": now,
        "updated": now,
        "finished": None,
    }
    fields.update(values)
    with gw.db.transaction() as conn:
        gw.db.insert_job(conn, Job(**fields))


def test_restart_requeues_or_fails_interrupted_jobs_and_sweeps_partials(make_gateway) -> None:
    crashed = make_gateway(start=False)
    _insert(crashed, "pulling", JobState.PULLING)
    _insert(crashed, "pending", JobState.PENDING, attempts=0, reference=f"{REGISTRY}/pub/app:2")
    _insert(crashed, "secret", JobState.CONVERTING, credentialed=True, acl=Acl((ALICE.uid,), ()))
    _insert(crashed, "import", JobState.PULLING, kind="import")
    _insert(crashed, "tired", JobState.PULLING, attempts=3)
    crashed.store.path.mkdir(parents=True)
    partial = crashed.store.path / f".{'a' * 64}.123.partial"
    partial.write_bytes(b"half")
    crashed.db.close()
    gw = make_gateway()
    assert not partial.exists()
    for job_id in ("pulling", "pending"):
        job = wait(gw, ADMIN, job_id)
        assert job.state == "READY", job
    assert wait(gw, ADMIN, "pulling").attempts == 2
    messages = {j: gw.job(ADMIN, j).message for j in ("secret", "import", "tired")}
    assert all(gw.job(ADMIN, j).state == "FAILED" for j in messages)
    assert "credentials it used are not kept" in messages["secret"]
    assert "import the file again" in messages["import"]
    assert "3 times" in messages["tired"]
    assert not [j for j in gw.db.jobs() if j.active]
    assert gw.db.prune_jobs(time.time() + 1) == 5 and gw.db.jobs() == []


def _docker_archive(path: Path) -> str:
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "config": {"Env": ["A=1"]}, "rootfs": {}}
    ).encode()
    manifest = json.dumps([{"Config": "c.json", "Layers": ["l/layer.tar"]}]).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in (
            ("./manifest.json", manifest),
            ("./c.json", config),
            ("./l/layer.tar", layer.getvalue()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(config).hexdigest()


def _upload(gw: Gateway, source: Path) -> tuple[Path, str]:
    upload = gw.new_upload()
    shutil.copyfile(source, upload)
    return upload, hashlib.sha256(source.read_bytes()).hexdigest()


def test_import_docker_archive_and_refusals(make_gateway, tmp_path: Path) -> None:
    gw = make_gateway()
    archive = tmp_path / "image.tar"
    expected = _docker_archive(archive)
    with pytest.raises(Forbidden, match="may not import"):
        gw.check_import(ALICE, "mine:1")
    name = gw.check_import(IMPORTER, "mine:1")
    assert name == "docker.io/library/mine:1"
    job = gw.submit_import(IMPORTER, name, *_upload(gw, archive))
    done = wait(gw, IMPORTER, job.id)
    assert done.state == "READY" and done.image_id == expected, done
    image = gw.lookup(BOB, "mine:1")
    assert list(image.image.env) == ["A=1"] and image.image.platform == "linux/amd64"
    junk = tmp_path / "junk"
    junk.write_bytes(bytes(range(256)) * 16)
    failed = wait(gw, IMPORTER, gw.submit_import(IMPORTER, name, *_upload(gw, junk)).id)
    assert failed.state == "FAILED" and "neither a tar archive" in failed.message
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"\0" * 2048)  # an empty tar archive
    failed = wait(gw, IMPORTER, gw.submit_import(IMPORTER, name, *_upload(gw, empty)).id)
    assert "neither manifest.json (docker-archive) nor index.json" in failed.message
    fake = tmp_path / "fake.sqfs"
    fake.write_bytes(b"hsqs" + b"\0" * 4000)
    failed = wait(gw, IMPORTER, gw.submit_import(IMPORTER, name, *_upload(gw, fake)).id)
    assert failed.state == "FAILED" and "not a valid squashfs" in failed.message
    assert [p for p in gw.store.path.iterdir() if p.name.endswith(".partial")] == []


def test_expire_and_remove_are_for_admins(make_gateway) -> None:
    gw = make_gateway()
    one = pull(gw, ALICE, "pub/app:1").image_id
    two = pull(gw, ALICE, "pub/app:2").image_id
    for call in (lambda: gw.expire(ALICE, days=1), lambda: gw.remove(ALICE, one)):
        with pytest.raises(Forbidden, match="only image gateway admins"):
            call()
    with pytest.raises(BadRequest, match="greater than 0"):
        gw.expire(ADMIN)  # gateway.expire_days is 0
    gw.db.touch_image(one, when=time.time() - 3 * 86400)
    assert gw.expire(ADMIN, days=2) == [one]
    assert gw.store.get(one) is None
    with pytest.raises(NotFound):
        gw.lookup(ALICE, f"{REGISTRY}/pub/app:1")
    assert gw.remove(ADMIN, f"{REGISTRY}/pub/app:2") == [two]
    with pytest.raises(NotFound):
        gw.remove(ADMIN, f"{REGISTRY}/pub/app:2")
    assert gw.images(ADMIN) == []
