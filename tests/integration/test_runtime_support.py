"""Fixtures of the runtime tests (no tests here): an image store, a test image, a config.

The session fixture ``rt`` makes ``/var/tmp/shifter-rt-XXXX`` (mode 0755, so the test users
can read it; pytest's own tmp directories are 0700) holding

- ``images/``: busybox pulled from the box registry through the real pipeline, and
  ``testimg``, built here with ``tarfile`` + ``tar2sqfs``: busybox, ``/bin/catroot`` (a
  static setuid-root program that tries to read ``/secret``, mode 0600 root), a ``/usr``
  tree, hostile symlinks (``/lnk-etc -> /etc``, ``/lnk-up -> ../..``,
  ``/usr/lib/escape -> ../../../etc``), ENTRYPOINT, CMD, WORKDIR and ENV;
- ``dev/testdev0`` (``mknod c 1 3``), ``libdir/`` and ``lib/libcopied.so.1`` for a module;
- ``shifter.yaml`` with a default module, a device/library module and a site environment.

``/dev/fuse`` is made 0666 for the session (sites have that; these machines have 0600) and
restored afterwards; everything is removed at the end.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shifter_core import config as config_module
from shifter_core.image.layercache import LayerCache
from shifter_core.image.pipeline import pull_image
from shifter_core.image.registry.client import RegistryClient
from shifter_core.image.registry.settings import RegistrySettings
from shifter_core.image.store import ImageMetadata, ImageStore

from .slurm import user_env

CHECKOUT = Path(__file__).resolve().parents[2]
SHIFTER = str(CHECKOUT / ".venv" / "bin" / "shifter")
BOX_REGISTRY = "127.0.0.1:5000"
FUSE = "/dev/fuse"

CATROOT_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
int main(void) {
    char buf[64];
    printf("euid=%d\n", (int)geteuid());
    int fd = open("/secret", O_RDONLY);
    if (fd < 0) { printf("denied: %s\n", strerror(errno)); return 0; }
    ssize_t n = read(fd, buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    printf("READ: %s\n", buf);
    return 3;
}
"""

APPLETS = [
    "sh",
    "cat",
    "echo",
    "id",
    "ls",
    "mkdir",
    "touch",
    "stat",
    "grep",
    "env",
    "pwd",
    "sleep",
    "true",
    "false",
    "test",
    "head",
    "readlink",
    "printf",
    "wc",
    "cut",
    "tr",
    "sort",
    "df",
    "mount",
]


@dataclass(frozen=True)
class Runtime:
    base: Path
    config: Path
    run_dir: str
    busybox: str  # image id
    testimg: str  # image id
    store: ImageStore

    def image_file(self, image_id: str) -> str:
        return str(self.store.image_file(image_id))


def _add(tar: tarfile.TarFile, name: str, kind: bytes, mode: int, data: bytes = b"", **kw) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid = kw.get("uid", 0)
    info.gid = kw.get("gid", 0)
    info.mtime = 1_704_067_200
    info.linkname = kw.get("link", "")
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def build_test_image(base: Path, store: ImageStore) -> str:
    """The test image (see the module docstring); returns its id."""
    source = base / "catroot.c"
    source.write_text(CATROOT_C)
    binary = base / "catroot"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(source)], check=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d, mode in [
            ("bin", 0o755), ("usr", 0o755), ("usr/bin", 0o755), ("usr/lib", 0o755),
            ("etc", 0o755), ("tmp", 0o1777), ("dev", 0o755), ("proc", 0o555), ("sys", 0o555),
            ("opt", 0o755), ("home", 0o755), ("root", 0o700), ("var", 0o755),
        ]:  # fmt: skip
            _add(tar, d, tarfile.DIRTYPE, mode)
        _add(tar, "bin/busybox", tarfile.REGTYPE, 0o755, Path("/bin/busybox").read_bytes())
        for applet in APPLETS:
            _add(tar, f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        _add(tar, "bin/catroot", tarfile.REGTYPE, 0o4755, binary.read_bytes())
        _add(tar, "secret", tarfile.REGTYPE, 0o600, b"top secret\n")
        _add(tar, "etc/passwd", tarfile.REGTYPE, 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        _add(tar, "etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\n")
        _add(tar, "lnk-etc", tarfile.SYMTYPE, 0o777, link="/etc")
        _add(tar, "lnk-up", tarfile.SYMTYPE, 0o777, link="../..")
        _add(tar, "usr/lib/escape", tarfile.SYMTYPE, 0o777, link="../../../etc")
        _add(tar, "data-link", tarfile.SYMTYPE, 0o777, link="/opt")
    tar_path = base / "testimg.tar"
    tar_path.write_bytes(buffer.getvalue())
    squashfs = base / "testimg.squashfs"
    with open(tar_path, "rb") as stdin:
        subprocess.run(
            ["tar2sqfs", "--quiet", "--force", "--no-skip", "-c", "gzip", str(squashfs)],
            stdin=stdin,
            check=True,
        )
    image_id = hashlib.sha256(squashfs.read_bytes()).hexdigest()
    partial = store.new_partial(image_id)
    shutil.move(squashfs, partial)
    meta = ImageMetadata(
        id=image_id,
        source="local/testimg:latest",
        digest=f"sha256:{image_id}",
        platform="linux/amd64",
        env=("PATH=/usr/bin:/bin", "IMG_VAR=image", "LEVEL1=image", "LEVEL2=image"),
        entrypoint=("/bin/echo", "entry"),
        cmd=("from-cmd",),
        workdir="/usr/lib",
        size=partial.stat().st_size,
    )
    store.publish(meta, partial)
    return image_id


CONFIG = """\
image_path: {base}/images
gateway:
  url: http://127.0.0.1:7080
runtime:
  run_dir: {run_dir}
  per_node_cache_dir: {base}/pnc
  env:
    set: {{SITE_VAR: site, LEVEL5: site}}
modules:
  always:
    description: a default module
    default: true
    env:
      set: {{ALWAYS: "1", LEVEL4: module}}
  testmod:
    description: a device and a library directory
    devices: [{base}/dev/testdev*]
    binds: [{base}/libdir:/opt/testmod/lib]
    copies: ["{base}/lib/libcopied.so*:/opt/udiImage/modules/testmod/lib64/"]
    env:
      prepend: {{LD_LIBRARY_PATH: /opt/testmod/lib}}
"""


@pytest.fixture(scope="session", name="rt")
def runtime_fixture(box) -> Runtime:
    """The runtime test environment (see the module docstring)."""
    base = Path(f"/var/tmp/shifter-rt-{uuid.uuid4().hex[:8]}")
    base.mkdir(mode=0o755)
    base.chmod(0o755)
    run_dir = f"/run/shifter-test-{base.name[-8:]}"
    fuse_mode = stat.S_IMODE(os.stat(FUSE).st_mode)
    os.chmod(FUSE, 0o666)
    try:
        store = ImageStore(base / "images")
        settings = RegistrySettings(
            mirrors={"docker.io": [f"http://{BOX_REGISTRY}"]}, insecure=frozenset({BOX_REGISTRY})
        )
        with RegistryClient(settings) as client:
            busybox = pull_image(
                "busybox", client=client, cache=LayerCache(base / "layers"), store=store
            ).id
        testimg = build_test_image(base, store)
        (base / "dev").mkdir(mode=0o755)
        os.mknod(base / "dev" / "testdev0", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.chmod(base / "dev" / "testdev0", 0o666)
        (base / "libdir").mkdir(mode=0o755)
        (base / "libdir" / "libbound.so.1").write_text("not really a library\n")
        (base / "lib").mkdir(mode=0o755)
        (base / "lib" / "libcopied.so.1").write_text("copied library\n")
        (base / "pnc").mkdir(mode=0o755)
        config = base / "shifter.yaml"
        config.write_text(CONFIG.format(base=base, run_dir=run_dir))
        config.chmod(0o644)
        config_module.load(str(config))  # as root: writes the start-up cache users read
        for path in base.rglob("*"):
            if path.is_dir() and not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o055)
        yield Runtime(base, config, run_dir, busybox, testimg, store)
    finally:
        os.chmod(FUSE, fuse_mode)
        _cleanup_run_dir(run_dir)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(name="tmp_submount")
def tmp_submount_fixture() -> Iterator[Path]:
    """A 1 MiB tmpfs mounted at ``/tmp/shifter-test-submount-XXXX`` (a mount below the host's
    /tmp), owned by alice and holding ``inside``; unmounted and removed afterwards."""
    import pwd
    import tempfile

    from shifter_core.syscalls import MNT_DETACH, umount2

    alice = pwd.getpwnam("alice")
    path = Path(tempfile.mkdtemp(prefix="shifter-test-submount-", dir="/tmp"))
    mounted = False
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "shifter-test", str(path)],
            check=True,
        )
        mounted = True
        os.chown(path, alice.pw_uid, alice.pw_gid)
        (path / "inside").write_text("in the submount\n")
        yield path
    finally:
        if mounted:
            try:
                umount2(str(path))
            except OSError:
                umount2(str(path), MNT_DETACH)
        path.rmdir()


@pytest.fixture(name="shared_sources")
def shared_sources_fixture(rt: Runtime, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two host directories, each a shared mount (as / is under systemd) with an empty
    ``sub`` mount point: ``slave`` for a ``:slave`` site volume, ``plain`` for one without."""
    made: list[Path] = []
    try:
        for name in ("slave", "plain"):
            path = rt.base / f"{name}-{tmp_path.name}"
            (path / "sub").mkdir(parents=True)
            path.chmod(0o755)
            subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
            made.append(path)
            subprocess.run(["mount", "--make-shared", str(path)], check=True)
        yield made[0], made[1]
    finally:
        for path in reversed(made):
            subprocess.run(["umount", "-R", "-l", str(path)], check=False)


def _cleanup_run_dir(run_dir: str) -> None:
    """Remove the test run directory as the epilog would: never through a mount (a root's
    /tmp is the host's)."""
    from shifter_core.mounts import teardown_tree

    assert teardown_tree(run_dir) == []


def shifter_as(
    rt: Runtime,
    args: list[str],
    *,
    user: str = "alice",
    input: str | None = None,
    cwd: str = "/tmp",
    timeout: float = 60,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """Run ``shifter ARGS`` as ``user`` with a clean environment and the test config."""
    variables = user_env(**{"SHIFTER_CONFIG": str(rt.config), **env})
    command = [
        "runuser", "-u", user, "--", "env", "-i",
        *(f"{k}={v}" for k, v in variables.items()), SHIFTER, *args,
    ]  # fmt: skip
    return subprocess.run(
        command,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def user_processes(user: str, name: str | None = None) -> list[str]:
    """``pid state command`` of the user's processes (optionally only those called name)."""
    out = subprocess.run(
        ["ps", "-u", user, "-o", "pid=,stat=,comm="], capture_output=True, text=True, check=False
    ).stdout
    rows = [line.split(None, 2) for line in out.splitlines() if line.strip()]
    return [" ".join(r) for r in rows if name is None or (len(r) == 3 and r[2] == name)]


def wait_for_no_processes(user: str, name: str, timeout: float = 10) -> list[str]:
    """Wait until the user has no process called ``name`` (zombies included)."""
    deadline = time.monotonic() + timeout
    while True:
        left = user_processes(user, name)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def loop_devices_of(path_fragment: str) -> list[str]:
    """Attached loop devices whose backing file contains ``path_fragment``."""
    found = []
    for entry in Path("/sys/block").glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if path_fragment in backing:
            found.append(f"/dev/{entry.name}: {backing}")
    return found


def host_mounts_with(fragment: str) -> list[str]:
    """Mount table lines of this (the host's) namespace that mention ``fragment``."""
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        return [line.strip() for line in fh if fragment in line]


def config_with_site_volumes(rt: Runtime, name: str, volumes: list[str]) -> Path:
    """The test config with ``runtime.site_volumes``, written to a file of its own."""
    config = rt.base / f"{name}.yaml"
    listed = ", ".join(f"'{v}'" for v in volumes)
    config.write_text(
        rt.config.read_text().replace("runtime:\n", f"runtime:\n  site_volumes: [{listed}]\n")
    )
    config.chmod(0o644)
    return config
