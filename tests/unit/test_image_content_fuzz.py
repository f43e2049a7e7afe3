"""What root reads from an image is parsed defensively (issue 9, deliverable 3).

The image's ``/etc/passwd`` and ``/etc/group`` (for the container's generated files) and the
image's recorded config (env, entrypoint, cmd, workdir, user, labels, ACL) are hostile
input: every content gives a result or an :class:`ImageContentError` (a ``ShifterError``, so
the prolog records it as the job's error), never a KeyError, ValueError, TypeError,
UnicodeDecodeError, RecursionError or MemoryError that would fail the hook and drain the node.
"""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shifter_core.errors import ShifterError
from shifter_core.image.content import (
    MAX_IDENTITY_TEXT,
    MAX_METADATA_TEXT,
    ImageContentError,
)
from shifter_core.image.oci import ImageConfig
from shifter_core.image.store import ImageMetadata
from shifter_core.runtime.identity import group_file, passwd_file
from shifter_core.runtime.images import ImageRecord
from shifter_core.runtime.plan import User

IMAGE_ID = "a" * 64
USER = User(
    uid=1000,
    gid=1000,
    groups=(1000, 27),
    name="alice",
    home="/home/alice",
    shell="/bin/bash",
    gecos="Alice",
    group_names=((1000, "alice"), (27, "sudo")),
)


def _valid_passwd(text: str) -> None:
    lines = text.split("\n")
    assert lines[-1] == "" and lines[-2].startswith("alice:x:1000:1000:")
    for line in lines[:-1]:
        fields = line.split(":")
        assert len(fields) == 7, line
        assert line.isprintable(), line
        for number in fields[2:4]:
            assert number.isascii() and number.isdigit() and int(number) < 2**32 - 1
    assert sum(line.split(":")[2] == "1000" for line in lines[:-1]) == 1


def _valid_group(text: str) -> None:
    lines = text.split("\n")
    assert lines[-1] == ""
    for line in lines[:-1]:
        fields = line.split(":")
        assert len(fields) == 4, line
        assert line.isprintable(), line
        assert fields[2].isascii() and fields[2].isdigit() and int(fields[2]) < 2**32 - 1


# -- /etc/passwd and /etc/group -----------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "evil:x:²:0::/:/bin/sh",  # '²'.isdigit() is True, int('²') raises ValueError
        "evil:x:" + "9" * 5000 + ":0::/:/bin/sh",  # int() refuses over 4300 digits
        "evil:x:0:²::/:/bin/sh",
    ],
)
def test_hostile_uid_fields_do_not_raise(line):
    text = passwd_file(f"root:x:0:0:root:/root:/bin/sh\n{line}\n", USER, "/bin/sh")
    _valid_passwd(text)
    assert "evil" not in text and "root:x:0:0" in text


@pytest.mark.parametrize(
    "line",
    [
        "alice2:x:١٠٠٠:0::/:/bin/sh",  # Arabic-Indic digits: int() takes them as 1000
        "nul\0:x:5:5::/:/bin/sh",
        "cr:x:5:5::/:/bin/sh\r",
        "neg:x:-1:5::/:/bin/sh",
        "big:x:4294967295:5::/:/bin/sh",
        "plus:x:+5:5::/:/bin/sh",
        "sp:x: 5:5::/:/bin/sh",
        "+:::::::",
        "-nis:x:5:5::/:/bin/sh",
        "long:x:5:5:" + "g" * 100_000 + ":/:/bin/sh",
        ":x:5:5::/:/bin/sh",
    ],
)
def test_malformed_passwd_lines_are_dropped(line):
    text = passwd_file(f"daemon:x:1:1::/:/bin/sh\n{line}\n", USER, "/bin/sh")
    _valid_passwd(text)
    assert text.startswith("daemon:x:1:1::/:/bin/sh\n")
    assert len(text.split("\n")) == 3


def test_other_line_separators_do_not_split_lines():
    # str.splitlines() splits on \x1c, \x85, \u2028 ...; libc only on \n: a line smuggled
    # behind one of them must not become an entry of its own.
    for sep in ("\x1c", "\x85", "\u2028", "\x0b"):
        text = passwd_file(f"a:x:5:5::/:/bin/sh{sep}b:x:6:6::/:/bin/sh\n", USER, "/bin/sh")
        _valid_passwd(text)
        assert "b:x:6" not in text


def test_hostile_group_lines():
    image = "\n".join(
        [
            "users:x:100:a,b",
            "evil:x:²:",
            "evil2:x:" + "9" * 5000 + ":",
            "evil3:x:١٠٠:",
            "evil4\0:x:101:",
            "ok:x:102:",
        ]
    )
    text = group_file(image, USER, overflow=65534)
    _valid_group(text)
    assert "evil" not in text
    assert "users:x:100:a,b\n" in text and "ok:x:102:\n" in text
    assert text.endswith("nogroup:x:65534:\n")


def test_identity_files_over_the_bound_are_a_job_error():
    huge = "u:x:5:5::/:/bin/sh\n" * (MAX_IDENTITY_TEXT // 19 + 1)
    with pytest.raises(ImageContentError, match="/etc/passwd") as info:
        passwd_file(huge, USER, "/bin/sh")
    assert isinstance(info.value, ShifterError) and info.value.hint
    with pytest.raises(ImageContentError, match="/etc/group"):
        group_file(huge, USER)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.text(max_size=60),
            st.lists(
                st.one_of(st.text(max_size=8), st.from_regex(r"[0-9]{1,12}", fullmatch=True)),
                min_size=3,
                max_size=8,
            ).map(":".join),
        ),
        max_size=12,
    ).map("\n".join)
)
def test_passwd_and_group_of_any_content(image):
    try:
        _valid_passwd(passwd_file(image, USER, "/bin/sh"))
        _valid_group(group_file(image, USER, overflow=65534))
    except ImageContentError:
        pass


# -- the image's recorded config ----------------------------------------------------------


def _record(**changes):
    data = {
        "id": IMAGE_ID,
        "source": "docker.io/library/busybox:latest",
        "digest": "sha256:" + "b" * 64,
        "platform": "linux/amd64",
        "env": ["PATH=/usr/bin:/bin"],
        "entrypoint": None,
        "cmd": ["sh"],
        "workdir": "/",
        "user": "",
        "labels": {"a": "b"},
        "config_digest": "sha256:" + "c" * 64,
        "layers": [{"digest": "sha256:" + "d" * 64, "size": 10, "media_type": "x"}],
        "size": 4096,
        "sha256": "e" * 64,
        "created": 1.5,
        "acl": None,
    }
    data.update(changes)
    return json.dumps(data)


PARSERS = [ImageMetadata.from_json, ImageRecord.from_json]


@pytest.mark.parametrize("parse", PARSERS)
def test_a_good_record_parses(parse):
    meta = parse(_record())
    assert meta.id == IMAGE_ID and meta.env == ("PATH=/usr/bin:/bin",) and meta.cmd == ("sh",)


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize(
    "changes, message",
    [
        ({"env": {"PATH": "/bin"}}, "env"),
        ({"env": "PATH=/bin"}, "env"),
        ({"env": ["A=1", 5]}, "env"),
        ({"env": ["A=\0"]}, "env"),
        ({"env": ["A=" + "x" * 200_000]}, "env"),
        ({"env": [f"V{i}=1" for i in range(10_000)]}, "env"),
        ({"user": 1000}, "user"),
        ({"user": "a\0b"}, "user"),
        ({"workdir": "/a\0b"}, "workdir"),
        ({"workdir": ["/"]}, "workdir"),
        ({"workdir": "/" + "a" * 5000}, "workdir"),
        ({"labels": {"a": 1}}, "labels"),
        ({"labels": ["a"]}, "labels"),
        ({"cmd": "sh -c true"}, "cmd"),
        ({"cmd": [None]}, "cmd"),
        ({"entrypoint": {"a": 1}}, "entrypoint"),
        ({"id": "../../etc/passwd"}, "id"),
        ({"id": None}, "id"),
        ({"acl": ["alice"]}, "acl"),
        ({"acl": {"users": ["1000"]}}, "acl"),
        ({"acl": {"users": [True]}}, "acl"),
        ({"acl": {"users": [-1]}}, "acl"),
        ({"source": 5}, "source"),
        ({"size": "big"}, "size"),
    ],
)
def test_hostile_records_are_an_image_content_error(parse, changes, message):
    with pytest.raises(ImageContentError, match=message) as info:
        parse(_record(**changes))
    assert len(str(info.value)) < 600 and "\0" not in str(info.value)


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize(
    "text",
    [
        "",
        "null",
        "[]",
        '"x"',
        "{",
        "\udcff",
        "[" * 100_000 + "]" * 100_000,  # RecursionError in json
        '{"id": ' + "1" * 5000 + "}",  # ValueError: too many digits
        '{"size": 1e999999}',
    ],
)
def test_broken_json_is_an_image_content_error(parse, text):
    with pytest.raises(ImageContentError):
        parse(text)


@pytest.mark.parametrize("parse", PARSERS)
def test_oversized_records_are_refused_before_parsing(parse):
    with pytest.raises(ImageContentError, match="larger than"):
        parse(_record(labels={"x": "y" * MAX_METADATA_TEXT}))


@pytest.mark.parametrize("parse", PARSERS)
def test_relative_workdir_is_taken_from_the_root_and_unknown_keys_are_ignored(parse):
    data = json.loads(_record(workdir="app/run"))
    data["future_field"] = {"x": 1}
    meta = parse(json.dumps(data))
    assert meta.workdir == "/app/run"


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_KEYS = ["id", "source", "env", "entrypoint", "cmd", "workdir", "user", "labels", "acl"]
_KEYS += ["layers", "size", "created", "sha256", "digest", "platform", "config_digest"]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_KEYS), _json), st.booleans())
def test_records_of_any_content(changes, keep_id):
    data = json.loads(_record())
    data.update(changes)
    if keep_id:
        data["id"] = IMAGE_ID
    text = json.dumps(data)
    for parse in PARSERS:
        try:
            meta = parse(text)
        except ImageContentError:
            continue
        assert meta.id == IMAGE_ID
        assert all(isinstance(e, str) and "\0" not in e for e in meta.env)
        for argv in (meta.entrypoint, meta.cmd):
            assert argv is None or all(isinstance(a, str) and "\0" not in a for a in argv)
        assert isinstance(meta.workdir, str) and (not meta.workdir or meta.workdir[0] == "/")
        assert isinstance(meta.user, str) and "\0" not in meta.user
        assert meta.visible_to(1000, [100]) in (True, False)


@settings(max_examples=200)
@given(st.text(max_size=200))
def test_any_text_as_a_record(text):
    for parse in PARSERS:
        with contextlib.suppress(ImageContentError):
            parse(text)


@pytest.mark.parametrize(
    "config, message",
    [
        (ImageConfig(env=("A=\0",)), "env"),
        (ImageConfig(workdir="/a\0"), "workdir"),
        (ImageConfig(cmd=("x" * 200_000,)), "cmd"),
        (ImageConfig(labels={"k": "v" * 2_000_000}), "labels"),
    ],
)
def test_a_pull_of_a_hostile_config_fails_cleanly(config, message):
    with pytest.raises(ImageContentError, match=message):
        ImageMetadata.from_config(
            config,
            id=IMAGE_ID,
            source="docker.io/x/y:1",
            digest="sha256:" + "b" * 64,
            platform="linux/amd64",
            config_digest="sha256:" + "c" * 64,
            layers=[],
            size=1,
        )


def test_the_store_lists_around_a_broken_record(tmp_path):
    from shifter_core.image.store import ImageStore

    good, bad = "1" * 64, "2" * 64
    for image_id, text in ((good, _record(id=good)), (bad, _record(id=bad, env={"A": 1}))):
        (tmp_path / f"{image_id}.json").write_text(text)
        (tmp_path / f"{image_id}.squashfs").write_bytes(b"x")
    store = ImageStore(tmp_path)
    assert [m.id for m in store] == [good]
    with pytest.raises(ImageContentError):
        store.get(bad)


_CONFIG_KEYS = ["Env", "Entrypoint", "Cmd", "WorkingDir", "User", "Labels"]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(_CONFIG_KEYS), _json) | _json,
    st.dictionaries(st.sampled_from(["os", "architecture", "variant", "rootfs"]), _json),
)
def test_image_configs_of_any_shape(config, top):
    """A registry's config JSON of any shape parses or is an ImageContentError (it used to
    raise AttributeError, which failed the pull as 'failed unexpectedly')."""
    with contextlib.suppress(ImageContentError):
        ImageConfig.from_json({**top, "config": config})
