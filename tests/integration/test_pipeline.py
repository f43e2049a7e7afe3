"""Pull → flatten → squashfs → store, against the box's registry (a docker.io mirror)."""

from __future__ import annotations

import subprocess

import pytest

from shifter_core.image.convert import SquashfsOptions
from shifter_core.image.layercache import LayerCache
from shifter_core.image.pipeline import READY, Progress, pull_image
from shifter_core.image.registry.client import RegistryClient
from shifter_core.image.registry.settings import RegistrySettings
from shifter_core.image.store import ImageStore

pytestmark = pytest.mark.usefixtures("box")

BOX_REGISTRY = "127.0.0.1:5000"


@pytest.fixture
def client():
    settings = RegistrySettings(
        mirrors={"docker.io": [f"http://{BOX_REGISTRY}"]}, insecure=frozenset({BOX_REGISTRY})
    )
    with RegistryClient(settings) as client:
        yield client


def test_busybox_becomes_a_squashfs_in_the_store(client, tmp_path):
    store = ImageStore(tmp_path / "images")
    cache = LayerCache(tmp_path / "layers")
    events: list[Progress] = []
    image = pull_image("busybox", client=client, cache=cache, store=store, progress=events.append)
    assert [e.state for e in events if e.layer is None] == ["PULLING", "CONVERTING", READY]
    squashfs = store.image_file(image.id)
    assert squashfs.stat().st_size == image.size > 0
    assert image.source == "docker.io/library/busybox:latest"
    assert image.cmd == ("/bin/sh",)
    assert any(e.startswith("PATH=") for e in image.env)
    listing = subprocess.run(
        ["unsquashfs", "-lls", str(squashfs)], capture_output=True, text=True, check=True
    ).stdout
    assert "squashfs-root/etc/shifter-test-image" in listing
    assert "squashfs-root/bin/sh -> busybox" in listing
    content = subprocess.run(
        ["unsquashfs", "-cat", str(squashfs), "etc/shifter-test-image"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert content.strip() == "shifter busybox test image"
    assert store.get(image.id) == image
    assert [p.name for p in store.path.iterdir() if p.name.endswith(".partial")] == []
    # A second pull finds the image in the store and downloads nothing.
    downloads = cache.stats.downloads
    again = pull_image("busybox", client=client, cache=cache, store=store)
    assert again == image and cache.stats.downloads == downloads


def test_compression_options_reach_tar2sqfs(client, tmp_path):
    store = ImageStore(tmp_path / "images")
    image = pull_image(
        "busybox",
        client=client,
        cache=LayerCache(tmp_path / "layers"),
        store=store,
        squashfs=SquashfsOptions(compressor="gzip", level=1),
    )
    info = subprocess.run(
        ["unsquashfs", "-s", str(store.image_file(image.id))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Compression gzip" in info
