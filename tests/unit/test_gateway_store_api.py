"""The gateway changes the store's files only through the store's API (ImageStore)."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

from shifter_core.image.store import Acl, ImageMetadata, ImageStore, StoreError

IMAGE_ID = "cd" * 32


def published(store: ImageStore, acl: Acl | None = None) -> ImageMetadata:
    partial = store.new_partial(IMAGE_ID)
    partial.write_bytes(b"squashfs")
    meta = ImageMetadata(IMAGE_ID, "docker.io/x/y:1", "sha256:" + IMAGE_ID, "linux/amd64")
    return store.publish(dataclasses.replace(meta, acl=acl), partial)


def hidden(store: ImageStore) -> list[str]:
    return sorted(p.name for p in store.path.iterdir() if p.name.startswith("."))


def test_set_access_rewrites_the_record_and_leaves_nothing_behind(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    store.create()
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o755
    meta = published(store, Acl((1001,)))
    widened = dataclasses.replace(meta, acl=Acl((1001,), (2000,)))
    store.set_access(widened)
    assert store.get(IMAGE_ID) == widened
    public = dataclasses.replace(meta, acl=None)
    store.set_access(public)
    assert store.get(IMAGE_ID) == public
    for path in (store.image_file(IMAGE_ID), store.metadata_file(IMAGE_ID)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    store.set_access(public, rewrite=False)  # only the files' access: the record stays
    assert store.get(IMAGE_ID) == public and hidden(store) == []


def test_uploads_and_partials_are_discarded_through_the_store(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    upload = store.new_upload()
    upload.write_bytes(b"upload")
    partial = store.new_partial(IMAGE_ID)
    partial.write_bytes(b"partial")
    assert hidden(store) == sorted([upload.name, partial.name])
    store.discard(upload)
    store.discard(partial)
    store.discard(partial)  # gone already: nothing to do
    assert hidden(store) == []
    meta = published(store)
    for path in (store.image_file(IMAGE_ID), store.metadata_file(IMAGE_ID), tmp_path / "x.partial"):
        with pytest.raises(StoreError, match="not a partial file"):
            store.discard(path)
    assert store.get(IMAGE_ID) == meta
