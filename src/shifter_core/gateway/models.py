"""The gateway's API as types: every request body and answer, shared by the server and
:class:`~shifter_core.client.GatewayClient`.

``to_dict`` gives the JSON the protocol documents (:mod:`shifter_core.gateway`);
``from_dict`` reads it back and checks its shape: a request body that does not fit is a
:class:`~.errors.BadRequest` (400), an answer that does not fit an :class:`InvalidAnswer`.
Named tuples, not dataclasses: ``shifterimg`` and the submission side of the plugin load this
module, and defining a dataclass costs about a millisecond, a named tuple a fifth of that.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import BadRequest

if TYPE_CHECKING:
    from ..image.store import ImageMetadata


class JobState(enum.StrEnum):
    """Where a pull or import is: ``PENDING`` -> ``PULLING`` -> ``CONVERTING`` -> ``READY``,
    or ``FAILED`` (with a message) from any of the first three."""

    PENDING = "PENDING"
    PULLING = "PULLING"
    CONVERTING = "CONVERTING"
    READY = "READY"
    FAILED = "FAILED"

    @property
    def active(self) -> bool:
        """Still running: ``PENDING``, ``PULLING`` or ``CONVERTING``."""
        return self in ACTIVE_STATES

    @property
    def final(self) -> bool:
        """``READY`` or ``FAILED``."""
        return not self.active


ACTIVE_STATES = (JobState.PENDING, JobState.PULLING, JobState.CONVERTING)
FINAL_STATES = (JobState.READY, JobState.FAILED)
PLATFORM_HINT = "platform must be a string such as linux/amd64"
MAX_WAIT = 30.0  # seconds a status request may wait for a change


class InvalidAnswer(ValueError):
    """An answer of the gateway that does not have the shape of its model."""


# -- reading JSON ---------------------------------------------------------------------------


def _object(data: object, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise InvalidAnswer(f"{what} is not a JSON object")
    return data


def _str(data: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise InvalidAnswer(f"{key} is not a string")
    return value


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return None if value is None else _str(data, key)


def _int(data: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidAnswer(f"{key} is not an integer")
    return value


def _float(data: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = data.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidAnswer(f"{key} is not a number")
    return float(value)


def _opt_float(data: Mapping[str, Any], key: str) -> float | None:
    return None if data.get(key) is None else _float(data, key)


def _bool(data: Mapping[str, Any], key: str, default: bool | None = None) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise InvalidAnswer(f"{key} is not true or false")
    return value


def _state(data: Mapping[str, Any], key: str) -> JobState:
    value = _str(data, key)
    try:
        return JobState(value)
    except ValueError:
        raise InvalidAnswer(f"{key} {value[:40]!r} is not a job state") from None


def _list(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise InvalidAnswer(f"{key} is not a list")
    return value


def strings(value: object, what: str) -> tuple[str, ...]:
    """A list of strings in an answer."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidAnswer(f"{what} is not a list of strings")
    return tuple(value)


# -- requests -------------------------------------------------------------------------------


def _platform(data: Mapping[str, Any]) -> str | None:
    value = data.get("platform")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(PLATFORM_HINT)
    return value


def _names(data: Mapping[str, Any], key: str, what: str) -> tuple[str, ...]:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise BadRequest(f"{what} must be a list")
    return tuple(str(v) for v in value)


class PullRequest(NamedTuple):
    """``POST /pull``: an image to pull, private to ``users`` and ``groups`` (names or ids)
    when any are given."""

    reference: str | None
    platform: str | None = None
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "reference": self.reference,
            "users": list(self.users),
            "groups": list(self.groups),
        }
        if self.platform:
            body["platform"] = self.platform
        return body

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PullRequest:
        reference = data.get("reference")
        users, groups = data.get("users") or [], data.get("groups") or []
        if not isinstance(users, list) or not isinstance(groups, list):
            raise BadRequest("users and groups must be lists")
        return cls(
            reference if isinstance(reference, str) else None,
            _platform(data),
            tuple(str(u) for u in users),
            tuple(str(g) for g in groups),
        )


class ExpireRequest(NamedTuple):
    """``POST /expire``: these image ids, or the images unused for ``days``."""

    days: float | None = None
    ids: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.days is not None:
            body["days"] = self.days
        if self.ids:
            body["ids"] = list(self.ids)
        return body

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpireRequest:
        ids = _names(data, "ids", "ids")
        days = data.get("days")
        if ids or days is None:
            return cls(None, ids)
        if not isinstance(days, int | float) or isinstance(days, bool):
            raise BadRequest("give a number of days greater than 0 or image ids")
        return cls(float(days), ids)


class RemoveRequest(NamedTuple):
    """``POST /remove``: an image id, or every image a reference points at."""

    image: str
    platform: str | None = None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"image": self.image}
        if self.platform:
            body["platform"] = self.platform
        return body

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RemoveRequest:
        platform = data.get("platform")
        if platform and not isinstance(platform, str):
            raise BadRequest(PLATFORM_HINT)
        return cls(str(data.get("image") or ""), platform or None)


class LoginRequest(NamedTuple):
    """``POST /login``: the registry whose credentials (in the munge payload) to check."""

    registry: str

    def to_dict(self) -> dict[str, Any]:
        return {"registry": self.registry}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoginRequest:
        registry = data.get("registry")
        return cls(registry if isinstance(registry, str) else "")


class LookupQuery(NamedTuple):
    """``GET /lookup?reference=R[&platform=P]``: R is a reference or an image id."""

    reference: str
    platform: str | None = None

    def to_params(self) -> dict[str, str]:
        params = {"reference": self.reference}
        if self.platform:
            params["platform"] = self.platform
        return params

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> LookupQuery:
        return cls(params.get("reference", ""), params.get("platform") or None)


class JobQuery(NamedTuple):
    """``GET /jobs/ID[?wait=S&state=STATE]``: answer once the job is no longer in STATE, or
    after S seconds (at most :data:`MAX_WAIT`); without them, at once."""

    wait: float = 0.0
    state: str | None = None

    def to_params(self) -> dict[str, str] | None:
        if not (self.wait and self.state):
            return None
        return {"wait": f"{self.wait:g}", "state": str(self.state)}

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> JobQuery:
        text = params.get("wait", "0")
        try:
            seconds = float(text)
        except ValueError:
            raise BadRequest(f"wait={text!r} is not a number of seconds") from None
        if not 0 <= seconds <= MAX_WAIT:
            raise BadRequest(f"wait must be between 0 and {MAX_WAIT:g} seconds")
        return cls(seconds, params.get("state"))


# -- answers --------------------------------------------------------------------------------


class Identity(NamedTuple):
    """``GET /ping``: who the gateway takes the caller for, and its version."""

    version: str
    uid: int
    user: str
    gids: tuple[int, ...] = ()
    admin: bool = False
    may_import: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "uid": self.uid,
            "user": self.user,
            "gids": list(self.gids),
            "admin": self.admin,
            "may_import": self.may_import,
        }

    @classmethod
    def from_dict(cls, data: object) -> Identity:
        d = _object(data, "the identity")
        gids = _list(d, "gids")
        if not all(isinstance(g, int) and not isinstance(g, bool) for g in gids):
            raise InvalidAnswer("gids is not a list of integers")
        return cls(
            _str(d, "version", ""),
            _int(d, "uid"),
            _str(d, "user", ""),
            tuple(gids),
            _bool(d, "admin", False),
            _bool(d, "may_import", False),
        )


class LayerProgress(NamedTuple):
    """Bytes of one layer downloaded so far."""

    digest: str
    done: int
    total: int

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "done": self.done, "total": self.total}

    @property
    def complete(self) -> bool:
        return bool(self.total) and self.done >= self.total


class PullProgress(NamedTuple):
    """A running pull's downloads: per layer, in all, and the rate in bytes per second."""

    layers: tuple[LayerProgress, ...] = ()
    done: int = 0
    total: int = 0
    rate: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "done": self.done,
            "total": self.total,
            "rate": self.rate,
        }

    @classmethod
    def from_dict(cls, data: object) -> PullProgress:
        d = _object(data, "the progress")
        layers = []
        for item in _list(d, "layers"):
            layer = _object(item, "a layer's progress")
            layers.append(
                LayerProgress(_str(layer, "digest"), _int(layer, "done"), _int(layer, "total"))
            )
        return cls(tuple(layers), _int(d, "done", 0), _int(d, "total", 0), _float(d, "rate", 0))


class JobInfo(NamedTuple):
    """A pull or import job as callers see it (``progress`` while it downloads)."""

    id: str
    state: JobState
    kind: str = "pull"
    reference: str = ""
    platform: str = ""
    message: str = ""
    image_id: str | None = None
    private: bool = False
    requester: str = ""
    attempts: int = 0
    created: float = 0.0
    updated: float = 0.0
    finished: float | None = None
    progress: PullProgress | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "reference": self.reference,
            "platform": self.platform,
            "state": self.state.value,
            "message": self.message,
            "image_id": self.image_id,
            "private": self.private,
            "requester": self.requester,
            "attempts": self.attempts,
            "created": self.created,
            "updated": self.updated,
            "finished": self.finished,
        }
        if self.progress is not None:
            data["progress"] = self.progress.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: object) -> JobInfo:
        d = _object(data, "the job")
        progress = d.get("progress")
        return cls(
            id=_str(d, "id"),
            state=_state(d, "state"),
            kind=_str(d, "kind", "pull"),
            reference=_str(d, "reference", ""),
            platform=_str(d, "platform", ""),
            message=_str(d, "message", "") if d.get("message") is not None else "",
            image_id=_opt_str(d, "image_id"),
            private=_bool(d, "private", False),
            requester=str(d.get("requester", "")),
            attempts=_int(d, "attempts", 0),
            created=_float(d, "created", 0),
            updated=_float(d, "updated", 0),
            finished=_opt_float(d, "finished"),
            progress=None if progress is None else PullProgress.from_dict(progress),
        )


class ImageEntry(NamedTuple):
    """One line of ``GET /images``: a READY image under one reference, or a pull in
    progress (``id`` None, ``job`` its job). ``record`` is the store's whole record of a
    READY image (what ``GET /lookup`` answers: digest, env, entrypoint, workdir, labels,
    layers, ACL...), None for a pull in progress."""

    status: JobState
    id: str | None
    reference: str
    platform: str
    pulled: float | None = None
    private: bool = False
    size: int = 0
    job: str | None = None
    record: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "status": self.status.value,
            "id": self.id,
            "reference": self.reference,
            "platform": self.platform,
            "pulled": self.pulled,
            "private": self.private,
            "size": self.size,
        }
        if self.job is not None:
            data["job"] = self.job
        if self.record is not None:
            data["record"] = self.record
        return data

    @classmethod
    def from_dict(cls, data: object) -> ImageEntry:
        d = _object(data, "an image")
        return cls(
            status=_state(d, "status"),
            id=_opt_str(d, "id"),
            reference=_str(d, "reference"),
            platform=_str(d, "platform", ""),
            pulled=_opt_float(d, "pulled"),
            private=_bool(d, "private", False),
            size=_int(d, "size", 0),
            job=_opt_str(d, "job"),
            record=d["record"] if isinstance(d.get("record"), dict) else None,
        )


class ImageInfo(NamedTuple):
    """``GET /lookup``: the store's record of the image, the reference it was found by,
    and when that reference was pulled (None when found by id or digest)."""

    image: ImageMetadata
    reference: str
    status: JobState = JobState.READY
    pulled: float | None = None

    @property
    def id(self) -> str:
        return self.image.id

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        data = dataclasses.asdict(self.image)
        data["private"] = self.image.private
        data["reference"] = self.reference
        data["status"] = self.status.value
        if self.pulled is not None:
            data["pulled"] = self.pulled
        return data

    @classmethod
    def from_dict(cls, data: object) -> ImageInfo:
        """Read an answer; the record is checked as the store checks its own
        (:class:`~shifter_core.image.content.ImageContentError` when it is not sane)."""
        import json

        from ..image.store import ImageMetadata

        d = _object(data, "the image")
        fields = ImageMetadata.__dataclass_fields__
        image = ImageMetadata.from_json(json.dumps({k: v for k, v in d.items() if k in fields}))
        reference = _str(d, "reference", image.source)
        return cls(image, reference, _state(d, "status"), _opt_float(d, "pulled"))


class LoginResult(NamedTuple):
    """``POST /login``: what the registry said; ``verified`` False when it could not be
    asked."""

    result: str
    verified: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"result": self.result, "verified": self.verified}

    @classmethod
    def from_dict(cls, data: object) -> LoginResult:
        d = _object(data, "the login result")
        return cls(_str(d, "result", "credentials accepted"), _bool(d, "verified", True))


class LayerCacheStats(NamedTuple):
    """Counters of the gateway's layer cache."""

    downloads: int = 0
    hits: int = 0
    waited: int = 0
    bytes_written: int = 0
    bytes: int = 0
    max_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "downloads": self.downloads,
            "hits": self.hits,
            "waited": self.waited,
            "bytes_written": self.bytes_written,
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
        }


class GatewayStats(NamedTuple):
    """``GET /stats``: the layer cache, jobs by state, workers and queued jobs."""

    layer_cache: LayerCacheStats
    jobs: dict[str, int]
    workers: int = 0
    queued: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer_cache": self.layer_cache.to_dict(),
            "jobs": dict(self.jobs),
            "workers": self.workers,
            "queued": self.queued,
        }

    @classmethod
    def from_dict(cls, data: object) -> GatewayStats:
        d = _object(data, "the statistics")
        cache = _object(d.get("layer_cache", {}), "layer_cache")
        jobs = _object(d.get("jobs", {}), "jobs")
        counts = {str(k): _int(jobs, k) for k in jobs}
        return cls(
            LayerCacheStats(**{k: _int(cache, k, 0) for k in LayerCacheStats._fields}),
            counts,
            _int(d, "workers", 0),
            _int(d, "queued", 0),
        )
