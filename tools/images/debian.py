#!/usr/bin/env python3
"""Build a Debian bookworm minbase image (like ``debian:bookworm``) as a reproducible OCI layout.

Usage::

    debian.py --out DIR [--cache DIR] [--mirror URL] [--push] [--ref REF]

``debootstrap --variant=minbase bookworm`` from the Debian mirror of the apt sources (into
tmpfs), without apt lists, apt caches and logs: about 120 MB unpacked in about 6,700 entries,
written as ONE gzip layer the way a real ``debian`` image is (Cmd ``["bash"]``).  The layer and
the layout follow ``build.py``'s conventions (sorted entries, one fixed mtime, numeric owners,
gzip with mtime 0, canonical JSON), and the build is cached the same way, under
``<checkout>/.box/cache/images/debian-KEY/``: a second build only copies the layout (seconds)
and gives the same digest.  The cache key holds this script's version, ``build.py``'s, the
architecture, suite, mirror, the sha256 of the suite's ``InRelease`` (it pins every package
version) and the host's debootstrap version.

With ``--push`` the layout is copied to the box registry as
``127.0.0.1:5000/library/debian:bookworm`` (``skopeo copy --dest-tls-verify=false``), unless
the registry already serves that digest.  The manifest digest is printed on stdout; progress
goes to stderr.  Needs root (debootstrap, chroot); the first build takes about a minute.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# build.py lives next to this file; importing it gives the layer writer, the layout writer and
# the cache, so that both builders produce images the same way.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import build
from build import BuildError, run

LOG = logging.getLogger("images.debian")

#: Bump whenever a change here changes what the image contains: it is part of the cache key.
SCRIPT_VERSION = 1

SUITE = "bookworm"
NAME = "debian"
REGISTRY = "127.0.0.1:5000"
DEFAULT_REF = f"{REGISTRY}/library/debian:{SUITE}"
DEFAULT_OUT = build.CHECKOUT / ".box" / "cache" / "oci" / NAME
BOX_POLICY = build.CHECKOUT / ".box" / "etc" / "policy.json"
# The box's mirror (REGISTRY) is read-only: pushes go to its authenticated endpoint on the
# same storage, with the credentials box.py made (root's).
PUSH_REGISTRY = "127.0.0.1:5001"
BOX_AUTHFILE = build.CHECKOUT / ".box" / "etc" / "registry-push-auth.json"
PUSH_STAMP = build.CHECKOUT / ".box" / "cache" / f"pushed-{NAME}.json"

#: Directories whose regular files are deleted (the directories themselves stay, as apt and
#: dpkg expect them): apt's package lists and caches, and build-time logs.
EMPTIED_DIRS = ("var/lib/apt/lists", "var/cache/apt", "var/log")
#: Single files removed (relative to the root; globs allowed).
REMOVED = (
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/cache/ldconfig/aux-cache",  # inode numbers and mtimes of the build
    "etc/resolv.conf",  # copied from the host by debootstrap; runtimes provide their own
)

MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)


def prune(root: Path) -> None:
    """Remove apt lists and caches, logs and host-specific bits; fix build-time dates."""
    for relative in EMPTIED_DIRS:
        top = root / relative
        for path in sorted(top.rglob("*"), reverse=True) if top.is_dir() else ():
            if path.is_symlink() or path.is_file():
                path.unlink()
    for pattern in REMOVED:
        for path in sorted(root.glob(pattern)):
            path.unlink()
    # debootstrap copies the host's /etc/hostname; the date of the build is in /etc/shadow.
    hostname = root / "etc" / "hostname"
    hostname.write_text("localhost\n")
    hostname.chmod(0o644)
    for name in ("shadow", "shadow-"):
        path = root / "etc" / name
        if path.is_file():
            lines = []
            for line in path.read_text().splitlines():
                fields = line.split(":")
                if len(fields) > 2 and fields[2]:
                    fields[2] = str(build.FIXED_MTIME // 86400)
                lines.append(":".join(fields))
            path.write_text("\n".join(lines) + "\n")


def build_debian(out: Path, cache: Path, mirror: str | None) -> str:
    """Build the Debian minbase image into ``out``; return its manifest digest."""
    mirror = (mirror or build.debian_mirror(SUITE)).rstrip("/")
    inputs = {
        "image": NAME,
        "script_version": SCRIPT_VERSION,
        "build_py_version": build.SCRIPT_VERSION,
        "architecture": build.oci_architecture(),
        "suite": SUITE,
        "mirror": mirror,
        "suite_inrelease_sha256": build.suite_release_digest(mirror, SUITE),
        "host_packages": build.host_package_versions(["debootstrap"]),
    }

    def make(layout: Path, entry: Path) -> None:
        if os.geteuid() != 0:
            raise BuildError("building the debian image needs root (debootstrap, chroot)")
        for tool in ("debootstrap", "chroot"):
            if shutil.which(tool) is None:
                raise BuildError(f"{tool}: not found (apt-get install {tool})")
        scratch = build.scratch_dir("shifter-image-debian-")
        try:
            root, _packages = build.debootstrap_image(
                NAME, scratch, entry, suite=SUITE, mirror=mirror, takes="~40 s"
            )
            prune(root)
            output = run(
                ["chroot", str(root), "/bin/bash", "-c", "echo ok"],
                env={"PATH": build.PATH_ENV.removeprefix("PATH="), "LC_ALL": "C"},
            )
            if output.strip() != "ok":
                raise BuildError(f"bash in the image printed {output!r}")
            size, count = build.tree_size(root)
            LOG.info("debian: root is %.0f MB in %d entries", size / 1e6, count)
            started = time.monotonic()
            layer = build.write_layer(build.tree_entries(root), layout / "blobs" / "sha256")
            LOG.info(
                "debian: layer %.1f MB gz in %.1f s",
                layer.blob.size / 1e6,
                time.monotonic() - started,
            )
        finally:
            build.remove_tree(scratch)
        build.write_layout(
            layout, [layer], cmd=["bash"], created_by=f"tools/images/debian.py ({SUITE} minbase)"
        )

    return build.cached_build(NAME, inputs, cache, out, make)


# --------------------------------------------------------------------------------------------
# Pushing


def registry_digest(ref: str) -> str | None:
    """Return the digest ``ref`` (``HOST:PORT/REPO:TAG``, plain http) has, None if untagged."""
    host, _, rest = ref.partition("/")
    repo, _, tag = rest.rpartition(":")
    request = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/{tag}",
        method="HEAD",
        headers={"Accept": MANIFEST_ACCEPT},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.headers.get("Docker-Content-Digest")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise BuildError(f"registry answered {exc.code} for {ref}") from exc
    except OSError as exc:
        raise BuildError(f"registry {host} does not answer ({exc}): is the box up?") from exc


def push(layout: Path, digest: str, ref: str) -> str:
    """Copy ``layout`` to ``ref`` unless the registry has ``digest`` there; return its digest."""
    remote = registry_digest(ref)
    try:
        stamp = json.loads(PUSH_STAMP.read_text())
    except (OSError, ValueError):
        stamp = {}
    if remote is not None and (
        remote == digest or stamp == {"ref": ref, "source": digest, "pushed": remote}
    ):
        LOG.info("registry has %s (%s): not pushed again", ref, remote)
        return remote
    digest_file = layout.parent / f".{layout.name}.pushed-digest"
    argv = ["skopeo"]
    if BOX_POLICY.is_file():
        argv += ["--policy", str(BOX_POLICY)]
    dest = ref
    argv += ["copy", "--quiet", "--dest-tls-verify=false"]
    if ref.startswith(f"{REGISTRY}/") and BOX_AUTHFILE.is_file():
        dest = PUSH_REGISTRY + ref.removeprefix(REGISTRY)
        argv += ["--dest-authfile", str(BOX_AUTHFILE)]
    argv += ["--digestfile", str(digest_file), f"oci:{layout}:latest", f"docker://{dest}"]
    LOG.info("pushing %s to %s", layout, ref)
    try:
        run(argv)
        pushed = digest_file.read_text().strip()
    finally:
        digest_file.unlink(missing_ok=True)
    PUSH_STAMP.parent.mkdir(parents=True, exist_ok=True)
    PUSH_STAMP.write_text(json.dumps({"ref": ref, "source": digest, "pushed": pushed}) + "\n")
    LOG.info("pushed %s as %s", ref, pushed)
    return pushed


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, build (and push) the image, print its manifest digest."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"OCI layout to write ({DEFAULT_OUT})"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=build.DEFAULT_CACHE,
        help=f"cache directory (default {build.DEFAULT_CACHE})",
    )
    parser.add_argument("--mirror", help="Debian mirror (default: from the apt sources)")
    parser.add_argument("--push", action="store_true", help="push to the registry (see --ref)")
    parser.add_argument("--ref", default=DEFAULT_REF, help=f"where to push (default {DEFAULT_REF})")
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
        digest = build_debian(args.out, cache, args.mirror)
        if args.push:
            push(args.out.resolve(), digest, args.ref)
    except BuildError as exc:
        LOG.error("%s", exc)
        return 1
    LOG.info("done in %.1f s", time.monotonic() - started)
    print(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
