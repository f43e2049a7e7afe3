"""--volume and --module syntax."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shifter_core.errors import OptionError
from shifter_core.options import (
    PerNodeCache,
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
        "/x", "/scratch", per_node_cache=PerNodeCache(10 << 30)
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
        ("/a:/b:ro:rw:x", "invalid volume"),
        (":/b", "empty source"),
        ("/a:", "empty target"),
        ("a:/b", "not an absolute path"),
        ("/a:b", "not an absolute path"),
        ("/a:/b/../etc", "contains '..'"),
        ("/a:/b:rox", "unknown flag"),
        ("/a:/b:perNodeCache=10G", "is not KEY=VALUE"),
        ("/a:/b:perNodeCache", "needs a size"),
        ("/a:/b:perNodeCache=bs=1M", "needs a size"),
        ("/a:/b:perNodeCache=size=ten", "invalid size"),
        ("/a:/b:perNodeCache=size=1G,bs=0", "invalid size"),
        ("/a:/b:perNodeCache=size=1G,bs=", "empty value"),
        ("/a:/b:perNodeCache=size=1G,method=dd", "method 'dd'"),
        ("/a:/b:perNodeCache=size=1G,fs=btrfs", "file system 'btrfs'"),
        ("/a:/b:perNodeCache=size=1G,fstype=xfs", "unknown perNodeCache key 'fstype'"),
        ("/a:/b:perNodeCache=size=1G,size=2G", "given twice"),
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
    for bad in ("0", "-1", "G", "1X", "", "0.0001", "1e3", "0x10", " 1G", "1G ", "+1G"):
        with pytest.raises(OptionError, match="invalid size"):
            parse_size(bad)


@pytest.mark.parametrize(
    "text, size",
    [
        # Shifter's parseBytes (VolumeMap.c): a number, then a unit letter of b, k, m, g,
        # t, p, e in any case (powers of 1024); what follows the letter is not read
        ("500KB", 500 << 10),
        ("500kb", 500 << 10),
        ("500Kb", 500 << 10),
        ("4T", 4 << 40),
        ("4tb", 4 << 40),
        ("10G", 10 << 30),
        ("10g", 10 << 30),
        ("10GiB", 10 << 30),
        ("1M", 1 << 20),
        ("1mB", 1 << 20),
        ("2GB", 2 << 30),
        ("512B", 512),
        ("512b", 512),
        ("2P", 2 << 50),
        ("1E", 1 << 60),
        ("1.5G", 3 << 29),  # a decimal number, as strtod reads it; bytes are truncated
        ("0.5k", 512),
        (".5k", 512),
        ("1.0000001k", 1024),
        ("0010M", 10 << 20),
    ],
)
def test_shifter_size_suffixes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["10Gfoo", "10GBB", "10BB", "10iB", "10KiBs", "1.2.3G", "1,5G"])
def test_sizes_with_trailing_text_are_refused(text):
    # Shifter ignores what follows the unit letter; a typo here is refused instead
    with pytest.raises(OptionError, match="invalid size") as info:
        parse_size(text)
    assert "500KB" in (info.value.hint or "")


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


# -- bounds (issue 9): every limit is checked before any privileged work --------------------

from shifter_core.options import (  # noqa: E402
    MAX_MODULES,
    MAX_PER_NODE_CACHE_VOLUMES,
    MAX_SIZE,
    MAX_VOLUME_TEXT,
    MAX_VOLUMES,
    NAME_MAX,
    PATH_MAX,
)


def test_path_max_per_path():
    ok = "/" + "/".join(["d" * 200] * 20)  # 4020 bytes
    assert parse_volume(f"/a:{ok}").target == ok
    long = "/" + "/".join(["d" * 200] * 21)  # 4221 bytes
    with pytest.raises(OptionError, match="longer than 4095 bytes") as info:
        parse_volume(f"/a:{long}")
    assert len(str(info.value)) < 400  # the value is cut, not echoed whole
    assert PATH_MAX == 4096


def test_path_max_counts_bytes_not_characters():
    component = "é" * 127  # 254 bytes
    path = "/" + "/".join([component] * 16)  # 16 * 255 = 4080 bytes, 2048 characters
    assert parse_volume(f"/a:{path}").target == path
    with pytest.raises(OptionError, match="longer than 4095 bytes"):
        parse_volume(f"/a:{path}/éééééééé")


def test_name_max_per_component():
    assert parse_volume("/a:/" + "n" * 255).target == "/" + "n" * 255
    with pytest.raises(OptionError, match="255 bytes") as info:
        parse_volume("/a:/data/" + "n" * 256)
    assert "hint" not in str(info.value) and info.value.hint
    with pytest.raises(OptionError, match="255 bytes"):
        parse_volume("/" + "é" * 128 + ":/b")
    assert NAME_MAX == 255


@pytest.mark.parametrize(
    "char", ["\0", "\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\u2028", "\u202e", "\udcff"]
)
def test_control_and_invisible_characters_are_refused(char):
    with pytest.raises(OptionError, match="character") as info:
        parse_volumes([f"/a:/b{char}c"])
    assert char not in str(info.value)  # shown escaped


def test_printable_unicode_and_spaces_are_allowed():
    volume = parse_volume("/scratch/données utiles:/data/résultats")
    assert volume.source == "/scratch/données utiles"
    assert parse_volume(str(volume)) == volume


def test_number_of_volumes_is_bounded():
    specs = [f"/s{i}:/t{i}" for i in range(MAX_VOLUMES)]
    assert len(parse_volumes([";".join(specs)])) == MAX_VOLUMES
    with pytest.raises(OptionError, match=f"more than {MAX_VOLUMES} volumes"):
        parse_volumes([";".join(specs), "/x:/y"])
    assert MAX_VOLUMES == 64


def test_total_length_is_bounded_before_parsing():
    huge = "/a:/b;" * 1_000_000  # 6 MB: refused at once, without splitting it up
    with pytest.raises(OptionError, match="longer than") as info:
        parse_volumes([huge])
    assert len(str(info.value)) < 400
    with pytest.raises(OptionError, match="longer than"):
        parse_volumes(["/a:/b"] * (MAX_VOLUME_TEXT // 4))


def test_per_node_cache_count_is_bounded():
    specs = [f"/s{i}:/t{i}:perNodeCache=size=1G" for i in range(MAX_PER_NODE_CACHE_VOLUMES)]
    assert len(parse_volumes(specs)) == MAX_PER_NODE_CACHE_VOLUMES
    with pytest.raises(OptionError, match="perNodeCache volumes"):
        parse_volumes([*specs, "/x:/y:perNodeCache=size=1G"])


def test_sizes_are_bounded():
    with pytest.raises(OptionError, match="invalid size"):
        parse_size("9" * 16 + "T")  # 10**16 TiB: refused, not an astronomic int
    assert parse_size("1024T") == 1 << 50
    assert parse_size("1E") == MAX_SIZE
    with pytest.raises(OptionError, match="larger than 1E"):
        parse_size("1.001E")
    with pytest.raises(OptionError, match="invalid size") as info:
        parse_size("1" * 100_000 + "G")  # refused before any arithmetic
    assert len(str(info.value)) < 400


def test_module_lists_are_bounded():
    names = [f"m{i}" for i in range(MAX_MODULES)]
    assert parse_modules(",".join(names)) == names
    with pytest.raises(OptionError, match=f"more than {MAX_MODULES} modules"):
        parse_modules(",".join([*names, "extra"]))
    with pytest.raises(OptionError, match="longer than") as info:
        parse_modules("a," * 1_000_000)
    assert len(str(info.value)) < 400
    with pytest.raises(OptionError, match="invalid module name") as info:
        parse_modules("g" * 65)
    for bad in ("gpu\0", "gpu\n", "gpü", "١"):
        with pytest.raises(OptionError):
            parse_modules(bad)


@given(st.lists(st.text(max_size=80), max_size=4))
def test_volume_parser_never_crashes_on_any_text(values):
    try:
        volumes = parse_volumes(values)
    except OptionError as err:
        assert str(err) and len(str(err)) < 1000
    else:
        assert len(volumes) <= MAX_VOLUMES
        for volume in volumes:
            for path in (volume.source, volume.target):
                assert path.isprintable() and len(path.encode()) < PATH_MAX
                assert all(len(c.encode()) <= NAME_MAX for c in path.split("/"))


# -- perNodeCache with Shifter's keys (issue 11) -------------------------------------------


def test_per_node_cache_keys():
    volume = parse_volume("/tmp:/cache:perNodeCache=size=10G,bs=1M,method=loop,fs=xfs")
    assert volume.per_node_cache == PerNodeCache(10 << 30, 1 << 20, "loop", "xfs")
    assert volume.per_node_cache_bytes == 10 << 30  # what the runtime reads today
    assert not volume.read_only
    # keys and the words in any case, as Shifter compares them (strcasecmp)
    same = parse_volume("/tmp:/cache:PERNODECACHE=Size=10g,BS=1m,Method=LOOP,FS=XFS")
    assert same == volume
    ext4 = parse_volume("/tmp:/cache:perNodeCache=fs=ext4,size=1T,")
    assert ext4.per_node_cache == PerNodeCache(1 << 40, fs="ext4")


def test_per_node_cache_defaults_are_shifters():
    cache = parse_volume("/tmp:/c:perNodeCache=size=1G").per_node_cache
    assert cache == PerNodeCache(size=1 << 30, block_size=1 << 20, method="loop", fs=None)
    assert Volume("/a", "/b").per_node_cache is None
    assert Volume("/a", "/b").per_node_cache_bytes is None


@pytest.mark.parametrize(
    "spec, text",
    [
        ("/t:/c:perNodeCache=size=10G", "/t:/c:perNodeCache=size=10737418240"),
        (
            "/t:/c:perNodeCache=size=1G,bs=4k,method=loop,fs=ext4",
            "/t:/c:perNodeCache=size=1073741824,bs=4096,fs=ext4",
        ),
        ("/t:/c:perNodeCache=size=1G,bs=1M", "/t:/c:perNodeCache=size=1073741824"),
    ],
)
def test_per_node_cache_canonical_form(spec, text):
    volume = parse_volume(spec)
    assert str(volume) == text  # defaults left out: older parsers read the common form
    assert parse_volume(text) == volume
    assert parse_volumes([format_volumes([volume])]) == [volume]


def test_per_node_cache_errors_say_what_to_write():
    with pytest.raises(OptionError) as info:
        parse_volume("/a:/b:perNodeCache=size=1G,color=red")
    assert "size=" in (info.value.hint or "") and "fs=" in (info.value.hint or "")


# -- site-volume flags, as Shifter's siteFs spells them (issue 11) -------------------------


def test_site_volume_flags():
    volume = parse_volume("/global/u1:/global/u1:ro:rec:slave", site=True)
    assert volume == Volume(
        "/global/u1", "/global/u1", read_only=True, recursive=True, propagation="slave"
    )
    assert parse_volume("/a:/b:private", site=True).propagation == "private"
    assert parse_volume("/a:/b:REC:Private", site=True) == Volume(
        "/a", "/b", recursive=True, propagation="private"
    )  # flag names in any case, as Shifter compares them
    plain = parse_volume("/a:/b", site=True)
    assert (plain.recursive, plain.propagation) == (False, None)
    assert parse_volumes(["/a:/a:rec;/b:/b:slave"], site=True)[1].propagation == "slave"


@pytest.mark.parametrize(
    "spec, text",
    [
        ("/a:/b:rec", "/a:/b:rw:rec"),
        ("/a:/b:slave:ro", "/a:/b:ro:slave"),
        ("/a:/b:private:rec:ro", "/a:/b:ro:rec:private"),
    ],
)
def test_site_volume_canonical_form(spec, text):
    volume = parse_volume(spec, site=True)
    assert str(volume) == text
    assert parse_volume(text, site=True) == volume


@pytest.mark.parametrize("flag", ["rec", "slave", "private", "REC"])
def test_site_flags_are_refused_in_user_volumes(flag):
    with pytest.raises(OptionError, match="site volumes only") as info:
        parse_volume(f"/a:/b:{flag}")
    assert "ro" in (info.value.hint or "")
    with pytest.raises(OptionError, match="site volumes only"):
        parse_volumes([f"/a:/b:ro:{flag}"])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/a:/b:slave:private", "both slave and private"),
        ("/a:/b:ro:rw", "both ro and rw"),
        ("/a:/b:ro:ro", "given twice"),
        ("/a:/b:rec:REC", "given twice"),
        ("/a:/b:rec=1", "takes no value"),
        ("/a:/b:shared", "unknown flag"),
        ("/a:/b:ro:perNodeCache=size=1G", "perNodeCache takes no other flag"),
    ],
)
def test_bad_flag_combinations_are_refused(spec, message):
    with pytest.raises(OptionError, match=message):
        parse_volume(spec, site=True)


def test_user_volumes_may_combine_their_flags_as_before():
    assert parse_volume("/a:/b:ro").read_only
    assert parse_volume("/a:/b:").read_only is False  # an empty flag is ignored, as Shifter
    assert parse_volume("/a:/b:RO").read_only  # any case, as Shifter
    with pytest.raises(OptionError, match="unknown flag"):
        parse_volume("/a:/b:ro:x")


@given(
    _path,
    _path,
    st.sampled_from(["", ":ro", ":rw"]),
    st.sampled_from(["", ":rec"]),
    st.sampled_from(["", ":slave", ":private"]),
)
def test_site_volume_round_trip(source, target, access, rec, propagation):
    volume = parse_volume(f"{source}:{target}{access}{rec}{propagation}", site=True)
    assert volume.read_only == (access == ":ro")
    assert volume.recursive == bool(rec)
    assert volume.propagation == (propagation[1:] or None)
    assert parse_volume(str(volume), site=True) == volume


@pytest.mark.parametrize("target", ["//etc", "//etc/", "///etc", "//./etc/."])
def test_two_leading_slashes_are_one(target):
    # posixpath.normpath keeps exactly two leading slashes (POSIX leaves "//" to the
    # implementation); on Linux "//etc" is "/etc", and checks on targets compare strings
    assert parse_volume(f"/a:{target}").target == "/etc"
    assert parse_volume(f"/{target}:/b").source == "/etc"
    assert parse_volume("/a://").target == "/"
