"""libmunge through cffi, and the request payload that binds a credential to one request."""

from __future__ import annotations

import json
import os
import pwd
import subprocess

import pytest

from shifter_core import munge


def munged_running() -> bool:
    try:
        munge.encode(b"")
    except munge.MungeError:
        return False
    return True


def test_request_payload_is_canonical_json() -> None:
    payload = munge.request_payload("get", "/api/v1/images?x=1", munge.body_digest(b""))
    assert json.loads(payload) == {
        "method": "GET",
        "path": "/api/v1/images?x=1",
        "body_sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    }
    secret = {"registry": "r", "username": "u", "password": "p"}
    assert munge.parse_payload(munge.request_payload("POST", "/p", "0", secret))["secret"] == secret


@pytest.mark.parametrize("payload", [b"", b"text", b"[]", b'{"method": "GET", "path": "/"}'])
def test_other_payloads_are_not_gateway_requests(payload: bytes) -> None:
    with pytest.raises(munge.MungeAuthError, match="does not carry a gateway request"):
        munge.parse_payload(payload)


@pytest.mark.skipif(not munged_running(), reason="munged is not running")
def test_encode_decode_replay_and_garbage() -> None:
    import os

    credential = munge.encode(b"payload \x00 bytes")
    assert credential.startswith("MUNGE:")
    uid, gid, payload, restriction = munge.decode(credential)
    assert (uid, gid, payload) == (os.getuid(), os.getgid(), b"payload \x00 bytes")
    assert restriction is None
    restricted = munge.decode(munge.encode(b"x", uid_restriction=os.getuid()))
    assert restricted.uid_restriction == os.getuid()  # what a gateway may insist on
    with pytest.raises(munge.MungeAuthError, match="replayed") as err:
        munge.decode(credential)
    assert err.value.code == munge.EMUNGE_CRED_REPLAYED
    with pytest.raises(munge.MungeAuthError, match="invalid munge credential"):
        munge.decode("MUNGE:garbage:")
    with pytest.raises(munge.MungeAuthError, match="not ASCII"):
        munge.decode("MUNGE:\u00e9")
    assert munge.decode(munge.encode()).payload == b""


def test_an_unreachable_munged_is_not_an_auth_error() -> None:
    with pytest.raises(munge.MungeError, match="is munged running") as err:
        munge.encode(b"x", socket="/nonexistent/munge.socket")
    assert not isinstance(err.value, munge.MungeAuthError)
    with pytest.raises(munge.MungeError) as err:
        munge.decode("MUNGE:abc", socket="/nonexistent/munge.socket")
    assert not isinstance(err.value, munge.MungeAuthError)


def _unmunge_as(user: str, credential: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", user, "--", "unmunge"],
        input=credential,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.skipif(not munged_running(), reason="munged is not running")
@pytest.mark.skipif(os.geteuid() != 0, reason="runs unmunge as other users")
def test_a_uid_restricted_credential_decodes_for_that_uid_only() -> None:
    try:
        bob, service = pwd.getpwnam("bob"), pwd.getpwnam("shifter")
    except KeyError:
        pytest.skip("needs the box's users bob and shifter")
    secret = b"registry password"
    credential = munge.encode(secret, uid_restriction=service.pw_uid)
    other = _unmunge_as(bob.pw_name, credential)
    assert other.returncode != 0 and "Unauthorized credential" in other.stderr
    assert secret.decode() not in other.stdout
    with pytest.raises(munge.MungeAuthError, match="invalid munge credential"):
        munge.decode(munge.encode(secret, uid_restriction=service.pw_uid))  # not even root
    mine = _unmunge_as(service.pw_name, credential)
    assert mine.returncode == 0, mine.stderr
    assert mine.stdout.endswith(secret.decode())


@pytest.mark.skipif(not munged_running(), reason="munged is not running")
@pytest.mark.skipif(os.geteuid() != 0, reason="runs unmunge as other users")
def test_the_client_restricts_credentials_with_secrets_to_the_gateway_user() -> None:
    """shifterimg login and private pulls: only the gateway's uid can read the password."""
    from shifter_core._httpx import httpx
    from shifter_core.client import GatewayClient

    try:
        service = pwd.getpwnam("shifter")
    except KeyError:
        pytest.skip("needs the box's service user shifter")
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"].removeprefix("Munge "))
        job = {"id": "j", "state": "PENDING"}
        return httpx.Response(200, json={"result": "ok", "uid": 0, "job": job})

    with GatewayClient("http://gw.test", transport=httpx.MockTransport(handler)) as client:
        assert client.gateway_uid() == service.pw_uid
        client.login("reg.test", "alice", "hunter2")
        secret = {"registry": "reg.test", "username": "a", "password": "p"}
        client.pull("reg.test/x:1", secret=secret)
        client.ping()
    login, pull, ping = seen
    for credential in (login, pull):
        assert _unmunge_as("bob", credential).returncode != 0
    decoded = _unmunge_as("shifter", login)
    assert decoded.returncode == 0 and '"password":"hunter2"' in decoded.stdout
    assert "UID_RESTRICTION" not in _unmunge_as("bob", ping).stdout  # no secret: unrestricted


def test_an_unknown_gateway_user_refuses_to_send_secrets() -> None:
    from shifter_core.client import GatewayClient, GatewayError

    client = GatewayClient("http://gw.test", gateway_user="no-such-user-here")
    with client, pytest.raises(GatewayError, match="user 'no-such-user-here' does not exist"):
        client.login("reg.test", "alice", "hunter2")
    with GatewayClient("http://gw.test", gateway_user=4242) as client:
        assert client.gateway_uid() == 4242
