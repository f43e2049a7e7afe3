"""The C launcher (``launcher/shifter_launch.c``, installed as ``.venv/bin/shifter``): the
first run of a request goes through the Python runtime and leaves a recipe; the next runs
replay it in C and must give the same container.  Anything it cannot vouch for goes back to
Python."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from shifter_core.runtime.recipe import VERSION, Op, parse, render, serialise

from .slurm import user_env
from .test_runtime_support import (  # noqa: F401 - fixture 'rt'
    SHIFTER,
    host_mounts_with,
    runtime_fixture,
    shifter_as,
    user_processes,
    wait_for_no_processes,
)

MISS = "running the Python runtime"
# What a container shows of itself: ids, capabilities, environment, mounts, identity files.
PROBE = (
    "id; grep -E '^(Cap|NoNewPrivs)' /proc/self/status; env | sort; "
    "pwd; awk '{print $5, $6}' /proc/self/mountinfo | sed 's/,relatime//' | sort; "
    "cat /etc/passwd /etc/group /etc/hosts; "
    "ls -la / /dev | grep -v '^total' | awk '{print $1, $3, $4, $NF}'"
)  # (not sizes or link counts: the generated files live on tmpfs, then in the user's cache)


def cache_of(user: str) -> Path:
    return Path(f"/tmp/shifter-launch-{pwd.getpwnam(user).pw_uid}")


def launched(rt, args: list[str], **env: str) -> tuple[subprocess.CompletedProcess[str], bool]:
    """Run shifter as alice; (result, whether the C launcher replayed a recipe)."""
    result = shifter_as(rt, args, SHIFTER_LAUNCH_DEBUG="1", **env)
    return result, MISS not in result.stderr


@pytest.fixture
def fresh_cache():
    """Alice's launch cache, empty before and after the test."""
    shutil.rmtree(cache_of("alice"), ignore_errors=True)
    yield cache_of("alice")
    shutil.rmtree(cache_of("alice"), ignore_errors=True)


def test_the_launcher_is_installed_as_shifter() -> None:
    with open(SHIFTER, "rb") as fh:
        assert fh.read(4) == b"\x7fELF", f"{SHIFTER} is not the C launcher (make setup)"


@pytest.fixture
def alice_dir():
    """A directory of alice's that she can reach."""
    path = Path(tempfile.mkdtemp(prefix="shifter-launch-test-", dir="/var/tmp"))
    shutil.chown(path, "alice")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_replayed_container_is_the_python_one(rt, fresh_cache, alice_dir) -> None:
    data = alice_dir
    args = [f"--image=id:{rt.busybox}", "-V", f"{data}:/a/b/data", "-e", "X=1", "sh", "-c"]
    first, replayed = launched(rt, [*args, PROBE + "; touch /a/b/data/first"])
    assert first.returncode == 0, first.stderr
    assert not replayed and "no launch cache" in first.stderr
    # the recipe the Python runtime left (and where its siblings would have met it)
    assert len([p for p in fresh_cache.iterdir() if not p.name.startswith(".join-")]) == 1
    second, replayed = launched(rt, [*args, PROBE + "; touch /a/b/data/second"])
    assert second.returncode == 0, second.stderr
    assert replayed, second.stderr
    assert second.stdout == first.stdout
    assert "CapBnd:\t0000000000000000" in second.stdout and "NoNewPrivs:\t1" in second.stdout
    assert "SHIFTER_RUNTIME=1" in second.stdout and "X=1" in second.stdout
    for name in ("first", "second"):  # the volume is the user's, writable
        assert (data / name).stat().st_uid == pwd.getpwnam("alice").pw_uid


def test_exit_status_signals_and_cleanup(rt, fresh_cache) -> None:
    args = [f"--image=id:{rt.busybox}", "sh", "-c"]
    assert launched(rt, [*args, "exit 3"])[0].returncode == 3  # Python; leaves the recipe
    result, replayed = launched(rt, [*args, "exit 7"])
    assert replayed and result.returncode == 7
    result, replayed = launched(rt, [*args, "kill -KILL $$"])
    assert replayed and result.returncode in (-9, 128 + 9)  # runuser reports it as a shell does
    missing, replayed = launched(rt, [f"--image=id:{rt.busybox}", "no-such-command"])
    missing, replayed = launched(rt, [f"--image=id:{rt.busybox}", "no-such-command"])
    assert replayed and missing.returncode == 127
    assert "no-such-command: command not found in the container" in missing.stderr
    assert not wait_for_no_processes("alice", "shifter-sqfs")
    assert not host_mounts_with(str(fresh_cache))


def test_changes_send_the_request_back_to_python(rt, fresh_cache) -> None:
    args = [f"--image=id:{rt.busybox}", "true"]
    assert not launched(rt, args)[1]
    assert launched(rt, args)[1]
    os.utime(rt.config)  # the configuration changed: the recipe no longer holds
    result, replayed = launched(rt, args)
    assert not replayed and "changed" in result.stderr and result.returncode == 0
    assert launched(rt, args)[1]  # the Python run left a new recipe
    # Other options, another key: the Python runtime again.
    assert not launched(rt, [f"--image=id:{rt.busybox}", "-e", "Y=2", "true"])[1]


def test_what_the_launcher_leaves_to_python(rt, fresh_cache) -> None:
    image = f"--image=id:{rt.busybox}"
    for args in ([image], [image, "--entrypoint", "true"], [image, "-v", "true"]):
        for _ in range(2):  # never recorded, so never replayed
            result, replayed = launched(rt, args, SHELL="/bin/true")
            assert result.returncode == 0, result.stderr
            assert not replayed
    bad, replayed = launched(rt, ["--no-such-option", "true"])
    assert bad.returncode == 2 and "unknown option --no-such-option" in bad.stderr


def test_a_cache_others_could_write_is_ignored(rt, fresh_cache) -> None:
    args = [f"--image=id:{rt.busybox}", "true"]
    assert not launched(rt, args)[1]
    assert launched(rt, args)[1]
    fresh_cache.chmod(0o777)
    result, replayed = launched(rt, args)
    assert not replayed and "no launch cache" in result.stderr
    fresh_cache.chmod(0o700)
    recipe = next(fresh_cache.glob("*/recipe"))
    recipe.write_bytes(recipe.read_bytes().replace(b"uid=", b"uid=9", 1))  # another key
    result, replayed = launched(rt, args)
    assert not replayed and "another request's recipe" in result.stderr


def _command_of(runuser: int, name: str, timeout: float = 10) -> int:
    """The pid of runuser's child once it has become ``name`` (shifter execs the command)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{runuser}/task").iterdir():
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == name:
                        return int(child)
        time.sleep(0.01)
    raise AssertionError(f"no {name} below runuser {runuser}")


def test_many_replays_leave_nothing(rt, fresh_cache) -> None:
    """Replayed containers killed with SIGKILL leave no process and no mount."""
    image = f"--image=id:{rt.busybox}"
    assert launched(rt, [image, "true"])[0].returncode == 0  # leaves the recipe
    env = {"SHIFTER_CONFIG": str(rt.config), "SHIFTER_LAUNCH_DEBUG": "1"}
    for _ in range(5):
        proc = subprocess.Popen(
            ["runuser", "-u", "alice", "--", "env", *(f"{k}={v}" for k, v in env.items()),
             SHIFTER, image, "sleep", "30"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd="/tmp",
        )  # fmt: skip
        os.kill(_command_of(proc.pid, "sleep"), 9)
        _, stderr = proc.communicate(timeout=30)
        assert MISS not in stderr  # replayed
    # The image servers (forked launchers, named shifter-sqfs) end with their containers.
    assert not wait_for_no_processes("alice", "shifter-sqfs")
    assert not host_mounts_with(str(fresh_cache))
    assert not host_mounts_with("squashfuse")


def test_an_image_name_is_replayed_for_a_while(rt, box, fresh_cache) -> None:
    """By name (through the gateway): replayed until runtime.launcher_name_ttl runs out."""
    pull = subprocess.run(
        ["runuser", "-u", "alice", "--", "env", "-i",
         *(f"{k}={v}" for k, v in user_env().items()),
         str(Path(SHIFTER).parent / "shifterimg"), "pull", "busybox"],
        capture_output=True, text=True, timeout=300, cwd="/tmp", check=False,
    )  # fmt: skip
    assert pull.returncode == 0, pull.stderr
    env = {"SHIFTER_CONFIG": str(box.shifter_config)}
    args = ["--image=busybox", "sh", "-c", "echo $SHIFTER_IMAGEREQUEST"]
    first, replayed = launched(rt, args, **env)
    assert first.returncode == 0 and not replayed, first.stderr
    second, replayed = launched(rt, args, **env)
    assert replayed and second.stdout == first.stdout == "docker:busybox\n"
    recipe = next(fresh_cache.glob("*/recipe"))
    ops = parse(recipe.read_bytes())
    (expires,) = [i for i, op in enumerate(ops) if op.name == "expires"]
    assert 0 < int(ops[expires].args[0]) - time.time() <= 60  # the default
    ops[expires] = Op("expires", 1)
    recipe.write_bytes(serialise(ops))
    third, replayed = launched(rt, args, **env)
    assert not replayed and "expired" in third.stderr and third.stdout == first.stdout


def test_a_replay_that_fails_leaves_the_next_run_to_python(rt, fresh_cache, alice_dir) -> None:
    args = [f"--image=id:{rt.busybox}", "--workdir=/tmp", "true"]
    assert launched(rt, args)[0].returncode == 0
    recipe = next(fresh_cache.glob("*/recipe"))
    ops = parse(recipe.read_bytes())
    # What Python decided is now wrong:
    ops = [Op("chdir", "/no/such/dir") if op.name == "chdir" else op for op in ops]
    recipe.write_bytes(serialise(ops))
    failed, replayed = launched(rt, args)
    assert replayed and failed.returncode == 125
    assert "cannot change to the working directory /no/such/dir" in failed.stderr
    assert not recipe.exists()
    again, replayed = launched(rt, args)
    assert not replayed and again.returncode == 0


def test_files_below_tmp_are_seen_as_the_launcher_sees_them(rt, fresh_cache) -> None:
    """The Python runtime stages its build on a tmpfs over /tmp: the status of what the
    recipe depends on (here the configuration, as in a checkout under /tmp) is taken before."""
    directory = Path(tempfile.mkdtemp(prefix="shifter-launch-config-", dir="/tmp"))
    try:
        directory.chmod(0o755)
        config = directory / "shifter.yaml"
        shutil.copy(rt.config, config)
        config.chmod(0o644)
        args = [f"--image=id:{rt.busybox}", "true"]
        assert not launched(rt, args, SHIFTER_CONFIG=str(config))[1]
        result, replayed = launched(rt, args, SHIFTER_CONFIG=str(config))
        assert replayed, result.stderr
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_the_launcher_executes_the_recorded_operations(rt, fresh_cache, alice_dir) -> None:
    """The launcher's dry run of the recipe a request would replay prints the operations
    Python recorded (recipe.render), with the flags assemble gave each mount."""
    args = [f"--image=id:{rt.busybox}", "-V", f"{alice_dir}:/data:ro", "-e", "A=b c", "true"]
    assert not launched(rt, args)[1]
    recipe = next(fresh_cache.glob("*/recipe"))
    ops = parse(recipe.read_bytes())
    dry = shifter_as(rt, args, SHIFTER_LAUNCH_DRY_RUN="1")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout == render(ops)
    clone = rf"^clone \d+ {alice_dir} recursive ro,nosuid,nodev private$"
    assert re.search(clone, dry.stdout, re.M)
    assert "env-set A b\\x20c\n" in dry.stdout and dry.stdout.endswith("exec\n")
    assert launched(rt, args)[1]  # the dry run executed nothing and removed nothing


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # cut short
        lambda data: data.replace(f"recipe\0{VERSION}\0".encode(), b"recipe\x001\x00"),
        lambda data: data.replace(b"pivot\0", b"reboot\0"),  # an unknown operation
        lambda data: data.replace(b"exec\0" + b"0\0", b"exec\0" + b"1\0/bin/sh\0"),
    ],
    ids=["truncated", "version", "unknown-op", "field-count"],
)
def test_a_malformed_recipe_is_refused_whole(rt, fresh_cache, damage) -> None:
    """A damaged recipe is refused before anything of it runs (no image server, no mount):
    Python runs the request and writes a good recipe, which the next run replays."""
    args = [f"--image=id:{rt.busybox}", "sh", "-c", "echo ran"]
    assert not launched(rt, args)[1]
    recipe = next(fresh_cache.glob("*/recipe"))
    recipe.write_bytes(damage(recipe.read_bytes()))
    result, replayed = launched(rt, args)
    assert not replayed and "recipe refused" in result.stderr, result.stderr
    assert result.returncode == 0 and result.stdout == "ran\n"
    assert parse(recipe.read_bytes())  # Python wrote it again
    result, replayed = launched(rt, args)
    assert replayed and result.stdout == "ran\n"
    assert not wait_for_no_processes("alice", "shifter-sqfs")
    assert not host_mounts_with(str(fresh_cache))
