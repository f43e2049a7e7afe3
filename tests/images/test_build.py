"""Tests of tools/images/build.py: reproducible OCI layouts for the busybox and mpi test images.

The busybox tests build into temporary caches (about a second each).  The mpi test is marked
``slow``: it needs root, debootstrap and mpicc, and uses the default cache
(``<checkout>/.box/cache/images``) so that only its first run pays for debootstrap (~1 min).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
IMAGES = CHECKOUT / "tools" / "images"
BUILD = IMAGES / "build.py"
CHROOT_RUN = IMAGES / "chroot_run.py"
FIXED_MTIME = 1_704_067_200
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def build(name: str, out: Path, cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run build.py for image ``name``; return the finished process (stdout: the digest)."""
    cmd = [sys.executable, str(BUILD), name, "--out", str(out)]
    if cache is not None:
        cmd += ["--cache", str(cache)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)


def built_digest(name: str, out: Path, cache: Path | None = None) -> str:
    """Build image ``name`` and return its manifest digest, failing the test on error."""
    proc = build(name, out, cache)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def blob(layout: Path, digest: str) -> Path:
    """Return the path of the blob ``digest`` in ``layout``."""
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def manifest_of(layout: Path) -> dict:
    """Return the manifest tagged ``latest`` in ``layout``."""
    index = json.loads((layout / "index.json").read_text())
    (desc,) = [
        d
        for d in index["manifests"]
        if d["annotations"]["org.opencontainers.image.ref.name"] == "latest"
    ]
    return json.loads(blob(layout, desc["digest"]).read_text())


def layer_path(layout: Path) -> Path:
    """Return the path of the single layer blob of the image in ``layout``."""
    (layer,) = manifest_of(layout)["layers"]
    return blob(layout, layer["digest"])


@pytest.fixture(scope="module")
def busybox_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox image built into a fresh cache."""
    if not Path("/bin/busybox").is_file():
        pytest.skip("busybox-static is not installed")
    base = tmp_path_factory.mktemp("busybox")
    built_digest("busybox", base / "layout", base / "cache")
    return base / "layout"


def test_busybox_is_reproducible(tmp_path: Path, busybox_layout: Path) -> None:
    """Two builds from empty caches, and a cached rebuild, give the same manifest digest."""
    first = built_digest("busybox", tmp_path / "a", tmp_path / "cache-a")
    second = built_digest("busybox", tmp_path / "b", tmp_path / "cache-b")
    cached = build("busybox", tmp_path / "a", tmp_path / "cache-a")
    assert cached.returncode == 0, cached.stderr
    assert "cached build" in cached.stderr
    assert first == second == cached.stdout.strip()
    assert sorted(p.name for p in (tmp_path / "a" / "blobs" / "sha256").iterdir()) == sorted(
        p.name for p in (busybox_layout / "blobs" / "sha256").iterdir()
    )


def test_busybox_layout_is_valid_oci(busybox_layout: Path) -> None:
    """The layout, index, manifest and config are what OCI tools expect; blobs match digests."""
    assert json.loads((busybox_layout / "oci-layout").read_text()) == {
        "imageLayoutVersion": "1.0.0"
    }
    index = json.loads((busybox_layout / "index.json").read_text())
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    manifest = manifest_of(busybox_layout)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    for desc in [index["manifests"][0], manifest["config"], *manifest["layers"]]:
        data = blob(busybox_layout, desc["digest"]).read_bytes()
        assert len(data) == desc["size"]
        assert "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"]
    config = json.loads(blob(busybox_layout, manifest["config"]["digest"]).read_text())
    assert config["architecture"] == "amd64"
    assert config["os"] == "linux"
    assert config["config"]["Cmd"] == ["/bin/sh"]
    assert config["config"]["Env"] == [PATH_ENV]
    layer = layer_path(busybox_layout).read_bytes()
    assert layer[4:8] == b"\0\0\0\0", "gzip header mtime must be 0"
    diff_id = "sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()
    assert config["rootfs"] == {"type": "layers", "diff_ids": [diff_id]}


def test_busybox_layer_contents(busybox_layout: Path) -> None:
    """The layer has busybox, its applet links, the marker file, and normalised headers."""
    with tarfile.open(layer_path(busybox_layout), "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        marker = tar.extractfile(members["etc/shifter-test-image"])
        assert marker is not None
        assert marker.read() == b"shifter busybox test image\n"
        passwd = tar.extractfile(members["etc/passwd"])
        assert passwd is not None
        assert passwd.read().startswith(b"root:x:0:0:")
    busybox = members["bin/busybox"]
    assert busybox.isfile()
    assert busybox.mode == 0o755
    assert busybox.size == Path("/bin/busybox").stat().st_size
    assert members["bin/sh"].issym()
    assert members["bin/sh"].linkname == "busybox"
    assert members["bin/ls"].linkname == "busybox"
    assert "bin/bin/busybox" not in members
    assert members["tmp"].isdir()
    assert members["tmp"].mode == 0o1777
    assert members["root"].isdir()
    assert members["home"].isdir()
    assert members["etc/group"].isfile()
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    assert all(m.uname == "" and m.gname == "" for m in members.values())
    assert {m.mtime for m in members.values()} == {FIXED_MTIME}
    names = list(members)
    assert names == sorted(names, key=str.encode)


def test_busybox_umoci_unpack_and_run(busybox_layout: Path, tmp_path: Path) -> None:
    """``umoci unpack --rootless`` unpacks the image and its busybox runs."""
    if shutil.which("umoci") is None:
        pytest.skip("umoci is not installed")
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{busybox_layout}:latest", str(bundle)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    rootfs = bundle / "rootfs"
    proc = subprocess.run(
        [str(rootfs / "bin" / "busybox"), "echo", "hi"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert proc.stdout == "hi\n"
    assert (rootfs / "bin" / "sh").readlink() == Path("busybox")
    assert (rootfs / "etc" / "shifter-test-image").read_text() == "shifter busybox test image\n"


def test_busybox_skopeo_reads_layout(busybox_layout: Path) -> None:
    """skopeo (what pushes the layouts to the test registry) reads the layout."""
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    proc = subprocess.run(
        ["skopeo", "inspect", f"oci:{busybox_layout}:latest"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    info = json.loads(proc.stdout)
    index = json.loads((busybox_layout / "index.json").read_text())
    assert info["Digest"] == index["manifests"][0]["digest"]
    assert info["Architecture"] == "amd64"


def test_out_that_is_not_a_layout_is_left_alone(tmp_path: Path) -> None:
    """--out naming a non-empty directory that is no image layout fails and changes nothing."""
    out = tmp_path / "precious"
    out.mkdir()
    (out / "data.txt").write_text("keep me")
    proc = build("busybox", out, tmp_path / "cache")
    assert proc.returncode == 1
    assert "not touched" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["data.txt"]


# ------------------------------------------------------------------------------------------
# mpi


@pytest.fixture
def mpi_rootfs() -> Iterator[Path]:
    """The mpi image (built, or taken from the default cache) unpacked on tmpfs, as root."""
    if os.geteuid() != 0:
        pytest.skip("the mpi image needs root (debootstrap, chroot)")
    for tool in ("debootstrap", "mpicc", "umoci", "chroot"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (tools/images/APT_PACKAGES)")
    scratch = Path(
        tempfile.mkdtemp(
            prefix="test-mpi-image-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None
        )
    )
    try:
        layout = scratch / "layout"
        digest = built_digest("mpi", layout)
        assert digest.startswith("sha256:")
        subprocess.run(
            ["umoci", "unpack", "--image", f"{layout}:latest", str(scratch / "bundle")],
            check=True,
            capture_output=True,
            timeout=300,
        )
        yield scratch / "bundle" / "rootfs"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.slow
def test_mpi_image_runs_mpi_hello(mpi_rootfs: Path) -> None:
    """mpi-hello runs in the image: a bare chroot singleton, then 3 ranks under mpiexec."""
    marker = mpi_rootfs / "etc" / "shifter-test-image"
    assert marker.read_text() == "shifter mpi test image\n"
    assert not (mpi_rootfs / "var" / "lib" / "apt" / "lists").exists() or not any(
        (mpi_rootfs / "var" / "lib" / "apt" / "lists").iterdir()
    )
    assert not (mpi_rootfs / "usr" / "share" / "man").exists()

    proc = subprocess.run(
        ["chroot", str(mpi_rootfs), "/usr/local/bin/mpi-hello"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hello from rank 0 of 1" in proc.stdout

    env = {**os.environ, "SLURMD_NODENAME": "node-x"}
    proc = subprocess.run(
        [sys.executable, str(CHROOT_RUN), str(mpi_rootfs), "/usr/local/bin/mpi-hello"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("hello from rank 0 of 1 on ")
    assert "(SLURMD_NODENAME=node-x)" in proc.stdout

    # MPICH's own launcher: which MPI `mpiexec` names is a Debian alternative (Open MPI's
    # wins where both are installed, and refuses to run as root).
    if shutil.which("mpiexec.mpich") is None:
        return
    proc = subprocess.run(
        [
            "mpiexec.mpich",
            "-n",
            "3",
            sys.executable,
            str(CHROOT_RUN),
            str(mpi_rootfs),
            "/usr/local/bin/mpi-hello",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("hello"))
    assert [line.split(" on ")[0] for line in lines] == [
        f"hello from rank {rank} of 3" for rank in range(3)
    ]
