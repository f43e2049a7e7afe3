"""Registry client, layer cache and credential store against httpx.MockTransport fakes.

The fake registry speaks enough of the distribution API (manifests, blobs, tags, Basic and
Bearer challenges, a token service) for the client's logic to be tested without processes:
challenge parsing, per-scope tokens and their expiry, 429 handling, redirects, retries with
backoff (``sleep`` is recorded, never slept), schema-1 rejection and platform selection.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shifter_core.errors import OptionError
from shifter_core.image.errors import (
    AuthenticationError,
    DigestMismatch,
    ImageNotFound,
    PlatformNotFound,
    RateLimited,
    RegistryError,
    RegistryUnavailable,
    UnsupportedManifest,
)
from shifter_core.image.layercache import LayerCache
from shifter_core.image.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Platform,
    available_platforms,
    detect_manifest_type,
    select_platform,
)
from shifter_core.image.registry.auth import Challenge, parse_challenges
from shifter_core.image.registry.client import RegistryClient
from shifter_core.image.registry.credentials import (
    CredentialError,
    CredentialStore,
    StaticCredentials,
    normalize_registry,
)
from shifter_core.image.registry.settings import RegistrySettings
from shifter_core.image.registry.transport import parse_retry_after

HOST = "reg.example"
REALM = "https://auth.example/token"
Handler = Callable[[httpx.Request], httpx.Response | None]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gz(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as f:
        f.write(data)
    return out.getvalue()


class FakeRegistry:
    """A tiny in-memory registry + token service for MockTransport."""

    def __init__(self, *, auth: str | None = None, users: dict[str, str] | None = None) -> None:
        self.auth = auth
        self.users = users or {}
        self.manifests: dict[tuple[str, str], tuple[bytes, str | None]] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[httpx.Request] = []
        self.token_lifetime: int | None = 300
        self.tokens: dict[str, set[str]] = {}  # token -> repositories it grants
        self.issued = 0
        self.hooks: list[Handler] = []

    # -- content ---------------------------------------------------------------------------

    def blob(self, data: bytes) -> dict[str, Any]:
        d = digest_of(data)
        self.blobs[d] = data
        return {"digest": d, "size": len(data)}

    def image(
        self,
        repo: str,
        tag: str | None,
        layers: list[bytes],
        *,
        arch: str = "amd64",
        variant: str | None = None,
        media_type: str | None = OCI_MANIFEST,
        content_type: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> tuple[str, bytes]:
        cfg = {
            "architecture": arch,
            "os": "linux",
            "config": config or {"Env": ["A=1"], "Cmd": ["sh"], "WorkingDir": "/w"},
            "rootfs": {
                "type": "layers",
                "diff_ids": [digest_of(b"x%d" % i) for i in range(len(layers))],
            },
        }
        if variant:
            cfg["variant"] = variant
        manifest: dict[str, Any] = {"schemaVersion": 2}
        if media_type:
            manifest["mediaType"] = media_type
        manifest["config"] = {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **self.blob(json.dumps(cfg).encode()),
        }
        manifest["layers"] = [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **self.blob(layer)}
            for layer in layers
        ]
        data = json.dumps(manifest).encode()
        return self.put_manifest(repo, tag, data, content_type or media_type), data

    def put_manifest(self, repo: str, tag: str | None, data: bytes, ctype: str | None) -> str:
        d = digest_of(data)
        self.manifests[(repo, d)] = (data, ctype)
        if tag:
            self.manifests[(repo, tag)] = (data, ctype)
        return d

    # -- HTTP ------------------------------------------------------------------------------

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        for hook in self.hooks:
            response = hook(request)
            if response is not None:
                return response
        if request.url.host == "auth.example":
            return self.token(request)
        denied = self.check_auth(request)
        if denied is not None:
            return denied
        path = request.url.path
        parts = path.split("/")
        if path == "/v2/":
            return httpx.Response(200, json={})
        if "manifests" in parts:
            i = parts.index("manifests")
            repo, ref = "/".join(parts[2:i]), parts[i + 1]
            if (repo, ref) not in self.manifests:
                return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
            data, ctype = self.manifests[(repo, ref)]
            headers = {"Docker-Content-Digest": digest_of(data)}
            if ctype:
                headers["Content-Type"] = ctype
            return httpx.Response(200, content=data, headers=headers)
        if "blobs" in parts:
            d = parts[-1]
            if d not in self.blobs:
                return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN"}]})
            data = self.blobs[d]
            rng = request.headers.get("range")
            if rng:
                start = int(rng.split("=")[1].rstrip("-"))
                return httpx.Response(
                    206,
                    content=data[start:],
                    headers={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"},
                )
            return httpx.Response(200, content=data)
        if parts[-2:] == ["tags", "list"]:
            repo = "/".join(parts[2:-2])
            tags = sorted(
                {r for (rp, r) in self.manifests if rp == repo and not r.startswith("sha256:")}
            )
            return httpx.Response(200, json={"name": repo, "tags": tags})
        return httpx.Response(404)

    def repo_of(self, request: httpx.Request) -> str:
        parts = request.url.path.split("/")
        for marker in ("manifests", "blobs", "tags"):
            if marker in parts:
                return "/".join(parts[2 : parts.index(marker)])
        return ""

    def check_auth(self, request: httpx.Request) -> httpx.Response | None:
        header = request.headers.get("authorization", "")
        if self.auth == "basic":
            if header.startswith("Basic "):
                user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
                if self.users.get(user) == pw:
                    return None
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="fake"'})
        if self.auth == "bearer":
            repo = self.repo_of(request)
            if header.startswith("Bearer ") and repo in self.tokens.get(header[7:], set()):
                return None
            error = ',error="insufficient_scope"' if header else ""
            return httpx.Response(
                401,
                headers={
                    "WWW-Authenticate": f'Bearer realm="{REALM}",service="fake-svc",'
                    f'scope="repository:{repo}:pull"{error}'
                },
                json={"errors": [{"code": "UNAUTHORIZED"}]},
            )
        return None

    def token(self, request: httpx.Request) -> httpx.Response:
        header = request.headers.get("authorization", "")
        if header:
            user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(user) != pw:
                return httpx.Response(401, json={"details": "incorrect username or password"})
        scopes = request.url.params.get_list("scope")
        repos = {s.split(":")[1] for s in scopes}
        self.issued += 1
        value = f"tok{self.issued}"
        self.tokens[value] = repos
        doc: dict[str, Any] = {"token": value}
        if self.token_lifetime is not None:
            doc["expires_in"] = self.token_lifetime
        return httpx.Response(200, json=doc)

    def count(self, predicate: Callable[[httpx.Request], bool]) -> int:
        return sum(1 for r in self.requests if predicate(r))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sleeps() -> list[float]:
    return []


def make_client(
    fake: FakeRegistry,
    sleeps: list[float],
    *,
    creds: dict[str, tuple[str, str]] | None = None,
    clock: Callable[[], float] = time.monotonic,
    **settings: Any,
) -> RegistryClient:
    settings.setdefault("backoff", 1.0)
    return RegistryClient(
        RegistrySettings(**settings),
        StaticCredentials(creds or {}),
        transport=fake.transport(),
        sleep=sleeps.append,
        clock=clock,
    )


# -- challenges, Retry-After --------------------------------------------------------------------


def test_parse_bearer_challenge() -> None:
    [c] = parse_challenges(
        [
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/ubuntu:pull",error="insufficient_scope"'
        ]
    )
    assert c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/ubuntu:pull",
        "error": "insufficient_scope",
    }


def test_parse_several_challenges_and_quoting() -> None:
    found = parse_challenges(
        [
            'Basic realm="a \\"quoted\\" realm", Bearer realm=https://x/t , service = svc',
            "Negotiate",
        ]
    )
    assert found == [
        Challenge("basic", {"realm": 'a "quoted" realm'}),
        Challenge("bearer", {"realm": "https://x/t", "service": "svc"}),
        Challenge("negotiate", {}),
    ]
    assert parse_challenges([""]) == []


def test_parse_retry_after() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = time.time() + 30
    value = parse_retry_after(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(later)))
    assert value is not None and 25 <= value <= 31


# -- manifests -----------------------------------------------------------------------------------


def test_resolve_oci_image(sleeps: list[float]) -> None:
    fake = FakeRegistry()
    layer = gz(b"layer")
    digest, _ = fake.image("app", "1", [layer])
    client = make_client(fake, sleeps)
    resolved = client.resolve(f"{HOST}/app:1")
    assert resolved.digest == digest and resolved.id == digest.split(":")[1]
    assert resolved.config.env == ("A=1",) and resolved.config.cmd == ("sh",)
    assert resolved.config.workdir == "/w"
    assert [(la.digest, la.compression) for la in resolved.layers] == [(digest_of(layer), "gzip")]
    manifest_requests = [r for r in fake.requests if "/manifests/" in r.url.path]
    accept = manifest_requests[0].headers["accept"]
    for media_type in (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX):
        assert media_type in accept
    assert manifest_requests[0].url.scheme == "https"


def test_manifest_without_media_type_is_typed_by_content_type_then_shape() -> None:
    assert detect_manifest_type({"layers": []}, DOCKER_MANIFEST + "; charset=utf-8") == (
        DOCKER_MANIFEST
    )
    assert detect_manifest_type({"schemaVersion": 2, "layers": [], "config": {}}, None) == (
        OCI_MANIFEST
    )
    assert detect_manifest_type({"schemaVersion": 2, "manifests": []}, "text/plain") == OCI_INDEX
    assert detect_manifest_type({"mediaType": DOCKER_MANIFEST_LIST}, OCI_MANIFEST) == (
        DOCKER_MANIFEST_LIST
    )
    with pytest.raises(UnsupportedManifest):
        detect_manifest_type({"schemaVersion": 2}, "application/json")


def test_umoci_style_manifest_resolves(sleeps: list[float]) -> None:
    fake = FakeRegistry()
    digest, _ = fake.image("u", "t", [gz(b"a")], media_type=None, content_type=None)
    resolved = make_client(fake, sleeps).resolve(f"{HOST}/u:t")
    assert resolved.digest == digest and resolved.media_type == OCI_MANIFEST


@pytest.mark.parametrize(
    "doc, ctype",
    [
        ({"schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": []}, "application/json"),
        (
            {"schemaVersion": 1, "fsLayers": []},
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
        ),
        ({"fsLayers": [], "signatures": []}, None),
    ],
)
def test_schema1_is_rejected_clearly(
    doc: dict[str, Any], ctype: str | None, sleeps: list[float]
) -> None:
    fake = FakeRegistry()
    fake.put_manifest("old", "v1", json.dumps(doc).encode(), ctype)
    with pytest.raises(UnsupportedManifest) as err:
        make_client(fake, sleeps).resolve(f"{HOST}/old:v1")
    assert "schema 1" in str(err.value) and "skopeo" in str(err.value)


def test_pull_by_digest_verifies_manifest_bytes(sleeps: list[float]) -> None:
    fake = FakeRegistry()
    digest, data = fake.image("app", None, [gz(b"x")])
    client = make_client(fake, sleeps)
    assert client.resolve(f"{HOST}/app@{digest}").digest == digest
    fake.manifests[("app", digest)] = (data + b" ", OCI_MANIFEST)  # served bytes altered
    with pytest.raises(DigestMismatch) as err:
        client.resolve(f"{HOST}/app@{digest}")
    assert digest in str(err.value)


def test_not_found_suggests_a_tag(sleeps: list[float]) -> None:
    fake = FakeRegistry()
    fake.image("library/ubuntu", "22.04", [gz(b"u")])
    fake.image("library/ubuntu", "20.04", [gz(b"v")])
    settings = {"mirrors": {}, "insecure": frozenset()}
    client = make_client(fake, sleeps, **settings)
    with pytest.raises(ImageNotFound) as err:
        client.resolve("ubuntu:2204")
    assert str(err.value) == (
        "image 'ubuntu:2204' not found in registry docker.io; did you mean ubuntu:22.04?"
    )
    assert fake.requests[0].url.host == "registry-1.docker.io"
    assert sleeps == []


def test_config_with_wrong_digest_is_refused(sleeps: list[float]) -> None:
    fake = FakeRegistry()
    fake.image("app", "1", [gz(b"x")])
    manifest = json.loads(fake.manifests[("app", "1")][0])
    fake.blobs[manifest["config"]["digest"]] = b'{"architecture": "amd64", "os": "linux"}'
    with pytest.raises(DigestMismatch):
        make_client(fake, sleeps).resolve(f"{HOST}/app:1")


# -- platforms -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("linux/arm64/v8", Platform("linux", "arm64", "v8")),
        ("linux/amd64", Platform("linux", "amd64")),
        ("arm64", Platform("linux", "arm64")),
        ("linux/x86_64", Platform("linux", "amd64")),
        ("linux/aarch64", Platform("linux", "arm64")),
        ("linux/armhf", Platform("linux", "arm", "v7")),
        ("Linux/ARM/v6", Platform("linux", "arm", "v6")),
        ("windows/amd64", Platform("windows", "amd64")),
    ],
)
def test_platform_parse(text: str, expected: Platform) -> None:
    assert Platform.parse(text) == expected


@pytest.mark.parametrize("text", ["", "/", "linux/", "a/b/c/d", "linux/amd 64", "linux/$x"])
def test_platform_parse_rejects(text: str) -> None:
    with pytest.raises(OptionError):
        Platform.parse(text)


@pytest.mark.parametrize(
    "machine, expected",
    [
        ("x86_64", "linux/amd64"),
        ("aarch64", "linux/arm64/v8"),
        ("armv7l", "linux/arm/v7"),
        ("ppc64le", "linux/ppc64le"),
        ("i686", "linux/386"),
    ],
)
def test_host_platform(machine: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import shifter_core.image.oci as oci

    monkeypatch.setattr(oci._platform, "machine", lambda: machine)
    assert str(Platform.host()) == expected


INDEX = [
    {"digest": "sha256:" + "1" * 64, "platform": {"os": "linux", "architecture": "amd64"}},
    {
        "digest": "sha256:" + "5" * 64,
        "platform": {"os": "linux", "architecture": "amd64", "variant": "v3"},
    },
    {"digest": "sha256:" + "2" * 64, "platform": {"os": "linux", "architecture": "arm64"}},
    {
        "digest": "sha256:" + "3" * 64,
        "platform": {"os": "linux", "architecture": "arm", "variant": "v6"},
    },
    {"digest": "sha256:" + "4" * 64, "platform": {"os": "unknown", "architecture": "unknown"}},
    {"digest": "sha256:" + "6" * 64},
]


@pytest.mark.parametrize(
    "want, digit",
    [
        ("linux/amd64", "1"),
        ("linux/amd64/v3", "5"),
        ("linux/arm64/v8", "2"),  # no variant in the index means v8 for arm64
        ("linux/arm64", "2"),
        ("linux/arm/v6", "3"),
        ("linux/arm/v7", None),
        ("linux/ppc64le", None),
        ("windows/amd64", None),
    ],
)
def test_select_platform(want: str, digit: str | None) -> None:
    entry = select_platform(INDEX, Platform.parse(want))
    assert (entry["digest"][-1] if entry else None) == digit


def test_available_platforms_skip_attestations() -> None:
    assert available_platforms(INDEX) == [
        "linux/amd64",
        "linux/amd64/v3",
        "linux/arm64",
        "linux/arm/v6",
    ]


def test_index_platform_selection_and_error(sleeps: list[float]) -> None:
    fake = FakeRegistry()
    amd, amd_data = fake.image("m", None, [gz(b"amd")])
    arm, arm_data = fake.image("m", None, [gz(b"arm")], arch="arm64", variant="v8")
    index = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST_LIST,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": amd,
                "size": len(amd_data),
                "platform": {"os": "linux", "architecture": "amd64"},
            },
            {
                "mediaType": OCI_MANIFEST,
                "digest": arm,
                "size": len(arm_data),
                "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
            },
        ],
    }
    list_digest = fake.put_manifest("m", "latest", json.dumps(index).encode(), DOCKER_MANIFEST_LIST)
    client = make_client(fake, sleeps)
    got = client.resolve(f"{HOST}/m", "linux/amd64")
    assert (got.digest, got.index_digest, str(got.platform)) == (amd, list_digest, "linux/amd64")
    got = client.resolve(f"{HOST}/m", Platform.parse("linux/arm64/v8"))
    assert got.digest == arm and str(got.platform) == "linux/arm64/v8"
    with pytest.raises(PlatformNotFound) as err:
        client.resolve(f"{HOST}/m", "linux/s390x")
    assert "linux/amd64, linux/arm64/v8" in str(err.value)
    assert err.value.available == ["linux/amd64", "linux/arm64/v8"]


def test_explicit_platform_mismatch_on_single_image(sleeps: list[float]) -> None:
    fake = FakeRegistry()
    fake.image("a", "1", [gz(b"a")], arch="arm64")
    client = make_client(fake, sleeps)
    with pytest.raises(PlatformNotFound):
        client.resolve(f"{HOST}/a:1", "linux/amd64")
    assert client.resolve(f"{HOST}/a:1", "linux/arm64").digest


# -- auth ----------------------------------------------------------------------------------------


def test_bearer_tokens_are_cached_per_scope(sleeps: list[float]) -> None:
    fake = FakeRegistry(auth="bearer")
    fake.image("one", "1", [gz(b"1")])
    fake.image("two", "1", [gz(b"2")])
    client = make_client(fake, sleeps)
    client.resolve(f"{HOST}/one:1")
    client.resolve(f"{HOST}/one:1")
    assert fake.issued == 1
    client.resolve(f"{HOST}/two:1")  # the token for "one" is not valid here
    assert fake.issued == 2
    token_requests = [r for r in fake.requests if r.url.host == "auth.example"]
    assert [r.url.params.get_list("scope") for r in token_requests] == [
        ["repository:one:pull"],
        ["repository:two:pull"],
    ]
    assert token_requests[0].url.params["service"] == "fake-svc"
    assert "authorization" not in token_requests[0].headers  # anonymous
    client.resolve(f"{HOST}/one:1")
    assert fake.issued == 2


def test_token_expiry_and_refresh(sleeps: list[float]) -> None:
    fake = FakeRegistry(auth="bearer")
    fake.image("one", "1", [gz(b"1")])
    clock = Clock()
    client = make_client(fake, sleeps, clock=clock)
    fake.token_lifetime = 120
    client.resolve(f"{HOST}/one:1")
    clock.now += 100
    client.resolve(f"{HOST}/one:1")
    assert fake.issued == 1
    clock.now += 30  # past 120 s
    client.resolve(f"{HOST}/one:1")
    assert fake.issued == 2


def test_token_default_lifetime_is_60s(sleeps: list[float]) -> None:
    fake = FakeRegistry(auth="bearer")
    fake.token_lifetime = None  # no expires_in
    fake.image("one", "1", [gz(b"1")])
    clock = Clock()
    client = make_client(fake, sleeps, clock=clock)
    client.resolve(f"{HOST}/one:1")
    clock.now += 30
    client.resolve(f"{HOST}/one:1")
    assert fake.issued == 1
    clock.now += 31
    client.resolve(f"{HOST}/one:1")
    assert fake.issued == 2


def test_revoked_token_is_refreshed_on_401(sleeps: list[float]) -> None:
    fake = FakeRegistry(auth="bearer")
    fake.image("one", "1", [gz(b"1")])
    client = make_client(fake, sleeps)
    client.resolve(f"{HOST}/one:1")
    fake.tokens.clear()  # the registry forgets every token
    client.resolve(f"{HOST}/one:1")
    assert fake.issued == 2


def test_credentials_go_to_token_service_as_basic(sleeps: list[float]) -> None:
    fake = FakeRegistry(auth="bearer", users={"alice": "pw"})
    fake.image("one", "1", [gz(b"1")])
    client = make_client(fake, sleeps, creds={HOST: ("alice", "pw")})
    client.resolve(f"{HOST}/one:1")
    [token_request] = [r for r in fake.requests if r.url.host == "auth.example"]
    assert (
        token_request.headers["authorization"] == "Basic " + base64.b64encode(b"alice:pw").decode()
    )
    assert token_request.url.params["account"] == "alice"
    registry_requests = [r for r in fake.requests if r.url.host == HOST]
    assert all("alice" not in r.headers.get("authorization", "") for r in registry_requests)


def test_wrong_password_fails_fast(sleeps: list[float]) -> None:
    fake = FakeRegistry(auth="bearer", users={"alice": "pw"})
    fake.image("one", "1", [gz(b"1")])
    client = make_client(fake, sleeps, creds={HOST: ("alice", "nope")})
    with pytest.raises(AuthenticationError) as err:
        client.resolve(f"{HOST}/one:1")
    assert "rejected the username or password" in str(err.value)
    assert f"shifterimg login {HOST}" in str(err.value)
    assert fake.count(lambda r: r.url.host == "auth.example") == 1
    assert sleeps == []


def test_anonymous_denied_hints_login(sleeps: list[float]) -> None:
    fake = FakeRegistry(auth="bearer")
    fake.image("one", "1", [gz(b"1")])
    fake.hooks.append(
        lambda r: (
            httpx.Response(200, json={"token": "useless"}) if r.url.host == "auth.example" else None
        )
    )
    with pytest.raises(AuthenticationError) as err:
        make_client(fake, sleeps).resolve(f"{HOST}/one:1")
    assert "denied" in str(err.value) and f"shifterimg login {HOST}" in str(err.value)


def test_basic_auth(sleeps: list[float]) -> None:
    fake = FakeRegistry(auth="basic", users={"bob": "pw"})
    fake.image("one", "1", [gz(b"1")])
    client = make_client(fake, sleeps, creds={HOST: ("bob", "pw")})
    client.resolve(f"{HOST}/one:1")
    authorised = [r for r in fake.requests if r.headers.get("authorization")]
    assert authorised and all(r.url.scheme == "https" for r in authorised)
    # once the scheme is known, later requests are authorised up front
    before = len(fake.requests)
    client.resolve(f"{HOST}/one:1")
    assert len(fake.requests) - before == 2  # manifest + config, no 401 round trip
    with pytest.raises(AuthenticationError) as err:
        make_client(fake, sleeps, creds={HOST: ("bob", "bad")}).resolve(f"{HOST}/one:1")
    assert "rejected the username or password of user 'bob'" in str(err.value)
    with pytest.raises(AuthenticationError) as err:
        make_client(fake, sleeps).resolve(f"{HOST}/one:1")
    assert "shifterimg login" in str(err.value)
    assert sleeps == []


def test_basic_auth_over_http_only_for_insecure(sleeps: list[float]) -> None:
    fake = FakeRegistry(auth="basic", users={"bob": "pw"})
    fake.image("one", "1", [gz(b"1")])
    creds = {HOST: ("bob", "pw"), "mirror.example": ("bob", "pw")}
    client = make_client(fake, sleeps, creds=creds, insecure=frozenset({HOST}))
    client.resolve(f"{HOST}/one:1")
    assert {r.url.scheme for r in fake.requests} == {"http"}
    # a plain-http mirror that is not listed as insecure never gets the password
    fake.requests.clear()
    client = make_client(
        fake, sleeps, creds=creds, mirrors={"other.example": ["http://mirror.example"]}
    )
    with pytest.raises(RegistryError):
        client.resolve("other.example/one:1")
    sent = [r for r in fake.requests if r.headers.get("authorization")]
    assert sent == []


# -- transport: 429, redirects, retries --------------------------------------------------------


def test_429_honours_retry_after_then_succeeds(sleeps: list[float]) -> None:
    fake = FakeRegistry()
    fake.image("one", "1", [gz(b"1")])
    remaining = [2]

    def limit(request: httpx.Request) -> httpx.Response | None:
        if "/manifests/" in request.url.path and remaining[0]:
            remaining[0] -= 1
            return httpx.Response(429, headers={"Retry-After": "7"})
        return None

    fake.hooks.append(limit)
    make_client(fake, sleeps).resolve(f"{HOST}/one:1")
    assert sleeps == [7.0, 7.0]


def test_429_persisting_fails_with_clear_message(sleeps: list[float]) -> None:
    fake = FakeRegistry()
    fake.hooks.append(lambda r: httpx.Response(429, headers={"Retry-After": "7"}))
    with pytest.raises(RateLimited) as err:
        make_client(fake, sleeps, rate_limit_retries=3).resolve(f"{HOST}/one:1")
    assert str(err.value).startswith(f"rate limited by {HOST}; retry after 7 s")
    assert sleeps == [7.0, 7.0, 7.0]


def test_429_with_long_retry_after_fails_at_once(sleeps: list[float]) -> None:
    fake = FakeRegistry()
    fake.hooks.append(lambda r: httpx.Response(429, headers={"Retry-After": "3600"}))
    with pytest.raises(RateLimited) as err:
        make_client(fake, sleeps).resolve("busybox")
    assert "rate limited by docker.io; retry after 3600 s" in str(err.value)
    assert err.value.retry_after == 3600
    assert sleeps == []


def test_blob_redirect_drops_authorization(sleeps: list[float], tmp_path: Path) -> None:
    fake = FakeRegistry(auth="bearer")
    layer = gz(b"layer data" * 100)
    fake.image("one", "1", [layer])
    storage_hits: list[httpx.Request] = []

    def redirect(request: httpx.Request) -> httpx.Response | None:
        if request.url.host == "storage.example":
            storage_hits.append(request)
            return httpx.Response(200, content=layer)
        if request.url.path.endswith(digest_of(layer)) and fake.check_auth(request) is None:
            return httpx.Response(307, headers={"Location": "https://storage.example/b?sig=abc"})
        return None

    fake.hooks.append(redirect)
    client = make_client(fake, sleeps)
    resolved = client.resolve(f"{HOST}/one:1")
    [path] = client.pull_layers(resolved, LayerCache(tmp_path / "c"))
    assert path.read_bytes() == layer
    [hit] = storage_hits
    assert "authorization" not in hit.headers and hit.url.params["sig"] == "abc"
    blob_gets = [r for r in fake.requests if r.url.path.endswith(digest_of(layer))]
    assert blob_gets[-1].headers["authorization"].startswith("Bearer ")


def test_same_host_redirect_keeps_authorization(sleeps: list[float]) -> None:
    fake = FakeRegistry(auth="bearer")
    fake.image("one", "1", [gz(b"1")])

    def redirect(request: httpx.Request) -> httpx.Response | None:
        if request.url.path == "/v2/one/manifests/old":
            return httpx.Response(301, headers={"Location": "/v2/one/manifests/1"})
        return None

    fake.hooks.append(redirect)
    make_client(fake, sleeps).resolve(f"{HOST}/one:old")
    final = [r for r in fake.requests if r.url.path == "/v2/one/manifests/1"]
    assert final[-1].headers["authorization"].startswith("Bearer ")


def test_5xx_is_retried_with_exponential_backoff(sleeps: list[float]) -> None:
    fake = FakeRegistry()
    fake.image("one", "1", [gz(b"1")])
    failures = [2]

    def flaky(request: httpx.Request) -> httpx.Response | None:
        if failures[0]:
            failures[0] -= 1
            return httpx.Response(503, text="busy")
        return None

    fake.hooks.append(flaky)
    make_client(fake, sleeps, backoff=0.5).resolve(f"{HOST}/one:1")
    assert sleeps == [0.5, 1.0]


def test_connection_errors_retried_then_reported(sleeps: list[float]) -> None:
    fake = FakeRegistry()

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    fake.hooks.append(refuse)
    with pytest.raises(RegistryUnavailable) as err:
        make_client(fake, sleeps, retries=3).resolve(f"{HOST}/one:1")
    assert sleeps == [1.0, 2.0, 4.0]
    assert "cannot reach registry reg.example" in str(err.value)
    assert len(fake.requests) == 4


def test_4xx_is_not_retried(sleeps: list[float]) -> None:
    fake = FakeRegistry()
    fake.hooks.append(lambda r: httpx.Response(400, json={"errors": [{"code": "X"}]}))
    with pytest.raises(RegistryError) as err:
        make_client(fake, sleeps).resolve(f"{HOST}/one:1")
    assert "HTTP 400 X" in str(err.value)
    assert sleeps == [] and len(fake.requests) == 1


class _BrokenStream(httpx.SyncByteStream):
    def __init__(self, data: bytes, request: httpx.Request) -> None:
        self.data = data
        self.request = request

    def __iter__(self) -> Iterator[bytes]:
        yield self.data
        raise httpx.ReadError("connection reset", request=self.request)


def test_interrupted_blob_resumes_with_range(sleeps: list[float], tmp_path: Path) -> None:
    fake = FakeRegistry()
    layer = os.urandom(200_000)
    fake.image("one", "1", [layer])
    broken = [True]

    def cut(request: httpx.Request) -> httpx.Response | None:
        if request.url.path.endswith(digest_of(layer)) and broken[0]:
            broken[0] = False
            return httpx.Response(200, stream=_BrokenStream(layer[:70_000], request))
        return None

    fake.hooks.append(cut)
    client = make_client(fake, sleeps)
    resolved = client.resolve(f"{HOST}/one:1")
    progress: list[tuple[str, int, int]] = []
    [path] = client.pull_layers(resolved, LayerCache(tmp_path), lambda *a: progress.append(a))
    assert path.read_bytes() == layer
    ranges = [
        r.headers.get("range") for r in fake.requests if r.url.path.endswith(digest_of(layer))
    ]
    assert ranges[0] is None and len(ranges) == 2
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 70_000  # whole chunks received before the cut are kept
    assert sleeps == [1.0]
    assert progress[0] == (digest_of(layer), 0, len(layer))
    assert progress[-1] == (digest_of(layer), len(layer), len(layer))


# -- blobs and the cache -------------------------------------------------------------------------


def test_corrupt_blob_raises_and_caches_nothing(sleeps: list[float], tmp_path: Path) -> None:
    fake = FakeRegistry()
    good, bad = gz(b"good"), gz(b"bad" * 50)
    fake.image("one", "1", [good, bad])
    fake.blobs[digest_of(bad)] = bad[:-3] + b"xyz"
    cache = LayerCache(tmp_path / "cache")
    client = make_client(fake, sleeps)
    resolved = client.resolve(f"{HOST}/one:1")
    with pytest.raises(DigestMismatch) as err:
        client.pull_layers(resolved, cache)
    assert err.value.blob == digest_of(bad) and err.value.actual == digest_of(bad[:-3] + b"xyz")
    assert digest_of(bad) in str(err.value) and err.value.actual in str(err.value)
    assert not cache.has(digest_of(bad))
    assert [p.name for p in (tmp_path / "cache" / "sha256").iterdir()] in (
        [],
        [digest_of(good).split(":")[1]],
    )
    assert sleeps == []  # a corrupt blob is not retried


def test_oversized_blob_is_cut_off(sleeps: list[float], tmp_path: Path) -> None:
    fake = FakeRegistry()
    layer = gz(b"abc")
    fake.image("one", "1", [layer])
    fake.blobs[digest_of(layer)] = layer + b"\0" * 10_000
    client = make_client(fake, sleeps)
    with pytest.raises(DigestMismatch, match="larger than"):
        client.pull_layers(client.resolve(f"{HOST}/one:1"), LayerCache(tmp_path))


def test_pull_layers_parallel_and_cached(sleeps: list[float], tmp_path: Path) -> None:
    fake = FakeRegistry()
    layers = [gz(b"layer %d" % i) for i in range(6)]
    fake.image("one", "1", [*layers, layers[0]])  # a repeated layer is fetched once
    cache = LayerCache(tmp_path)
    client = make_client(fake, sleeps, max_parallel=3)
    resolved = client.resolve(f"{HOST}/one:1")
    seen: list[tuple[str, int, int]] = []
    paths = client.pull_layers(resolved, cache, lambda *a: seen.append(a))
    assert [p.read_bytes() for p in paths] == [*layers, layers[0]]
    assert cache.stats.downloads == 6
    assert {d for d, done, total in seen if done == total} == {digest_of(la) for la in layers}
    again = client.pull_layers(resolved, cache)
    assert again == paths and cache.stats.downloads == 6
    blob_gets = fake.count(lambda r: "/blobs/" in r.url.path)
    assert blob_gets == 7  # 6 layers + 1 config


def test_layer_cache_put_is_atomic_and_verified(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path)
    data = b"hello"
    d = digest_of(data)
    assert cache.path(d) == tmp_path / "sha256" / d.split(":")[1]

    def broken(fh: Any) -> None:
        fh.write(b"hel")
        raise OSError("network gone")

    with pytest.raises(OSError):
        cache.put(d, broken)
    assert not cache.has(d) and list((tmp_path / "sha256").iterdir()) == []
    with pytest.raises(DigestMismatch):
        cache.put(d, lambda fh: fh.write(b"HELLO"))
    assert not cache.has(d) and list((tmp_path / "sha256").iterdir()) == []
    assert cache.put_bytes(d, data).read_bytes() == data
    assert cache.has(d) and d in cache and list(cache.digests()) == [d]
    assert stat.S_IMODE(cache.path(d).stat().st_mode) == 0o644
    with pytest.raises(RegistryError):
        cache.path("sha256:../../etc/passwd")
    assert cache.remove(d) and not cache.has(d)


def test_layer_cache_threads_download_once(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path, fsync=False)
    data = os.urandom(1000)
    d = digest_of(data)
    calls = []
    barrier = threading.Barrier(8)

    def slow_writer(fh: Any) -> None:
        calls.append(1)
        time.sleep(0.2)
        fh.write(data)

    def worker() -> None:
        barrier.wait()
        cache.put(d, slow_writer)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and cache.stats.downloads == 1
    assert cache.stats.hits == 7 and cache.stats.waited >= 1


def test_layer_cache_cleans_stale_temporary_files(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path)
    (tmp_path / "sha256").mkdir()
    stale = tmp_path / "sha256" / ".abc.123.x.partial"
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))
    assert cache.clean_temporary(60) == 1 and not stale.exists()


# -- settings and mirrors ------------------------------------------------------------------------


def test_settings_endpoints() -> None:
    settings = RegistrySettings(
        mirrors={"index.docker.io": ["http://127.0.0.1:5000/", "mirror.example"]},
        insecure=frozenset({"127.0.0.1:5000", "Local.Example:5000"}),
    )
    assert [(e.url, e.mirror) for e in settings.endpoints("docker.io")] == [
        ("http://127.0.0.1:5000", True),
        ("https://mirror.example", True),
        ("https://registry-1.docker.io", False),
    ]
    assert settings.endpoints("local.example:5000")[0].url == "http://local.example:5000"
    assert settings.endpoints("quay.io")[0].url == "https://quay.io"


def test_mirror_is_tried_first_then_upstream(sleeps: list[float]) -> None:
    fake = FakeRegistry()
    digest, _ = fake.image("library/busybox", "latest", [gz(b"bb")])
    client = make_client(fake, sleeps, mirrors={"docker.io": ["https://mirror.example"]})
    resolved = client.resolve("busybox")
    assert resolved.endpoint.url == "https://mirror.example" and resolved.endpoint.mirror
    assert resolved.registry == "docker.io" and resolved.digest == digest
    assert {r.url.host for r in fake.requests} == {"mirror.example"}

    fake.hooks.append(lambda r: httpx.Response(404) if r.url.host == "mirror.example" else None)
    resolved = client.resolve("busybox")
    assert resolved.endpoint.url == "https://registry-1.docker.io"


def test_mirror_failures_are_reported_with_upstream_error(sleeps: list[float]) -> None:
    fake = FakeRegistry()

    def down(request: httpx.Request) -> httpx.Response:
        if request.url.host == "registry-1.docker.io":
            raise httpx.ConnectError("no route", request=request)
        return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})

    fake.hooks.append(down)
    client = make_client(fake, sleeps, retries=0, mirrors={"docker.io": ["https://mirror.example"]})
    with pytest.raises(RegistryUnavailable) as err:
        client.resolve("busybox")
    assert "registry-1.docker.io" in str(err.value)
    assert "mirror https://mirror.example: image 'busybox:latest' not found" in str(err.value)


# -- credentials ---------------------------------------------------------------------------------


def test_credential_store_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "shifter" / "credentials.json"
    store = CredentialStore(path)
    assert store.get("docker.io") is None
    store.set("index.docker.io", "alice", "pa:ss")
    store.set("127.0.0.1:5000", "bob", "x")
    assert store.get("docker.io") == ("alice", "pa:ss")
    assert store.get("registry-1.docker.io") == ("alice", "pa:ss")
    assert store.get("http://127.0.0.1:5000/") == ("bob", "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    doc = json.loads(path.read_text())
    assert base64.b64decode(doc["auths"]["docker.io"]["auth"]) == b"alice:pa:ss"
    assert store.registries() == ["127.0.0.1:5000", "docker.io"]
    store.set("docker.io", "carol", "y")
    assert store.get("docker.io") == ("carol", "y")
    assert store.remove("docker.io") and not store.remove("docker.io")
    assert store.get("docker.io") is None


def test_credential_store_reads_docker_legacy_keys(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": base64.b64encode(b"u:p").decode()},
                    "quay.io": {"username": "q", "password": "r"},
                }
            }
        )
    )
    path.chmod(0o600)
    store = CredentialStore(path)
    assert store.get("docker.io") == ("u", "p")
    assert store.get("quay.io") == ("q", "r")


def test_credential_store_refuses_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text('{"auths": {}}')
    path.chmod(0o644)
    with pytest.raises(CredentialError) as err:
        CredentialStore(path).get("docker.io")
    assert f"chmod 600 {path}" in str(err.value)
    path.chmod(0o600)
    path.write_text("{not json")
    with pytest.raises(CredentialError, match="not valid JSON"):
        CredentialStore(path).get("docker.io")


def test_default_credentials_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert CredentialStore().path == tmp_path / ".config" / "shifter" / "credentials.json"
    assert normalize_registry("HTTPS://Quay.IO/v2/") == "quay.io"


def test_credential_store_never_chmods_a_foreign_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o1777)
    CredentialStore(shared / "creds.json").set("quay.io", "u", "p")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert stat.S_IMODE((shared / "creds.json").stat().st_mode) == 0o600


def test_unknown_layer_media_type_is_refused(sleeps: list[float]) -> None:
    fake = FakeRegistry()
    fake.image("art", "1", [b"helm chart"])
    data, ctype = fake.manifests[("art", "1")]
    doc = json.loads(data)
    doc["layers"][0]["mediaType"] = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
    fake.put_manifest("art", "1", json.dumps(doc).encode(), ctype)
    with pytest.raises(UnsupportedManifest) as err:
        make_client(fake, sleeps).resolve(f"{HOST}/art:1")
    assert "layer 0 of 'reg.example/art:1'" in str(err.value)


def test_parallel_downloads_share_one_refreshed_token(sleeps: list[float], tmp_path: Path) -> None:
    fake = FakeRegistry(auth="bearer")
    layers = [gz(b"layer %d" % i) for i in range(8)]
    fake.image("one", "1", layers)
    client = make_client(fake, sleeps, max_parallel=4)
    resolved = client.resolve(f"{HOST}/one:1")
    fake.tokens.clear()  # every download starts with a token the registry now refuses
    client.pull_layers(resolved, LayerCache(tmp_path))
    assert fake.issued == 2
