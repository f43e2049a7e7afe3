#!/usr/bin/env python3
"""Build the project's test container images as reproducible OCI image layouts, offline.

Usage::

    build.py NAME --out DIR [--cache DIR] [--mirror URL]

NAME is ``busybox``, ``mpi`` (MPICH) or ``openmpi`` (Open MPI, for ``srun --mpi=pmix``).
DIR becomes an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/...``) whose
only manifest is tagged ``latest``, ready for ``skopeo copy --dest-tls-verify=false
--dest-authfile .box/etc/registry-push-auth.json oci:DIR:latest
docker://127.0.0.1:5001/library/NAME:latest`` (the box registry's authenticated push
endpoint: its docker.io mirror on 127.0.0.1:5000 is read-only; ``box.py up`` pushes so).
The manifest digest is printed on stdout; progress goes to stderr.

Every build is keyed on its inputs (the script version, package versions, the sources) and
kept in the cache directory (default ``<checkout>/.box/cache/images``); an unchanged rebuild
only copies the cached layout.  Layers are written reproducibly: entries in sorted order, one
fixed mtime, numeric owners (uid/gid as on disk, no user names), gzip with mtime 0 and no
file name, canonical JSON.

Host packages (Debian 12), also listed one a line in ``tools/images/APT_PACKAGES``:

    busybox-static   the /bin/busybox copied into the busybox image
    debootstrap      the root file systems of the mpi and openmpi images
    mpich            MPICH runtime and mpiexec (hydra) on the host
    libmpich-dev     mpicc.mpich, to compile hello.c for the mpi image (pulls in gcc)
    libpmix2         PMIx for Slurm's mpi/pmix_v4 plugin on the nodes (the openmpi image)
    libopenmpi-dev   mpicc.openmpi, to compile hello.c for the openmpi image
    umoci            tests: unpacking the layouts
    skopeo           pushing the layouts to a registry

The ``mpi`` and ``openmpi`` images need root (debootstrap, chroot) and the Debian mirror named
in the apt sources; the ``busybox`` image needs neither.  Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

LOG = logging.getLogger("images")

#: Bump whenever a change here changes what an image contains: it is part of every cache key.
SCRIPT_VERSION = 1

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent
DEFAULT_CACHE = CHECKOUT / ".box" / "cache" / "images"
HELLO_SOURCE = HERE / "hello.c"

#: The one mtime given to every layer entry, and the images' "created" time (2024-01-01 UTC).
FIXED_MTIME = 1_704_067_200
FIXED_CREATED = "2024-01-01T00:00:00Z"

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUSYBOX_HOST_PATH = Path("/bin/busybox")

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
TAG = "latest"

#: Debian packages installed into the mpi image on top of debootstrap's minbase.
MPI_INCLUDE = ("libmpich12",)
#: Host packages whose versions go into the mpi cache key (they shape the compiled binary).
MPI_HOST_PACKAGES = (
    "debootstrap",
    "libmpich-dev",
    "libmpich12",
    "gcc-12",
    "libc6-dev",
    "binutils",
)
#: MPICH's compiler wrapper: ``mpicc`` is an alternative that Open MPI's libopenmpi-dev (for the
#: openmpi image) takes over in auto mode, since it has the higher priority.
MPI_MPICC = "mpicc.mpich"
#: Paths removed from the mpi root to shrink it (relative to the root; globs allowed).
MPI_PRUNE = (
    "var/lib/apt/lists/*",
    "var/cache/apt/*",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/cache/ldconfig/aux-cache",
    "var/log/*",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/linda",
    "etc/resolv.conf",  # copied from the host by debootstrap; runtimes provide their own
)

#: Debian packages installed into the openmpi image on top of debootstrap's minbase (Open MPI
#: 4.1.4; libopenmpi3 links the external PMIx client library libpmix2, pulled in as a dependency).
OPENMPI_INCLUDE = ("openmpi-bin", "libopenmpi3", "libpmix2")
#: Host packages whose versions go into the openmpi cache key.
OPENMPI_HOST_PACKAGES = (
    "debootstrap",
    "libopenmpi-dev",
    "libopenmpi3",
    "libpmix2",
    "gcc-12",
    "libc6-dev",
    "binutils",
)
#: The compiler wrapper of Debian's Open MPI (``mpicc`` itself is an alternative that may
#: point at MPICH's).
OPENMPI_MPICC = "mpicc.openmpi"
#: Environment for running mpi-hello as a root singleton in the openmpi build check: Open MPI
#: refuses root without these, and shared-memory single-copy needs ptrace rights chroot lacks.
OPENMPI_CHECK_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_btl": "self,tcp",
    "OMPI_MCA_pml": "ob1",
    "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
    "PMIX_MCA_gds": "hash",
}

GZIP_LEVEL = 6
CHUNK = 1 << 20


class BuildError(RuntimeError):
    """A build step failed; the message says which and why."""


# --------------------------------------------------------------------------------------------
# Small helpers


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(obj: object) -> bytes:
    """Serialise ``obj`` as compact JSON with sorted keys (stable bytes for stable digests)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def run(
    cmd: list[str],
    *,
    log_file: Path | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run ``cmd`` (no shell), return its stdout; raise BuildError with its output on failure.

    With ``log_file`` stdout and stderr go to that file, and its tail is quoted on failure.
    """
    LOG.debug("running %s", cmd)
    try:
        if log_file is not None:
            with log_file.open("wb") as out:
                done = subprocess.run(
                    cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, check=False
                )
            returncode = done.returncode
            output = stdout = log_file.read_text(errors="replace")
        else:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, cwd=cwd, env=env, check=False
            )
            returncode = proc.returncode
            output = proc.stdout + proc.stderr
            stdout = proc.stdout
    except FileNotFoundError as exc:
        raise BuildError(f"{cmd[0]}: not found (see tools/images/APT_PACKAGES)") from exc
    if returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-30:])
        raise BuildError(f"{' '.join(cmd)} exited with {returncode}:\n{tail}")
    return stdout


def oci_architecture() -> str:
    """Return the OCI architecture name of this machine."""
    machine = platform.machine()
    names = {
        "x86_64": "amd64",
        "aarch64": "arm64",
        "armv7l": "arm",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
    }
    if machine not in names:
        raise BuildError(f"unsupported machine {machine!r}")
    return names[machine]


# --------------------------------------------------------------------------------------------
# Layers


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, sink: BinaryIO | gzip.GzipFile | None = None) -> None:
        self.sink = sink
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        """Hash ``data``, pass it on, and return its length."""
        self.digest.update(data)
        self.size += len(data)
        if self.sink is not None:
            self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        """Nothing buffered here."""


@dataclass(frozen=True)
class Blob:
    """A blob written to an image layout."""

    digest: str  # "sha256:<hex>"
    size: int


@dataclass(frozen=True)
class Layer:
    """A gzip layer blob and the digest of its uncompressed tar (the config's diff_id)."""

    blob: Blob
    diff_id: str


#: One layer entry: its header and, for regular files, where its bytes come from.
Entry = tuple[tarfile.TarInfo, bytes | Path | None]


def write_layer(entries: Iterable[Entry], blobs_dir: Path) -> Layer:
    """Write ``entries`` as a gzip-compressed tar layer into ``blobs_dir``; return it.

    The tar is streamed once: its bytes are hashed (diff_id) on the way into gzip, whose
    output is hashed (blob digest) on the way to a temporary file renamed to its digest.
    """
    blobs_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=blobs_dir, prefix=".layer-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            blob_hash = _HashingWriter(raw)
            with gzip.GzipFile(
                filename="",
                mode="wb",
                fileobj=blob_hash,
                compresslevel=GZIP_LEVEL,
                mtime=0,
            ) as gz:
                tar_hash = _HashingWriter(gz)
                with tarfile.open(
                    fileobj=tar_hash,
                    mode="w|",  # type: ignore[call-overload]
                    format=tarfile.PAX_FORMAT,
                ) as tar:
                    for info, source in entries:
                        if isinstance(source, bytes):
                            tar.addfile(info, io.BytesIO(source))
                        elif isinstance(source, Path):
                            with source.open("rb") as handle:
                                tar.addfile(info, handle)
                        else:
                            tar.addfile(info)
        hexdigest = blob_hash.digest.hexdigest()
        tmp.replace(blobs_dir / hexdigest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Layer(
        Blob(f"sha256:{hexdigest}", blob_hash.size), f"sha256:{tar_hash.digest.hexdigest()}"
    )


def tar_entry(
    name: str,
    kind: bytes,
    mode: int,
    *,
    size: int = 0,
    linkname: str = "",
    uid: int = 0,
    gid: int = 0,
) -> tarfile.TarInfo:
    """Return a normalised tar header: fixed mtime, numeric owners only, no user names."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = linkname
    info.uid = uid
    info.gid = gid
    info.uname = ""
    info.gname = ""
    info.mtime = FIXED_MTIME
    return info


def tree_entries(root: Path) -> Iterator[Entry]:
    """Yield the layer entries of the tree at ``root`` in a stable order.

    Depth first, names sorted by their bytes, each directory before its contents; owners and
    permission bits (setuid included) as on disk; hard links as links to the first name seen.
    Device nodes and sockets are skipped (runtimes provide /dev); so are extended attributes.
    """
    seen: dict[tuple[int, int], str] = {}

    def walk(directory: Path, prefix: str) -> Iterator[Entry]:
        names = sorted(os.listdir(directory), key=os.fsencode)
        for name in names:
            path = directory / name
            rel = f"{prefix}{name}"
            st = path.lstat()
            mode = stat.S_IMODE(st.st_mode)
            uid, gid = st.st_uid, st.st_gid
            if stat.S_ISDIR(st.st_mode):
                yield tar_entry(rel, tarfile.DIRTYPE, mode, uid=uid, gid=gid), None
                yield from walk(path, f"{rel}/")
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
                yield tar_entry(rel, tarfile.SYMTYPE, mode, linkname=target, uid=uid, gid=gid), None
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in seen:
                    yield (
                        tar_entry(rel, tarfile.LNKTYPE, mode, linkname=seen[key], uid=uid, gid=gid),
                        None,
                    )
                    continue
                seen[key] = rel
                yield tar_entry(rel, tarfile.REGTYPE, mode, size=st.st_size, uid=uid, gid=gid), path
            elif stat.S_ISFIFO(st.st_mode):
                yield tar_entry(rel, tarfile.FIFOTYPE, mode, uid=uid, gid=gid), None
            else:
                LOG.debug("skipping %s (device node or socket)", rel)

    yield from walk(root, "")


# --------------------------------------------------------------------------------------------
# Image layouts


def write_json_blob(blobs_dir: Path, obj: object) -> Blob:
    """Write ``obj`` as canonical JSON into ``blobs_dir`` under its digest; return it."""
    data = canonical_json(obj)
    hexdigest = hashlib.sha256(data).hexdigest()
    (blobs_dir / hexdigest).write_bytes(data)
    return Blob(f"sha256:{hexdigest}", len(data))


def write_layout(
    layout: Path,
    layers: list[Layer],
    *,
    cmd: list[str],
    created_by: str,
    env: list[str] | None = None,
) -> Blob:
    """Write config, manifest, ``index.json`` and ``oci-layout`` around already written layers.

    Returns the manifest blob (its digest is the image's digest).
    """
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    config = {
        "architecture": oci_architecture(),
        "os": "linux",
        "created": FIXED_CREATED,
        "config": {"Env": env or [PATH_ENV], "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": FIXED_CREATED, "created_by": created_by}],
    }
    config_blob = write_json_blob(blobs, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {
            "mediaType": MEDIA_CONFIG,
            "digest": config_blob.digest,
            "size": config_blob.size,
        },
        "layers": [
            {"mediaType": MEDIA_LAYER_GZIP, "digest": layer.blob.digest, "size": layer.blob.size}
            for layer in layers
        ],
    }
    manifest_blob = write_json_blob(blobs, manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": manifest_blob.digest,
                "size": manifest_blob.size,
                "annotations": {REF_NAME_ANNOTATION: TAG},
            }
        ],
    }
    (layout / "index.json").write_bytes(canonical_json(index))
    (layout / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    return manifest_blob


def layout_manifest_digest(layout: Path) -> str:
    """Return the digest of the manifest tagged ``latest`` in the layout at ``layout``."""
    index = json.loads((layout / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get(REF_NAME_ANNOTATION) == TAG:
            return str(desc["digest"])
    raise BuildError(f"{layout}: no manifest tagged {TAG!r}")


def verify_layout(layout: Path) -> None:
    """Check that every blob the tagged manifest needs exists with its digest and size."""
    blobs = layout / "blobs" / "sha256"

    def check(desc: dict[str, object]) -> Path:
        digest = str(desc["digest"])
        path = blobs / digest.removeprefix("sha256:")
        if not path.is_file():
            raise BuildError(f"{layout}: missing blob {digest}")
        if path.stat().st_size != desc["size"] or f"sha256:{sha256_file(path)}" != digest:
            raise BuildError(f"{layout}: blob {digest} is corrupt")
        return path

    index = json.loads((layout / "index.json").read_text())
    for desc in index["manifests"]:
        manifest = json.loads(check(desc).read_text())
        check(manifest["config"])
        for layer in manifest["layers"]:
            check(layer)


# --------------------------------------------------------------------------------------------
# The cache


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_key(inputs: dict[str, object]) -> str:
    """Return the cache key (hex sha256) of a build's inputs."""
    return hashlib.sha256(canonical_json(inputs)).hexdigest()


def copy_layout(src: Path, dest: Path) -> None:
    """Replace ``dest`` (absent, empty, or an image layout) by a copy of the layout ``src``."""
    dest = dest.resolve()
    if dest.exists():
        if not dest.is_dir():
            raise BuildError(f"--out {dest}: exists and is not a directory")
        if any(dest.iterdir()) and not (dest / "oci-layout").is_file():
            raise BuildError(f"--out {dest}: neither empty nor an OCI image layout; not touched")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        tmp.chmod(0o755)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached_build(
    name: str,
    inputs: dict[str, object],
    cache: Path,
    out: Path,
    build: Callable[[Path, Path], None],
) -> str:
    """Return the digest of image ``name`` written to ``out``, building it only on a cache miss.

    ``build(layout_dir, entry_dir)`` writes a layout into ``layout_dir`` (and may leave notes
    in ``entry_dir``).  A finished entry is ``<cache>/<name>-<key>/`` with ``layout/`` and
    ``inputs.json``; older entries of the same image are removed after a successful build.
    """
    key = cache_key(inputs)
    entry = cache / f"{name}-{key[:20]}"
    with locked(cache / f".{name}.lock"):
        if (entry / "layout" / "index.json").is_file():
            LOG.info("%s: cached build %s", name, entry)
        else:
            LOG.info("%s: building (cache key %s)", name, key[:20])
            started = time.monotonic()
            tmp_entry = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}-build-"))
            tmp_entry.chmod(0o755)  # readable by the non-root users of a root-built cache
            try:
                (tmp_entry / "inputs.json").write_text(
                    json.dumps(inputs, indent=2, sort_keys=True) + "\n"
                )
                build(tmp_entry / "layout", tmp_entry)
                verify_layout(tmp_entry / "layout")
                if entry.exists():
                    shutil.rmtree(entry)
                tmp_entry.rename(entry)
            except BaseException:
                shutil.rmtree(tmp_entry, ignore_errors=True)
                raise
            LOG.info("%s: built in %.1f s", name, time.monotonic() - started)
            for old in cache.glob(f"{name}-*"):
                if old != entry and old.is_dir():
                    LOG.info("%s: removing old cache entry %s", name, old.name)
                    shutil.rmtree(old, ignore_errors=True)
        layout = entry / "layout"
        digest = layout_manifest_digest(layout)
        copy_layout(layout, out)
    LOG.info("%s: %s written to %s", name, digest, out)
    return digest


# --------------------------------------------------------------------------------------------
# busybox


def busybox_applets(busybox: Path) -> list[str]:
    """Return the applet names that ``busybox --list`` prints (without busybox itself)."""
    names = run([str(busybox), "--list"]).split()
    applets = sorted({n for n in names if n and n != "busybox" and "/" not in n})
    if "sh" not in applets:
        raise BuildError(f"{busybox} has no sh applet")
    return applets


def busybox_entries(busybox: Path, applets: list[str]) -> list[Entry]:
    """Return the entries of the busybox image's single layer, sorted by path."""
    passwd = b"root:x:0:0:root:/root:/bin/sh\n"
    group = b"root:x:0:\n"
    marker = b"shifter busybox test image\n"
    size = busybox.stat().st_size
    dirs = {
        "bin": 0o755,
        "dev": 0o755,
        "etc": 0o755,
        "home": 0o755,
        "proc": 0o555,
        "root": 0o700,
        "sys": 0o555,
        "tmp": 0o1777,
    }
    entries: list[Entry] = [(tar_entry(d, tarfile.DIRTYPE, mode), None) for d, mode in dirs.items()]
    entries.append((tar_entry("bin/busybox", tarfile.REGTYPE, 0o755, size=size), busybox))
    entries += [
        (tar_entry(f"bin/{a}", tarfile.SYMTYPE, 0o777, linkname="busybox"), None) for a in applets
    ]
    for path, data in (
        ("etc/passwd", passwd),
        ("etc/group", group),
        ("etc/shifter-test-image", marker),
    ):
        entries.append((tar_entry(path, tarfile.REGTYPE, 0o644, size=len(data)), data))
    # Parents sort before their children because a parent's path is a prefix of theirs.
    entries.sort(key=lambda entry: entry[0].name.encode())
    return entries


def build_busybox(out: Path, cache: Path) -> str:
    """Build the busybox image into ``out``; return its manifest digest."""
    if not BUSYBOX_HOST_PATH.is_file():
        raise BuildError(f"{BUSYBOX_HOST_PATH} missing: apt-get install busybox-static")
    inputs = {
        "image": "busybox",
        "script_version": SCRIPT_VERSION,
        "architecture": oci_architecture(),
        "busybox_sha256": sha256_file(BUSYBOX_HOST_PATH),
    }

    def build(layout: Path, _entry: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="busybox-") as tmp:
            # Snapshot the binary so the hashed bytes are the ones that go into the layer.
            binary = Path(tmp) / "busybox"
            shutil.copyfile(BUSYBOX_HOST_PATH, binary)
            if sha256_file(binary) != inputs["busybox_sha256"]:
                raise BuildError(f"{BUSYBOX_HOST_PATH} changed during the build")
            binary.chmod(0o755)
            applets = busybox_applets(binary)
            LOG.info("busybox: %d applets", len(applets))
            layer = write_layer(busybox_entries(binary, applets), layout / "blobs" / "sha256")
        write_layout(layout, [layer], cmd=["/bin/sh"], created_by="tools/images/build.py busybox")

    return cached_build("busybox", inputs, cache, out, build)


# --------------------------------------------------------------------------------------------
# mpi


def _sources_entries() -> Iterator[tuple[list[str], list[str]]]:
    """Yield (URIs, suites) of every enabled ``deb`` entry in the apt sources."""
    apt = Path("/etc/apt")
    one_line = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in one_line:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                yield [words[1]], [words[2]]
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                field, value = line.split(":", 1)
                fields[field.strip().lower()] = value.strip()
            if fields.get("enabled", "yes").lower() == "no":
                continue
            if "deb" in fields.get("types", "").split():
                yield fields.get("uris", "").split(), fields.get("suites", "").split()


def debian_mirror(codename: str) -> str:
    """Return the first apt source that serves the suite ``codename`` itself."""
    for uris, suites in _sources_entries():
        if codename in suites and uris:
            return uris[0].rstrip("/")
    raise BuildError(f"no apt source for suite {codename!r} in /etc/apt; pass --mirror")


def host_codename() -> str:
    """Return the Debian codename of this host (the image must match the compiler's)."""
    fields = {}
    for line in Path("/etc/os-release").read_text().splitlines():
        if "=" in line:
            field, value = line.split("=", 1)
            fields[field] = value.strip('"')
    if fields.get("ID") != "debian" or not fields.get("VERSION_CODENAME"):
        raise BuildError("the mpi image is built on a Debian host (mpicc must match the image)")
    return fields["VERSION_CODENAME"]


def suite_release_digest(mirror: str, codename: str) -> str:
    """Return the sha256 of the suite's InRelease file: it pins every package version.

    Fetched from the mirror when it answers; otherwise apt's copy in /var/lib/apt/lists (as
    fresh as the last ``apt-get update``).
    """
    url = f"{mirror}/dists/{codename}/InRelease"
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            return hashlib.sha256(response.read()).hexdigest()
    except (urllib.error.URLError, OSError) as exc:
        LOG.warning("could not fetch %s (%s); using apt's copy", url, exc)
    stem = re.sub(r"^[a-z+]+://", "", mirror).replace("/", "_")
    listed = Path("/var/lib/apt/lists") / f"{stem}_dists_{codename}_InRelease"
    if listed.is_file():
        return sha256_file(listed)
    raise BuildError(f"cannot read {url} nor {listed}: cannot key the mpi image's packages")


def host_package_versions(packages: Iterable[str]) -> dict[str, str]:
    """Return ``{package: version}`` of the host packages installed among ``packages``."""
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${Version} ${db:Status-Abbrev}\n", *packages],
        capture_output=True,
        text=True,
        check=False,
    )
    versions = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2].startswith("ii"):
            versions[parts[0]] = parts[1]
    return versions


def mounts_below(root: Path) -> list[Path]:
    """Return the mount points at or below ``root``, deepest first."""
    root_s = str(root.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if point == root_s or point.startswith(root_s + "/"):
            found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_below(root: Path) -> None:
    """Unmount whatever is still mounted below ``root`` (debootstrap's /proc, /sys on failure)."""
    for point in mounts_below(root):
        LOG.warning("unmounting leftover mount %s", point)
        if subprocess.run(["umount", str(point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], check=False)


def remove_tree(root: Path) -> None:
    """Unmount whatever is mounted below ``root``, then delete it (never through a mount)."""
    unmount_below(root)
    left = mounts_below(root)
    if left:
        raise BuildError(f"not deleting {root}: still mounted: {left}")
    shutil.rmtree(root, ignore_errors=True)


def debootstrap_image(
    name: str,
    scratch: Path,
    entry: Path,
    *,
    suite: str,
    mirror: str,
    include: Iterable[str] = (),
    takes: str = "",
) -> tuple[Path, str]:
    """Debootstrap a Debian minbase root into ``scratch/rootfs`` for image ``name``.

    ``include`` are packages installed on top of minbase; ``takes`` is a hint for the log
    (such as "about a minute").  The installed packages (``dpkg-query``: one "name version" a
    line) are written to ``entry/packages.txt``.  Returns the root and that package list.
    """
    root = scratch / "rootfs"
    packages = list(include)
    started = time.monotonic()
    LOG.info(
        "%s: debootstrap --variant=minbase %s from %s%s",
        name,
        suite,
        mirror,
        f" ({takes})" if takes else "",
    )
    run(
        [
            "debootstrap",
            "--variant=minbase",
            *([f"--include={','.join(packages)}"] if packages else []),
            "--components=main",
            suite,
            str(root),
            mirror,
        ],
        log_file=scratch / "debootstrap.log",
        env={**os.environ, "LC_ALL": "C"},
    )
    LOG.info("%s: debootstrap done in %.0f s", name, time.monotonic() - started)
    unmount_below(root)  # debootstrap unmounts its /proc and /sys; make sure
    listing = run(
        ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Package} ${Version}\n"]
    )
    (entry / "packages.txt").write_text(listing)
    return root, listing


def compile_hello(dest: Path, workdir: Path, compiler: str) -> None:
    """Compile tools/images/hello.c with the host's ``compiler`` into ``dest``, reproducibly."""
    src = workdir / "hello.c"
    shutil.copyfile(HELLO_SOURCE, src)
    run(
        [compiler, "-O2", "-Wall", f"-ffile-prefix-map={workdir}=.", "-o", str(dest), str(src)],
        cwd=workdir,
        env={**os.environ, "LC_ALL": "C"},
    )
    run(["strip", "--strip-unneeded", str(dest)])
    dest.chmod(0o755)


def prune_root(root: Path) -> None:
    """Delete apt lists, caches, logs, docs and man pages from ``root``; fix build-time bits."""
    for pattern in MPI_PRUNE:
        for path in sorted(root.glob(pattern)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    doc = root / "usr" / "share" / "doc"
    if doc.is_dir():  # keep only the copyright files
        for path in sorted(doc.rglob("*"), reverse=True):
            if path.is_symlink() or path.is_file():
                if path.name != "copyright":
                    path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    # debootstrap copies the host's /etc/hostname; the date of the build is in /etc/shadow.
    (root / "etc" / "hostname").write_text("localhost\n")
    for name in ("shadow", "shadow-"):
        path = root / "etc" / name
        if path.is_file():
            lines = []
            for line in path.read_text().splitlines():
                fields = line.split(":")
                if len(fields) > 2 and fields[2]:
                    fields[2] = str(FIXED_MTIME // 86400)
                lines.append(":".join(fields))
            path.write_text("\n".join(lines) + "\n")


def tree_size(root: Path) -> tuple[int, int]:
    """Return (bytes in regular files, number of entries) of the tree at ``root``."""
    total = count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        count += len(dirnames) + len(filenames)
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total, count


def scratch_dir(prefix: str) -> Path:
    """Return a new directory on tmpfs (/dev/shm) if there is one: trees are slow on ext4."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def check_mpi_hello(root: Path) -> None:
    """Run mpi-hello as a singleton in ``root``: bare chroot, then with /proc, /sys and /dev.

    The bare chroot relies on hello.c's UCX_TLS=self fallback; the second run is what a
    container runtime gives it (see chroot_run.py).  UCX logs its complaints on stdout.
    """
    env = {"PATH": PATH_ENV.removeprefix("PATH="), "LC_ALL": "C"}
    hello = "/usr/local/bin/mpi-hello"
    for how, cmd in (
        ("bare chroot", ["chroot", str(root), hello]),
        (
            "chroot with /proc, /sys, /dev",
            [sys.executable, str(HERE / "chroot_run.py"), str(root), hello],
        ),
    ):
        output = run(cmd, env=env)
        lines = [line for line in output.splitlines() if line.startswith("hello from rank")]
        if not lines or "hello from rank 0 of 1" not in lines[0]:
            raise BuildError(f"mpi-hello in the image ({how}) printed {output!r}")
        LOG.info("mpi: %s: %s", how, lines[0])


def build_mpi(out: Path, cache: Path, mirror: str | None) -> str:
    """Build the mpi image (Debian minbase + MPICH + mpi-hello) into ``out``; return its digest."""
    codename = host_codename()
    mirror = (mirror or debian_mirror(codename)).rstrip("/")
    inputs = {
        "image": "mpi",
        "script_version": SCRIPT_VERSION,
        "architecture": oci_architecture(),
        "suite": codename,
        "mirror": mirror,
        "include": list(MPI_INCLUDE),
        "suite_inrelease_sha256": suite_release_digest(mirror, codename),
        "host_packages": host_package_versions(MPI_HOST_PACKAGES),
        "hello_c_sha256": sha256_file(HELLO_SOURCE),
    }

    def build(layout: Path, entry: Path) -> None:
        if os.geteuid() != 0:
            raise BuildError("building the mpi image needs root (debootstrap, chroot)")
        for tool in ("debootstrap", MPI_MPICC, "chroot"):
            if shutil.which(tool) is None:
                raise BuildError(f"{tool}: not found (see tools/images/APT_PACKAGES)")
        scratch = scratch_dir("shifter-image-mpi-")
        try:
            hello = scratch / "mpi-hello"
            compile_hello(hello, scratch, MPI_MPICC)
            LOG.info("mpi: compiled mpi-hello")
            root, packages = debootstrap_image(
                "mpi",
                scratch,
                entry,
                suite=codename,
                mirror=mirror,
                include=MPI_INCLUDE,
                takes="about a minute",
            )
            _check_mpich_matches(packages)
            target = root / "usr" / "local" / "bin" / "mpi-hello"
            shutil.copyfile(hello, target)
            target.chmod(0o755)
            (root / "etc" / "shifter-test-image").write_text("shifter mpi test image\n")
            prune_root(root)
            size, count = tree_size(root)
            LOG.info("mpi: root is %.0f MB in %d entries", size / 1e6, count)
            check_mpi_hello(root)
            started = time.monotonic()
            layer = write_layer(tree_entries(root), layout / "blobs" / "sha256")
            LOG.info(
                "mpi: layer %.1f MB gz in %.1f s", layer.blob.size / 1e6, time.monotonic() - started
            )
        finally:
            remove_tree(scratch)
        write_layout(
            layout,
            [layer],
            cmd=["/usr/local/bin/mpi-hello"],
            created_by="tools/images/build.py mpi",
        )

    return cached_build("mpi", inputs, cache, out, build)


def _check_mpich_matches(packages: str) -> None:
    """Warn when the image's MPICH differs from the host's that compiled mpi-hello."""
    image = dict(line.split(" ", 1) for line in packages.splitlines() if " " in line)
    host = host_package_versions(["libmpich12"])
    if image.get("libmpich12") != host.get("libmpich12"):
        LOG.warning(
            "image libmpich12 %s differs from the host's %s that compiled mpi-hello",
            image.get("libmpich12"),
            host.get("libmpich12"),
        )


# --------------------------------------------------------------------------------------------
# openmpi


def check_openmpi_hello(root: Path) -> None:
    """Run mpi-hello as a singleton in ``root`` with /proc, /sys and /dev (chroot_run.py).

    An Open MPI singleton (no PMIx server around) starts its own orted from the image, so this
    also checks that openmpi-bin is complete.  A bare chroot is not tried: Open MPI needs /proc.
    """
    env = {"PATH": PATH_ENV.removeprefix("PATH="), "LC_ALL": "C", **OPENMPI_CHECK_ENV}
    cmd = [sys.executable, str(HERE / "chroot_run.py"), str(root), "/usr/local/bin/mpi-hello"]
    output = run(cmd, env=env)
    lines = [line for line in output.splitlines() if line.startswith("hello from rank")]
    if not lines or "hello from rank 0 of 1" not in lines[0]:
        raise BuildError(f"mpi-hello in the openmpi image printed {output!r}")
    LOG.info("openmpi: chroot with /proc, /sys, /dev: %s", lines[0])


def build_openmpi(out: Path, cache: Path, mirror: str | None) -> str:
    """Build the openmpi image (minbase + Open MPI + mpi-hello) into ``out``; return its digest."""
    codename = host_codename()
    mirror = (mirror or debian_mirror(codename)).rstrip("/")
    inputs = {
        "image": "openmpi",
        "script_version": SCRIPT_VERSION,
        "architecture": oci_architecture(),
        "suite": codename,
        "mirror": mirror,
        "include": list(OPENMPI_INCLUDE),
        "suite_inrelease_sha256": suite_release_digest(mirror, codename),
        "host_packages": host_package_versions(OPENMPI_HOST_PACKAGES),
        "hello_c_sha256": sha256_file(HELLO_SOURCE),
    }

    def build(layout: Path, entry: Path) -> None:
        if os.geteuid() != 0:
            raise BuildError("building the openmpi image needs root (debootstrap, chroot)")
        for tool in ("debootstrap", OPENMPI_MPICC, "chroot"):
            if shutil.which(tool) is None:
                raise BuildError(f"{tool}: not found (see tools/images/APT_PACKAGES)")
        scratch = scratch_dir("shifter-image-openmpi-")
        try:
            hello = scratch / "mpi-hello"
            compile_hello(hello, scratch, OPENMPI_MPICC)
            LOG.info("openmpi: compiled mpi-hello with %s", OPENMPI_MPICC)
            root, packages = debootstrap_image(
                "openmpi", scratch, entry, suite=codename, mirror=mirror, include=OPENMPI_INCLUDE
            )
            image = dict(line.split(" ", 1) for line in packages.splitlines() if " " in line)
            host = host_package_versions(["libopenmpi3"])
            if image.get("libopenmpi3") != host.get("libopenmpi3"):
                LOG.warning(
                    "image libopenmpi3 %s differs from the host's %s that compiled mpi-hello",
                    image.get("libopenmpi3"),
                    host.get("libopenmpi3"),
                )
            target = root / "usr" / "local" / "bin" / "mpi-hello"
            shutil.copyfile(hello, target)
            target.chmod(0o755)
            (root / "etc" / "shifter-test-image").write_text("shifter openmpi test image\n")
            prune_root(root)
            size, count = tree_size(root)
            LOG.info("openmpi: root is %.0f MB in %d entries", size / 1e6, count)
            check_openmpi_hello(root)
            started = time.monotonic()
            layer = write_layer(tree_entries(root), layout / "blobs" / "sha256")
            LOG.info(
                "openmpi: layer %.1f MB gz in %.1f s",
                layer.blob.size / 1e6,
                time.monotonic() - started,
            )
        finally:
            remove_tree(scratch)
        write_layout(
            layout,
            [layer],
            cmd=["/usr/local/bin/mpi-hello"],
            created_by="tools/images/build.py openmpi",
        )

    return cached_build("openmpi", inputs, cache, out, build)


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, build the image, print its manifest digest."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=["busybox", "mpi", "openmpi"], help="image to build")
    parser.add_argument("--out", type=Path, required=True, help="OCI image layout to write")
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"cache directory (default {DEFAULT_CACHE})",
    )
    parser.add_argument(
        "--mirror", help="Debian mirror for the mpi/openmpi images (default: apt sources)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    cache = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        if args.name == "busybox":
            digest = build_busybox(args.out, cache)
        elif args.name == "openmpi":
            digest = build_openmpi(args.out, cache, args.mirror)
        else:
            digest = build_mpi(args.out, cache, args.mirror)
    except BuildError as exc:
        LOG.error("%s", exc)
        return 1
    LOG.info("done in %.1f s", time.monotonic() - started)
    print(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
