"""POSIX ACLs of private images in the store: the xattr encoding, and what the kernel makes
of it (on the file system of pytest's tmp_path; skipped where it has no ACLs)."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import struct
from pathlib import Path

import pytest

from shifter_core.image import store as store_mod
from shifter_core.image.store import (
    ACL_XATTR,
    Acl,
    ImageMetadata,
    ImageStore,
    decode_posix_acl,
    encode_posix_acl,
    set_image_access,
)

UNDEFINED = 0xFFFFFFFF
IMAGE_ID = "ab" * 32


def entry(tag: int, perm: int, id: int = UNDEFINED) -> bytes:
    return struct.pack("<HHI", tag, perm, id)


def test_encoding_is_the_kernels_version_2_format_sorted_by_tag_then_id() -> None:
    data = encode_posix_acl(Acl(users=(1001, 5, 1001), groups=(2000, 1001)))
    assert data == b"".join(
        [
            b"\x02\x00\x00\x00",  # version 2, little-endian
            entry(0x01, 6),  # USER_OBJ rw-: the gateway
            entry(0x02, 4, 5),  # USER r--, by id, duplicates dropped
            entry(0x02, 4, 1001),
            entry(0x04, 0),  # GROUP_OBJ ---
            entry(0x08, 4, 1001),  # GROUP r--
            entry(0x08, 4, 2000),
            entry(0x10, 4),  # MASK r--
            entry(0x20, 0),  # OTHER ---
        ]
    )
    assert decode_posix_acl(data)[1] == (0x02, 4, 5)


def test_an_empty_acl_is_mode_0600_without_a_mask() -> None:
    assert decode_posix_acl(encode_posix_acl(Acl())) == [
        (0x01, 6, UNDEFINED),
        (0x04, 0, UNDEFINED),
        (0x20, 0, UNDEFINED),
    ]


@pytest.mark.parametrize("data", [b"", b"\x01\x00\x00\x00", b"\x02\x00\x00\x00\x01\x00"])
def test_decoding_refuses_what_is_not_a_version_2_acl(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_posix_acl(data)


def _acl_of(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, ACL_XATTR)
    except OSError as err:
        if err.errno == errno.ENODATA:
            return None
        raise


@pytest.fixture
def acl_fs(tmp_path: Path) -> Path:
    """tmp_path, if its file system takes POSIX ACLs."""
    probe = tmp_path / "probe"
    probe.touch()
    try:
        os.setxattr(probe, ACL_XATTR, encode_posix_acl(Acl((12345,))))
    except OSError as err:
        if err.errno == errno.EOPNOTSUPP:
            pytest.skip(f"{tmp_path} has no POSIX ACLs")
        raise
    probe.unlink()
    return tmp_path


def test_private_files_get_the_acl_and_public_ones_lose_it(acl_fs: Path) -> None:
    path = acl_fs / "image.squashfs"
    path.write_bytes(b"x")
    path.chmod(0o644)
    acl = Acl((1001,), (1001,))
    set_image_access(path, acl)
    assert _acl_of(path) == encode_posix_acl(acl)
    # The mode's group bits show the mask; other has nothing.
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    widened = Acl((1001, 1002), (1001,))
    set_image_access(path, widened)
    assert _acl_of(path) == encode_posix_acl(widened)
    set_image_access(path, None)
    assert _acl_of(path) is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_publish_sets_the_acl_on_the_squashfs_and_the_metadata(acl_fs: Path) -> None:
    store = ImageStore(acl_fs / "images")
    acl = Acl((1001,), (1001,))
    for private in (acl, None):
        partial = store.new_partial(IMAGE_ID)
        partial.write_bytes(b"squashfs")
        meta = ImageMetadata(IMAGE_ID, "docker.io/x/y:1", "sha256:" + IMAGE_ID, "linux/amd64")
        store.publish(dataclasses.replace(meta, acl=private), partial)
        for path in (store.image_file(IMAGE_ID), store.metadata_file(IMAGE_ID)):
            mode = stat.S_IMODE(path.stat().st_mode)
            if private:
                assert _acl_of(path) == encode_posix_acl(acl) and mode == 0o640, path
            else:
                assert _acl_of(path) is None and mode == 0o644, path


def test_without_acl_support_private_files_stay_0600_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unsupported(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(store_mod.os, "setxattr", unsupported)
    monkeypatch.setattr(store_mod, "_acl_unsupported_warned", False)
    caplog.set_level(logging.WARNING, logger="shifter_core.image.store")
    for name in ("a", "b"):
        path = tmp_path / name
        path.write_bytes(b"x")
        path.chmod(0o644)
        set_image_access(path, Acl((1001,)))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    warnings = [r for r in caplog.records if "cannot set POSIX ACLs" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
