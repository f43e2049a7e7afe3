"""--volume and --module syntax."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shifter_core.errors import OptionError
from shifter_core.options import (
    Volume,
    format_volumes,
    parse_modules,
    parse_size,
    parse_volume,
    parse_volumes,
)


def test_volume_forms():
    assert parse_volume("/a:/b") == Volume("/a", "/b")
    assert parse_volume("/a:/b:ro") == Volume("/a", "/b", read_only=True)
    assert parse_volume("/a/:/b//c/:rw") == Volume("/a", "/b/c")
    assert parse_volume("/x:/scratch:perNodeCache=size=10G") == Volume(
        "/x", "/scratch", per_node_cache_bytes=10 << 30
    )


def test_repeated_and_joined_volumes_are_all_kept():
    volumes = parse_volumes(["/a:/a1;/b:/b1:ro", "/c:/c1"])
    assert [v.target for v in volumes] == ["/a1", "/b1", "/c1"]
    assert parse_volumes([format_volumes(volumes)]) == volumes


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/a", "invalid volume"),
        ("/a:/b:ro:x", "invalid volume"),
        (":/b", "empty source"),
        ("/a:", "empty target"),
        ("a:/b", "not an absolute path"),
        ("/a:b", "not an absolute path"),
        ("/a:/b/../etc", "contains '..'"),
        ("/a:/b:rox", "unknown flag"),
        ("/a:/b:perNodeCache=10G", "needs a size"),
        ("/a:/b:perNodeCache=size=ten", "invalid size"),
    ],
)
def test_bad_volumes_name_the_spec(spec, message):
    with pytest.raises(OptionError, match=message) as info:
        parse_volume(spec)
    assert spec in str(info.value) or "size" in str(info.value)


def test_duplicate_targets_and_empty_values_are_refused():
    with pytest.raises(OptionError, match="more than once"):
        parse_volumes(["/a:/x", "/b:/x"])
    with pytest.raises(OptionError, match="empty --volume"):
        parse_volumes([";"])


def test_sizes():
    assert parse_size("512") == 512
    assert parse_size("2k") == 2048
    assert parse_size("3M") == 3 << 20
    assert parse_size("1T") == 1 << 40
    for bad in ("0", "-1", "1.5G", "G", "1P", ""):
        with pytest.raises(OptionError):
            parse_size(bad)


def test_modules():
    assert parse_modules("gpu,mpich") == ["gpu", "mpich"]
    assert parse_modules("none") == ["none"]
    for bad, message in [
        ("", "invalid --module"),
        ("gpu,", "invalid --module"),
        ("none,gpu", "cannot be combined"),
        ("gpu,gpu", "given twice"),
        ("g p u", "invalid module name"),
        ("../x", "invalid module name"),
    ]:
        with pytest.raises(OptionError, match=message):
            parse_modules(bad)


_path = (
    st.lists(st.from_regex(r"[A-Za-z0-9_.-]{1,10}", fullmatch=True), min_size=1, max_size=4)
    .filter(lambda parts: ".." not in parts and "." not in parts)
    .map(lambda parts: "/" + "/".join(parts))
)


@given(_path, _path, st.sampled_from(["", ":ro", ":rw"]))
def test_volume_round_trip(source, target, flag):
    volume = parse_volume(f"{source}:{target}{flag}")
    assert volume.read_only == (flag == ":ro")
    assert parse_volume(str(volume)) == volume


@given(st.text(max_size=30))
def test_volume_parser_never_crashes(text):
    try:
        volumes = parse_volumes([text])
    except OptionError as err:
        assert str(err)
    else:
        assert all(v.source.startswith("/") and v.target.startswith("/") for v in volumes)
        assert all(".." not in v.target.split("/") for v in volumes)
