"""The layer flattener, rule by rule, on tiny in-memory layers (plus a model-based check)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shifter_core.errors import ShifterError
from shifter_core.image.convert import layers_to_squashfs
from shifter_core.image.flatten.onepass import OnePassImpossible, flatten_one_pass
from shifter_core.image.flatten.policy import FlattenPolicy, FlattenStats, normalise
from shifter_core.image.flatten.spool import FlattenError, _ZstdFrames
from shifter_core.image.flatten.twopass import flatten
from tests.fixtures.edgecase_image import (
    CAP_NET_BIND_SERVICE,
    MTIME,
    Member,
    blockdev,
    chardev,
    compress,
    dir_,
    fifo,
    hardlink,
    opaque,
    reg,
    symlink,
    tar_bytes,
    whiteout,
)


@dataclass
class Entry:
    type: bytes
    mode: int
    uid: int
    gid: int
    mtime: float
    data: bytes
    linkname: str
    pax: dict[str, str]


@dataclass
class Result:
    entries: dict[str, Entry]
    order: list[str]
    stats: FlattenStats
    raw: bytes

    def data(self, path: str) -> bytes:
        """The content behind ``path``, following one hardlink."""
        entry = self.entries[path]
        if entry.type == tarfile.LNKTYPE:
            entry = self.entries[entry.linkname]
        assert entry.type == tarfile.REGTYPE, path
        return entry.data

    def groups(self) -> set[frozenset[str]]:
        """Hardlink groups (a primary and the links to it), as sets of paths."""
        groups: dict[str, set[str]] = {}
        for path, entry in self.entries.items():
            if entry.type == tarfile.LNKTYPE:
                groups.setdefault(entry.linkname, {entry.linkname}).add(path)
        return {frozenset(group) for group in groups.values()}


def read_tar(raw: bytes) -> tuple[dict[str, Entry], list[str]]:
    entries: dict[str, Entry] = {}
    order = []
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        for member in tar:
            assert member.name not in entries, f"duplicate member {member.name}"
            data = b""
            if member.isreg():
                fileobj = tar.extractfile(member)
                assert fileobj is not None
                data = fileobj.read()
            entries[member.name] = Entry(
                member.type,
                member.mode,
                member.uid,
                member.gid,
                member.mtime,
                data,
                member.linkname,
                dict(member.pax_headers),
            )
            order.append(member.name)
    return entries, order


def run(
    tmp: Path,
    layers: list[list[Member]],
    *,
    kinds: list[str] | None = None,
    policy: FlattenPolicy | None = None,
) -> Result:
    paths = []
    for i, members in enumerate(layers):
        path = tmp / f"layer{i}"
        kind = kinds[i] if kinds else "gzip"
        path.write_bytes(compress(tar_bytes(members), kind))
        paths.append(path)
    out = io.BytesIO()
    stats = flatten(paths, out, policy=policy)
    entries, order = read_tar(out.getvalue())
    return Result(entries, order, stats, out.getvalue())


def files(result: Result) -> set[str]:
    return {path for path, e in result.entries.items() if e.type != tarfile.DIRTYPE}


# --------------------------------------------------------------------------------------------
# Reading layers


@pytest.mark.parametrize("kind", ["gzip", "zstd", "none"])
def test_compression_is_detected_from_magic_bytes(tmp_path: Path, kind: str) -> None:
    members = [reg("a", b"hello"), dir_("d/"), reg("d/b", b"x" * 100_000)]
    # A misleading name: the content decides.
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(compress(tar_bytes(members), kind))
    out = io.BytesIO()
    flatten([path], out)
    entries, _ = read_tar(out.getvalue())
    assert entries["a"].data == b"hello"
    assert entries["d/b"].data == b"x" * 100_000


def test_zstd_with_several_frames(tmp_path: Path) -> None:
    raw = tar_bytes([reg("a", b"a" * 5000), reg("b", b"b" * 5000)])
    half = len(raw) // 2
    path = tmp_path / "layer"
    path.write_bytes(compress(raw[:half], "zstd") + compress(raw[half:], "zstd"))
    out = io.BytesIO()
    flatten([path], out)
    entries, _ = read_tar(out.getvalue())
    assert entries["b"].data == b"b" * 5000


def test_all_layers_compressed_alike_give_the_same_stream(tmp_path: Path) -> None:
    layers = [[reg("a", b"1"), dir_("d/")], [reg("d/x", b"2"), whiteout("a")]]
    raws = {run(tmp_path, layers, kinds=[kind] * 2).raw for kind in ("gzip", "zstd", "none")}
    assert len(raws) == 1


@pytest.mark.parametrize(
    ("data", "what"),
    [(b"\xfd7zXZ\x00" + b"\x00" * 100, "xz"), (b"BZh91AY&SY" + b"\x00" * 100, "bzip2")],
)
def test_unsupported_compression_is_an_error(tmp_path: Path, data: bytes, what: str) -> None:
    path = tmp_path / "layer"
    path.write_bytes(data)
    with pytest.raises(FlattenError, match=what) as info:
        flatten([path], io.BytesIO())
    assert isinstance(info.value, ShifterError)
    assert info.value.hint


def test_empty_layers(tmp_path: Path) -> None:
    empty_file = tmp_path / "empty"
    empty_file.write_bytes(b"")
    empty_gzip = tmp_path / "empty.gz"
    empty_gzip.write_bytes(compress(b"", "gzip"))
    empty_tar = tmp_path / "empty.tar"
    empty_tar.write_bytes(tar_bytes([]))
    base = tmp_path / "base"
    base.write_bytes(compress(tar_bytes([reg("a", b"a")]), "gzip"))
    out = io.BytesIO()
    stats = flatten([empty_file, base, empty_gzip, empty_tar], out)
    entries, _ = read_tar(out.getvalue())
    assert set(entries) == {".", "a"}
    assert stats.layers == 4
    assert stats.layers_with_data == [1]  # only the layer holding surviving data


@pytest.mark.parametrize("cut", [0.3, 0.9])
def test_truncated_layer_is_an_error(tmp_path: Path, cut: float) -> None:
    blob = compress(tar_bytes([reg("a", os.urandom(200_000))]), "gzip")
    path = tmp_path / "layer"
    path.write_bytes(blob[: int(len(blob) * cut)])
    with pytest.raises(FlattenError, match="not a valid tar archive"):
        flatten([path], io.BytesIO())


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_truncated_compressed_stream_after_the_tar_is_an_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "layer"
    path.write_bytes(compress(tar_bytes([reg("a", b"a")]), kind)[:-3])
    with pytest.raises(FlattenError, match="not a valid tar archive"):
        flatten([path], io.BytesIO())


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=3000), min_size=1, max_size=3),
    checksum=st.booleans(),
    content_size=st.booleans(),
    skippable=st.booleans(),
    cut=st.integers(min_value=0),
)
def test_zstd_frame_walker(
    chunks: list[bytes], checksum: bool, content_size: bool, skippable: bool, cut: int
) -> None:
    """Every cut of a zstd stream is detected, except between frames."""
    cctx = zstandard.ZstdCompressor(
        level=1, write_checksum=checksum, write_content_size=content_size
    )
    frames = [cctx.compress(chunk * 50) for chunk in chunks]
    if skippable:
        frames.insert(1, b"\x5a\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"hello")
    stream = b"".join(frames)
    boundaries = {0} | {len(b"".join(frames[: i + 1])) for i in range(len(frames))}
    cut %= len(stream) + 1

    def read_all(data: bytes) -> None:
        walker = _ZstdFrames(io.BytesIO(data))  # type: ignore[arg-type]
        while walker.read(7):
            pass

    if cut in boundaries:
        read_all(stream[:cut])
    else:
        with pytest.raises(EOFError):
            read_all(stream[:cut])
    with pytest.raises(zstandard.ZstdError):
        read_all(stream + b"garbage!")


def test_corrupt_header_inside_a_layer_is_an_error(tmp_path: Path) -> None:
    """tarfile alone would end the archive there and silently lose the rest."""
    raw = bytearray(tar_bytes([reg("a", b"x" * 100), reg("b", b"y"), reg("c", b"z")]))
    second = raw.index(b"b\x00")
    assert second % 512 == 0
    raw[second + 148 : second + 156] = b"0000000\x00"  # a wrong header checksum
    path = tmp_path / "layer"
    path.write_bytes(compress(bytes(raw), "gzip"))
    with pytest.raises(FlattenError, match="bad checksum"):
        flatten([path], io.BytesIO())
    path.write_bytes(bytes(raw[: second + 100]))  # ends inside a header
    with pytest.raises(FlattenError, match="truncated header"):
        flatten([path], io.BytesIO())


def test_layer_ending_between_members_or_with_trailing_data(tmp_path: Path) -> None:
    raw = tar_bytes([reg("a", b"x" * 100), reg("b", b"y")])
    path = tmp_path / "layer"
    path.write_bytes(raw[:1024])  # no end-of-archive blocks, as some writers do
    out = io.BytesIO()
    flatten([path], out)
    assert set(read_tar(out.getvalue())[0]) == {".", "a"}
    path.write_bytes(compress(raw + b"trailing garbage", "zstd"))
    out = io.BytesIO()
    flatten([path], out)
    assert set(read_tar(out.getvalue())[0]) == {".", "a", "b"}


def test_garbage_layer_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "layer"
    path.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(FlattenError, match="layer 1"):
        flatten([path], io.BytesIO())


def test_missing_layer_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FlattenError, match="cannot read layer"):
        flatten([tmp_path / "nope"], io.BytesIO())


def test_output_is_written_sequentially(tmp_path: Path) -> None:
    """``out`` may be a pipe: only write() and flush() are used."""

    class WriteOnly:
        def __init__(self) -> None:
            self.buf = bytearray()

        def write(self, data: bytes) -> int:
            self.buf += data
            return len(data)

        def flush(self) -> None:
            pass

    path = tmp_path / "layer"
    path.write_bytes(compress(tar_bytes([reg("a", b"a" * 3000), hardlink("b", "a")]), "zstd"))
    out = WriteOnly()
    flatten([path], out)  # type: ignore[arg-type]
    entries, _ = read_tar(bytes(out.buf))
    assert entries["a"].data == b"a" * 3000


def test_output_is_pax_and_deterministic(tmp_path: Path) -> None:
    layers = [[reg("é" * 60, b"x"), dir_("d/", mtime=MTIME + 0.25)]]
    first = run(tmp_path, layers).raw
    assert run(tmp_path, layers).raw == first
    assert b"ustar\x0000" in first[:512]  # POSIX ustar magic, as PAX writes it
    assert b"path=" + ("é" * 60).encode() in first  # non-ASCII names go to PAX records


# --------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a", "a"),
        ("./a", "a"),
        ("a/", "a"),
        ("/a", "a"),
        ("//a//b/", "a/b"),
        ("./a/./b", "a/b"),
        ("a/../b", "b"),
        (".", ""),
        ("./", ""),
        ("/", ""),
        ("..", None),
        ("../a", None),
        ("a/../../b", None),
        ("/../a", None),
        ("./../a", None),
    ],
)
def test_normalise(name: str, expected: str | None) -> None:
    assert normalise(name) == expected


def test_names_are_normalised(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [[reg("./a", b"1"), dir_("/d/"), reg("/d/b", b"2"), reg("d//c/", b"3"), reg("e/./f")]],
    )
    assert files(result) == {"a", "d/b", "d/c", "e/f"}
    assert result.entries["d/b"].data == b"2"


def test_escaping_members_are_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shifter_core.image.flatten")
    result = run(
        tmp_path,
        [
            [
                reg("etc/passwd", b"p"),
                reg("../escape", b"e"),
                reg("a/../../escape2", b"e"),
                dir_("../dir/"),
                symlink("../link", "etc/passwd"),
                hardlink("hl", "../etc/passwd"),
                hardlink("../hl2", "etc/passwd"),
                hardlink("hl3", "/etc/passwd"),  # absolute targets are re-rooted: kept
            ]
        ],
    )
    assert files(result) == {"etc/passwd", "hl3"}
    assert result.stats.escaping_dropped == 6
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in ("../escape", "a/../../escape2", "../dir", "../link", "hl", "../hl2"):
        assert repr(name) in warned


def test_long_and_non_ascii_names(tmp_path: Path) -> None:
    c255 = "c" * 255
    u255 = "é" * 127 + "x"
    assert len(u255.encode()) == 255
    deep = "/".join(["d" * 50] * 5) + "/f"
    raw_name = "bad-\udcff-bytes"  # a non-UTF-8 byte, as tarfile decodes it
    result = run(
        tmp_path,
        [
            [
                reg(f"long/{c255}", b"1"),
                reg(f"long/{u255}", b"2"),
                reg(deep, b"3"),
                reg("intl/日本/語.txt", b"4"),
                reg("intl/café", b"5"),
                hardlink("long/hl", f"long/{c255}"),
                symlink("long/sl", f"../long/{u255}"),
                reg(raw_name, b"6"),
            ]
        ],
    )
    assert result.data(f"long/{c255}") == b"1"
    assert result.data(f"long/{u255}") == b"2"
    assert result.data(deep) == b"3"
    assert result.data("intl/日本/語.txt") == b"4"
    assert result.data("intl/café") == b"5"
    assert result.entries["long/hl"].linkname == f"long/{c255}"
    assert result.entries["long/sl"].linkname == f"../long/{u255}"
    assert result.data(raw_name) == b"6"
    assert "intl/日本" in result.entries


# --------------------------------------------------------------------------------------------
# Whiteouts


def test_whiteout_removes_a_file_and_a_subtree(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [
            [reg("f", b"f"), dir_("d/"), dir_("d/sub/"), reg("d/sub/x"), reg("keep")],
            [whiteout("f"), whiteout("d"), whiteout("missing"), whiteout("no/such/dir")],
        ],
    )
    assert set(result.entries) == {".", "keep"}
    assert result.stats.whiteouts == 4
    assert not any(".wh." in path for path in result.entries)


def test_whiteout_only_hides_lower_layers(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [
            [reg("a", b"lower"), dir_("d/"), reg("d/lower")],
            # The same layer's own entries survive its whiteouts, in either order.
            [
                reg("a", b"upper"),
                whiteout("a"),
                whiteout("d"),
                reg("d/upper"),
                reg("b"),
                whiteout("b"),
            ],
        ],
    )
    assert result.data("a") == b"upper"
    assert files(result) == {"a", "b", "d/upper"}


def test_whiteout_then_recreate_in_next_layer(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [
            [dir_("d/", mode=0o700), reg("d/old")],
            [whiteout("d")],
            [reg("d/new", b"n")],
        ],
    )
    assert files(result) == {"d/new"}
    assert result.entries["d"].mode == 0o755  # implicit again
    assert result.entries["d"].mtime == 0


def test_opaque_directory(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [
            [
                dir_("o/", mode=0o750, mtime=MTIME),
                reg("o/lower"),
                dir_("o/sub/"),
                reg("o/sub/x"),
                reg("outside"),
            ],
            [reg("o/before", b"b"), opaque("o"), reg("o/after", b"a"), reg("o/sub/y")],
        ],
    )
    assert files(result) == {"o/before", "o/after", "o/sub/y", "outside"}
    # The directory itself stays, with its metadata (a+rX applied).
    assert result.entries["o"].mode == 0o755
    assert result.entries["o"].mtime == MTIME
    # o/sub was hidden before o/sub/y re-created it: it is implicit now.
    assert result.entries["o/sub"].mtime == 0
    assert result.stats.whiteouts == 1


def test_opaque_keeps_same_layer_subtrees_created_before_it(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [
            [dir_("o/"), dir_("o/sub/", mtime=MTIME + 5), reg("o/sub/x")],
            [reg("o/sub/y"), opaque("o")],
        ],
    )
    # o/sub holds a same-layer entry, so it survives (like umoci), minus its lower child.
    assert files(result) == {"o/sub/y"}
    assert result.entries["o/sub"].mtime == MTIME + 5


def test_aufs_metadata_is_ignored(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [[reg("a"), dir_(".wh..wh.plnk/"), reg(".wh..wh.plnk/123.456"), reg(".wh..wh.aufs")]],
    )
    assert files(result) == {"a"}


@pytest.mark.parametrize("name", ["d/.wh.", "./.wh.", ".wh./"])
def test_whiteout_with_an_empty_name_refuses_the_layer(tmp_path: Path, name: str) -> None:
    """As umoci does: such a layer is invalid, in either strategy, and says where."""
    bad = [dir_("d/"), reg(name)]
    message = f"layer 2: the whiteout {name!r} has an empty name"
    with pytest.raises(FlattenError, match=re.escape(message)):
        run(tmp_path, [[reg("a")], bad])
    path = tmp_path / "single.gz"
    path.write_bytes(compress(tar_bytes(bad), "gzip"))
    message = f"layer 1: the whiteout {name!r} has an empty name"
    with pytest.raises(FlattenError, match=re.escape(message)):
        flatten_one_pass(path, io.BytesIO())


def test_whiteout_with_an_empty_name_fails_the_conversion(tmp_path: Path) -> None:
    if shutil.which("tar2sqfs") is None:
        pytest.skip("needs tar2sqfs")
    path = tmp_path / "layer.gz"
    path.write_bytes(compress(tar_bytes([reg("a", b"a"), reg(".wh.")]), "gzip"))
    image = tmp_path / "image.sqfs"
    with pytest.raises(FlattenError, match="empty name") as info:
        layers_to_squashfs([path], image, spool_dir=tmp_path)
    assert isinstance(info.value, ShifterError) and info.value.hint
    assert not image.exists()


# --------------------------------------------------------------------------------------------
# Replacement and directories


def test_file_replaces_directory_and_directory_replaces_file(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [
            [dir_("d/"), reg("d/x"), dir_("d/sub/"), reg("d/sub/y"), reg("f", b"file")],
            [reg("d", b"now a file"), dir_("f/", mode=0o711), reg("f/child")],
        ],
    )
    assert files(result) == {"d", "f/child"}
    assert result.entries["d"].type == tarfile.REGTYPE
    assert result.entries["f"].type == tarfile.DIRTYPE
    assert result.entries["f"].mode == 0o755


def test_symlink_replaced_by_directory_and_file(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [
            [
                dir_("real/"),
                reg("real/x"),
                symlink("s1", "real"),
                symlink("s2", "real"),
                symlink("s3", "real"),
            ],
            [dir_("s1/"), reg("s1/y"), reg("s2", b"file"), reg("s3/z")],
        ],
    )
    # Symlinks are never followed: s3/z makes s3 a directory, real/ is untouched.
    assert files(result) == {"real/x", "s1/y", "s2", "s3/z"}
    assert result.entries["s3"].type == tarfile.DIRTYPE


def test_directory_update_keeps_children(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [
            [dir_("d/", mode=0o700, uid=5, mtime=MTIME), reg("d/x")],
            [dir_("d/", mode=0o750, uid=7, gid=8, mtime=MTIME + 9)],
            [reg("d/y")],  # an implicit parent does not change the metadata
        ],
    )
    assert files(result) == {"d/x", "d/y"}
    d = result.entries["d"]
    assert (d.mode, d.uid, d.gid, d.mtime) == (0o755, 7, 8, MTIME + 9)


def test_implicit_directories_and_root(tmp_path: Path) -> None:
    result = run(tmp_path, [[reg("a/b/c/f")]])
    assert result.order[:4] == [".", "a", "a/b", "a/b/c"]
    for path in (".", "a", "a/b", "a/b/c"):
        e = result.entries[path]
        assert (e.type, e.mode, e.uid, e.gid, e.mtime) == (tarfile.DIRTYPE, 0o755, 0, 0, 0)
    with_root = run(tmp_path, [[dir_("./", mode=0o700, uid=3, mtime=MTIME)], [reg("x")]])
    root = with_root.entries["."]
    assert (root.mode, root.uid, root.mtime) == (0o755, 3, MTIME)
    assert b"./" in with_root.raw[:100]  # tar2sqfs takes "./" as the root inode


def test_non_directory_root_is_dropped(tmp_path: Path) -> None:
    result = run(tmp_path, [[reg("./", b"x"), reg("a")]])
    assert files(result) == {"a"}
    assert result.stats.other_dropped == 1


# --------------------------------------------------------------------------------------------
# Hardlinks


def test_hardlink_in_the_same_layer(tmp_path: Path) -> None:
    result = run(tmp_path, [[reg("a", b"data", mode=0o700), hardlink("b", "a")]])
    assert result.entries["a"].type == tarfile.REGTYPE
    assert result.entries["b"].type == tarfile.LNKTYPE
    assert result.entries["b"].linkname == "a"
    assert result.order.index("a") < result.order.index("b")
    assert result.stats.files == 1
    assert result.stats.hardlinks == 1
    assert result.stats.bytes == 4


def test_hardlink_to_a_lower_layer(tmp_path: Path) -> None:
    result = run(tmp_path, [[reg("a", b"lower")], [hardlink("b", "a")]])
    assert result.groups() == {frozenset({"a", "b"})}
    assert result.data("b") == b"lower"


def test_hardlink_original_whited_out(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [
            [reg("a", b"content", mode=0o640, uid=9, mtime=MTIME + 1)],
            [hardlink("b", "a")],
            [whiteout("a")],
        ],
    )
    assert set(files(result)) == {"b"}
    b = result.entries["b"]
    assert (b.type, b.data, b.mode, b.uid, b.mtime) == (
        tarfile.REGTYPE,
        b"content",
        0o644,
        9,
        MTIME + 1,
    )
    assert result.stats.layers_with_data == [0]  # the data comes from the layer that holds it


def test_hardlink_original_replaced(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [
            [reg("a", b"old"), hardlink("b", "a")],
            [hardlink("c", "a")],
            [reg("a", b"new")],
        ],
    )
    assert result.data("a") == b"new"
    assert result.data("b") == b"old"
    assert result.data("c") == b"old"
    assert result.groups() == {frozenset({"b", "c"})}
    assert result.entries["b"].type == tarfile.REGTYPE  # the first surviving name


def test_hardlink_original_replaced_by_directory(tmp_path: Path) -> None:
    result = run(tmp_path, [[reg("a", b"x"), hardlink("b", "a")], [dir_("a/"), reg("a/in")]])
    assert result.data("b") == b"x"
    assert result.entries["b"].type == tarfile.REGTYPE


def test_hardlink_relinked_in_a_later_layer(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [[reg("a", b"A"), reg("z", b"Z"), hardlink("b", "a")], [hardlink("b", "z")]],
    )
    assert result.groups() == {frozenset({"b", "z"})}
    assert result.data("b") == b"Z"
    assert result.data("a") == b"A"


def test_hardlink_chain_and_order(tmp_path: Path) -> None:
    result = run(tmp_path, [[reg("z", b"1"), hardlink("a", "z"), hardlink("m", "a")]])
    # The file is written under the name created first, the others link to it.
    assert result.entries["z"].type == tarfile.REGTYPE
    assert {result.entries[p].linkname for p in ("a", "m")} == {"z"}


def test_invalid_hardlinks_are_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shifter_core.image.flatten")
    result = run(
        tmp_path,
        [
            [
                dir_("d/"),
                hardlink("to-dir", "d"),
                hardlink("dangling", "nope"),
                hardlink("forward", "later"),
                reg("later"),
            ]
        ],
    )
    assert files(result) == {"later"}
    assert result.stats.other_dropped == 3
    assert "does not exist" in caplog.text
    assert "is a directory" in caplog.text


def test_hardlink_to_symlink_and_empty_file(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [[symlink("s", "/target"), hardlink("s2", "s"), reg("e"), hardlink("e2", "e")]],
    )
    assert result.entries["s"].type == tarfile.SYMTYPE
    assert result.entries["s2"].linkname == "s"
    assert result.groups() == {frozenset({"s", "s2"}), frozenset({"e", "e2"})}
    assert result.stats.layers_with_data == []  # nothing with data


def test_zero_size_files_and_big_files(tmp_path: Path) -> None:
    big = os.urandom(3 * 1024 * 1024 + 17)
    result = run(tmp_path, [[reg("empty"), reg("big", big)]], kinds=["zstd"])
    assert result.data("empty") == b""
    assert hashlib.sha256(result.data("big")).digest() == hashlib.sha256(big).digest()
    assert result.stats.bytes == len(big)


# --------------------------------------------------------------------------------------------
# Symlinks


def test_symlinks_are_kept_verbatim(tmp_path: Path) -> None:
    targets = {
        "rel": "../etc/passwd",
        "abs": "/etc/passwd",
        "esc": "../../../../../../etc/shadow",
        "dot": "./x/../y//z/",
        "long": "t" * 300,
        "dangling": "does/not/exist",
    }
    result = run(tmp_path, [[symlink(f"l/{name}", target) for name, target in targets.items()]])
    for name, target in targets.items():
        entry = result.entries[f"l/{name}"]
        assert entry.type == tarfile.SYMTYPE
        assert entry.linkname == target
    assert result.stats.symlinks == len(targets)


def test_symlinked_parent_is_not_followed(tmp_path: Path) -> None:
    result = run(tmp_path, [[dir_("usr/lib/"), symlink("lib", "usr/lib")], [reg("lib/x", b"x")]])
    assert files(result) == {"lib/x"}
    assert "usr/lib/x" not in result.entries


# --------------------------------------------------------------------------------------------
# Policy


def _both(tmp: Path, members: list[Member], policy: FlattenPolicy | None = None) -> list[Result]:
    """One layer flattened by each strategy (the one pass must manage it)."""
    path = tmp / "both.gz"
    path.write_bytes(compress(tar_bytes(members), "gzip"))
    out = io.BytesIO()
    stats = flatten_one_pass(path, out, policy=policy)
    one = Result(*read_tar(out.getvalue()), stats, out.getvalue())
    return [one, run(tmp, [members], policy=policy)]


def test_devices_are_dropped_and_fifos_kept(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [
            [
                dir_("dev/"),
                chardev("dev/null"),
                blockdev("dev/loop0"),
                fifo("dev/fifo", mode=0o600),
                hardlink("dev/null2", "dev/null"),
                hardlink("dev/fifo2", "dev/fifo"),
                chardev("dev/gone"),
                fifo("dev/gone-fifo"),
            ],
            [whiteout("dev/gone"), whiteout("dev/gone-fifo")],
        ],
    )
    assert set(result.entries) == {".", "dev", "dev/fifo", "dev/fifo2"}
    fifo_entry = result.entries["dev/fifo"]
    assert fifo_entry.type == tarfile.FIFOTYPE
    assert fifo_entry.mode == 0o644  # a+r, no execute
    assert (fifo_entry.uid, fifo_entry.gid, fifo_entry.mtime) == (0, 0, MTIME)
    assert result.entries["dev/fifo2"].type == tarfile.LNKTYPE
    assert result.entries["dev/fifo2"].linkname == "dev/fifo"
    assert result.stats.devices_dropped == 3
    assert (result.stats.fifos, result.stats.hardlinks, result.stats.devices) == (1, 1, 0)


def test_fifos_are_kept_by_both_strategies(tmp_path: Path) -> None:
    members = [
        dir_("run/"),
        fifo("run/p"),
        hardlink("run/q", "run/p"),
        chardev("run/null"),
        reg("run/f", b"data"),
    ]
    one, two = _both(tmp_path, members)
    assert one.entries == two.entries
    one.stats.layers_with_data = two.stats.layers_with_data = []  # the one pass keeps none
    assert one.stats == two.stats
    assert two.entries["run/p"].type == tarfile.FIFOTYPE
    assert two.entries["run/q"].linkname == "run/p"
    assert "run/null" not in two.entries
    assert (two.stats.fifos, two.stats.devices_dropped) == (1, 1)


def test_devices_can_be_kept(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [[chardev("null", 1, 3), fifo("p")]],
        policy=FlattenPolicy(keep_devices=True),
    )
    assert result.entries["null"].type == tarfile.CHRTYPE
    assert result.entries["p"].type == tarfile.FIFOTYPE
    assert (result.stats.devices, result.stats.fifos) == (1, 1)


@pytest.mark.skipif(
    shutil.which("tar2sqfs") is None or shutil.which("unsquashfs") is None,
    reason="needs squashfs-tools-ng and squashfs-tools",
)
@pytest.mark.parametrize("layers", [1, 2], ids=["one pass", "two passes"])
def test_fifos_reach_the_squashfs(tmp_path: Path, layers: int) -> None:
    """tar2sqfs (``--no-skip``) takes a FIFO, and the image holds it as a FIFO."""
    members = [dir_("run/"), fifo("run/p", mode=0o640), hardlink("run/q", "run/p")]
    paths = []
    for index, layer in enumerate([members, [reg("f", b"x")]][:layers]):
        paths.append(tmp_path / f"layer{index}")
        paths[-1].write_bytes(compress(tar_bytes(layer), "gzip"))
    image = tmp_path / "image.sqfs"
    layers_to_squashfs(paths, image, spool_dir=tmp_path)
    listing = subprocess.run(
        ["unsquashfs", "-lln", str(image)], capture_output=True, text=True, check=True
    ).stdout
    fifos = {
        line.split()[-1].removeprefix("squashfs-root/"): line.split()[0]
        for line in listing.splitlines()
        if line.startswith("p")
    }
    assert fifos == {"run/p": "prw-r--r--", "run/q": "prw-r--r--"}


def test_xattrs_are_dropped(tmp_path: Path) -> None:
    xattrs = {"security.capability": CAP_NET_BIND_SERVICE.decode("latin-1"), "user.x": "v"}
    layers = [[reg("ping", b"p", mode=0o755, xattrs=xattrs), dir_("d/")]]
    layers[0][1][0].pax_headers["SCHILY.xattr.user.d"] = "dir xattr"
    result = run(tmp_path, layers)
    for entry in result.entries.values():
        assert not any(key.startswith("SCHILY.") for key in entry.pax)
    assert b"SCHILY" not in result.raw
    kept = run(tmp_path, layers, policy=FlattenPolicy(keep_xattrs=True))
    assert kept.entries["ping"].pax["SCHILY.xattr.user.x"] == "v"


@pytest.mark.parametrize(
    ("kind", "mode", "expected"),
    [
        ("file", 0o600, 0o644),
        ("file", 0o000, 0o444),
        ("file", 0o700, 0o755),
        ("file", 0o100, 0o555),
        ("file", 0o4755, 0o4755),  # setuid kept: images are mounted nosuid
        ("file", 0o2711, 0o2755),
        ("file", 0o6700, 0o6755),
        ("file", 0o1600, 0o1644),
        ("dir", 0o700, 0o755),
        ("dir", 0o000, 0o555),
        ("dir", 0o1777, 0o1777),
        ("dir", 0o2750, 0o2755),
    ],
)
def test_modes_get_a_plus_rX(tmp_path: Path, kind: str, mode: int, expected: int) -> None:
    member = reg("x", b"x", mode=mode) if kind == "file" else dir_("x/", mode=mode)
    result = run(tmp_path, [[member]])
    assert result.entries["x"].mode == expected
    off = run(tmp_path, [[member]], policy=FlattenPolicy(world_readable=False))
    assert off.entries["x"].mode == mode


def test_setid_bits_can_be_dropped(tmp_path: Path) -> None:
    result = run(tmp_path, [[reg("su", mode=0o6755)]], policy=FlattenPolicy(keep_setid=False))
    assert result.entries["su"].mode == 0o755


def test_ownership_and_times_are_kept(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [
            [
                dir_("home/u/", mode=0o700, uid=1000, gid=1000, mtime=MTIME + 2),
                reg("home/u/secret", b"s", mode=0o600, uid=1000, gid=1000, mtime=MTIME + 3),
                reg("big", uid=100_000_000, gid=3_000_000_000),
                reg("frac", mtime=MTIME + 0.5),
                symlink("sl", "x", uid=4, gid=5, mtime=MTIME + 4),
            ]
        ],
    )
    e = result.entries
    assert (e["home/u"].uid, e["home/u"].gid, e["home/u"].mtime) == (1000, 1000, MTIME + 2)
    assert (e["home/u/secret"].mode, e["home/u/secret"].uid) == (0o644, 1000)
    assert e["home/u/secret"].mtime == MTIME + 3
    assert (e["big"].uid, e["big"].gid) == (100_000_000, 3_000_000_000)
    assert e["frac"].mtime == MTIME + 0.5
    assert (e["sl"].uid, e["sl"].gid, e["sl"].mtime) == (4, 5, MTIME + 4)
    with tarfile.open(fileobj=io.BytesIO(result.raw)) as tar:
        assert {(m.uname, m.gname) for m in tar} == {("", "")}  # numeric ownership only


# --------------------------------------------------------------------------------------------
# Order


def test_emission_order(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [
            [reg("z/file", b"1"), symlink("a/link", "x"), dir_("m/"), reg("b", b"2")],
            [reg("c", b"3"), hardlink("a/hl", "z/file")],
        ],
    )
    kinds = [result.entries[p].type for p in result.order]
    n_dirs = kinds.count(tarfile.DIRTYPE)
    assert set(kinds[:n_dirs]) == {tarfile.DIRTYPE}  # directories first
    assert result.order[:n_dirs] == [".", "a", "m", "z"]  # root, then sorted by path
    assert result.order[n_dirs] == "a/link"  # then entries without data
    # then files with data in layer and member order, links right after their file
    assert result.order[n_dirs + 1 :] == ["z/file", "a/hl", "b", "c"]


# --------------------------------------------------------------------------------------------
# Model-based: random layers against a simple path-keyed model of the rules


NAMES = ["a", "b", "c"]
paths_st = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
ops_st = st.one_of(
    st.tuples(
        st.just("file"),
        paths_st,
        st.sampled_from([b"1", b"22", b"", b"333"]),
        st.sampled_from([0o600, 0o644, 0o755]),
    ),
    st.tuples(st.just("dir"), paths_st, st.sampled_from([0o700, 0o755, 0o750])),
    st.tuples(st.just("symlink"), paths_st, st.sampled_from(["a", "/abs", "../../up"])),
    st.tuples(st.just("hardlink"), paths_st, paths_st),
    st.tuples(st.just("whiteout"), paths_st),
    st.tuples(st.just("opaque"), paths_st),
    st.tuples(st.just("device"), paths_st),
)
layers_st = st.lists(st.lists(ops_st, max_size=8), min_size=1, max_size=4)


class Model:
    """The final tree as a dict ``path -> node``; a node is a dict (kind, touched, inode...)."""

    def __init__(self) -> None:
        self.tree: dict[str, dict] = {}
        self.inodes = 0

    def subtree(self, path: str) -> list[str]:
        return [p for p in self.tree if p == path or p.startswith(path + "/")]

    def drop(self, path: str) -> None:
        for p in self.subtree(path):
            del self.tree[p]

    def parents(self, path: str, layer: int) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            node = self.tree.get(parent)
            if node is None or node["kind"] != "dir":
                self.drop(parent)
                self.tree[parent] = {"kind": "dir", "mode": 0o755, "touched": layer}
            else:
                node["touched"] = layer

    def put(self, path: str, node: dict, layer: int) -> None:
        self.parents(path, layer)
        old = self.tree.get(path)
        if node["kind"] == "dir" and old is not None and old["kind"] == "dir":
            old.update(node, touched=layer)
            return
        self.drop(path)
        self.tree[path] = dict(node, touched=layer)

    def new_inode(self) -> int:
        self.inodes += 1
        return self.inodes

    def remove_lower(self, paths: list[str], layer: int) -> None:
        for p in sorted(paths):
            if p in self.tree and self.tree[p]["touched"] != layer:
                self.drop(p)

    def apply(self, layer: int, op: tuple) -> Member | None:
        kind, path = op[0], op[1]
        if kind == "file":
            self.put(
                path,
                {"kind": "file", "data": op[2], "mode": op[3], "inode": self.new_inode()},
                layer,
            )
            return reg(path, op[2], mode=op[3])
        if kind == "dir":
            self.put(path, {"kind": "dir", "mode": op[2]}, layer)
            return dir_(path + "/", mode=op[2])
        if kind == "symlink":
            self.put(path, {"kind": "symlink", "target": op[2], "inode": self.new_inode()}, layer)
            return symlink(path, op[2])
        if kind == "device":
            self.put(path, {"kind": "device", "inode": self.new_inode()}, layer)
            return chardev(path)
        if kind == "hardlink":
            target = self.tree.get(op[2])
            if target is not None and target["kind"] != "dir":
                self.put(path, {k: v for k, v in target.items() if k != "touched"}, layer)
            return hardlink(path, op[2])
        if kind == "whiteout":
            self.remove_lower(self.subtree(path), layer)
            return whiteout(path)
        # opaque
        if path in self.tree and self.tree[path]["kind"] == "dir":
            self.remove_lower([p for p in self.subtree(path) if p != path], layer)
        return opaque(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=layers_st,
    kinds=st.lists(st.sampled_from(["gzip", "zstd", "none"]), min_size=4, max_size=4),
)
def test_random_layers_match_the_model(layers: list[list[tuple]], kinds: list[str]) -> None:
    model = Model()
    tar_layers = []
    for index, ops in enumerate(layers):
        tar_layers.append([m for m in (model.apply(index, op) for op in ops) if m is not None])
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(tmp), tar_layers, kinds=kinds)

    expected = {p: n for p, n in model.tree.items() if n["kind"] != "device"}
    assert set(result.entries) - {"."} == set(expected)
    groups: dict[int, set[str]] = {}
    for path, node in expected.items():
        entry = result.entries[path]
        if node["kind"] == "dir":
            assert entry.type == tarfile.DIRTYPE, path
            assert entry.mode == node["mode"] | 0o555, path
        elif node["kind"] == "file":
            assert result.data(path) == node["data"], path
            mode = node["mode"] | 0o444
            assert entry.mode == (mode | 0o111 if mode & 0o111 else mode), path
            groups.setdefault(node["inode"], set()).add(path)
        else:
            target = entry if entry.type == tarfile.SYMTYPE else result.entries[entry.linkname]
            assert target.type == tarfile.SYMTYPE, path
            assert target.linkname == node["target"], path
            groups.setdefault(node["inode"], set()).add(path)
    assert result.groups() == {frozenset(g) for g in groups.values() if len(g) > 1}
    # Parents always precede their children.
    seen = set()
    for path in result.order:
        parent = path.rpartition("/")[0] or "."
        assert path == "." or parent in seen, path
        seen.add(path)
    assert all(".wh." not in path for path in result.entries)
    assert all(stat.S_IMODE(e.mode) == e.mode for e in result.entries.values())


def test_gnu_sparse_file_is_written_expanded(tmp_path: Path) -> None:
    import gzip

    if shutil.which("tar") is None:
        pytest.skip("needs GNU tar")
    tree = tmp_path / "tree"
    tree.mkdir()
    sparse = tree / "sparse.img"
    with open(sparse, "wb") as fh:
        fh.seek(3 << 20)
        fh.write(b"middle")
        fh.truncate(8 << 20)
    (tree / "after").write_bytes(b"next member\n")
    layer = tmp_path / "layer.tar"
    subprocess.run(["tar", "--sparse", "-C", str(tree), "-cf", str(layer), "."], check=True)
    with tarfile.open(layer) as check:
        assert check.getmember("./sparse.img").issparse()  # really a GNU sparse member
    compressed = tmp_path / "layer.tar.gz"
    compressed.write_bytes(gzip.compress(layer.read_bytes()))
    out = tmp_path / "flat.tar"
    with open(out, "wb") as fh:
        flatten([compressed], fh)
    with tarfile.open(out) as result:
        data = result.extractfile("sparse.img")
        assert data is not None
        content = data.read()
        after = result.extractfile("after")
        assert after is not None and after.read() == b"next member\n"
    assert content == sparse.read_bytes()


# --------------------------------------------------------------------------------------------
# One pass (single-layer images) against two


_NAMES = st.sampled_from(["a", "b", "a/b", "a/c", "b/d", "a/b/e", "./a", "/b/x", "c", ".wh.a"])
_MEMBER = st.one_of(
    st.builds(lambda n, d, m: reg(n, d, mode=m), _NAMES, st.binary(max_size=600),
              st.sampled_from([0o644, 0o4755, 0o600])),
    st.builds(lambda n: dir_(n, mode=0o700), _NAMES),
    st.builds(symlink, _NAMES, st.sampled_from(["a", "/etc", "../../x"])),
    st.builds(hardlink, _NAMES, _NAMES),
    st.builds(lambda n: fifo(n), _NAMES),
    st.builds(whiteout, _NAMES),
    st.builds(opaque, st.sampled_from(["a", "b"])),
)  # fmt: skip


def _one_pass(tmp: Path, members: list[Member], kind: str) -> Result | None:
    path = tmp / f"one.{kind}"
    path.write_bytes(compress(tar_bytes(members), kind))
    out = io.BytesIO()
    try:
        stats = flatten_one_pass(path, out)
    except OnePassImpossible:
        return None
    entries, order = read_tar(out.getvalue())
    return Result(entries, order, stats, out.getvalue())


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(members=st.lists(_MEMBER, max_size=8), kind=st.sampled_from(["gzip", "zstd", "none"]))
def test_one_pass_writes_what_two_passes_write(tmp_path: Path, members, kind) -> None:
    """Whenever a single layer can be written in one pass, the tree is flatten()'s: the same
    entries with the same metadata, content and hardlink groups, and the same counts."""
    one = _one_pass(tmp_path, members, kind)
    two = run(tmp_path, [members], kinds=[kind])
    event("one pass" if one is not None else "two passes needed")
    if one is None:
        return
    assert one.entries == two.entries
    assert one.order[0] == "." and set(one.order) == set(two.order)
    one.stats.layers_with_data = two.stats.layers_with_data = []
    assert one.stats == two.stats


def test_one_pass_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    cases = {
        "twice": [reg("a", b"1"), reg("a", b"2")],
        "late": [reg("d/f", b"1"), dir_("d")],
        "below a non-directory": [reg("d", b"1"), reg("d/f", b"2")],
        "root": [reg("x"), dir_(".")],
    }
    for why, members in cases.items():
        assert _one_pass(tmp_path, members, "gzip") is None, why
    assert _one_pass(tmp_path, [reg("a", b"1"), dir_("b"), reg("b/c", b"2")], "gzip") is not None


def test_one_pass_fails_on_a_corrupt_layer(tmp_path: Path) -> None:
    data = compress(tar_bytes([reg("a", b"x" * 5000)]), "gzip")
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FlattenError, match="not a valid tar archive"):
        flatten_one_pass(path, io.BytesIO())
