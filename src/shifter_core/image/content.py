"""Checks of what root reads from an image: its recorded config and its passwd/group lines.

Image content is hostile (DESIGN: "Trust boundaries"). Whatever an image holds, the readers
here give a value or raise :class:`ImageContentError`, a ``ShifterError`` that the prolog
records as the job's error; never a KeyError, TypeError, RecursionError or the like that
would fail the hook and drain the node. ``ImageContentError`` is also a ``ValueError``, so
callers that skip unreadable records on ``ValueError`` keep doing so.

Bounds on the image's config (the store's ``<id>.json``; the gateway applies the same at
pull time): at most :data:`MAX_METADATA_TEXT` bytes of JSON; ``env``, ``entrypoint`` and
``cmd`` each at most :data:`MAX_LIST_ITEMS` strings of at most :data:`MAX_ARG_STRLEN`
characters, :data:`MAX_LIST_TEXT` in all, without NUL; ``workdir`` a path below PATH_MAX
without control characters (relative: taken from ``/``, as Docker does); ``user`` at most
:data:`MAX_USER_LENGTH` printable characters; ``labels`` at most :data:`MAX_LABELS` string
pairs, :data:`MAX_LIST_TEXT` in all. Only the standard library's ``json`` and ``re`` are
imported: ``shifter`` reads image records on its start-up path.
"""

from __future__ import annotations

import json
import re

from ..errors import ShifterError
from ..options import PATH_MAX, shown

MAX_METADATA_TEXT = 4 << 20  # bytes of an image's recorded JSON
MAX_ARG_STRLEN = 128 * 1024  # the kernel's limit on one argument or environment string
MAX_LIST_ITEMS = 4096
MAX_LIST_TEXT = 1 << 20  # characters of all env (or cmd, entrypoint, labels) strings
MAX_LABELS = 4096
MAX_USER_LENGTH = 256
MAX_FIELD_LENGTH = 1024  # source, digest, platform ...
MAX_LAYERS = 4096
MAX_ACL_ENTRIES = 65536
MAX_IDENTITY_TEXT = 4 << 20  # characters of an image's /etc/passwd or /etc/group
MAX_IDENTITY_LINE = 64 * 1024
MAX_ID = 2**32 - 2  # (uid_t)-1 means "no id"
_HEX64 = re.compile(r"[0-9a-f]{64}")

_TEXT_FIELDS = ("source", "digest", "platform", "config_digest", "sha256")


class ImageContentError(ShifterError, ValueError):
    """What the image holds (config, /etc/passwd, /etc/group) is malformed or too large."""


def _bad(image: str, what: str, value: object, why: str) -> ImageContentError:
    return ImageContentError(
        f"image {image}: its {what} {shown(value)} {why}",
        hint="the image's content is malformed; rebuild it or ask its maintainer",
    )


def _strings(image: str, what: str, value: object, *, optional: bool) -> tuple[str, ...] | None:
    if value is None and optional:
        return None
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise _bad(image, what, value, "is not a list of strings")
    if len(value) > MAX_LIST_ITEMS:
        raise _bad(image, what, f"{len(value)} items", f"has more than {MAX_LIST_ITEMS} items")
    total = 0
    for item in value:
        if not isinstance(item, str):
            raise _bad(image, what, item, "is not a string")
        if len(item) > MAX_ARG_STRLEN:
            raise _bad(image, what, item, f"is longer than {MAX_ARG_STRLEN} characters")
        if "\0" in item:
            raise _bad(image, what, item, "contains a NUL character")
        total += len(item)
    if total > MAX_LIST_TEXT:
        raise _bad(image, what, f"{total} characters", f"is longer than {MAX_LIST_TEXT} in all")
    return tuple(value)


def _text(image: str, what: str, value: object, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad(image, what, value, "is not a string")
    if len(value) > limit:
        raise _bad(image, what, value, f"is longer than {limit} characters")
    if not value.isprintable():
        raise _bad(image, what, value, "contains control or invisible characters")
    return value


def check_workdir(image: str, value: object) -> str:
    """The image's working directory: '' (none) or an absolute path."""
    workdir = _text(image, "workdir", value, PATH_MAX - 2)
    if workdir and not workdir.startswith("/"):
        workdir = "/" + workdir  # as Docker runs an image with a relative WORKDIR
    return workdir


def check_labels(image: str, value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(image, "labels", value, "are not a mapping of strings")
    if len(value) > MAX_LABELS:
        raise _bad(image, "labels", f"{len(value)} labels", f"are more than {MAX_LABELS}")
    total = 0
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise _bad(image, "labels", {key: item}, "are not a mapping of strings")
        total += len(key) + len(item)
    if total > MAX_LIST_TEXT:
        raise _bad(image, "labels", f"{total} characters", f"are longer than {MAX_LIST_TEXT}")
    return dict(value)


def check_config(
    image: str,
    *,
    env: object,
    entrypoint: object,
    cmd: object,
    workdir: object,
    user: object,
    labels: object,
) -> dict[str, object]:
    """The run-time fields of an image's config, checked and normalised (see the module)."""
    return {
        "env": _strings(image, "env", env, optional=False),
        "entrypoint": _strings(image, "entrypoint", entrypoint, optional=True),
        "cmd": _strings(image, "cmd", cmd, optional=True),
        "workdir": check_workdir(image, workdir),
        "user": _text(image, "user", user, MAX_USER_LENGTH),
        "labels": check_labels(image, labels),
    }


def _ids(image: str, what: str, value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or len(value) > MAX_ACL_ENTRIES:
        raise _bad(image, what, value, "is not a list of ids")
    for item in value:
        if type(item) is not int or not 0 <= item <= MAX_ID:
            raise _bad(image, what, item, "is not a user or group id")
    return tuple(value)


def check_acl(image: str, value: object) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(users, groups) of a private image's ACL, None for a public image."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad(image, "acl", value, "is not a mapping of users and groups")
    return _ids(image, "acl users", value.get("users")), _ids(
        image, "acl groups", value.get("groups")
    )


def parse_record(text: str | bytes) -> dict[str, object]:
    """The fields of an image's recorded JSON (``<id>.json``), checked; unknown keys are
    left out. Raises :class:`ImageContentError` for anything else than a sane record."""
    if len(text) > MAX_METADATA_TEXT:
        raise ImageContentError(
            f"an image record of {len(text)} bytes is larger than {MAX_METADATA_TEXT}",
            hint="the image store holds a damaged record; ask an administrator to pull it again",
        )
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError ...
        raise ImageContentError(
            f"an image record is not valid JSON ({shown(err, 120)})",
            hint="the image store holds a damaged record; ask an administrator to pull it again",
        ) from None
    if not isinstance(data, dict):
        raise ImageContentError(
            f"an image record is not a JSON object: {shown(text)}",
            hint="the image store holds a damaged record; ask an administrator to pull it again",
        )
    image_id = data.get("id")
    if not isinstance(image_id, str) or not _HEX64.fullmatch(image_id):
        raise _bad("record", "id", image_id, "is not an image id (64 hexadecimal digits)")
    image = image_id[:12]
    fields: dict[str, object] = {"id": image_id}
    for key in _TEXT_FIELDS:
        fields[key] = _text(image, key, data.get(key), MAX_FIELD_LENGTH)
    fields.update(
        check_config(
            image,
            env=data.get("env"),
            entrypoint=data.get("entrypoint"),
            cmd=data.get("cmd"),
            workdir=data.get("workdir"),
            user=data.get("user"),
            labels=data.get("labels"),
        )
    )
    layers = data.get("layers") or []
    if (
        not isinstance(layers, list)
        or len(layers) > MAX_LAYERS
        or not all(isinstance(layer, dict) for layer in layers)
    ):
        raise _bad(image, "layers", layers, "are not a list of layer records")
    fields["layers"] = tuple(layers)
    for key, kinds in (("size", (int,)), ("created", (int, float))):
        value = data.get(key, 0)
        if type(value) not in kinds or not 0 <= value < 2**63:
            raise _bad(image, key, value, "is not a non-negative number")
        fields[key] = value
    fields["acl"] = check_acl(image, data.get("acl"))
    return fields


# -- /etc/passwd and /etc/group of the image -----------------------------------------------


def _is_id(text: str) -> bool:
    # ASCII digits only: str.isdigit() also takes '²' (int() refuses it) and '١٠٠٠' (which
    # int() reads as 1000); at most 10 digits, so int() stays cheap.
    return 0 < len(text) <= 10 and text.isascii() and text.isdigit() and int(text) <= MAX_ID


def identity_lines(text: str, what: str, fields: int) -> list[list[str]]:
    """The well-formed entries of an image's ``/etc/passwd`` (7 fields) or ``/etc/group``
    (4 fields), split into fields; other lines are dropped. Lines end at ``\\n`` only (as
    libc reads them). Dropped: lines with control or invisible characters, longer than
    :data:`MAX_IDENTITY_LINE`, with an empty name or a NIS ``+``/``-`` entry, ids that are
    not ASCII numbers up to 2**32-2. More than :data:`MAX_IDENTITY_TEXT` characters is an
    :class:`ImageContentError`."""
    if len(text) > MAX_IDENTITY_TEXT:
        raise ImageContentError(
            f"the image's {what} is larger than {MAX_IDENTITY_TEXT} characters",
            hint="the image's content is malformed; rebuild it or ask its maintainer",
        )
    entries = []
    for line in text.split("\n"):
        if not line or len(line) > MAX_IDENTITY_LINE or not line.isprintable():
            continue
        parts = line.split(":")
        if len(parts) != fields or not parts[0] or parts[0][0] in "+-":
            continue
        if not all(_is_id(n) for n in parts[2 : 4 if fields == 7 else 3]):
            continue
        entries.append(parts)
    return entries
