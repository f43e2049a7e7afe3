"""The node-local image cache: verified copies, one copy per image, holds, LRU eviction."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from shifter_core.nodecache import NodeCache, NodeCacheError

ID_A, ID_B, ID_C = ("a" * 64), ("b" * 64), ("c" * 64)


def make_image(directory: Path, name: str, size: int) -> tuple[Path, str]:
    path = directory / name
    data = os.urandom(size)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_second_job_finds_the_copy(tmp_path):
    source, digest = make_image(tmp_path, "img", 300_000)
    cache = NodeCache(tmp_path / "cache")
    first = cache.stage(ID_A, source, digest, "job1")
    assert first.read_bytes() == source.read_bytes()
    assert cache.stage(ID_A, source, digest, "job2") == first
    assert (cache.stats()["copies"], cache.stats()["hits"]) == (1, 1)
    assert cache.holders(ID_A) == ["job1", "job2"]


def test_a_corrupt_source_never_becomes_an_entry(tmp_path):
    source, _ = make_image(tmp_path, "img", 1000)
    cache = NodeCache(tmp_path / "cache")
    with pytest.raises(NodeCacheError, match="corrupt"):
        cache.stage(ID_A, source, "0" * 64, "job1")
    assert not cache.path(ID_A).exists()
    assert list((tmp_path / "cache").glob(".*.partial")) == []


def _stage(args: tuple[str, str, str, str]) -> str:
    cache_dir, source, digest, holder = args
    return str(NodeCache(cache_dir).stage(ID_A, Path(source), digest, holder))


def test_concurrent_jobs_copy_once(tmp_path):
    source, digest = make_image(tmp_path, "img", 2_000_000)
    cache_dir = tmp_path / "cache"
    jobs = [(str(cache_dir), str(source), digest, f"job{i}") for i in range(6)]
    with multiprocessing.get_context("fork").Pool(6) as pool:
        paths = pool.map(_stage, jobs)
    assert len(set(paths)) == 1
    assert NodeCache(cache_dir).stats()["copies"] == 1
    assert NodeCache(cache_dir).stats()["hits"] == 5


def test_least_recently_used_unheld_entries_go_first(tmp_path):
    cache = NodeCache(tmp_path / "cache", max_bytes=250_000)
    a, da = make_image(tmp_path, "a", 100_000)
    b, db = make_image(tmp_path, "b", 100_000)
    c, dc = make_image(tmp_path, "c", 100_000)
    cache.stage(ID_A, a, da, "job1")
    cache.stage(ID_B, b, db, "job2")
    past = time.time() - 100
    os.utime(cache.path(ID_B), (past, past))  # B used longest ago
    cache.release("job2")
    cache.stage(ID_C, c, dc, "job3")
    assert not cache.path(ID_B).exists()  # evicted: unheld and least recently used
    assert cache.path(ID_A).exists()  # held by job1
    assert cache.stats()["evictions"] == 1
    assert cache.release("job1") == 1 and cache.release("job1") == 0


def test_held_entries_are_never_evicted(tmp_path):
    cache = NodeCache(tmp_path / "cache", max_bytes=150_000)
    a, da = make_image(tmp_path, "a", 100_000)
    b, db = make_image(tmp_path, "b", 100_000)
    cache.stage(ID_A, a, da, "job1")
    cache.stage(ID_B, b, db, "job2")
    assert cache.path(ID_A).exists() and cache.path(ID_B).exists()


def test_a_private_image_stays_private_in_the_node_cache(tmp_path):
    private, digest = make_image(tmp_path, "private", 1000)
    private.chmod(0o600)  # as the store keeps a private image (ACLs aside)
    public, public_digest = make_image(tmp_path, "public", 1000)
    public.chmod(0o644)
    cache = NodeCache(tmp_path / "cache")
    assert cache.stage(ID_A, private, digest, "job1").stat().st_mode & 0o777 == 0o600
    assert cache.stage(ID_B, public, public_digest, "job1").stat().st_mode & 0o777 == 0o644
