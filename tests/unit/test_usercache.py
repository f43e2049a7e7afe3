"""The user's cache of image-name resolutions (srun's claims, checked against the store)."""

from __future__ import annotations

import os
from pathlib import Path

from shifter_core import usercache

ID = "ab" * 32


def _env(tmp_path: Path) -> dict[str, str]:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700, exist_ok=True)
    return {"XDG_RUNTIME_DIR": str(xdg)}


def test_a_name_is_remembered_until_it_expires(tmp_path: Path) -> None:
    env, uid = _env(tmp_path), os.getuid()
    usercache.remember(uid, {5, 6}, env, "docker:busybox", ID, expires=1000.0)
    assert usercache.claimed_id(uid, {6, 5}, env, "docker:busybox", now=999.0) == ID
    assert usercache.claimed_id(uid, {5, 6}, env, "docker:busybox", now=1000.0) is None
    assert usercache.claimed_id(uid, {5}, env, "docker:busybox", now=1.0) is None  # groups
    assert usercache.claimed_id(uid, {5, 6}, env, "docker:ubuntu", now=1.0) is None
    entry = next((tmp_path / "xdg" / "shifter-launch" / usercache.NAMES_DIR).iterdir())
    assert entry.stat().st_mode & 0o777 == 0o600


def test_a_pull_forgets_every_name(tmp_path: Path) -> None:
    env, uid = _env(tmp_path), os.getuid()
    usercache.remember(uid, {5}, env, "docker:busybox", ID, expires=1000.0)
    usercache.forget(uid, env)
    assert usercache.claimed_id(uid, {5}, env, "docker:busybox", now=1.0) is None


def test_a_cache_others_could_write_is_not_used(tmp_path: Path) -> None:
    env, uid = _env(tmp_path), os.getuid()
    usercache.remember(uid, {5}, env, "docker:busybox", ID, expires=1000.0)
    (tmp_path / "xdg" / "shifter-launch").chmod(0o777)
    assert usercache.claimed_id(uid, {5}, env, "docker:busybox", now=1.0) is None
    assert usercache.cache_directory(uid + 1, env) != str(tmp_path / "xdg" / "shifter-launch")


def test_a_damaged_entry_is_no_claim(tmp_path: Path) -> None:
    env, uid = _env(tmp_path), os.getuid()
    usercache.remember(uid, {5}, env, "docker:busybox", ID, expires=1000.0)
    names = tmp_path / "xdg" / "shifter-launch" / usercache.NAMES_DIR
    for entry in names.iterdir():
        entry.write_text(f"{ID}\nsoon\ndocker:busybox")
    assert usercache.claimed_id(uid, {5}, env, "docker:busybox", now=1.0) is None
