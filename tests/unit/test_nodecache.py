"""The node-local image cache: verified copies, one copy per image, holds, LRU eviction."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from shifter_core.image.nodecache import NodeCache, NodeCacheError

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


# -- a full disk, a quota, no file descriptors left: the job fails, the node does not -------

import errno  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

from shifter_core.config import SlurmConfig  # noqa: E402
from shifter_core.errors import ShifterError  # noqa: E402
from shifter_core.options import parse_size  # noqa: E402

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs: a real file system that runs out of space."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _left_in(directory: Path) -> list[str]:
    """What staging left in a cache directory besides its lock and statistics."""
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.name not in (".lock", "stats.json") and not p.is_dir()
    )


@needs_root
def test_an_image_larger_than_the_disk_fails_the_job_and_leaves_nothing(tmp_path, small_fs):
    source, digest = make_image(tmp_path, "img", 3 << 20)
    cache = NodeCache(small_fs / "cache", max_bytes=parse_size(SlurmConfig().node_cache_size))
    with pytest.raises(NodeCacheError, match="space") as info:
        cache.stage(ID_A, source, digest, "job1")
    assert isinstance(info.value, ShifterError) and info.value.hint
    assert ID_A[:12] in str(info.value)
    assert _left_in(small_fs / "cache") == []
    assert cache.holders(ID_A) == []


@needs_root
def test_enospc_while_copying_is_a_job_error(tmp_path, small_fs, monkeypatch):
    # The disk looks big enough (another writer fills it while the copy runs): the copy
    # itself meets ENOSPC on the real tmpfs.
    monkeypatch.setattr(NodeCache, "_free_bytes", lambda self: 1 << 40)
    source, digest = make_image(tmp_path, "img", 3 << 20)
    cache = NodeCache(small_fs / "cache")
    with pytest.raises(NodeCacheError, match="no space left") as info:
        cache.stage(ID_A, source, digest, "job1")
    assert "ENOSPC" not in info.value.message or info.value.hint
    assert _left_in(small_fs / "cache") == []
    assert os.statvfs(small_fs).f_bfree * os.statvfs(small_fs).f_frsize > 1 << 20


def test_edquot_is_a_job_error(tmp_path, monkeypatch):
    source, digest = make_image(tmp_path, "img", 100_000)
    cache = NodeCache(tmp_path / "cache")

    def over_quota(fd):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr("shifter_core.image.nodecache.os.fsync", over_quota)
    with pytest.raises(NodeCacheError, match="quota"):
        cache.stage(ID_A, source, digest, "job1")
    assert _left_in(tmp_path / "cache") == []


@pytest.mark.parametrize("free_fds", [0, 1, 2, 8])
def test_emfile_is_a_job_error(tmp_path, free_fds):
    """Staging needs 3 descriptors (lock, copy, source): with fewer, every point where one
    runs out is a NodeCacheError; with enough, the copy is made."""
    source, digest = make_image(tmp_path, "img", 100_000)
    script = textwrap.dedent(
        f"""
        import os, resource, sys
        from pathlib import Path
        from shifter_core.image.nodecache import NodeCache, NodeCacheError
        cache = NodeCache({str(tmp_path / "cache")!r})
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        for fd in held[: {free_fds}]:
            os.close(fd)
        try:
            cache.stage({ID_A!r}, Path({str(source)!r}), {digest!r}, "job1")
        except NodeCacheError as err:
            print("ERROR", err)
            sys.exit(3)
        print("STAGED")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "Traceback" not in run.stderr, run.stderr
    if free_fds >= 3:
        assert run.stdout == "STAGED\n"
        return
    assert run.returncode == 3, run.stdout + run.stderr
    assert "too many open files" in run.stdout
    assert _left_in(tmp_path / "cache") == []


def test_the_default_cap_is_a_size():
    assert parse_size(SlurmConfig().node_cache_size) == 50 << 30


@needs_root
def test_a_full_disk_evicts_least_recently_used_entries_first(tmp_path, small_fs):
    # A cap far above the disk (the default, 50G): the disk's free space decides.
    cache = NodeCache(small_fs / "cache", max_bytes=50 << 30)
    images = [make_image(tmp_path, name, 600_000) for name in "abc"]
    for image_id, (source, digest), job in zip(
        (ID_A, ID_B, ID_C), images, ("j1", "j2", "j3"), strict=True
    ):
        cache.stage(image_id, source, digest, job)
        cache.release(job)
    past = time.time() - 100
    os.utime(cache.path(ID_B), (past, past))  # B used longest ago, then A, then C
    os.utime(cache.path(ID_A), (past + 10, past + 10))
    d, dd = make_image(tmp_path, "d", 600_000)
    cache.stage("d" * 64, d, dd, "j4")
    assert not cache.path(ID_B).exists()
    assert cache.path(ID_A).exists() and cache.path(ID_C).exists()
    e, de = make_image(tmp_path, "e", 600_000)
    cache.stage("e" * 64, e, de, "j5")
    assert not cache.path(ID_A).exists() and cache.path(ID_C).exists()
    assert cache.stats()["evictions"] == 2


def test_eviction_order_under_a_cap(tmp_path):
    cache = NodeCache(tmp_path / "cache", max_bytes=350_000)
    ids = [c * 64 for c in "abcdef"]
    for i, image_id in enumerate(ids[:3]):
        source, digest = make_image(tmp_path, image_id[:1], 100_000)
        cache.stage(image_id, source, digest, f"j{i}")
        cache.release(f"j{i}")
        stamp = time.time() - 100 + i
        os.utime(cache.path(image_id), (stamp, stamp))
    cache.stage(ids[0], Path("/nonexistent"), "", "j9")  # a hit makes A the most recent
    cache.release("j9")
    evicted = []
    for image_id in ids[3:]:
        before = {i for i in ids if cache.path(i).exists()}
        source, digest = make_image(tmp_path, image_id[:1], 100_000)
        cache.stage(image_id, source, digest, "jx")
        cache.release("jx")
        evicted += sorted(before - {i for i in ids if cache.path(i).exists()})
    assert [e[0] for e in evicted] == ["b", "c", "a"]


def test_storage_error_tells_job_errors_from_node_faults():
    from shifter_core.image.nodecache import storage_error

    for code, words in [
        (errno.ENOSPC, "no space left"),
        (errno.EDQUOT, "the disk quota"),
        (errno.EMFILE, "too many open files"),
        (errno.ENFILE, "too many open files"),
    ]:
        error = storage_error(OSError(code, os.strerror(code)), "cannot write /run/shifter/n1/7")
        assert isinstance(error, NodeCacheError) and error.hint
        assert str(error).startswith(f"cannot write /run/shifter/n1/7: {words}")
    for code in (errno.EACCES, errno.EROFS, errno.EIO):
        assert storage_error(OSError(code, os.strerror(code)), "x") is None
