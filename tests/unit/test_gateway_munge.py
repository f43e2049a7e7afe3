"""libmunge through cffi, and the request payload that binds a credential to one request."""

from __future__ import annotations

import json

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
    uid, gid, payload = munge.decode(credential)
    assert (uid, gid, payload) == (os.getuid(), os.getgid(), b"payload \x00 bytes")
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
