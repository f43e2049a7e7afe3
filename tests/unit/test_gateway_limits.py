"""The gateway under abuse, with fakes: limits, bombs, the layer cache, redirects, leaks.

Each test is an attack; the same classes run against a real gateway in
``tests/security/test_gateway_abuse.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from shifter_core import munge
from shifter_core.gateway.app import create_app
from shifter_core.gateway.callers import Caller
from shifter_core.gateway.errors import NotFound
from shifter_core.gateway.service import Gateway
from shifter_core.image.errors import RegistryError
from shifter_core.image.layercache import LayerCache
from shifter_core.image.limits import check_redirect, clean_text
from shifter_core.image.registry.client import RegistryClient
from shifter_core.image.registry.settings import RegistrySettings
from shifter_core.image.store import Acl, ImageMetadata
from tests.fixtures.registries import Layer, OCILayout, make_layer, sha256
from tests.unit.test_gateway_api import FakeMunge
from tests.unit.test_gateway_service import (
    ALICE,
    BOB,
    REGISTRY,
    SECRET,
    FakeRegistry,
    make_config,
    pull,
)


def zeros_layer(size: int) -> Layer:
    """A gzip layer of *size* zero bytes (a small decompression bomb)."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=9) as gz:
        chunk = bytes(1 << 20)
        for _ in range(size >> 20):
            gz.write(chunk)
    return Layer(
        out.getvalue(), "sha256:" + "0" * 64, "application/vnd.oci.image.layer.v1.tar+gzip"
    )


def many_entries_layer(count: int) -> Layer:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(count):
            tar.addfile(tarfile.TarInfo(f"f{i}"), io.BytesIO(b""))
    data = raw.getvalue()
    return Layer(data, sha256(data), "application/vnd.oci.image.layer.v1.tar")


class StrictRegistry(FakeRegistry):
    """A FakeRegistry where each repository serves only the blobs pushed to it."""

    def __init__(self, layout: OCILayout) -> None:
        super().__init__(layout)
        self.repo_blobs: dict[str, set[str]] = {}
        self.requests: list[tuple[str, str]] = []

    def own(self, repo: str, descriptor: dict[str, Any], extra: list[str] = ()) -> None:
        manifest = json.loads(
            (self.layout.path / "blobs/sha256" / descriptor["digest"].split(":")[1]).read_bytes()
        )
        blobs = {manifest["config"]["digest"], *(la["digest"] for la in manifest["layers"])}
        self.repo_blobs.setdefault(repo, set()).update(blobs - set(extra))

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        path = request.url.path
        if "/blobs/" in path:
            repo, _, digest = path[len("/v2/") :].rsplit("/", 2)
            if repo in self.repo_blobs and digest not in self.repo_blobs[repo]:
                return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN"}]})
        return super().handler(request)


@pytest.fixture
def strict(tmp_path: Path) -> StrictRegistry:
    return StrictRegistry(OCILayout(tmp_path / "layout"))


def gateway_for(tmp_path: Path, registry: FakeRegistry, **gw: Any) -> Gateway:
    gateway = Gateway(make_config(tmp_path, **gw), transport=httpx.MockTransport(registry.handler))
    gateway.start()
    return gateway


# -- request bodies ---------------------------------------------------------------------------


def _call(app: Any, method: str, path: str, headers: dict[str, str], chunks: list[bytes]):
    """Call the ASGI app directly; returns (status, body, number of body chunks it read)."""
    read = [0]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if read[0] < len(chunks):
            read[0] += 1
            return {
                "type": "http.request",
                "body": chunks[read[0] - 1],
                "more_body": read[0] < len(chunks),
            }
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1),
        "root_path": "",
        "http_version": "1.1",
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), read[0]


def test_an_unauthenticated_body_is_refused_before_it_is_read(tmp_path: Path, strict) -> None:
    gateway = gateway_for(tmp_path, strict)
    try:
        app = create_app(gateway, decoder=FakeMunge().decode)
        chunks = [bytes(1 << 16)] * 64
        status, body, read = _call(
            app, "POST", "/api/v1/pull", {"content-length": str(64 << 16)}, chunks
        )
        assert status == 401 and "no munge credential" in body["error"]
        assert read == 0, "the body of an unauthenticated request was read"
        status, body, read = _call(
            app, "POST", "/api/v1/import", {"content-length": str(64 << 16)}, chunks
        )
        assert status == 401 and read == 0
    finally:
        gateway.stop()


def test_an_oversized_body_is_refused_by_its_length(tmp_path: Path, strict) -> None:
    gateway = gateway_for(tmp_path, strict, limits={"max_request_body": "64k"})
    try:
        app = create_app(gateway, decoder=FakeMunge().decode)
        big = b"{" + b" " * (1 << 17) + b"}"
        payload = munge.request_payload("POST", "/api/v1/pull", munge.body_digest(big))
        auth = {"authorization": f"Munge {FakeMunge.encoder(0)(payload)}"}
        status, body, read = _call(
            app, "POST", "/api/v1/pull", {**auth, "content-length": str(len(big))}, [big]
        )
        assert status == 413 and "larger than" in body["error"], body
        assert read == 0
        # Without a Content-Length (chunked), reading stops at the limit.
        payload = munge.request_payload("POST", "/api/v1/pull", munge.body_digest(big))
        auth = {"authorization": f"Munge {FakeMunge.encoder(0)(payload)}"}
        pieces = [big[i : i + 8192] for i in range(0, len(big), 8192)]
        status, body, read = _call(app, "POST", "/api/v1/pull", auth, pieces)
        assert status == 413 and read <= 9, (status, body, read)
    finally:
        gateway.stop()


# -- pulls ------------------------------------------------------------------------------------


def test_a_decompression_bomb_fails_its_pull_cleanly(tmp_path: Path, strict) -> None:
    bomb = zeros_layer(96 << 20)
    strict.push("pub/bomb", "1", strict.layout.add_image([bomb]))
    gateway = gateway_for(tmp_path, strict, limits={"max_layer_unpacked": "16M"})
    try:
        job = pull(gateway, ALICE, "pub/bomb:1")
        assert job.state == "FAILED", job
        assert "decompresses to more than 16 MiB" in job.message, job.message
        assert not [p for p in gateway.store.path.iterdir() if p.name.startswith(".")]
        leftovers = [p for p in gateway.cache.directory.rglob("*") if p.name.endswith(".partial")]
        assert not leftovers
    finally:
        gateway.stop()


def test_image_limits_stop_a_pull_before_downloading(tmp_path: Path, strict) -> None:
    layers = [make_layer({f"f{i}": str(i)}) for i in range(5)]
    strict.push("pub/many", "1", strict.layout.add_image(layers))
    strict.push("pub/entries", "1", strict.layout.add_image([many_entries_layer(300)]))
    gateway = gateway_for(
        tmp_path, strict, limits={"max_layers": 4, "max_tar_entries": 200, "max_layer_size": "1M"}
    )
    try:
        job = pull(gateway, ALICE, "pub/many:1")
        assert job.state == "FAILED" and "has 5 layers" in job.message, job
        assert not strict.blob_gets or all(
            d not in strict.blob_gets for d in (la.digest for la in layers)
        )
        job = pull(gateway, ALICE, "pub/entries:1")
        assert job.state == "FAILED" and "more than 200 tar entries" in job.message, job
    finally:
        gateway.stop()


def test_a_pull_that_takes_too_long_is_stopped(tmp_path: Path, strict) -> None:
    strict.push("pub/slow", "1", strict.layout.add_image([make_layer({"a": "1"})]))
    strict.delay = 1.5
    gateway = gateway_for(tmp_path, strict, limits={"pull_timeout": 1.0})
    try:
        job = pull(gateway, ALICE, "pub/slow:1")
        assert job.state == "FAILED" and "took longer than 1 s" in job.message, job
    finally:
        gateway.stop()


def test_a_large_manifest_is_refused(tmp_path: Path, strict) -> None:
    layers = [make_layer({"a": "1"})]
    strict.push(
        "pub/big", "1", strict.layout.add_image(layers, config={"Env": ["X=" + "y" * 9000]})
    )
    gateway = gateway_for(tmp_path, strict, limits={"max_manifest_size": "1k"})
    try:
        # The manifest itself is small; a padded one is refused.
        desc = strict.layout.add_image([make_layer({"a": "1"})] * 1, config={"Labels": {"x": "1"}})
        blob = strict.layout.path / "blobs/sha256" / desc["digest"].split(":")[1]
        doc = json.loads(blob.read_bytes())
        doc["annotations"] = {"pad": "p" * 4096}
        data = json.dumps(doc).encode()
        digest = strict.layout.add_blob(data)
        strict.tags["pub/padded:1"] = digest
        job = pull(gateway, ALICE, "pub/padded:1")
        assert job.state == "FAILED" and "larger than" in job.message, job
    finally:
        gateway.stop()


# -- the layer cache --------------------------------------------------------------------------


def test_the_layer_cache_is_bounded_and_evicts_the_least_recently_used(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path / "layers", fsync=False, max_bytes=3000)
    blobs = [bytes([i]) * 1000 for i in range(4)]
    digests = [sha256(b) for b in blobs]
    for digest, blob in zip(digests[:3], blobs[:3], strict=True):
        cache.put_bytes(digest, blob)
    cache.put_bytes(digests[0], blobs[0])  # a hit: blob 0 is now the most recent
    cache.put_bytes(digests[3], blobs[3])
    assert cache.size() <= 3000
    assert set(cache.digests()) == {digests[0], digests[2], digests[3]}
    with cache.pinned([digests[2]]):
        cache.put_bytes(digests[1], blobs[1])
    assert digests[2] in cache and digests[1] in cache and cache.size() <= 3000


def test_a_private_layer_is_reused_only_with_proof_of_access(tmp_path: Path, strict) -> None:
    secret = make_layer({"secret/key": "alice's\n"})
    private = strict.layout.add_image([secret])
    strict.push("private/app", "1", private)
    strict.own("private/app", private)
    # Bob's public repository names alice's layer, which it does not hold.
    evil = strict.layout.add_image([secret], config={"Env": ["EVIL=1"]})
    strict.push("pub/evil", "1", evil)
    strict.own("pub/evil", evil, extra=[secret.digest])
    gateway = gateway_for(tmp_path, strict)
    try:
        alice = Caller(**{**ALICE.__dict__, "secret": SECRET})
        assert pull(gateway, alice, "private/app:1").state == "READY"
        job = pull(gateway, BOB, "pub/evil:1")
        assert job.state == "FAILED", "bob got alice's private layer from the cache"
        assert "missing" in job.message, job.message
        # A repository that does hold the layer proves access and reuses the cached copy.
        ok = strict.layout.add_image([secret], config={"Env": ["OK=1"]})
        strict.push("pub/ok", "1", ok)
        strict.own("pub/ok", ok)
        assert pull(gateway, BOB, "pub/ok:1").state == "READY"
        assert ("HEAD", f"/v2/pub/ok/blobs/{secret.digest}") in strict.requests
        assert ("GET", f"/v2/pub/ok/blobs/{secret.digest}") not in strict.requests
    finally:
        gateway.stop()


# -- redirects and error texts ----------------------------------------------------------------


def _client(handler, insecure: bool = False) -> RegistryClient:
    settings = RegistrySettings(
        insecure=frozenset({"reg.example"} if insecure else ()), retries=0, trust_env=False
    )
    return RegistryClient(settings, transport=httpx.MockTransport(handler), sleep=lambda _s: None)


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/",
        "https://127.0.0.1:7080/api/v1/images",
        "https://[::1]/x",
        "https://localhost/x",
        "file:///etc/shadow",
        "http://cdn.example/blob",  # plain http from an https registry
    ],
)
def test_registry_redirects_are_restricted(location: str) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.host == "reg.example":
            return httpx.Response(307, headers={"Location": location})
        return httpx.Response(200, content=b"{}")

    with _client(handler) as client, pytest.raises(RegistryError, match="redirected"):
        client.resolve("reg.example/a/b:1")
    assert all("reg.example" in url for url in seen), seen


def test_redirect_rules_allow_what_registries_do() -> None:
    check_redirect("https://cdn.example/blob", "https://reg.example", "reg.example", False)
    check_redirect("http://cdn.example/blob", "http://reg.example", "reg.example", True)
    check_redirect("http://127.0.0.1:5000/x", "http://127.0.0.1:5000", "127.0.0.1:5000", True)
    check_redirect("http://localhost:5001/x", "http://127.0.0.1:5000", "127.0.0.1:5000", True)


def test_registry_error_texts_are_cut_and_escaped() -> None:
    hostile = "\x1b[2J\x1b[31mgotcha\r\nFAKE LOG LINE " + "A" * 20_000

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"errors": [{"code": "DENIED\x07", "message": hostile}]})

    with _client(handler) as client, pytest.raises(RegistryError) as info:
        client.resolve("reg.example/a/b:1")
    message = str(info.value)
    assert len(message) < 1200, len(message)
    assert not any(ord(c) < 32 or ord(c) == 127 for c in message), repr(message[:200])
    assert "\\x1b" in message and "gotcha" in message

    def plain(request: httpx.Request) -> httpx.Response:
        return httpx.Response(418, content=b"\x1b]0;title\x07" + b"B" * 50_000)

    with _client(plain) as client, pytest.raises(RegistryError) as info:
        client.resolve("reg.example/a/b:1")
    assert "\x1b" not in str(info.value) and len(str(info.value)) < 1200


def test_clean_text() -> None:
    assert clean_text("a\nb\x00c\u202ed") == "a\\nb\\x00c\\u202ed"
    assert clean_text("x" * 50, 10) == "x" * 10 + "..."


# -- what other users may learn ---------------------------------------------------------------


def _fake_image(gateway: Gateway, image_id: str, acl: Acl | None) -> None:
    partial = gateway.store.new_partial(image_id)
    partial.write_bytes(b"hsqs")
    meta = ImageMetadata(
        id=image_id, source=f"x/{image_id[:6]}", digest=f"sha256:{image_id}", platform="linux/amd64"
    )
    gateway.store.publish(dataclasses.replace(meta, acl=acl), partial)


def test_lookups_reveal_nothing_about_private_images(tmp_path: Path, strict) -> None:
    gateway = gateway_for(tmp_path, strict)
    try:
        shared = hashlib.sha256(b"p").hexdigest()[:12]
        private_id = shared + "a" * 52
        public_id = shared + "b" * 52
        _fake_image(gateway, private_id, Acl((ALICE.uid,), ()))
        _fake_image(gateway, public_id, None)
        # Bob sees the public image by the common prefix, as if the private one did not exist.
        assert gateway.lookup(BOB, shared).id == public_id
        with pytest.raises(NotFound) as hidden:
            gateway.lookup(BOB, private_id)
        with pytest.raises(NotFound) as missing:
            gateway.lookup(BOB, "c" * 64)
        assert str(hidden.value).replace(private_id, "X") == str(missing.value).replace(
            "c" * 64, "X"
        )
        assert gateway.lookup(ALICE, private_id).id == private_id
        with pytest.raises(Exception, match="ambiguous"):
            gateway.lookup(ALICE, shared)
        assert [i.id for i in gateway.images(BOB)] == []
    finally:
        gateway.stop()


def test_same_answer_for_hidden_and_missing_references(tmp_path: Path, strict) -> None:
    desc = strict.layout.add_image([make_layer({"s": "1"})])
    strict.push("private/app", "1", desc)
    gateway = gateway_for(tmp_path, strict)
    try:
        alice = Caller(**{**ALICE.__dict__, "secret": SECRET})
        job = pull(gateway, alice, "private/app:1")
        assert job.state == "READY"
        with pytest.raises(NotFound) as hidden:
            gateway.lookup(BOB, f"{REGISTRY}/private/app:1")
        with pytest.raises(NotFound) as missing:
            gateway.lookup(BOB, f"{REGISTRY}/private/nope:1")
        assert str(hidden.value).replace("app", "nope") == str(missing.value)
        with pytest.raises(NotFound) as hidden_job:
            gateway.job(BOB, job.id)
        with pytest.raises(NotFound) as missing_job:
            gateway.job(BOB, "0" * 16)
        assert str(hidden_job.value).replace(job.id, "0" * 16) == str(missing_job.value)
    finally:
        gateway.stop()


def test_a_token_realm_on_a_link_local_address_is_refused() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(
            401,
            headers={"WWW-Authenticate": 'Bearer realm="http://169.254.169.254/token"'},
            json={"errors": [{"code": "UNAUTHORIZED"}]},
        )

    with _client(handler) as client, pytest.raises(RegistryError, match="token realm"):
        client.resolve("reg.example/a/b:1")
    assert all("169.254" not in url for url in seen)


def test_a_private_image_is_not_given_away_by_a_copy_of_its_manifest(
    tmp_path: Path, strict
) -> None:
    secret = make_layer({"secret/key": "alice's\n"})
    private = strict.layout.add_image([secret])
    strict.push("private/app", "1", private)
    strict.own("private/app", private)
    # Bob's repository serves the very same manifest (same image id), not the layers.
    strict.push("pub/copy", "1", private)
    strict.own("pub/copy", private, extra=[secret.digest])
    gateway = gateway_for(tmp_path, strict)
    try:
        alice = Caller(**{**ALICE.__dict__, "secret": SECRET})
        image_id = pull(gateway, alice, "private/app:1").image_id
        job = pull(gateway, BOB, "pub/copy:1")
        assert job.state == "FAILED" and "missing" in job.message, job
        assert gateway.store.get(image_id).acl == Acl((ALICE.uid,), ())  # type: ignore[union-attr]
        with pytest.raises(NotFound):
            gateway.lookup(BOB, image_id)
    finally:
        gateway.stop()


def test_an_import_is_bounded_too(tmp_path: Path, strict) -> None:
    from tests.unit.test_gateway_service import IMPORTER, _docker_archive, _upload, wait

    gateway = gateway_for(tmp_path, strict, import_users=["*"], limits={"max_tar_entries": 2})
    try:
        archive = tmp_path / "image.tar"
        _docker_archive(archive)
        job = gateway.submit_import(IMPORTER, "docker.io/library/x:1", *_upload(gateway, archive))
        done = wait(gateway, IMPORTER, job.id)
        assert done.state == "FAILED" and "more than 2 tar entries" in done.message, done
        assert [p for p in gateway.store.path.iterdir() if p.name.startswith(".")] == []
    finally:
        gateway.stop()


def test_uncompressed_layers_count_towards_the_image_bound(tmp_path: Path, strict) -> None:
    layers = [many_entries_layer(40), many_entries_layer(41)]
    strict.push("pub/plain", "1", strict.layout.add_image(layers))
    gateway = gateway_for(tmp_path, strict, limits={"max_image_unpacked": "40k"})
    try:
        job = pull(gateway, ALICE, "pub/plain:1")
        assert job.state == "FAILED" and "decompresses to more than 40 KiB" in job.message
    finally:
        gateway.stop()


def test_a_manifest_sent_drop_by_drop_is_stopped_by_the_pull_timeout(tmp_path: Path) -> None:
    import time

    def drip():
        for _ in range(20):
            time.sleep(0.05)
            yield b" "

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=drip(), headers={"Content-Type": "application/json"})

    registry = FakeRegistry(OCILayout(tmp_path / "layout"))
    registry.handler = handler  # type: ignore[method-assign]
    gateway = gateway_for(tmp_path, registry, limits={"pull_timeout": 0.5})
    try:
        # (httpx's MockTransport reads the whole stream first; a real socket is read by chunk)
        job = pull(gateway, ALICE, "pub/drip:1")
        assert job.state == "FAILED" and "took longer than 0.5 s" in job.message, job
    finally:
        gateway.stop()


def test_a_failed_pull_message_is_bounded_and_escaped(tmp_path: Path, strict) -> None:
    layer = make_layer({"a": "1"})
    desc = strict.layout.add_image([layer])
    blob = strict.layout.path / "blobs/sha256" / desc["digest"].split(":")[1]
    doc = json.loads(blob.read_bytes())
    doc["layers"][0]["mediaType"] = "x\x1b[31m\n" * 20_000
    strict.tags["pub/odd:1"] = strict.layout.add_blob(json.dumps(doc).encode())
    gateway = gateway_for(tmp_path, strict)
    try:
        job = pull(gateway, ALICE, "pub/odd:1")
        assert job.state == "FAILED" and "media type" in job.message, job.message[:200]
        assert len(job.message) <= 2003 and "\x1b" not in job.message
        assert "\n" not in job.message
    finally:
        gateway.stop()
