"""Mirrors are trusted (they serve tags), so they are read-only to users.

The box's docker.io mirror (the registry on 127.0.0.1:5000 that serves library/busybox)
refuses every write from an ordinary user: a blob upload, a manifest, a delete, a whole
``skopeo copy``; busybox stays what it was. The box writes it through its authenticated
push endpoint only (what seeding uses), which refuses anyone without the box's credentials.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.registries import OCILayout, make_layer

from ..integration.slurm import ROOT, run_as

PYTHON = str(ROOT / ".venv" / "bin" / "python")
MANIFEST = "application/vnd.oci.image.manifest.v1+json"

# An HTTP request as the user: prints the status (no proxy, no retries).
REQUEST = """
import sys, urllib.request, urllib.error
method, url, body, ctype = sys.argv[1], sys.argv[2], sys.argv[3].encode(), sys.argv[4]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
req = urllib.request.Request(url, data=body or None, method=method)
if ctype:
    req.add_header("Content-Type", ctype)
try:
    with opener.open(req, timeout=10) as resp:
        print(resp.status)
except urllib.error.HTTPError as err:
    print(err.code)
"""


def http_as(user: str, method: str, url: str, body: str = "", ctype: str = "") -> int:
    result = run_as([PYTHON, "-c", REQUEST, method, url, body, ctype], user=user)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    for stream in (result.stdout, result.stderr):
        assert "Traceback" not in stream, stream


@pytest.fixture(scope="module")
def busybox_digest(box) -> Iterator[str]:
    """busybox's digest in the mirror before the attacks; checked unchanged after them."""
    before = box.module.registry_digest("library/busybox", "latest")
    assert before
    yield before
    assert box.module.registry_digest("library/busybox", "latest") == before


@pytest.fixture(scope="module")
def evil_layout() -> Iterator[Path]:
    """An image of alice's own that claims to be busybox (readable by the test users)."""
    path = Path(tempfile.mkdtemp(prefix="shifter-evil-", dir="/var/tmp"))
    path.chmod(0o755)
    layout = OCILayout(path / "layout")
    layer = make_layer({"bin/sh": "#!/bin/false\n", "etc/evil": "replaced by alice\n"})
    layout.tag("latest", layout.add_image([layer]))
    subprocess.run(["chmod", "-R", "a+rX", str(path)], check=True)
    try:
        yield layout.path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_user_cannot_upload_a_blob_to_the_mirror(box, busybox_digest):
    url = f"http://{box.registry}/v2/library/busybox/blobs/uploads/"
    assert http_as("alice", "POST", url) in (401, 403, 405)
    assert http_as("bob", "POST", url.replace("busybox", "someone-new")) in (401, 403, 405)


def test_a_user_cannot_put_or_delete_a_manifest_in_the_mirror(box, busybox_digest):
    base = f"http://{box.registry}/v2/library/busybox/manifests"
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "layers": []})
    assert http_as("alice", "PUT", f"{base}/latest", manifest, MANIFEST) in (401, 403, 405)
    assert http_as("alice", "DELETE", f"{base}/{busybox_digest}") in (401, 403, 405)


def test_skopeo_copy_to_the_mirror_is_refused(box, busybox_digest, evil_layout):
    policy = box.root / "etc" / "policy.json"
    for registry in (box.registry, box.module.REGISTRY_PUSH_ADDR):
        result = run_as(
            [
                "skopeo", "--policy", str(policy), "copy", "--quiet", "--dest-tls-verify=false",
                f"oci:{evil_layout}:latest", f"docker://{registry}/library/busybox:latest",
            ],
            timeout=120,
            HOME="/tmp",
        )  # fmt: skip
        no_traceback(result)
        assert result.returncode != 0, result.stdout
        assert any(word in result.stderr for word in ("405", "401", "unauthorized")), result.stderr


def test_the_push_endpoint_wants_the_box_credentials(box, busybox_digest):
    url = f"http://{box.module.REGISTRY_PUSH_ADDR}/v2/library/busybox/blobs/uploads/"
    assert http_as("alice", "POST", url) == 401
    assert http_as("alice", "GET", f"http://{box.module.REGISTRY_PUSH_ADDR}/v2/") == 401
    for secret in (
        box.root / "etc" / "registry-push-auth.json",
        box.root / "etc" / "registry-push.htpasswd",
    ):
        result = run_as(["cat", str(secret)])
        assert result.returncode != 0 and result.stdout == ""


def test_the_box_pushes_through_the_authenticated_endpoint(box, evil_layout):
    """What seeding does: the image then shows in the (read-only) mirror."""
    repo = f"library/shifter-security-{uuid.uuid4().hex[:8]}"
    push = box.module.REGISTRY_PUSH_ADDR
    subprocess.run(
        [
            "skopeo", "--policy", str(box.root / "etc" / "policy.json"), "copy", "--quiet",
            "--dest-tls-verify=false", "--dest-authfile", str(box.module.PATHS.registry_authfile),
            f"oci:{evil_layout}:latest", f"docker://{push}/{repo}:latest",
        ],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    digest = box.module.registry_digest(repo, "latest")
    try:
        assert digest and digest.startswith("sha256:")
    finally:
        if digest:  # the manifest goes again (its blobs stay, as after any delete)
            user, password = box.module.push_credentials()
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            status, _, _ = box.module.http_get(
                f"http://{push}/v2/{repo}/manifests/{digest}",
                method="DELETE",
                headers={"Authorization": f"Basic {basic}"},
            )
            assert status == 202
        # ... and the repository itself (the registry lists it in its catalog otherwise)
        shutil.rmtree(box.root / "registry/docker/registry/v2/repositories" / repo, True)
