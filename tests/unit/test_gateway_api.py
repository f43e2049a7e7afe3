"""The gateway's HTTP layer and its client: Starlette's TestClient, a fake munge.

The fake credential is ``FAKE:<base64 JSON {uid, gid, payload}>``; it decodes once (a second
use is "replayed", as munged says). The real munge is exercised by the integration tests.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest

from shifter_core import munge
from shifter_core.client import GatewayClient, GatewayError, GatewayUnreachable
from shifter_core.gateway.app import create_app
from shifter_core.gateway.service import Gateway
from tests.fixtures.registries import OCILayout, make_layer
from tests.unit.test_gateway_service import REGISTRY, FakeRegistry, make_config

with warnings.catch_warnings():  # Starlette would like httpx2 for its TestClient; httpx works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

pytestmark = pytest.mark.skipif(shutil.which("tar2sqfs") is None, reason="needs tar2sqfs")


_NONCE = itertools.count()


class FakeMunge:
    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.down = False

    @staticmethod
    def encoder(uid: int, gid: int = 0, restrict: bool = True):
        def encode(payload: bytes) -> str:
            secret = b'"secret"' in payload
            doc = {
                "uid": uid,
                "gid": gid,
                # as the real client does: a payload with a secret only the gateway decodes
                "uid_restriction": os.getuid() if secret and restrict else None,
                "payload": base64.b64encode(payload).decode(),
                "nonce": next(_NONCE),  # munge credentials differ even for equal payloads
            }
            return "FAKE:" + base64.b64encode(json.dumps(doc).encode()).decode()

        return encode

    def decode(self, credential: str) -> munge.Credential:
        if self.down:
            raise munge.MungeError("Socket communication error", code=munge.EMUNGE_SOCKET)
        if not credential.startswith("FAKE:"):
            raise munge.MungeAuthError("invalid munge credential: Invalid credential format")
        if credential in self.seen:
            raise munge.MungeAuthError("replayed munge credential: Replayed credential")
        self.seen.add(credential)
        doc = json.loads(base64.b64decode(credential[5:]))
        payload = base64.b64decode(doc["payload"])
        return munge.Credential(doc["uid"], doc["gid"], payload, doc.get("uid_restriction"))


@pytest.fixture
def setup(tmp_path: Path):
    layout = OCILayout(tmp_path / "layout")
    registry = FakeRegistry(layout)
    registry.push("pub/app", "1", layout.add_image([make_layer({"a": "1\n"})]))
    gateway = Gateway(
        make_config(tmp_path, import_users=["*"]),
        transport=httpx.MockTransport(registry.handler),
    )
    gateway.start()
    fake = FakeMunge()
    test_client = TestClient(create_app(gateway, decoder=fake.decode))
    yield gateway, fake, test_client
    test_client.close()
    gateway.stop()
    gateway.db.close()


def client_for(test_client: TestClient, uid: int = 0) -> GatewayClient:
    return GatewayClient(
        "http://testserver", encoder=FakeMunge.encoder(uid), transport=test_client._transport
    )


def header(method: str, path: str, body: bytes = b"", uid: int = 0) -> dict[str, str]:
    payload = munge.request_payload(method, path, munge.body_digest(body))
    return {"Authorization": f"Munge {FakeMunge.encoder(uid)(payload)}"}


def test_every_request_needs_a_credential_bound_to_it(setup) -> None:
    _, fake, http = setup

    def refused(response: httpx.Response, text: str, status: int = 401) -> None:
        assert response.status_code == status, response.text
        assert text in response.json()["error"]

    refused(http.get("/api/v1/images"), "no munge credential")
    refused(http.get("/api/v1/images", headers={"Authorization": "Bearer x"}), "'Munge <cred")
    refused(http.get("/api/v1/images", headers={"Authorization": "Munge nope"}), "invalid")
    good = header("GET", "/api/v1/images")
    assert http.get("/api/v1/images", headers=good).json() == {"images": []}
    refused(http.get("/api/v1/images", headers=good), "replayed")
    refused(http.get("/api/v1/ping", headers=header("GET", "/api/v1/images")), "made for GET")
    refused(http.post("/api/v1/images", headers=header("GET", "/api/v1/images")), "", 405)
    refused(
        http.get("/api/v1/lookup?reference=a", headers=header("GET", "/api/v1/lookup?reference=b")),
        "not for GET /api/v1/lookup?reference=a",
    )
    body = b'{"reference": "x"}'
    refused(
        http.post("/api/v1/pull", content=body, headers=header("POST", "/api/v1/pull", b"{}")),
        "another request body",
    )
    not_payload = {"Authorization": "Munge " + FakeMunge.encoder(0)(b"just text")}
    refused(http.get("/api/v1/images", headers=not_payload), "does not carry")
    fake.down = True
    refused(http.get("/api/v1/images", headers=header("GET", "/api/v1/images")), "cannot", 503)


def test_bad_requests_get_a_message(setup) -> None:
    _, _, http = setup
    response = http.post(
        "/api/v1/pull", content=b"[1]", headers=header("POST", "/api/v1/pull", b"[1]")
    )
    assert response.status_code == 400 and "JSON object" in response.json()["error"]
    body = b'{"reference": "Not A Ref"}'
    response = http.post("/api/v1/pull", content=body, headers=header("POST", "/api/v1/pull", body))
    assert response.status_code == 400 and "invalid image reference" in response.json()["error"]


def test_client_pull_wait_lookup_images_remove(setup) -> None:
    _, _, http = setup
    with client_for(http, uid=0) as client:
        me = client.ping()
        assert me.user == "root" and me.admin
        job = client.pull(f"{REGISTRY}/pub/app:1")
        states: list[str] = []
        final = client.wait(job.id, lambda j: states.append(j.state), interval=0.02)
        assert final.state == "READY" and states[-1] == "READY"
        image = client.lookup(f"{REGISTRY}/pub/app:1")
        assert image.id == final.image_id
        assert [i.id for i in client.images()] == [image.id]
        # the listing carries the store's whole record, as lookup gives it
        (record,) = [i.record for i in client.images()]
        assert record is not None and record["id"] == image.id
        looked_up = image.to_dict()
        assert json.loads(json.dumps({k: looked_up[k] for k in record})) == record
        assert {"digest", "env", "entrypoint", "workdir", "layers"} <= set(record)
        assert client.stats().layer_cache.downloads == 1
        assert client.remove(image.id[:12]) == [image.id]
        with pytest.raises(GatewayError) as err:
            client.lookup(f"{REGISTRY}/pub/app:1")
        assert err.value.status == 404 and "not found on the image gateway" in str(err.value)


def test_import_streams_the_file_and_checks_its_hash(setup, tmp_path: Path) -> None:
    gateway, _, http = setup
    squash = tmp_path / "x.sqfs"
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("x\n")
    subprocess.run(
        ["mksquashfs", str(tree), str(squash), "-quiet", "-noappend"],
        check=True,
        capture_output=True,
    )
    with client_for(http, uid=65534) as client:
        job = client.import_file(squash, "site/x:1")
        final = client.wait(job.id, interval=0.02)
    assert final.state == "READY", final
    # A credential for other bytes: refused, and the upload is not kept.
    payload = munge.request_payload("POST", "/api/v1/import?name=y", "0" * 64)
    response = http.post(
        "/api/v1/import?name=y",
        content=squash.read_bytes(),
        headers={"Authorization": "Munge " + FakeMunge.encoder(0)(payload)},
    )
    assert response.status_code == 401 and "another request body" in response.json()["error"]
    assert [p for p in gateway.store.path.iterdir() if p.name.startswith(".")] == []


def test_an_unreachable_gateway_is_named() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused")

    client = GatewayClient(
        "http://gw.test:7080", encoder=FakeMunge.encoder(0), transport=httpx.MockTransport(refuse)
    )
    with pytest.raises(GatewayUnreachable) as err:
        client.images()
    assert "cannot reach the image gateway at http://gw.test:7080: Connection refused" in str(
        err.value
    )


def test_wait_survives_a_gateway_restart() -> None:
    answers: list[Any] = ["down", "down", {"state": "PULLING"}, "down", {"state": "READY"}]

    def handler(request: httpx.Request) -> httpx.Response:
        answer = answers.pop(0)
        if answer == "down":
            raise httpx.ConnectError("Connection refused")
        return httpx.Response(200, json={"job": {"id": "j", **answer}})

    client = GatewayClient(
        "http://gw.test", encoder=FakeMunge.encoder(0), transport=httpx.MockTransport(handler)
    )
    lost: list[str] = []
    final = client.wait("j", interval=0.01, on_disconnect=lambda e: lost.append(str(e)))
    assert final.state == "READY" and len(lost) == 2
    answers[:] = ["down"] * 1000
    with pytest.raises(GatewayUnreachable):
        client.wait("j", interval=0.01, reconnect_timeout=0.05)


def test_a_status_request_waits_for_a_state_change(setup) -> None:
    import threading
    import time

    gateway, _, test_client = setup
    client = client_for(test_client)
    job = client.wait(client.pull(f"{REGISTRY}/pub/app:1").id)
    assert job.state == "READY"
    # Not in the state the client saw: answered at once.
    assert client.job(job.id, wait=10, state="PULLING").state == "READY"
    # In it: the answer waits for the next change (any job's), here from a worker thread.
    timer = threading.Timer(0.3, gateway.changes.notify)
    started = time.monotonic()
    timer.start()
    assert client.job(job.id, wait=10, state="READY").state == "READY"
    waited = time.monotonic() - started
    timer.join()
    assert 0.25 <= waited < 5  # woken by the change, not by the 10 s limit
    with pytest.raises(GatewayError, match="wait must be between 0 and 30 seconds"):
        client.job(job.id, wait=31, state="READY")
    with pytest.raises(GatewayError, match="is not a number"):
        client.request("GET", f"/jobs/{job.id}", params={"wait": "soon", "state": "READY"})


def test_registry_secrets_need_a_credential_only_the_gateway_can_decode(setup) -> None:
    """A credential with a secret that any uid could decode is refused (the client restricts
    it to the gateway's uid; an old or hand-made client may not)."""
    _gateway, _fake, test_client = setup
    loose = GatewayClient(
        "http://testserver",
        encoder=FakeMunge.encoder(1001, restrict=False),
        transport=test_client._transport,
    )
    with pytest.raises(GatewayError, match="only the image gateway's user can decode"):
        loose.login("registry.test", "alice", "s3cret")
    strict = GatewayClient(
        "http://testserver", encoder=FakeMunge.encoder(1001), transport=test_client._transport
    )
    try:
        strict.login("registry.test", "alice", "s3cret")
    except GatewayError as err:  # the fake registry may refuse the login itself
        assert "only the image gateway's user" not in str(err)


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_metrics_move_with_a_pull_and_name_no_image(setup) -> None:
    _, _, http = setup
    before = http.get("/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    with client_for(http, uid=0) as client:
        job = client.pull(f"{REGISTRY}/pub/app:1")
        assert client.wait(job.id, interval=0.02).state == "READY"
    text = http.get("/metrics").text
    after = _samples(text)
    assert after['shifter_gateway_job_transitions_total{kind="pull",state="ready"}'] == 1
    assert after['shifter_gateway_job_transitions_total{kind="pull",state="pulling"}'] == 1
    for stage in ("pending", "pulling", "converting"):
        assert after[f'shifter_gateway_job_stage_seconds_count{{stage="{stage}"}}'] == 1
    assert after["shifter_gateway_image_bytes_total"] > 0
    assert after["shifter_gateway_layer_cache_downloads_total"] == 1
    assert after["shifter_gateway_layer_cache_bytes"] > 0
    assert after['shifter_gateway_jobs{state="READY"}'] == 1
    assert after["shifter_gateway_queue_depth"] == 0
    route = 'method="POST",route="/api/v1/pull",status="200"'
    assert after[f"shifter_gateway_request_seconds_count{{{route}}}"] == 1, text
    assert 'route="/api/v1/jobs/{job_id}"' in text  # templates, not one label per job
    assert "pub/app" not in text and REGISTRY not in text
