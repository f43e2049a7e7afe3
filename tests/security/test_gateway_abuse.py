"""The image gateway holds under abuse: a real ``shifter-gateway`` with real munge.

Each test starts its own gateway (a temporary store, database and layer cache, a free port on
127.0.0.1) and a tiny hostile registry on loopback, so the box's gateway is never disturbed;
the box provides munge and the users. Attacks: an unauthenticated 1 GiB body, a layer that
decompresses to 10 GB, 100 concurrent pulls by an ordinary user, a hostile redirect, and a
private image probed by another user. Peak RSS (``VmHWM``) and disk use are measured and
printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from isal import isal_zlib

from shifter_core import munge
from shifter_core.client import GatewayClient, GatewayError
from shifter_core.gateway.models import JobInfo
from shifter_core.gateway.transport import gateway_transport
from tests.fixtures.registries import Layer, OCILayout, free_port, make_layer
from tests.integration.slurm import run_as

pytestmark = pytest.mark.skipif(shutil.which("tar2sqfs") is None, reason="needs tar2sqfs")

CHECKOUT = Path(__file__).resolve().parents[2]
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
BOMB_BYTES = 10 << 30  # what the bomb decompresses to (10 GiB)
UNPACK_LIMIT = 512 << 20  # the test gateway's max_layer_unpacked


def gzip_zeros(total: int) -> bytes:
    """A valid gzip stream of *total* zero bytes, made without compressing them all: after a
    full flush deflate output no longer depends on what came before, so one compressed MiB
    is repeated."""
    mib = 1 << 20
    assert total % mib == 0
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(bytes(mib)) + comp.flush(zlib.Z_FULL_FLUSH)
    block = comp.compress(bytes(mib)) + comp.flush(zlib.Z_FULL_FLUSH)
    assert block == comp.compress(bytes(mib)) + comp.flush(zlib.Z_FULL_FLUSH)
    end = comp.flush(zlib.Z_FINISH)
    crc = 0
    zeros = bytes(mib)
    for _ in range(total // mib):
        crc = isal_zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc & 0xFFFFFFFF, total & 0xFFFFFFFF)
    return header + first + block * (total // mib - 1) + end + trailer


def test_gzip_zeros_is_what_it_says() -> None:
    assert zlib.decompress(gzip_zeros(3 << 20), 31) == bytes(3 << 20)


class HostileRegistry:
    """A registry on 127.0.0.1 serving an OCI layout; ``redirects`` maps paths to Locations."""

    def __init__(self, layout: OCILayout) -> None:
        self.layout = layout
        self.tags: dict[str, str] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[str] = []
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self.answer(head=True)

            def do_GET(self) -> None:
                self.answer(head=False)

            def answer(self, head: bool) -> None:
                registry.requests.append(f"{self.command} {self.path}")
                if self.path in registry.redirects:
                    self.send_response(307)
                    self.send_header("Location", registry.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status, data, ctype = registry.lookup(self.path)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    with contextlib.suppress(OSError):
                        self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def push(self, repo: str, tag: str, descriptor: dict[str, Any]) -> str:
        self.tags[f"{repo}:{tag}"] = descriptor["digest"]
        return f"{self.host}/{repo}:{tag}"

    def lookup(self, path: str) -> tuple[int, bytes, str]:
        if path == "/v2/":
            return 200, b"{}", "application/json"
        repo, kind, ref = path[len("/v2/") :].rsplit("/", 2)
        digest = ref if ref.startswith("sha256:") else self.tags.get(f"{repo}:{ref}", "")
        blob = self.layout.path / "blobs" / "sha256" / digest.split(":")[-1]
        if not digest or not blob.is_file():
            code = "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN"
            return 404, json.dumps({"errors": [{"code": code}]}).encode(), "application/json"
        data = blob.read_bytes()
        if kind == "manifests":
            return 200, data, "application/vnd.oci.image.manifest.v1+json"
        return 200, data, "application/octet-stream"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class RunningGateway:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    root: Path
    log: Path

    def status(self, field: str) -> int:
        """A ``/proc/PID/status`` figure in bytes (``VmHWM``: peak RSS)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(field)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def client(self, ca_file: str | None = None) -> GatewayClient:
        base, transport = gateway_transport(self.url, ca_file=ca_file)
        return GatewayClient(base, timeout=60, transport=transport)


@pytest.fixture
def gateway_env(box, tmp_path: Path) -> Iterator[tuple[HostileRegistry, Any]]:
    """A hostile registry, and a function starting a gateway that pulls from it."""
    root = tmp_path
    root.chmod(0o755)
    registry = HostileRegistry(OCILayout(root / "layout"))
    started: list[RunningGateway] = []

    def start(**gateway: Any) -> RunningGateway:
        port = free_port()
        settings: dict[str, Any] = {
            "image_path": str(root / "images"),
            "gateway": {
                "url": f"http://127.0.0.1:{port}",
                "listen": f"127.0.0.1:{port}",
                "database": str(root / "gw" / "db.sqlite"),
                "layer_cache": str(root / "gw" / "layers"),
                "layer_cache_size": "256M",
                "workers": 2,
                "admins": ["root"],
                "limits": {"max_layer_unpacked": f"{UNPACK_LIMIT >> 20}M"},
                **gateway,
            },
            "registries": {"insecure": [registry.host], "retries": 0},
        }
        config = root / "shifter.yaml"
        config.write_text(json.dumps(settings))
        log = root / "gateway.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "shifter_core.gateway", "--config", str(config)],
            env={**os.environ, "PYTHONPATH": str(CHECKOUT / "src")},
            stdout=subprocess.DEVNULL,
            stderr=log.open("ab"),
            stdin=subprocess.DEVNULL,
        )
        url = settings["gateway"]["url"]
        if not settings["gateway"]["listen"].startswith("unix:"):
            port = int(settings["gateway"]["listen"].rsplit(":", 1)[1])
        gw = RunningGateway(url, port, proc, root, log)
        started.append(gw)
        listen = settings["gateway"]["listen"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if listen.startswith("unix:"):
                if Path(listen[5:]).is_socket():
                    return gw
            else:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                    return gw
            assert gw.alive(), log.read_text()[-3000:]
            time.sleep(0.1)
        raise AssertionError("the gateway did not start: " + log.read_text()[-3000:])

    yield registry, start
    for gw in started:
        gw.proc.terminate()
        try:
            gw.proc.wait(15)
        except subprocess.TimeoutExpired:
            gw.proc.kill()
            gw.proc.wait()
    registry.stop()


def wait_done(client: GatewayClient, job: JobInfo, timeout: float = 300) -> JobInfo:
    deadline = time.monotonic() + timeout
    while job.state not in ("READY", "FAILED"):
        assert time.monotonic() < deadline, job
        job = client.job(job.id, wait=2, state=job.state)
    return job


def send_body(port: int, headers: str, total: int, chunked: bool = False) -> tuple[str, int]:
    """Send a request with a *total*-byte body of zeros; (response head, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(30)
    reply = bytearray()
    done = threading.Event()

    def reader() -> None:
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                reply.extend(chunk)
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    sent = 0
    piece = bytes(1 << 20)
    try:
        sock.sendall(headers.encode())
        while sent < total and not done.is_set():
            data = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
            sock.sendall(data)
            sent += len(piece)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    done.wait(30)
    sock.close()
    return bytes(reply).decode("latin-1"), sent


def test_unauthenticated_huge_bodies_are_refused_unread(gateway_env) -> None:
    _registry, start = gateway_env
    gw = start()
    before = gw.status("VmHWM")
    head = (
        "POST /api/v1/pull HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {1 << 30}\r\n\r\n"
    )
    reply, sent = send_body(gw.port, head, 1 << 30)
    assert reply.startswith("HTTP/1.1 401"), reply[:300]
    assert "no munge credential" in reply
    after_first = gw.status("VmHWM")
    print(f"\n[gateway-abuse] 1 GiB body: sent {sent >> 20} MiB, peak RSS {after_first >> 20} MiB")
    assert after_first - before < 64 << 20, "the gateway buffered the body"
    assert sent < 64 << 20, "the gateway read the body of an unauthenticated request"
    chunked = "POST /api/v1/import?name=x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    reply2, sent2 = send_body(gw.port, chunked, 1 << 30, chunked=True)
    assert reply2.startswith("HTTP/1.1 401"), reply2[:300]
    # Authenticated, but over max_request_body: refused by its Content-Length.
    body = b"{" + b" " * (2 << 20) + b"}"
    payload = munge.request_payload("POST", "/api/v1/pull", munge.body_digest(body))
    cred = munge.encode(payload)
    head3 = (
        f"POST /api/v1/pull HTTP/1.1\r\nHost: x\r\nAuthorization: Munge {cred}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    reply3, _ = send_body(gw.port, head3, len(body))
    assert reply3.startswith("HTTP/1.1 413"), reply3[:300]
    assert gw.alive()
    assert gw.client().ping().uid == 0
    peak = gw.status("VmHWM")
    print(
        f"\n[gateway-abuse] 1 GiB unauthenticated body: client pushed {sent >> 20} MiB "
        f"(Content-Length) and {sent2 >> 20} MiB (chunked) before the gateway closed; "
        f"peak RSS {before >> 20} -> {peak >> 20} MiB"
    )
    assert peak - before < 64 << 20, "the gateway buffered the body"
    assert sent < 64 << 20 and sent2 < 64 << 20, "the gateway read (and dropped) the body"


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.slow
def test_a_10_gb_decompression_bomb_fails_its_pull_cleanly(gateway_env) -> None:
    registry, start = gateway_env
    blob = gzip_zeros(BOMB_BYTES)
    layer = Layer(blob, "sha256:" + hashlib.sha256(b"unknown").hexdigest(), GZIP_LAYER)
    ref = registry.push("bomb/zeros", "1", registry.layout.add_image([layer]))
    gw = start()
    free_before = free_bytes(gw.root)
    lowest = [free_before]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            lowest[0] = min(lowest[0], free_bytes(gw.root))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    client = gw.client()
    started = time.monotonic()
    job = wait_done(client, client.pull(ref))
    elapsed = time.monotonic() - started
    stop.set()
    watcher.join()
    assert job.state == "FAILED", job
    assert "decompresses to more than 512 MiB" in job.message, job.message
    assert "Traceback" not in job.message
    leftovers = [p.name for p in (gw.root / "images").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert not list((gw.root / "gw" / "layers").rglob("*.partial"))
    used = free_before - lowest[0]
    peak = gw.status("VmHWM")
    print(
        f"\n[gateway-abuse] bomb: {len(blob) >> 20} MiB gzip of {BOMB_BYTES >> 30} GiB, "
        f"FAILED in {elapsed:.1f} s; peak disk use {used >> 20} MiB "
        f"(limit {UNPACK_LIMIT >> 20} MiB + the layer); peak RSS {peak >> 20} MiB"
    )
    assert used < UNPACK_LIMIT + len(blob) + (1 << 30)  # slack: others share the disk
    assert free_bytes(gw.root) > free_before - len(blob) - (256 << 20)  # spool gone
    assert gw.alive() and gw.client().ping()


CONCURRENT = 100

PULLER = """
import json, sys, threading
from shifter_core.client import GatewayClient
url, refs = sys.argv[1], json.loads(sys.argv[2])
results = [None] * len(refs)
def one(i):
    try:
        with GatewayClient(url, timeout=120) as c:
            job = c.pull(refs[i])
            results[i] = c.wait(job.id, interval=2).state
    except Exception as err:
        results[i] = f"error: {err}"
threads = [threading.Thread(target=one, args=(i,)) for i in range(len(refs))]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(results))
"""


@pytest.mark.slow
def test_100_concurrent_pulls_by_an_ordinary_user(gateway_env) -> None:
    registry, start = gateway_env
    refs = []
    for i in range(20):
        desc = registry.layout.add_image([make_layer({f"app/{i}": f"{i}\n" * 1000})])
        refs.append(registry.push(f"many/app{i}", "1", desc))
    gw = start()
    wanted = [refs[i % len(refs)] for i in range(CONCURRENT)]
    started = time.monotonic()
    proc = run_as(
        [sys.executable, "-c", PULLER, gw.url, json.dumps(wanted)],
        "alice",
        timeout=600,
        PYTHONPATH=f"{CHECKOUT / 'src'}:{CHECKOUT}",
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results == ["READY"] * CONCURRENT, results
    assert gw.alive()
    images = gw.client().images()
    assert len([i for i in images if i.status == "READY"]) == len(refs)
    peak = gw.status("VmHWM")
    print(
        f"\n[gateway-abuse] {CONCURRENT} concurrent pulls ({len(refs)} images) by alice: all "
        f"READY in {elapsed:.1f} s; peak RSS {peak >> 20} MiB"
    )
    assert peak < 1 << 30


def test_hostile_redirects_and_private_images_through_the_gateway(gateway_env) -> None:
    registry, start = gateway_env
    desc = registry.layout.add_image([make_layer({"x": "1"})])
    ref = registry.push("evil/redirect", "1", desc)
    registry.redirects["/v2/evil/redirect/manifests/1"] = "http://169.254.169.254/latest/"
    gw = start()
    client = gw.client()
    job = wait_done(client, client.pull(ref))
    assert job.state == "FAILED" and "169.254.169.254" in job.message, job
    assert "link-local" in job.message
    assert not any("169.254" in r for r in registry.requests[1:] if "redirect" not in r)
    # A private image (pulled for alice only) is invisible to bob: same answers as for none.
    desc = registry.layout.add_image([make_layer({"secret": "alice\n"})])
    private = registry.push("alice/secret", "1", desc)
    job = wait_done(client, client.pull(private, users=["alice"]))
    assert job.state == "READY" and job.private, job
    image_id = job.image_id
    script = (
        "import sys\nfrom shifter_core.client import GatewayClient, GatewayError\n"
        "c = GatewayClient(sys.argv[1])\n"
        "for ref in sys.argv[2:]:\n"
        "    try:\n        print('FOUND', c.lookup(ref).id)\n"
        "    except GatewayError as err:\n        print('ERR', err.status, err)\n"
        "print('IMAGES', len(c.images()))\n"
    )
    missing = "f" * 64
    args = [private, image_id, image_id[:12], f"{registry.host}/alice/none:1", missing]
    env = {"PYTHONPATH": f"{CHECKOUT / 'src'}:{CHECKOUT}"}
    bob = run_as([sys.executable, "-c", script, gw.url, *args], "bob", **env)
    assert bob.returncode == 0, bob.stderr
    lines = bob.stdout.splitlines()
    assert not any(line.startswith("FOUND") for line in lines), lines
    assert lines[-1] == "IMAGES 0"
    norm = [
        line.replace(private, "R")
        .replace(f"{registry.host}/alice/none:1", "R")
        .replace(image_id, "I")
        .replace(missing, "I")
        .replace(image_id[:12], "I")
        for line in lines[:-1]
    ]
    assert norm[0] == norm[3] and norm[1] == norm[4], norm
    alice = run_as([sys.executable, "-c", script, gw.url, image_id], "alice", **env)
    assert alice.stdout.startswith(f"FOUND {image_id}"), alice.stdout + alice.stderr
    with pytest.raises(GatewayError):
        client.lookup(missing)


def test_the_gateway_listens_on_a_unix_socket_or_tls(
    gateway_env, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    _registry, start = gateway_env
    sockdir = Path(tempfile.mkdtemp(prefix="shifter-gw-"))  # alice must reach the socket
    sockdir.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(sockdir, ignore_errors=True))
    sock = sockdir / "gateway.sock"
    gw = start(listen=f"unix:{sock}", url=f"unix:{sock}")
    assert sock.stat().st_mode & 0o777 == 0o666  # munge authenticates every request
    assert gw.client().ping().uid == 0
    script = (
        "import sys\nfrom shifter_core.client import GatewayClient\n"
        "from shifter_core.gateway.transport import gateway_transport\n"
        "base, t = gateway_transport(sys.argv[1])\n"
        "print(GatewayClient(base, transport=t).ping().user)\n"
    )
    env = {"PYTHONPATH": f"{CHECKOUT / 'src'}:{CHECKOUT}"}
    alice = run_as([sys.executable, "-c", script, gw.url], "alice", **env)
    assert alice.stdout.strip() == "alice", alice.stderr
    gw.proc.terminate()
    gw.proc.wait(15)
    # TLS: a certificate for 127.0.0.1; clients verify it (here against its own CA file).
    cert, key = tmp_path / "gw.crt", tmp_path / "gw.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    port = free_port()
    tls = start(
        listen=f"127.0.0.1:{port}",
        url=f"https://127.0.0.1:{port}",
        tls_cert=str(cert),
        tls_key=str(key),
    )
    assert tls.client(ca_file=str(cert)).ping().uid == 0
    with pytest.raises(GatewayError):  # an unverified certificate is refused
        tls.client().ping()
    plain = GatewayClient(f"http://127.0.0.1:{port}", timeout=5)
    with pytest.raises(GatewayError):
        plain.ping()
