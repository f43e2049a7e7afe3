"""Resolving container paths inside an image tree, making mount points, identity files."""

from __future__ import annotations

import os
import stat

import pytest

from shifter_core.runtime.errors import VolumeError
from shifter_core.runtime.identity import group_file, passwd_file
from shifter_core.runtime.paths import make_path, read_image_file, resolve_in_root, write_file
from shifter_core.runtime.plan import User


@pytest.fixture
def image(tmp_path):
    """A small image tree with the symlinks a hostile image could hold."""
    root = tmp_path / "image"
    for d in ("usr/lib", "opt/app", "data", "etc"):
        (root / d).mkdir(parents=True)
    (root / "usr/lib").chmod(0o751)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nalice:x:5:5::/:/bin/sh\n")
    (root / "file").write_text("x")
    os.symlink("/etc", root / "etc-link")
    os.symlink("../..", root / "up")
    os.symlink("../../../etc", root / "opt/app/escape")
    os.symlink("usr/lib", root / "lib")
    os.symlink("/usr/lib", root / "opt/abs-lib")
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    os.symlink("/nonexistent/dir", root / "dangling")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    yield root, fd
    os.close(fd)


@pytest.mark.parametrize(
    "path, resolved, missing, kind",
    [
        ("/usr/lib", "/usr/lib", (), "dir"),
        ("/lib/x/y", "/usr/lib/x/y", ("x", "y"), None),
        ("/opt/abs-lib/z", "/usr/lib/z", ("z",), None),
        ("/etc-link/x", "/etc/x", ("x",), None),  # the caller refuses /etc
        ("/a/b/c", "/a/b/c", ("a", "b", "c"), None),
        ("/dangling/sub", "/nonexistent/dir/sub", ("nonexistent", "dir", "sub"), None),
        ("/", "/", (), "dir"),
        ("/file", "/file", (), "file"),
        ("/usr/./lib/", "/usr/lib", (), "dir"),
    ],
)
def test_resolution_stays_inside(image, path, resolved, missing, kind):
    _, fd = image
    result = resolve_in_root(fd, path, "volume X")
    assert (result.path, result.missing, result.kind) == (resolved, missing, kind)


@pytest.mark.parametrize("path", ["/up", "/up/etc", "/opt/app/escape/x"])
def test_escaping_symlinks_are_refused(image, path):
    _, fd = image
    with pytest.raises(VolumeError, match=r"volume X: .* leads outside the container through"):
        resolve_in_root(fd, path, "volume X")


def test_symlink_loops_and_files_in_the_middle(image):
    _, fd = image
    with pytest.raises(VolumeError, match="too many levels of symlinks"):
        resolve_in_root(fd, "/loop1/x", "v")
    with pytest.raises(VolumeError, match="/file is not a directory in the image"):
        resolve_in_root(fd, "/file/x", "v")


def test_make_path_mirrors_the_image(image, tmp_path):
    _, lower = image
    upper = tmp_path / "upper"
    upper.mkdir()
    ufd = os.open(upper, os.O_PATH | os.O_DIRECTORY)
    try:
        make_path(ufd, "/usr/lib/new/deep", "dir", mirror_fd=lower)
        make_path(ufd, "/data/file", "file", mirror_fd=lower)
        make_path(ufd, "/data/file", "file", mirror_fd=lower)  # idempotent
        write_file(ufd, "/etc/passwd", b"new\n", 0o644, mirror_fd=lower)
        write_file(ufd, "/etc/passwd", b"newer\n", 0o644, mirror_fd=lower)
    finally:
        os.close(ufd)
    assert stat.S_IMODE((upper / "usr/lib").stat().st_mode) == 0o751
    assert stat.S_IMODE((upper / "usr/lib/new").stat().st_mode) == 0o755
    assert (upper / "usr/lib/new/deep").is_dir()
    assert (upper / "data/file").is_file()
    assert (upper / "etc/passwd").read_text() == "newer\n"


def test_make_path_refuses_symlinks_in_the_upper_layer(tmp_path):
    upper = tmp_path / "upper"
    upper.mkdir()
    os.symlink("/", upper / "evil")
    ufd = os.open(upper, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(VolumeError, match="/evil is not a directory"):
            make_path(ufd, "/evil/x", "dir")
    finally:
        os.close(ufd)
    assert not os.path.exists("/x")


def test_read_image_file_resolves_inside(image):
    _, fd = image
    assert read_image_file(fd, "/etc/passwd").startswith("root:")
    assert read_image_file(fd, "/etc-link/passwd").startswith("root:")
    assert read_image_file(fd, "/up/etc/passwd") == ""
    assert read_image_file(fd, "/nope") == ""


USER = User(
    1001,
    1002,
    (1002, 1001, 4242),
    "alice",
    "/home/alice",
    "/bin/bash",
    "Alice A",
    ((1002, "alice"), (1001, "science")),
)


def test_passwd_keeps_the_image_and_adds_the_user():
    text = passwd_file(
        "root:x:0:0:root:/root:/bin/sh\nalice:x:5:5::/:/bin/sh\nx:x:1001:1::/:/bin/sh\nbad\n",
        USER,
        "/bin/sh",
    )
    assert text.splitlines() == [
        "root:x:0:0:root:/root:/bin/sh",
        "alice:x:1001:1002:Alice A:/home/alice:/bin/sh",
    ]


def test_group_adds_the_users_groups_and_nogroup():
    text = group_file("root:x:0:\nscience:x:7:\nold:x:1002:\nusers:x:100:\n", USER, 65534)
    assert text.splitlines() == [
        "root:x:0:",
        "users:x:100:",
        "alice:x:1002:",
        "science:x:1001:alice",
        "nogroup:x:65534:",
    ]
    assert group_file("nogroup:x:65534:\n", USER, 65534).count("65534") == 1
