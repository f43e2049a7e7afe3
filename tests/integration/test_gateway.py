"""The image gateway through the real thing: shifterimg as test users, real munge, real registries.

One gateway per module, separate from the box's: its own port, config, store, database and
layer cache under a temporary directory, run as the service user ``shifter`` (it needs no
root). Registries (anonymous, Basic auth, Bearer tokens) come from
``tests/fixtures/registries.py``; a throttling TCP relay in front of the anonymous one makes a
pull slow enough to SIGKILL the gateway in the middle of it.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import gzip
import hashlib
import io
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from shifter_core import munge
from shifter_core.client import GatewayClient
from shifter_core.image.store import ACL_GROUP, ACL_USER, ACL_XATTR, decode_posix_acl
from tests.fixtures.registries import (
    OCI_LAYER,
    Layer,
    OCILayout,
    RegistryProcess,
    TokenServer,
    corrupt_blob,
    free_port,
    make_layer,
    random_layer,
    skopeo_copy,
    start_registry,
    tools_available,
)
from tests.integration.slurm import run_as

pytestmark = [
    pytest.mark.usefixtures("box"),
    pytest.mark.skipif(
        bool(tools_available()), reason=f"missing programs: {', '.join(tools_available())}"
    ),
]

CHECKOUT = Path(__file__).resolve().parents[2]
GATEWAY_BIN = CHECKOUT / ".venv" / "bin" / "shifter-gateway"
SHIFTERIMG = str(CHECKOUT / ".venv" / "bin" / "shifterimg")
SHIFTER = str(CHECKOUT / ".venv" / "bin" / "shifter")
FUSE = "/dev/fuse"
SERVICE_USER = "shifter"
SECRET_USER, SECRET_PASSWORD = "carol", "s3cret-pw"
READY_RE = re.compile(r"is READY: ([0-9a-f]{64})")


# -- a throttling relay -----------------------------------------------------------------------


class ThrottledRelay:
    """A TCP relay to ``127.0.0.1:target`` sending answers at ``rate`` bytes per second."""

    def __init__(self, target: int, rate: float) -> None:
        self.target, self.rate = target, rate
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, 0.0), daemon=True).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, self.rate), daemon=True
            ).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, rate: float) -> None:
        try:
            while chunk := src.recv(16384):
                dst.sendall(chunk)
                if rate:
                    time.sleep(len(chunk) / rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()


# -- the test gateway -------------------------------------------------------------------------


def _chown(path: Path, user: str, mode: int) -> None:
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(mode)


@dataclass
class GatewayProcess:
    """A ``shifter-gateway`` process run as the service user, and how to talk to it."""

    root: Path
    port: int
    registries: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    homes: dict[str, Path] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        return self.root / "shifter.yaml"

    @property
    def store(self) -> Path:
        return self.root / "images"

    @property
    def log(self) -> Path:
        return self.root / "gateway.log"

    def write_config(self) -> None:
        insecure = sorted(self.registries.values())
        self.config.write_text(
            f"image_path: {self.store}\n"
            "gateway:\n"
            f"  url: {self.url}\n"
            f"  listen: 127.0.0.1:{self.port}\n"
            f"  database: {self.root / 'gw' / 'gateway.sqlite'}\n"
            f"  layer_cache: {self.root / 'gw' / 'layers'}\n"
            "  workers: 2\n"
            "  admins: [root]\n"
            "  import_users: [alice]\n"
            f"registries:\n  insecure: {json.dumps(insecure)}\n  timeout: 10\n  retries: 1\n"
        )
        self.config.chmod(0o644)

    def start(self) -> None:
        entry = pwd.getpwnam(SERVICE_USER)
        with open(self.log, "ab") as sink:
            self.proc = subprocess.Popen(
                [str(GATEWAY_BIN), "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
                cwd=self.root,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/"},
                user=entry.pw_uid,
                group=entry.pw_gid,
                extra_groups=[],
            )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"shifter-gateway exited: {self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway not up: {self.log.read_text()[-3000:]}") from None
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def home(self, user: str) -> Path:
        """A private config directory for *user* (their registry credentials)."""
        if user not in self.homes:
            path = self.root / "home" / user
            path.mkdir(parents=True)
            _chown(path, user, 0o700)
            self.homes[user] = path
        return self.homes[user]

    def shifterimg(
        self, *args: str, user: str = "alice", stdin: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = {"SHIFTER_CONFIG": str(self.config), "XDG_CONFIG_HOME": str(self.home(user))}
        if stdin is None:
            return run_as([SHIFTERIMG, *args], user=user, timeout=timeout, **env)
        command = ["runuser", "-u", user, "--", "env", "-i", "PATH=/usr/bin:/bin", "LANG=C.UTF-8"]
        command += [f"{k}={v}" for k, v in env.items()]
        return subprocess.run(
            [*command, SHIFTERIMG, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/tmp",
            check=False,
        )

    def popen(self, *args: str, user: str = "alice") -> subprocess.Popen[str]:
        command = ["runuser", "-u", user, "--", "env", "-i", "PATH=/usr/bin:/bin", "LANG=C.UTF-8"]
        command += [f"SHIFTER_CONFIG={self.config}", f"XDG_CONFIG_HOME={self.home(user)}"]
        return subprocess.Popen(
            [*command, SHIFTERIMG, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/tmp",
        )

    def client(self) -> GatewayClient:
        """A client as root (an admin of this gateway)."""
        return GatewayClient(self.url)

    def metadata(self, image_id: str) -> dict[str, Any]:
        return dict(json.loads((self.store / f"{image_id}.json").read_text()))

    def partials(self) -> list[str]:
        return [p.name for p in self.store.iterdir() if p.name.endswith(".partial")]


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The output of a command that must have succeeded."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def ready_id(result: subprocess.CompletedProcess[str]) -> str:
    match = READY_RE.search(ok(result))
    assert match, result.stdout
    return match.group(1)


def failed(result: subprocess.CompletedProcess[str]) -> str:
    """stderr of a command that must have failed (exit 1)."""
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stderr


# -- fixtures ---------------------------------------------------------------------------------


@dataclass
class World:
    gateway: GatewayProcess
    anon: RegistryProcess
    basic: RegistryProcess
    bearer: RegistryProcess
    relay: ThrottledRelay
    layout: OCILayout
    layers: dict[str, Layer]
    digests: dict[str, str]


def _push(layout: OCILayout, tag: str, dest: str, **kwargs: Any) -> None:
    skopeo_copy(layout, tag, dest, **kwargs)


def runnable_layer(secret: str) -> Layer:
    """A layer with busybox (``/bin/sh``, ``/bin/cat``) and ``/etc/secret``: an image that
    ``shifter`` can run a command in."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("bin", "etc"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        busybox = Path("/bin/busybox").read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(busybox), 0o755
        tar.addfile(info, io.BytesIO(busybox))
        for applet in ("sh", "cat"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(info)
        info = tarfile.TarInfo("etc/secret")
        info.size, info.mode = len(secret), 0o644
        tar.addfile(info, io.BytesIO(secret.encode()))
    tar_bytes = raw.getvalue()
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(tar_bytes)
    diff_id = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    return Layer(out.getvalue(), diff_id, OCI_LAYER["gzip"])


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="shifter-gw-test-", dir="/tmp"))
    root.chmod(0o755)
    started: list[Any] = []
    try:
        anon = start_registry(root / "reg-anon")
        started.append(anon)
        basic = start_registry(root / "reg-basic", users={SECRET_USER: SECRET_PASSWORD})
        started.append(basic)
        tokens = TokenServer(root, users={SECRET_USER: SECRET_PASSWORD}).start()
        started.append(tokens)
        bearer = start_registry(root / "reg-bearer", token_server=tokens)
        started.append(bearer)
        relay = ThrottledRelay(anon.port, rate=4 << 20)
        started.append(relay)

        layout = OCILayout(root / "layout")
        L: dict[str, Layer] = {
            "base": make_layer({"etc/os-release": "ID=gateway-test\n"}),
            "amd": make_layer({"etc/arch": "amd64\n"}),
            "arm": make_layer({"etc/arch": "arm64\n"}),
            "v2s2": make_layer({"etc/kind": "v2s2\n"}),
            "oci": make_layer({"etc/kind": "oci\n"}, "zstd"),
            "basic": make_layer({"etc/secret": "behind basic auth\n"}),
            "bearer": make_layer({"etc/secret": "behind bearer tokens\n"}),
            "run-basic": runnable_layer("runnable behind basic auth\n"),
            "run-bearer": runnable_layer("runnable behind bearer tokens\n"),
            "corrupt": random_layer(300_000, seed=31),
            "slow": random_layer(12 << 20, seed=32, compression="none"),
            "expire": make_layer({"etc/kind": "expire\n"}),
        }
        for i in range(3):
            L[f"ten{i}"] = random_layer(1 << 20, seed=40 + i)
        amd = layout.add_image([L["base"], L["amd"]])
        arm = layout.add_image([L["base"], L["arm"]], architecture="arm64", variant="v8")
        layout.tag("multi", layout.add_index([amd, arm]))
        for name in ("v2s2", "oci", "basic", "bearer", "corrupt", "slow", "expire"):
            layout.tag(name, layout.add_image([L["base"], L[name]]))
        for name in ("run-basic", "run-bearer"):
            layout.tag(name, layout.add_image([L[name]]))
        layout.tag("ten", layout.add_image([L["base"], *(L[f"ten{i}"] for i in range(3))]))
        digests = {"amd": amd["digest"], "arm": arm["digest"]}

        a = anon.name
        _push(layout, "v2s2", f"{a}/t/v2s2:1", format="v2s2")
        _push(layout, "oci", f"{a}/t/oci:1")
        _push(layout, "multi", f"{a}/t/list:1", all_images=True, format="v2s2")
        _push(layout, "multi", f"{a}/t/index:1", all_images=True)
        _push(layout, "corrupt", f"{a}/t/corrupt:1")
        _push(layout, "slow", f"{a}/t/slow:1")
        _push(layout, "ten", f"{a}/t/ten:1")
        _push(layout, "expire", f"{a}/t/expire:1")
        creds = (SECRET_USER, SECRET_PASSWORD)
        _push(layout, "basic", f"{basic.name}/private/app:1", creds=creds)
        _push(layout, "bearer", f"{bearer.name}/private/app:1", creds=creds)
        _push(layout, "run-basic", f"{basic.name}/private/run:1", creds=creds)
        _push(layout, "run-bearer", f"{bearer.name}/private/run:1", creds=creds)

        (root / "images").mkdir()
        _chown(root / "images", SERVICE_USER, 0o755)
        (root / "gw").mkdir()
        _chown(root / "gw", SERVICE_USER, 0o700)
        gateway = GatewayProcess(
            root,
            free_port(),
            {"anon": anon.name, "basic": basic.name, "bearer": bearer.name, "relay": relay.name},
        )
        gateway.write_config()
        gateway.start()
        started.append(gateway)
        yield World(gateway, anon, basic, bearer, relay, layout, L, digests)
    finally:
        for thing in reversed(started):
            thing.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- tests ------------------------------------------------------------------------------------


def test_manifest_formats_platforms_and_digests(world: World) -> None:
    gw, a = world.gateway, world.anon.name
    oci_digest = httpx.head(
        f"{world.anon.url}/v2/t/oci/manifests/1",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        trust_env=False,
    ).headers["Docker-Content-Digest"]
    pulls = {
        "v2s2": ("pull", f"{a}/t/v2s2:1"),
        "oci": ("pull", f"{a}/t/oci:1"),
        "list": ("pull", f"{a}/t/list:1"),
        "list-arm": ("pull", "--platform", "linux/arm64/v8", f"{a}/t/list:1"),
        "index": ("pull", f"{a}/t/index:1"),
        "index-arm": ("pull", "--platform", "linux/arm64/v8", f"{a}/t/index:1"),
        "digest": ("pull", f"{a}/t/oci@{oci_digest}"),
    }
    procs = {name: gw.popen(*argv) for name, argv in pulls.items()}
    ids = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        ids[name] = ready_id(result)
    platforms = {name: gw.metadata(i)["platform"] for name, i in ids.items()}
    assert platforms == {
        "v2s2": "linux/amd64",
        "oci": "linux/amd64",
        "list": "linux/amd64",
        "list-arm": "linux/arm64/v8",
        "index": "linux/amd64",
        "index-arm": "linux/arm64/v8",
        "digest": "linux/amd64",
    }
    assert ids["index"] == world.digests["amd"].split(":")[1]
    assert ids["index-arm"] == world.digests["arm"].split(":")[1]
    assert ids["digest"] == ids["oci"] == oci_digest.split(":")[1]
    assert len(set(ids.values())) == 6  # v2s2, oci (= by digest), list amd/arm, index amd/arm
    # lookup prints the id, per platform; images lists them READY; the squashfs files exist.
    assert ok(gw.shifterimg("lookup", f"{a}/t/index:1")).strip() == ids["index"]
    arm = gw.shifterimg("lookup", "--platform", "linux/arm64/v8", f"{a}/t/list:1")
    assert ok(arm).strip() == ids["list-arm"]
    listing = ok(gw.shifterimg("images"))
    assert re.search(
        rf"^READY\s+{ids['v2s2'][:12]}\s.*no\s+linux/amd64\s+{a}/t/v2s2:1$", listing, re.M
    )
    for image_id in ids.values():
        assert (gw.store / f"{image_id}.squashfs").stat().st_mode & 0o777 == 0o644
    content = subprocess.run(
        ["unsquashfs", "-cat", str(gw.store / f"{ids['list-arm']}.squashfs"), "etc/arch"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert content == "arm64\n"
    assert gw.partials() == []


def test_unknown_image_fails_with_the_registry_message(world: World) -> None:
    result = world.gateway.shifterimg("pull", f"{world.anon.name}/t/v2s2:2")
    err = failed(result)
    assert f"image '{world.anon.name}/t/v2s2:2' not found in registry" in err
    assert err.startswith("shifterimg: ") and err.count("\n") == 1


@pytest.mark.parametrize("kind", ["basic", "bearer"])
def test_private_images_from_authenticated_registries(world: World, kind: str) -> None:
    gw = world.gateway
    registry = world.basic if kind == "basic" else world.bearer
    ref = f"{registry.name}/private/app:1"
    # Without credentials the registry refuses; the message says how to fix it.
    err = failed(gw.shifterimg("pull", ref, user="bob"))
    assert "shifterimg login" in err
    # A wrong password is refused at login and not stored.
    bad = gw.shifterimg(
        "login", "-u", SECRET_USER, "--password-stdin", registry.name, stdin="wrong\n"
    )
    assert "rejected the username or password" in failed(bad)
    stored = gw.home("alice") / "shifter" / "credentials.json"
    assert not stored.exists() or registry.name not in json.loads(stored.read_text())["auths"]
    login = gw.shifterimg(
        "login", "-u", SECRET_USER, "--password-stdin", registry.name, stdin=SECRET_PASSWORD + "\n"
    )
    assert "logged in to" in ok(login)
    assert registry.name in json.loads(stored.read_text())["auths"]
    assert stored.stat().st_mode & 0o777 == 0o600
    image_id = ready_id(gw.shifterimg("pull", ref))
    alice, bob = pwd.getpwnam("alice").pw_uid, pwd.getpwnam("bob").pw_uid
    meta = gw.metadata(image_id)
    assert meta["acl"] == {"users": [alice], "groups": []}
    assert (gw.store / f"{image_id}.squashfs").stat().st_mode & 0o707 == 0o600
    assert ok(gw.shifterimg("lookup", ref)).strip() == image_id
    assert re.search(rf"^READY\s+{image_id[:12]}\s.*yes\s", ok(gw.shifterimg("images")), re.M)
    # bob is not in the ACL: "not found", and not listed.
    assert "not found" in failed(gw.shifterimg("lookup", ref, user="bob"))
    assert "not found" in failed(gw.shifterimg("lookup", f"id:{image_id}", user="bob"))
    assert image_id[:12] not in ok(gw.shifterimg("images", user="bob"))
    # Pulled again with -u bob (basic) or -g science (bearer): visible to bob.
    widen = ["-u", "bob"] if kind == "basic" else ["-g", "science"]
    assert ready_id(gw.shifterimg("pull", *widen, ref)) == image_id
    acl = gw.metadata(image_id)["acl"]
    if kind == "basic":
        assert acl == {"users": sorted([alice, bob]), "groups": []}
    else:
        assert acl == {"users": [alice], "groups": [grp.getgrnam("science").gr_gid]}
    assert ok(gw.shifterimg("lookup", ref, user="bob")).strip() == image_id
    assert image_id[:12] in ok(gw.shifterimg("images", user="bob"))


@pytest.fixture
def fuse_for_users() -> Iterator[None]:
    """``/dev/fuse`` mode 0666 (as at most sites; 0600 on these machines), then restored."""
    mode = stat.S_IMODE(os.stat(FUSE).st_mode)
    os.chmod(FUSE, 0o666)
    try:
        yield
    finally:
        os.chmod(FUSE, mode)


def named_acl_entries(path: Path) -> tuple[list[int], list[int]]:
    """The uids and gids a file's POSIX access ACL names ([], [] without an ACL)."""
    try:
        entries = decode_posix_acl(os.getxattr(path, ACL_XATTR))
    except OSError as err:
        if err.errno != errno.ENODATA:
            raise
        return [], []
    users = [i for tag, _, i in entries if tag == ACL_USER]
    groups = [i for tag, _, i in entries if tag == ACL_GROUP]
    return users, groups


@pytest.mark.usefixtures("fuse_for_users")
@pytest.mark.parametrize("kind", ["basic", "bearer"])
def test_private_images_run_outside_jobs_for_exactly_their_acl(world: World, kind: str) -> None:
    """``shifter`` without a job mounts the image file as the user (squashfuse_ll): the
    gateway grants read on a private image's files to exactly its ACL (POSIX ACLs)."""
    gw = world.gateway
    registry = world.basic if kind == "basic" else world.bearer
    ref = f"{registry.name}/private/run:1"
    secret = f"runnable behind {'basic auth' if kind == 'basic' else 'bearer tokens'}"
    login = gw.shifterimg(
        "login", "-u", SECRET_USER, "--password-stdin", registry.name, stdin=SECRET_PASSWORD + "\n"
    )
    ok(login)
    image_id = ready_id(gw.shifterimg("pull", ref))
    files = [gw.store / f"{image_id}.squashfs", gw.store / f"{image_id}.json"]
    alice, bob = pwd.getpwnam("alice").pw_uid, pwd.getpwnam("bob").pw_uid
    science = grp.getgrnam("science").gr_gid
    for path in files:
        assert path.stat().st_mode & 0o707 == 0o600, path  # nothing for "other"
        assert named_acl_entries(path) == ([alice], []), path

    def shifter(user: str, image: str) -> subprocess.CompletedProcess[str]:
        command = [SHIFTER, f"--image={image}", "cat", "/etc/secret"]
        return run_as(command, user=user, timeout=60, SHIFTER_CONFIG=str(gw.config))

    def reads(user: str, path: Path) -> subprocess.CompletedProcess[str]:
        return run_as(["head", "-c", "4", str(path)], user=user, timeout=30)

    # alice, who pulled it, runs it by name and by id (the metadata is read from the store).
    for image in (ref, f"id:{image_id}"):
        assert ok(shifter("alice", image)).strip() == secret
    # bob is not in the ACL: the files refuse him, and so does the lookup.
    for path in files:
        assert "Permission denied" in failed(reads("bob", path)), path
    for image in (ref, f"id:{image_id}"):
        result = shifter("bob", image)
        assert result.returncode != 0 and "not found" in result.stderr, result.stderr
        assert secret not in result.stdout
    # Pulled again with -u bob (basic) or -g science (bearer): the files' ACL follows.
    widen = ["-u", "bob"] if kind == "basic" else ["-g", "science"]
    assert ready_id(gw.shifterimg("pull", *widen, ref)) == image_id
    expected = ([alice, bob], []) if kind == "basic" else ([alice], [science])
    for path in files:
        assert path.stat().st_mode & 0o707 == 0o600, path
        assert named_acl_entries(path) == expected, path
        ok(reads("bob", path))
    for image in (ref, f"id:{image_id}"):
        assert ok(shifter("bob", image)).strip() == secret


def test_corrupted_blob_fails_the_pull_and_publishes_nothing(world: World) -> None:
    gw = world.gateway
    corrupt_blob(world.anon, world.layers["corrupt"].digest)
    result = gw.shifterimg("pull", f"{world.anon.name}/t/corrupt:1")
    err = failed(result)
    assert f"blob {world.layers['corrupt'].digest}" in err and "is corrupt" in err
    job_id = re.search(r"job ([0-9a-f]{16})", result.stdout).group(1)  # type: ignore[union-attr]
    with gw.client() as client:
        job = client.job(job_id)
    assert job.state == "FAILED" and "is corrupt" in job.message
    status = gw.shifterimg("status", job_id)
    assert status.returncode == 1 and re.search(r"^state:\s+FAILED$", status.stdout, re.M)
    assert gw.partials() == []
    assert not (gw.root / "gw" / "layers" / "sha256" / world.layers["corrupt"].digest[7:]).exists()
    assert "corrupt" not in ok(gw.shifterimg("images"))


def test_ten_simultaneous_pulls_share_one_job_and_download_each_layer_once(world: World) -> None:
    gw = world.gateway
    ref = f"{world.anon.name}/t/ten:1"
    procs = [gw.popen("pull", ref, user="alice" if i % 2 else "bob") for i in range(10)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    ids = {ready_id(r) for r in results}
    jobs = {re.search(r"job ([0-9a-f]{16})", r.stdout).group(1) for r in results}  # type: ignore[union-attr]
    assert len(ids) == 1 and len(jobs) == 1, results
    for i in range(3):
        assert world.anon.blob_gets(world.layers[f"ten{i}"].digest) == 1


def test_gateway_killed_during_a_pull_resumes_after_restart(world: World) -> None:
    gw = world.gateway
    ref = f"{world.relay.name}/t/slow:1"
    puller = gw.popen("pull", ref)
    job_id = None
    deadline = time.monotonic() + 30
    with gw.client() as client:
        while time.monotonic() < deadline:
            jobs = [j for j in client.jobs() if j.reference == ref]
            progress = jobs[0].progress if jobs else None
            if progress is not None and progress.done > 1 << 20:
                job_id = jobs[0].id
                break
            time.sleep(0.1)
    assert job_id, "the slow pull did not start"
    gw.stop(signal.SIGKILL)
    # A partial file as a crash during conversion would leave: the restart sweeps it.
    leftover = gw.store / f".{'0' * 64}.deadbeef.partial"
    leftover.write_bytes(b"half an image")
    gw.start()
    out, err = puller.communicate(timeout=120)
    result = subprocess.CompletedProcess(puller.args, puller.returncode, out, err)
    image_id = ready_id(result)
    assert "retrying" in err  # the client lost the gateway and waited for it
    with gw.client() as client:
        job = client.job(job_id)
    assert job.state == "READY" and job.attempts == 2 and job.image_id == image_id
    assert not leftover.exists() and gw.partials() == []
    log = gw.log.read_text()
    assert f"job {job_id} PENDING: pull {ref}: re-queued after a gateway restart" in log
    assert (gw.store / f"{image_id}.squashfs").exists()


def test_requests_without_a_valid_munge_credential_are_refused(world: World) -> None:
    url = world.gateway.url + "/api/v1"
    http = httpx.Client(trust_env=False, timeout=10)

    def header(method: str, path: str, body: bytes = b"", ttl: int | None = None) -> dict:
        payload = munge.request_payload(method, path, munge.body_digest(body))
        return {"Authorization": f"Munge {munge.encode(payload, ttl=ttl)}"}

    def refused(response: httpx.Response, text: str) -> None:
        assert response.status_code == 401, response.text
        assert text in response.json()["error"]

    refused(http.get(f"{url}/images"), "no munge credential")
    refused(http.get(f"{url}/images", headers={"Authorization": "Basic YTpi"}), "Munge <cred")
    refused(http.get(f"{url}/images", headers={"Authorization": "Munge garbage"}), "invalid")
    not_json = {"Authorization": f"Munge {munge.encode(b'hello')}"}
    refused(http.get(f"{url}/images", headers=not_json), "does not carry a gateway request")
    good = header("GET", "/api/v1/images")
    assert http.get(f"{url}/images", headers=good).status_code == 200
    refused(http.get(f"{url}/images", headers=good), "replayed")
    refused(http.get(f"{url}/ping", headers=header("GET", "/api/v1/images")), "made for GET")
    body = json.dumps({"reference": "busybox"}).encode()
    other = header("POST", "/api/v1/pull", json.dumps({"reference": "evil"}).encode())
    refused(http.post(f"{url}/pull", content=body, headers=other), "another request body")
    refused(http.post(f"{url}/pull", content=body, headers=header("GET", "/api/v1/pull")), "made")
    expiring = header("GET", "/api/v1/images", ttl=1)
    time.sleep(2.1)
    refused(http.get(f"{url}/images", headers=expiring), "expired")
    http.close()


def _docker_archive(path: Path) -> str:
    """A hand-made ``docker save`` tar; returns the expected image id (sha256 of the config)."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for name, data in (("hello/world.txt", b"imported\n"), ("hello/run.sh", b"#!/bin/sh\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["IMPORTED=yes"], "Cmd": ["/hello/run.sh"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    image_id = hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        [{"Config": f"{image_id}.json", "RepoTags": ["imported:1"], "Layers": ["l1/layer.tar"]}]
    ).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in (
            ("manifest.json", manifest),
            (f"{image_id}.json", config),
            ("l1/layer.tar", layer_bytes),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.chmod(0o644)
    return image_id


def test_import_docker_archive_oci_layout_and_squashfs(world: World) -> None:
    gw = world.gateway
    files = gw.root / "files"
    files.mkdir(mode=0o755, exist_ok=True)
    archive = files / "docker.tar"
    archive_id = _docker_archive(archive)
    assert ready_id(gw.shifterimg("import", str(archive), "imported:1")) == archive_id
    assert ok(gw.shifterimg("lookup", "imported:1")).strip() == archive_id
    meta = gw.metadata(archive_id)
    assert meta["env"] == ["IMPORTED=yes"] and meta["source"] == "docker.io/library/imported:1"
    listing = subprocess.run(
        ["unsquashfs", "-l", str(gw.store / f"{archive_id}.squashfs")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "squashfs-root/hello/world.txt" in listing
    # An OCI layout as a tar: the id is the manifest digest, as for a pull.
    oci = files / "oci.tar"
    with tarfile.open(oci, "w") as tar:
        tar.add(world.layout.path, arcname=".")
    oci.chmod(0o644)
    index_id = world.digests["amd"].split(":")[1]
    assert ready_id(gw.shifterimg("import", str(oci), "site/layout:multi")) == index_id
    # A squashfs file is checked and published as it is.
    tree = files / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_text("from a squashfs\n")
    squash = files / "image.sqfs"
    subprocess.run(
        ["mksquashfs", str(tree), str(squash), "-quiet", "-noappend", "-comp", "zstd"],
        check=True,
        capture_output=True,
    )
    squash.chmod(0o644)
    squash_id = hashlib.sha256(squash.read_bytes()).hexdigest()
    assert ready_id(gw.shifterimg("import", str(squash), "site/squash:1")) == squash_id
    assert (gw.store / f"{squash_id}.squashfs").read_bytes() == squash.read_bytes()
    # Not an image: FAILED with the reason; bob may not import at all.
    junk = files / "junk.bin"
    junk.write_bytes(os.urandom(4096))
    junk.chmod(0o644)
    assert "neither a tar archive" in failed(gw.shifterimg("import", str(junk), "junk:1"))
    refused = failed(gw.shifterimg("import", str(archive), "bobs:1", user="bob"))
    assert "user bob may not import images" in refused
    assert gw.partials() == []


def test_admins_remove_and_expire_images_others_may_not(world: World) -> None:
    gw = world.gateway
    a = world.anon.name
    keep = ready_id(gw.shifterimg("pull", f"{a}/t/v2s2:1"))
    old = ready_id(gw.shifterimg("pull", f"{a}/t/expire:1"))
    assert "only image gateway admins may remove" in failed(gw.shifterimg("rm", f"{a}/t/oci:1"))
    assert "only image gateway admins may expire" in failed(gw.shifterimg("expire", "--days", "1"))
    with gw.client() as client:
        oci = client.lookup(f"{a}/t/oci:1").id
    # rm (root is the admin) by reference, then by short id.
    rm = subprocess.run(
        [SHIFTERIMG, "rm", f"{a}/t/oci:1"],
        env={"SHIFTER_CONFIG": str(gw.config), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok(rm).strip() == f"removed {oci}"
    assert not (gw.store / f"{oci}.squashfs").exists()
    assert "not found" in failed(gw.shifterimg("lookup", f"{a}/t/oci:1"))
    # Expiry by age: 'old' is unused for 2 s, 'keep' was just looked up.
    time.sleep(2.2)
    assert ok(gw.shifterimg("lookup", f"{a}/t/v2s2:1")).strip() == keep
    with gw.client() as client:
        removed = set(client.expire(days=2 / 86400))
        assert old in removed and keep not in removed
        assert client.expire(ids=[keep[:12]]) == [keep]
    assert not (gw.store / f"{old}.squashfs").exists()
    assert not (gw.store / f"{keep}.json").exists()


def test_structured_logs_are_one_json_event_per_line(world: World) -> None:
    """gateway.log_format: json makes every line the gateway writes one JSON event."""
    gw = world.gateway
    gw.stop()
    offset = gw.log.stat().st_size
    text = gw.config.read_text()
    gw.config.write_text(text.replace("gateway:\n", "gateway:\n  log_format: json\n"))
    try:
        gw.start()
        pull = gw.shifterimg("pull", f"{world.anon.name}/t/oci:1")
        assert pull.returncode == 0, pull.stderr
        gw.stop()
        with open(gw.log, "rb") as fh:
            fh.seek(offset)
            lines = fh.read().decode().splitlines()
        events = [json.loads(line) for line in lines]  # every line: one JSON object
        assert events and all({"time", "level", "logger", "msg"} <= set(e) for e in events)
        assert any("READY" in e["msg"] for e in events), lines
    finally:
        gw.write_config()
        gw.start()
