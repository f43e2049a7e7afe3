"""The registry client against real ``docker-registry`` processes on loopback.

Three registries per module: anonymous, htpasswd Basic auth, and Bearer tokens from the
Python token server in ``tests/fixtures/registries.py``. Images are built in the test (small
reproducible tar layers) and pushed with skopeo as Docker v2s2, OCI, a Docker manifest list and
an OCI index (amd64 + arm64/v8), and an OCI manifest without ``mediaType`` (as umoci writes).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard

from shifter_core.image.errors import (
    AuthenticationError,
    DigestMismatch,
    ImageNotFound,
    PlatformNotFound,
    RegistryError,
)
from shifter_core.image.layercache import LayerCache
from shifter_core.image.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    Platform,
)
from shifter_core.image.registry.client import RegistryClient
from shifter_core.image.registry.credentials import CredentialStore, StaticCredentials
from shifter_core.image.registry.settings import RegistrySettings
from tests.fixtures.registries import (
    Layer,
    OCILayout,
    RegistryProcess,
    TokenServer,
    corrupt_blob,
    fetch_manifest,
    free_port,
    make_layer,
    random_layer,
    sha256,
    skopeo_copy,
    start_registry,
    tools_available,
)

pytestmark = pytest.mark.skipif(
    bool(tools_available()), reason=f"missing programs: {', '.join(tools_available())}"
)

CONFIG = {
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello"],
    "Entrypoint": ["/app/run.sh"],
    "Cmd": ["--verbose"],
    "WorkingDir": "/app",
    "User": "1000:1000",
    "Labels": {"org.example.test": "yes"},
}


@dataclass
class Images:
    """What the anonymous registry holds."""

    registry: RegistryProcess
    layers: dict[str, Layer] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)

    def ref(self, repo: str, tag: str = "latest") -> str:
        return f"{self.registry.name}/{repo}:{tag}"


def settings_for(*registries: RegistryProcess, **extra: Any) -> RegistrySettings:
    return RegistrySettings(insecure=frozenset(r.name for r in registries), **extra)


def served_digest(registry: RegistryProcess, repo: str, ref: str, accept: str) -> str:
    """The digest of the manifest bytes the registry serves (computed without our client)."""
    return sha256(fetch_manifest(registry, repo, ref, accept))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    root = tmp_path_factory.mktemp("anon")
    registry = start_registry(root / "registry")
    try:
        layout = OCILayout(root / "layout")
        found = Images(registry)
        L = found.layers
        L["etc"] = make_layer({"etc/os-release": "ID=shifter-test\n"})
        L["app"] = make_layer({"app/run.sh": "#!/bin/sh\necho hi\n"})
        L["zstd"] = make_layer({"app/zstd.txt": "zstd layer\n"}, "zstd")
        L["tar"] = make_layer({"app/plain.txt": "plain layer\n"}, "none")
        L["arm"] = make_layer({"etc/arch": "arm64\n"})
        for i in range(3):
            L[f"big{i}"] = random_layer(3 << 20, seed=100 + i, compression="none")
        L["unique"] = random_layer(200_000, seed=7)  # its blob is corrupted by a test

        amd = layout.add_image([L["etc"], L["app"]], config=CONFIG)
        arm = layout.add_image([L["etc"], L["arm"]], architecture="arm64", variant="v8")
        layout.tag("amd", amd)
        layout.tag("multi", layout.add_index([amd, arm]))
        layout.tag("mixed", layout.add_image([L["etc"], L["zstd"], L["tar"]]))
        layout.tag("nomt", layout.add_image([L["etc"]], media_type_field=False))
        layout.tag("big", layout.add_image([L[f"big{i}"] for i in range(3)]))
        layout.tag("unique", layout.add_image([L["etc"], L["unique"]]))
        found.digests.update(amd=amd["digest"], arm=arm["digest"])

        dest = registry.name
        skopeo_copy(layout, "amd", f"{dest}/t/v2s2:latest", format="v2s2")
        skopeo_copy(layout, "amd", f"{dest}/library/busybox:latest", format="v2s2")
        skopeo_copy(layout, "mixed", f"{dest}/t/oci:latest")  # --preserve-digests: no recompression
        skopeo_copy(layout, "multi", f"{dest}/t/index:latest", all_images=True)
        skopeo_copy(layout, "multi", f"{dest}/t/list:latest", all_images=True, format="v2s2")
        skopeo_copy(layout, "nomt", f"{dest}/t/umoci:latest")
        skopeo_copy(layout, "big", f"{dest}/t/big:latest")
        skopeo_copy(layout, "unique", f"{dest}/t/corrupt:latest")
        yield found
    finally:
        registry.stop()


def tar_members(blob: bytes, compression: str) -> dict[str, bytes]:
    if compression == "gzip":
        blob = gzip.decompress(blob)
    elif compression == "zstd":
        blob = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


# -- manifests --------------------------------------------------------------------------------


def test_docker_v2s2(images: Images, tmp_path: Path) -> None:
    with RegistryClient(settings_for(images.registry)) as client:
        resolved = client.resolve(images.ref("t/v2s2"))
        assert resolved.media_type == DOCKER_MANIFEST
        assert resolved.digest == served_digest(
            images.registry, "t/v2s2", "latest", DOCKER_MANIFEST
        )
        assert resolved.index_digest is None
        config = resolved.config
        assert config.env == tuple(CONFIG["Env"])
        assert config.entrypoint == ("/app/run.sh",) and config.cmd == ("--verbose",)
        assert (config.workdir, config.user) == ("/app", "1000:1000")
        assert config.labels == {"org.example.test": "yes"}
        assert [la.compression for la in resolved.layers] == ["gzip", "gzip"]
        assert [la.media_type for la in resolved.layers] == [
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        ] * 2
        cache = LayerCache(tmp_path / "cache")
        paths = client.pull_layers(resolved, cache)
    assert [p.name for p in paths] == [la.digest.split(":")[1] for la in resolved.layers]
    files = tar_members(paths[1].read_bytes(), "gzip")
    assert files["app/run.sh"] == b"#!/bin/sh\necho hi\n"


def test_oci_with_gzip_zstd_and_plain_layers(images: Images, tmp_path: Path) -> None:
    with RegistryClient(settings_for(images.registry)) as client:
        resolved = client.resolve(images.ref("t/oci"))
        assert resolved.media_type == OCI_MANIFEST
        assert resolved.digest == served_digest(images.registry, "t/oci", "latest", OCI_MANIFEST)
        assert [la.compression for la in resolved.layers] == ["gzip", "zstd", "none"]
        paths = client.pull_layers(resolved, LayerCache(tmp_path))
    contents = [
        tar_members(p.read_bytes(), la.compression)
        for p, la in zip(paths, resolved.layers, strict=True)
    ]
    assert contents[1]["app/zstd.txt"] == b"zstd layer\n"
    assert contents[2]["app/plain.txt"] == b"plain layer\n"


@pytest.mark.parametrize(
    "repo, index_type", [("t/list", DOCKER_MANIFEST_LIST), ("t/index", OCI_INDEX)]
)
def test_platform_selection(images: Images, repo: str, index_type: str) -> None:
    with RegistryClient(settings_for(images.registry)) as client:
        arm = client.resolve(images.ref(repo), "linux/arm64/v8")
        amd = client.resolve(images.ref(repo), "linux/amd64")
        assert arm.index_media_type == amd.index_media_type == index_type
        assert arm.index_digest == served_digest(images.registry, repo, "latest", index_type)
        assert str(arm.platform) == "linux/arm64/v8" and str(amd.platform) == "linux/amd64"
        assert arm.digest != amd.digest
        if repo == "t/index":  # pushed unchanged: the digests of the layout
            assert (amd.digest, arm.digest) == (images.digests["amd"], images.digests["arm"])
        host = Platform.host()
        default = client.resolve(images.ref(repo))
        if host.architecture == "amd64":
            assert default.digest == amd.digest
        elif host.architecture == "arm64":
            assert default.digest == arm.digest
        with pytest.raises(PlatformNotFound) as err:
            client.resolve(images.ref(repo), "linux/ppc64le")
        assert "linux/amd64, linux/arm64/v8" in str(err.value)


def test_umoci_style_manifest_without_media_type(images: Images) -> None:
    raw = json.loads(fetch_manifest(images.registry, "t/umoci", "latest", MANIFEST_ACCEPT))
    assert "mediaType" not in raw  # what this test is about
    with RegistryClient(settings_for(images.registry)) as client:
        resolved = client.resolve(images.ref("t/umoci"))
    assert resolved.media_type == OCI_MANIFEST and len(resolved.layers) == 1


def test_pull_by_digest(images: Images) -> None:
    with RegistryClient(settings_for(images.registry)) as client:
        by_tag = client.resolve(images.ref("t/v2s2"))
        name = f"{images.registry.name}/t/v2s2"
        assert client.resolve(f"{name}@{by_tag.digest}").digest == by_tag.digest
        assert client.resolve(f"{name}:latest@{by_tag.digest}").digest == by_tag.digest
        # the platform manifest of a list can be pulled by its own digest
        arm = client.resolve(f"{images.registry.name}/t/index@{images.digests['arm']}")
        assert arm.digest == images.digests["arm"] and arm.index_digest is None
        with pytest.raises(ImageNotFound):
            client.resolve(f"{name}@sha256:{'0' * 64}")


def test_not_found_messages(images: Images) -> None:
    with (
        RegistryClient(settings_for(images.registry)) as client,
        pytest.raises(ImageNotFound) as err,
    ):
        client.resolve(images.ref("t/v2s2", "lates"))
        assert str(err.value) == (
            f"image '{images.registry.name}/t/v2s2:lates' not found in registry "
            f"{images.registry.name}; did you mean {images.registry.name}/t/v2s2:latest?"
        )
        with pytest.raises(ImageNotFound) as err:
            client.resolve(images.ref("t/nothing-here"))
        assert "check the name" in str(err.value)


# -- mirrors ----------------------------------------------------------------------------------


def test_docker_hub_names_resolve_through_a_mirror(images: Images, tmp_path: Path) -> None:
    settings = RegistrySettings(mirrors={"docker.io": [images.registry.url]})
    with RegistryClient(settings) as client:
        resolved = client.resolve("busybox")
        assert resolved.registry == "docker.io" and resolved.name == "busybox:latest"
        assert resolved.endpoint.mirror and resolved.endpoint.url == images.registry.url
        assert client.pull_layers(resolved, LayerCache(tmp_path))
        by_digest = client.resolve(f"docker.io/library/busybox@{resolved.digest}")
        assert by_digest.digest == resolved.digest


def test_unreachable_mirror_falls_back_to_the_registry(images: Images) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = settings_for(
        images.registry, mirrors={images.registry.name: [dead]}, retries=1, backoff=0.01
    )
    with RegistryClient(settings) as client:
        resolved = client.resolve(images.ref("t/v2s2"))
    assert resolved.endpoint.url == images.registry.url and not resolved.endpoint.mirror


# -- blobs, cache, concurrency ----------------------------------------------------------------


def test_corrupted_blob_is_detected_and_not_cached(images: Images, tmp_path: Path) -> None:
    layer = images.layers["unique"]
    corrupt_blob(images.registry, layer.digest)
    cache = LayerCache(tmp_path / "cache")
    with RegistryClient(settings_for(images.registry)) as client:
        resolved = client.resolve(images.ref("t/corrupt"))
        with pytest.raises(DigestMismatch) as err:
            client.pull_layers(resolved, cache)
    assert err.value.blob == err.value.expected == layer.digest
    assert err.value.actual and err.value.actual != layer.digest
    assert layer.digest in str(err.value) and err.value.actual in str(err.value)
    assert not cache.has(layer.digest)
    leftovers = [p.name for p in (tmp_path / "cache" / "sha256").iterdir()]
    assert all(not name.startswith(".tmp") for name in leftovers)
    assert layer.digest.split(":")[1] not in leftovers


CHILD = r"""
import json, os, sys, threading, time
from shifter_core.image.layercache import LayerCache
from shifter_core.image.registry.client import RegistryClient, RegistrySettings

ref, cache_dir, insecure, go_file, nthreads = json.loads(sys.argv[1])
cache = LayerCache(cache_dir)
barrier = threading.Barrier(nthreads)
results = [None] * nthreads

def slow(digest, done, total):
    time.sleep(0.002)  # stretch downloads so that pulls overlap

def pull(i):
    client = RegistryClient(RegistrySettings(insecure=frozenset([insecure])))
    try:
        barrier.wait()
        resolved = client.resolve(ref)
        results[i] = [str(p) for p in client.pull_layers(resolved, cache, slow)]
    except Exception as exc:
        results[i] = repr(exc)
    finally:
        client.close()

print("ready", flush=True)
while not os.path.exists(go_file):
    time.sleep(0.005)
threads = [threading.Thread(target=pull, args=(i,)) for i in range(nthreads)]
for t in threads:
    t.start()
for t in threads:
    t.join()
stats = cache.stats
print(json.dumps({"downloaded": stats.downloaded, "hits": stats.hits, "waited": stats.waited,
                  "results": results}))
"""


def test_ten_concurrent_pulls_download_each_layer_once(images: Images, tmp_path: Path) -> None:
    """2 processes x 5 threads pull one image into one cache directory at the same time."""
    cache_dir = tmp_path / "cache"
    go_file = tmp_path / "go"
    ref = images.ref("t/big")
    args = json.dumps([ref, str(cache_dir), images.registry.name, str(go_file), 5])
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        go_file.touch()
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    reports = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    layers = [images.layers[f"big{i}"] for i in range(3)]
    expected_paths = [str(cache_dir / "sha256" / la.digest.split(":")[1]) for la in layers]
    for report in reports:
        assert report["results"] == [expected_paths] * 5
    downloaded = sorted(d for r in reports for d in r["downloaded"])
    assert downloaded == sorted(la.digest for la in layers)  # each layer exactly once
    assert sum(r["hits"] for r in reports) == 10 * 3 - 3
    assert sum(r["waited"] for r in reports) >= 1  # some pull waited on another's lock
    for la in layers:
        assert images.registry.blob_gets(la.digest) == 1  # the registry agrees
        assert Path(expected_paths[layers.index(la)]).read_bytes() == la.blob


# -- Basic auth -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    root = tmp_path_factory.mktemp("basic")
    registry = start_registry(root / "registry", users={"alice": "s3cret"})
    try:
        layout = OCILayout(root / "layout")
        layout.tag("img", layout.add_image([make_layer({"etc/basic": "basic\n"})]))
        skopeo_copy(layout, "img", f"{registry.name}/private/app:1", creds=("alice", "s3cret"))
        yield registry
    finally:
        registry.stop()


def test_basic_auth_with_stored_credentials(
    basic_registry: RegistryProcess, tmp_path: Path
) -> None:
    store = CredentialStore(tmp_path / "shifter" / "credentials.json")
    store.set(basic_registry.name, "alice", "s3cret")
    with RegistryClient(settings_for(basic_registry), store) as client:
        resolved = client.resolve(f"{basic_registry.name}/private/app:1")
        [path] = client.pull_layers(resolved, LayerCache(tmp_path / "cache"))
    assert tar_members(path.read_bytes(), "gzip")["etc/basic"] == b"basic\n"


def test_basic_auth_wrong_password_fails_fast(basic_registry: RegistryProcess) -> None:
    creds = StaticCredentials({basic_registry.name: ("alice", "wrong")})
    started = time.monotonic()
    with (
        RegistryClient(settings_for(basic_registry), creds) as client,
        pytest.raises(AuthenticationError) as err,
    ):
        client.resolve(f"{basic_registry.name}/private/app:1")
    assert time.monotonic() - started < 5
    assert "rejected the username or password of user 'alice'" in str(err.value)
    assert f"shifterimg login {basic_registry.name}" in str(err.value)


def test_basic_auth_without_credentials(basic_registry: RegistryProcess) -> None:
    with (
        RegistryClient(settings_for(basic_registry)) as client,
        pytest.raises(AuthenticationError) as err,
    ):
        client.resolve(f"{basic_registry.name}/private/app:1")
    assert f"shifterimg login {basic_registry.name}" in str(err.value)


def test_basic_auth_refused_over_http_unless_insecure(basic_registry: RegistryProcess) -> None:
    """An http mirror not listed as insecure never gets the password (the client falls back
    to the registry itself, here a dead port, and reports both)."""
    creds = StaticCredentials({basic_registry.name: ("alice", "s3cret")})
    upstream = f"127.0.0.1:{free_port()}"
    settings = RegistrySettings(mirrors={upstream: [basic_registry.url]}, retries=0)
    served = '"GET /v2/private/app/manifests/1 HTTP/1.1" 200'
    refused = '"GET /v2/private/app/manifests/1 HTTP/1.1" 401'
    before = basic_registry.log()
    with RegistryClient(settings, creds) as client, pytest.raises(RegistryError) as err:
        client.resolve(f"{upstream}/private/app:1")
    assert f"refusing to send credentials for {upstream} over plain http" in str(err.value)
    after = basic_registry.log()
    assert after.count(refused) == before.count(refused) + 1  # the challenge, nothing more
    assert after.count(served) == before.count(served)


# -- Bearer tokens ----------------------------------------------------------------------------


@dataclass
class TokenSetup:
    registry: RegistryProcess
    tokens: TokenServer


def token_policy(user: str | None, repository: str, actions: list[str]) -> list[str]:
    if user == "alice":
        return list(actions)
    if user == "bob" and repository.startswith("bob/"):
        return list(actions)
    if repository.startswith("public/") and "pull" in actions:
        return ["pull"]
    return []


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenSetup]:
    root = tmp_path_factory.mktemp("token")
    tokens = TokenServer(root, users={"alice": "pw-a", "bob": "pw-b"}, policy=token_policy)
    tokens.start()
    registry = start_registry(root / "registry", token_server=tokens)
    try:
        layout = OCILayout(root / "layout")
        layout.tag("one", layout.add_image([make_layer({"etc/one": "one\n"})]))
        layout.tag("two", layout.add_image([make_layer({"etc/two": "two\n"})]))
        for repo, tag in (("public/app", "one"), ("private/one", "one"), ("private/two", "two")):
            skopeo_copy(layout, tag, f"{registry.name}/{repo}:1", creds=("alice", "pw-a"))
        tokens.requests.clear()
        yield TokenSetup(registry, tokens)
    finally:
        registry.stop()
        tokens.stop()


def test_bearer_anonymous_pull_of_public_repository(token_registry: TokenSetup) -> None:
    reg = token_registry.registry
    with RegistryClient(settings_for(reg)) as client:
        assert client.resolve(f"{reg.name}/public/app:1").layers
        with pytest.raises(AuthenticationError) as err:
            client.resolve(f"{reg.name}/private/one:1")
    assert "needs credentials" in str(err.value) and "shifterimg login" in str(err.value)


def test_bearer_tokens_per_scope_for_two_repositories(
    token_registry: TokenSetup, tmp_path: Path
) -> None:
    reg, tokens = token_registry.registry, token_registry.tokens
    tokens.requests.clear()
    creds = StaticCredentials({reg.name: ("alice", "pw-a")})
    with RegistryClient(settings_for(reg), creds) as client:
        one = client.resolve(f"{reg.name}/private/one:1")
        two = client.resolve(f"{reg.name}/private/two:1")
        client.pull_layers(one, LayerCache(tmp_path))
        client.pull_layers(two, LayerCache(tmp_path))
        client.resolve(f"{reg.name}/private/one:1")
        assert client.token_requests == 2
    assert [r["scopes"] for r in tokens.requests] == [
        ["repository:private/one:pull"],
        ["repository:private/two:pull"],
    ]
    assert all(r["user"] == "alice" and r["service"] == [tokens.service] for r in tokens.requests)


def test_token_for_one_repository_is_refused_for_another(token_registry: TokenSetup) -> None:
    reg, tokens = token_registry.registry, token_registry.tokens
    token = tokens.issue("alice", ["repository:private/one:pull"])["token"]
    headers = {"Authorization": f"Bearer {token}", "Accept": MANIFEST_ACCEPT}
    with httpx.Client(trust_env=False) as http:
        ok = http.get(f"{reg.url}/v2/private/one/manifests/1", headers=headers)
        refused = http.get(f"{reg.url}/v2/private/two/manifests/1", headers=headers)
    assert ok.status_code == 200
    assert refused.status_code == 401
    assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]


def test_bearer_token_refreshed_after_expiry(token_registry: TokenSetup) -> None:
    reg, tokens = token_registry.registry, token_registry.tokens
    now = [1000.0]
    creds = StaticCredentials({reg.name: ("alice", "pw-a")})
    with RegistryClient(settings_for(reg), creds, clock=lambda: now[0]) as client:
        client.resolve(f"{reg.name}/private/one:1")
        now[0] += tokens.lifetime / 2
        client.resolve(f"{reg.name}/private/one:1")
        assert client.token_requests == 1
        now[0] += tokens.lifetime
        client.resolve(f"{reg.name}/private/one:1")
        assert client.token_requests == 2


def test_bearer_wrong_password_fails_fast(token_registry: TokenSetup) -> None:
    reg, tokens = token_registry.registry, token_registry.tokens
    tokens.requests.clear()
    creds = StaticCredentials({reg.name: ("alice", "nope")})
    started = time.monotonic()
    with (
        RegistryClient(settings_for(reg), creds) as client,
        pytest.raises(AuthenticationError) as err,
    ):
        client.resolve(f"{reg.name}/private/one:1")
    assert time.monotonic() - started < 5
    assert tokens.requests == [{"user": "alice", "ok": False}]  # asked once, no retry loop
    assert "rejected the username or password of user 'alice'" in str(err.value)


def test_bearer_user_without_access(token_registry: TokenSetup) -> None:
    reg = token_registry.registry
    creds = StaticCredentials({reg.name: ("bob", "pw-b")})
    with (
        RegistryClient(settings_for(reg), creds) as client,
        pytest.raises(AuthenticationError) as err,
    ):
        client.resolve(f"{reg.name}/private/one:1")
    assert "denied user 'bob' access to" in str(err.value)
