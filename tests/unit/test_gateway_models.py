"""The gateway API's typed models (JSON in and out) and the one visibility rule."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shifter_core.access import AclMembers, Viewer, visible
from shifter_core.gateway.callers import Caller
from shifter_core.gateway.errors import BadRequest
from shifter_core.gateway.models import (
    ExpireRequest,
    GatewayStats,
    Identity,
    ImageEntry,
    ImageInfo,
    InvalidAnswer,
    JobInfo,
    JobQuery,
    JobState,
    LayerCacheStats,
    LayerProgress,
    LoginResult,
    LookupQuery,
    PullProgress,
    PullRequest,
    RemoveRequest,
)
from shifter_core.image.store import Acl, ImageMetadata
from shifter_core.runtime.images import ImageRecord

IMAGE_ID = "ab" * 32


def roundtrip(model: object) -> object:
    """The model through JSON and back, as between the gateway and its client."""
    data = json.loads(json.dumps(model.to_dict()))  # type: ignore[attr-defined]
    return type(model).from_dict(data)  # type: ignore[attr-defined]


def test_answers_survive_json() -> None:
    progress = PullProgress((LayerProgress("sha256:" + "1" * 64, 5, 10),), 5, 10, 2.5)
    job = JobInfo("j1", JobState.PULLING, reference="r", created=1.5, progress=progress)
    assert roundtrip(job) == job
    assert roundtrip(job._replace(progress=None, finished=3.0)) == job._replace(
        progress=None, finished=3.0
    )
    assert "progress" not in job._replace(progress=None).to_dict()
    entry = ImageEntry(JobState.READY, IMAGE_ID, "r", "linux/amd64", 1.0, True, 7)
    assert roundtrip(entry) == entry and "job" not in entry.to_dict()
    recorded = entry._replace(record={"id": IMAGE_ID, "env": ["A=1"], "workdir": "/w"})
    assert roundtrip(recorded) == recorded and "record" not in entry.to_dict()
    pending = ImageEntry(JobState.PENDING, None, "r", "linux/amd64", 1.0, job="j1")
    assert roundtrip(pending) == pending
    meta = ImageMetadata(
        IMAGE_ID, "docker.io/x:1", "sha256:" + IMAGE_ID, "linux/amd64", env=("A=1",), acl=Acl((5,))
    )
    info = ImageInfo(meta, "x:1", pulled=2.0)
    assert roundtrip(info) == info and info.to_dict()["private"] is True
    for model in (
        Identity("1", 5, "alice", (5, 6), False, True),
        LoginResult("ok", verified=False),
        GatewayStats(LayerCacheStats(1, 2, 3, 4, 5, 6), {"READY": 2}, 2, 0),
    ):
        assert roundtrip(model) == model


def test_job_state_is_its_name() -> None:
    assert f"{JobState.READY}" == "READY" and json.dumps(JobState.FAILED) == '"FAILED"'
    assert [s.active for s in JobState] == [True, True, True, False, False]


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"id": "j"},
        {"id": "j", "state": "DONE"},
        {"id": 5, "state": "READY"},
        {"id": "j", "state": "READY", "attempts": True},
        {"id": "j", "state": "READY", "progress": {"layers": "x"}},
    ],
)
def test_a_job_that_does_not_fit_is_an_invalid_answer(data: object) -> None:
    with pytest.raises(InvalidAnswer):
        JobInfo.from_dict(data)


def test_request_bodies_are_checked_as_before() -> None:
    pull = PullRequest.from_dict({"reference": "x", "users": ["a", 5], "platform": ""})
    assert pull == PullRequest("x", None, ("a", "5"), ())
    assert PullRequest.from_dict(pull.to_dict()) == pull
    assert PullRequest.from_dict({"reference": 5}).reference is None
    with pytest.raises(BadRequest, match="users and groups must be lists"):
        PullRequest.from_dict({"reference": "x", "groups": "g"})
    with pytest.raises(BadRequest, match="platform must be a string"):
        PullRequest.from_dict({"reference": "x", "platform": 3})
    with pytest.raises(BadRequest, match="ids must be a list"):
        ExpireRequest.from_dict({"ids": "abc"})
    assert ExpireRequest.from_dict({"days": 2}) == ExpireRequest(2.0)
    assert RemoveRequest.from_dict({"image": None}) == RemoveRequest("")


ADMIN = Caller(1000, 1000, (1000,), "admin", admin=True)


@pytest.mark.parametrize(
    ("caller", "acl", "seen"),
    [
        (Viewer(5), None, True),  # public
        (Viewer(0), AclMembers((5,)), True),  # root
        (ADMIN, AclMembers((5,)), True),  # a gateway admin
        (Viewer(5), AclMembers((5,)), True),  # a listed user
        (Viewer(7, (9, 6)), AclMembers((5,), (6,)), True),  # a member of a listed group
        (Viewer(7, (9,)), AclMembers((5,), (6,)), False),
        (Viewer(7), AclMembers(), False),
    ],
)
def test_visible(caller: Viewer, acl: AclMembers | None, seen: bool) -> None:
    assert visible(caller, acl) is seen


ids = st.integers(min_value=0, max_value=8)


@given(
    uid=ids,
    gids=st.lists(ids, max_size=3),
    acl=st.none() | st.tuples(st.lists(ids, max_size=3), st.lists(ids, max_size=3)),
)
def test_every_record_type_asks_the_one_rule(
    uid: int, gids: list[int], acl: tuple[list[int], list[int]] | None
) -> None:
    """The store's ACL and metadata, the runtime's record and the gateway agree."""
    users, groups = acl if acl is not None else ((), ())
    expected = visible(Viewer(uid, gids), None if acl is None else AclMembers(users, groups))
    store_acl = None if acl is None else Acl(tuple(users), tuple(groups))
    meta = ImageMetadata(IMAGE_ID, "s", "d", "linux/amd64", acl=store_acl)
    assert meta.visible_to(uid, gids) is expected
    if store_acl is not None:
        assert store_acl.allows(uid, gids) is expected
    record = ImageRecord.from_json(meta.to_json())
    assert record.visible_to(uid, gids) is expected
    caller = Caller(uid, uid, tuple(gids), "u")
    assert visible(caller, store_acl) is expected


def test_queries_as_parameters() -> None:
    assert JobQuery(2, JobState.PULLING).to_params() == {"wait": "2", "state": "PULLING"}
    assert JobQuery(2).to_params() is None and JobQuery(0, "READY").to_params() is None
    assert JobQuery.from_params({"wait": "2.5", "state": "PULLING"}) == JobQuery(2.5, "PULLING")
    with pytest.raises(BadRequest, match="is not a number of seconds"):
        JobQuery.from_params({"wait": "soon"})
    with pytest.raises(BadRequest, match="wait must be between 0 and 30 seconds"):
        JobQuery.from_params({"wait": "31"})
    query = LookupQuery("ubuntu:22.04", "linux/arm64")
    assert LookupQuery.from_params(query.to_params()) == query
    assert LookupQuery.from_params({}) == LookupQuery("")
