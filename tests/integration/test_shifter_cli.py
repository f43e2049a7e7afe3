"""``shifter`` as a test user (no privilege): identity, capabilities, read-only image,
volumes, symlink escapes, environment, entrypoint/workdir, modules, and cleanup."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .slurm import user_env
from .test_runtime_support import (  # noqa: F401 - fixtures 'rt', 'tmp_submount', ...
    SHIFTER,
    config_with_site_volumes,
    host_mounts_with,
    loop_devices_of,
    runtime_fixture,
    shared_sources_fixture,
    shifter_as,
    tmp_submount_fixture,
    user_processes,
    wait_for_no_processes,
)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_id_and_privileges_by_image_name(rt, box):
    """`shifter --image=busybox id` through the gateway (box config): the caller's ids;
    no capabilities at all and no_new_privs inside."""
    pull = subprocess.run(
        ["runuser", "-u", "alice", "--", "env", "-i",
         *(f"{k}={v}" for k, v in user_env().items()),
         str(Path(SHIFTER).parent / "shifterimg"), "pull", "busybox"],
        capture_output=True, text=True, timeout=300, cwd="/tmp", check=False,
    )  # fmt: skip
    assert pull.returncode == 0, pull.stderr
    script = "id -u; id -g; id -G; id -un; grep -E '^(Cap|NoNewPrivs)' /proc/self/status"
    out = ok(
        shifter_as(
            rt, ["--image=busybox", "sh", "-c", script], SHIFTER_CONFIG=str(box.shifter_config)
        )
    )
    lines = out.splitlines()
    alice = pwd.getpwnam("alice")
    groups = os.getgrouplist("alice", alice.pw_gid)
    assert lines[:2] == [str(alice.pw_uid), str(alice.pw_gid)]
    shown = [int(g) for g in lines[2].split()]
    # Without privilege only the caller's own gid can be mapped into the user namespace: the
    # other groups are still held (the kernel checks them) but show as the overflow gid.
    assert alice.pw_gid in shown and len(shown) == len(groups)
    assert set(shown) <= {*groups, 65534}
    assert lines[3] == "alice"
    status = dict(line.split(":\t") for line in lines[4:])
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"] == "1"


def test_setuid_root_program_cannot_read_a_root_only_file(rt):
    out = ok(shifter_as(rt, [f"--image=id:{rt.testimg}", "/bin/catroot"]))
    assert f"euid={pwd.getpwnam('alice').pw_uid}" in out  # the setuid bit had no effect
    assert "denied: Permission denied" in out, out
    assert "READ" not in out
    out = ok(shifter_as(rt, [f"--image=id:{rt.testimg}", "sh", "-c", "cat /secret; true"]))
    assert "top secret" not in out


def test_image_is_read_only_tmp_and_volumes_are_writable(rt, tmp_path):
    volume = rt.base / f"vol-{tmp_path.name}"
    volume.mkdir()
    os.chown(volume, 1001, 1002)
    script = (
        "touch /usr/x 2>&1; mkdir /usr/bin/y 2>&1; touch /newfile 2>&1; "
        "echo data > /tmp/shifter-cli-test-$$ && ls -ln /tmp/shifter-cli-test-$$ "
        "&& rm /tmp/shifter-cli-test-$$; echo v > /data/file && echo volume-ok"
    )
    out = ok(shifter_as(rt, [f"--image=id:{rt.testimg}", f"-V{volume}:/data", "sh", "-c", script]))
    assert out.count("Read-only file system") == 3, out
    assert "1 1001     1002 " in out  # /tmp is the host's: the file is the user's
    assert "volume-ok" in out
    st = (volume / "file").stat()
    assert (st.st_uid, st.st_gid) == (1001, 1002)
    # :ro volumes are not writable
    out = shifter_as(
        rt, [f"--image=id:{rt.testimg}", f"--volume={volume}:/data:ro", "touch", "/data/new"]
    )
    assert out.returncode != 0 and "Read-only file system" in out.stderr


def test_host_tmp_with_a_mount_below_it(rt, tmp_submount):
    """A mount below the host's /tmp is locked in the user namespace, where a non-recursive
    bind of /tmp fails (EINVAL): the whole tree is attached instead, nosuid and nodev, and
    both the host's /tmp and the mount below it are seen (and written) from the container."""
    host_file = Path(f"/tmp/shifter-test-hostfile-{os.getpid()}")
    try:
        made = subprocess.run(
            ["runuser", "-u", "alice", "--", "sh", "-c", f"echo from the host > {host_file}"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        script = (
            f"cat {host_file} {tmp_submount}/inside && "
            f"echo from the container > {tmp_submount}/written && "
            "cat /proc/self/mountinfo"
        )
        out = ok(shifter_as(rt, [f"--image=id:{rt.busybox}", "sh", "-c", script]))
    finally:
        host_file.unlink(missing_ok=True)
    lines = out.splitlines()
    assert lines[:2] == ["from the host", "in the submount"]
    assert (tmp_submount / "written").read_text() == "from the container\n"
    options = {fields[4]: fields[5].split(",") for fields in (line.split() for line in lines[2:])}
    for point in ("/tmp", str(tmp_submount)):
        assert point in options, out
        assert "nosuid" in options[point] and "nodev" in options[point], (point, options[point])


def test_nested_missing_mount_points_are_created(rt):
    volume = rt.base / "vol-nested"
    volume.mkdir(exist_ok=True)
    (volume / "hello").write_text("hi\n")
    volume.chmod(0o755)
    out = ok(
        shifter_as(
            rt,
            [
                f"--image=id:{rt.testimg}",
                "-V",
                f"{volume}:/a/b/c;{volume}:/usr/lib/x/y:ro",
                "sh",
                "-c",
                "cat /a/b/c/hello /usr/lib/x/y/hello; ls /usr/lib",
            ],
        )
    )
    assert out.splitlines()[:2] == ["hi", "hi"]
    assert "escape" in out and "x" in out.split()  # the image's entries are still there
    # through a symlink that stays inside the image: /data-link -> /opt
    out = ok(
        shifter_as(rt, [f"--image=id:{rt.testimg}", f"-V{volume}:/data-link/d", "ls", "/opt/d"])
    )
    assert "hello" in out


@pytest.mark.parametrize(
    "target, message",
    [
        ("/etc/x", "the target may not be /etc or below it"),
        ("/", "the target may not be the container's root"),
        ("/lnk-etc/x", "the target may not be /etc or below it (it resolves to /etc/x)"),
        ("/lnk-etc", "the target may not be /etc or below it (it resolves to /etc)"),
        ("/lnk-up/x", "leads outside the container through the symlink /lnk-up -> ../.."),
        ("/usr/lib/escape/x", "through the symlink /usr/lib/escape -> ../../../etc"),
        ("/proc/x", "/proc"),
    ],
)
def test_forbidden_targets_and_escapes_are_refused(rt, target, message):
    result = shifter_as(rt, [f"--image=id:{rt.testimg}", "-V", f"/var/tmp:{target}", "true"])
    assert result.returncode == 125, result.stderr
    assert message in result.stderr
    assert "/var/tmp:" in result.stderr  # names the spec


def test_sources_are_checked_as_the_user(rt):
    private = rt.base / "bobs-private"
    private.mkdir(exist_ok=True)
    os.chown(private, 1002, 1003)
    private.chmod(0o700)
    result = shifter_as(rt, [f"--image=id:{rt.testimg}", f"-V{private}:/data", "true"])
    assert result.returncode == 125
    assert f"the source {private} cannot be used: Permission denied" in result.stderr
    result = shifter_as(rt, [f"--image=id:{rt.testimg}", "-V/nonexistent:/data", "true"])
    assert "the source /nonexistent cannot be used: No such file or directory" in result.stderr
    result = shifter_as(rt, [f"--image=id:{rt.testimg}", "-Vrelative:/data", "true"])
    assert result.returncode == 125 and "'relative:/data'" in result.stderr


def test_environment_precedence_through_the_cli(rt):
    env_file = rt.base / "vars.env"
    env_file.write_text("LEVEL2=env_file\nLEVEL3=env_file\nLEVEL4=env_file\nLEVEL5=env_file\n")
    env_file.chmod(0o644)
    names = "LEVEL0 LEVEL1 LEVEL2 LEVEL3 LEVEL4 LEVEL5 CALLER_ONLY"
    script = f"for v in {names}; do eval echo $v=\\$$v; done; env"
    args = [f"--image=id:{rt.testimg}", f"--env-file={env_file}", "-e", "LEVEL3=env",
            "--env=LEVEL4=env", "-eLEVEL5=env", "sh", "-c", script]  # fmt: skip
    caller = {f"LEVEL{i}": "caller" for i in range(6)} | {"CALLER_ONLY": "yes"}
    out = ok(shifter_as(rt, args, **caller))
    assert out.splitlines()[:7] == [
        "LEVEL0=caller",
        "LEVEL1=image",
        "LEVEL2=env_file",
        "LEVEL3=env",
        "LEVEL4=module",
        "LEVEL5=site",
        "CALLER_ONLY=yes",
    ]
    env = dict(line.split("=", 1) for line in out.splitlines()[7:] if "=" in line)
    assert env["SHIFTER_RUNTIME"] == "1"
    assert env["SHIFTER_IMAGE"] == rt.testimg
    assert env["SHIFTER_IMAGEREQUEST"] == f"id:{rt.testimg}"
    assert env["PATH"] == "/usr/bin:/bin"  # the image's, not the caller's
    out = ok(shifter_as(rt, ["-E", *args], **caller))
    assert out.splitlines()[0] == "LEVEL0=" and "CALLER_ONLY=" in out.splitlines()[6]


def test_entrypoint_workdir_and_default_command(rt, tmp_path):
    image = f"--image=id:{rt.testimg}"
    assert ok(shifter_as(rt, [image, "--entrypoint"])) == "entry from-cmd\n"
    assert ok(shifter_as(rt, [image, "--entrypoint", "a", "b"])) == "entry a b\n"
    assert ok(shifter_as(rt, [image, "--entrypoint=/bin/echo", "x"])) == "x\n"
    assert ok(shifter_as(rt, [image, "echo", "plain"])) == "plain\n"
    # no command, no --entrypoint: $SHELL (falling back to /bin/sh when the image lacks it)
    out = ok(shifter_as(rt, [image], input="echo shell:$0\n", SHELL="/bin/sh"))
    assert out == "shell:/bin/sh\n"
    out = ok(shifter_as(rt, [image], input="echo fallback:$0\n", SHELL="/bin/zsh"))
    assert out == "fallback:/bin/sh\n"
    # working directory: the caller's by default, -w alone the image's, -wDIR
    assert ok(shifter_as(rt, [image, "pwd"], cwd="/tmp")) == "/tmp\n"
    assert ok(shifter_as(rt, [image, "-w", "pwd"])) == "/usr/lib\n"
    assert ok(shifter_as(rt, [image, "--workdir=/etc", "pwd"])) == "/etc\n"
    assert ok(shifter_as(rt, [image, "pwd"], cwd=str(rt.base))) == "/\n"  # not in the container
    result = shifter_as(rt, [image, "-w/nope", "pwd"])
    assert (
        result.returncode == 125 and "cannot change to the working directory /nope" in result.stderr
    )
    result = shifter_as(rt, [image, "no-such-command"])
    assert result.returncode == 127 and "no-such-command: command not found" in result.stderr


def test_exit_status_and_signals_pass_through(rt):
    image = f"--image=id:{rt.testimg}"
    assert shifter_as(rt, [image, "sh", "-c", "exit 42"]).returncode == 42
    result = shifter_as(rt, [image, "sh", "-c", "kill -TERM $$"])
    # runuser reports a signal death as 128+N
    assert result.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM)


def test_module_device_library_and_none(rt):
    image = f"--image=id:{rt.testimg}"
    device = rt.base / "dev" / "testdev0"
    script = (
        f"stat -c '%t %T' {device}; echo written > {device} && echo device-ok; "
        "ls /opt/testmod/lib /opt/udiImage/modules/testmod/lib64; "
        "echo LD=$LD_LIBRARY_PATH ALWAYS=$ALWAYS"
    )
    out = ok(
        shifter_as(rt, [image, "--module=testmod", "sh", "-c", script], LD_LIBRARY_PATH="/host/lib")
    )
    lines = out.splitlines()
    assert lines[0] == "1 3"
    assert "device-ok" in lines
    assert "libbound.so.1" in out and "libcopied.so.1" in out
    assert "LD=/opt/testmod/lib:/host/lib ALWAYS=1" in lines
    # without it: no device, no library; --module=none also drops the default module
    out = ok(
        shifter_as(rt, [image, "sh", "-c", f"ls {device}; echo LD=$LD_LIBRARY_PATH ALWAYS=$ALWAYS"])
    )
    assert "No such file" in out or "can't access" in out or out.startswith("LD=")
    assert "ALWAYS=1" in out
    out = ok(shifter_as(rt, [image, "-m", "none", "sh", "-c", "echo ALWAYS=$ALWAYS"]))
    assert out == "ALWAYS=\n"
    result = shifter_as(rt, [image, "-m", "nosuchmodule", "true"])
    assert result.returncode == 125 and "unknown module 'nosuchmodule'" in result.stderr


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def test_hundred_runs_leave_nothing_behind(rt):
    """100 runs, every 5th killed with SIGKILL mid-command: no mount, loop device or process
    of theirs remains (the image servers, squashfuse_ll or the launcher's own, exit when their
    container's mounts go)."""
    variables = user_env(SHIFTER_CONFIG=str(rt.config))
    base = [
        "runuser",
        "-u",
        "alice",
        "--",
        "env",
        "-i",
        *(f"{k}={v}" for k, v in variables.items()),
    ]
    image = f"--image=id:{rt.busybox}"
    killed = 0
    for i in range(100):
        if i % 5 == 4:
            proc = subprocess.Popen(
                [*base, SHIFTER, image, "sh", "-c", "echo started; exec sleep 60"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                cwd="/tmp",
            )  # fmt: skip
            try:
                assert proc.stdout is not None
                assert proc.stdout.readline() == b"started\n"
                (command,) = _children(proc.pid)  # runuser's child: shifter, now the command
                deadline = time.monotonic() + 5
                while Path(f"/proc/{command}/comm").read_text().strip() != "sleep":
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                os.kill(command, signal.SIGKILL)
                assert proc.wait(timeout=10) in (-signal.SIGKILL, 128 + signal.SIGKILL)
                killed += 1
            finally:
                for child in _children(proc.pid):
                    os.kill(child, signal.SIGKILL)
                proc.wait(timeout=10)
        else:
            result = subprocess.run(
                [*base, SHIFTER, image, "cat", "/etc/hosts", "/etc/passwd"],
                capture_output=True, text=True, timeout=60, cwd="/tmp", stdin=subprocess.DEVNULL,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert "alice:x:1001:1002" in result.stdout
    assert killed == 20
    assert wait_for_no_processes("alice", "squashfuse_ll") == []
    assert wait_for_no_processes("alice", "shifter-sqfs") == []  # the launcher's image servers
    time.sleep(0.2)
    assert user_processes("alice") == []
    assert host_mounts_with("squashfuse") == []
    assert host_mounts_with(str(rt.base)) == []
    assert loop_devices_of(str(rt.base)) == []


def test_writable_tmpfs_changes_vanish(rt):
    image = f"--image=id:{rt.testimg}"
    script = "mkdir /newdir && echo x > /newdir/f && cat /newdir/f"
    assert ok(shifter_as(rt, [image, "--writable-tmpfs", "sh", "-c", script])) == "x\n"
    result = shifter_as(rt, [image, "ls", "/newdir"])
    assert result.returncode != 0  # a new container: the changes are gone
    result = shifter_as(rt, [image, "mkdir", "/newdir"])
    assert "Read-only file system" in result.stderr


# ---- NERSC Shifter's command lines and variables (issue 11) ---------------------------------


def _pull_busybox_as_alice(box) -> None:
    pull = subprocess.run(
        ["runuser", "-u", "alice", "--", "env", "-i",
         *(f"{k}={v}" for k, v in user_env().items()),
         str(Path(SHIFTER).parent / "shifterimg"), "pull", "busybox"],
        capture_output=True, text=True, timeout=300, cwd="/tmp", check=False,
    )  # fmt: skip
    assert pull.returncode == 0, pull.stderr


SHOW = "echo $SHIFTER_IMAGE $SHIFTER_IMAGEREQUEST ${IMG_VAR:-none}"


@pytest.mark.parametrize(
    "options",
    [
        ["-i", "id:{id}"],
        ["-iid:{id}"],
        ["--image", "id:{id}"],
        ["--im=id:{id}"],
        ["-n", "--image=id:{id}"],
        ["-nvi", "id:{id}"],
    ],
)
def test_every_form_of_shifters_image_option(rt, options):
    args = [o.format(id=rt.testimg) for o in options]
    result = shifter_as(rt, [*args, "sh", "-c", SHOW])
    assert ok(result) == f"{rt.testimg} id:{rt.testimg} image\n"


def test_the_image_from_shifter_imagetype_and_shifter_image(rt, box, tmp_path):
    """Shifter's pair names the image when --image is absent; --image wins over it; the
    job's SHIFTER_VOLUME comes with an image from the environment."""
    pair = {"SHIFTER_IMAGETYPE": "id", "SHIFTER_IMAGE": rt.testimg}
    assert ok(shifter_as(rt, ["sh", "-c", SHOW], **pair)) == f"{rt.testimg} id:{rt.testimg} image\n"
    other = ok(shifter_as(rt, [f"--image=id:{rt.busybox}", "sh", "-c", SHOW], **pair))
    assert other == f"{rt.busybox} id:{rt.busybox} none\n"
    volume = rt.base / f"vol-{tmp_path.name}"
    volume.mkdir()
    (volume / "hello").write_text("from the job's volume\n")
    volume.chmod(0o755)
    out = ok(shifter_as(rt, ["cat", "/data/hello"], SHIFTER_VOLUME=f"{volume}:/data", **pair))
    assert out == "from the job's volume\n"
    # by name, through the gateway (the box's configuration)
    _pull_busybox_as_alice(box)
    named = {"SHIFTER_IMAGETYPE": "docker", "SHIFTER_IMAGE": "busybox"}
    config = {"SHIFTER_CONFIG": str(box.shifter_config)}
    image_id, request = ok(shifter_as(rt, ["sh", "-c", SHOW], **named, **config)).split()[:2]
    assert request == "docker:busybox" and len(image_id) == 64


@pytest.mark.parametrize(
    "environ, status, message",
    [
        ({"SHIFTER_IMAGE": "ubuntu:22.04"}, 125,
         "shifter: SHIFTER_IMAGE='ubuntu:22.04' is not an image id (a job made with --image has "
         "one there); name the image with --image, or set SHIFTER_IMAGETYPE too"),
        ({"SHIFTER_IMAGETYPE": "chos", "SHIFTER_IMAGE": "x"}, 125,
         "shifter: SHIFTER_IMAGETYPE='chos' is not an image type; use one of docker, id"),
        ({"SHIFTER_IMAGETYPE": "docker"}, 2,
         "shifter: no image given: use --image=NAME (or SHIFTER_IMAGETYPE and SHIFTER_IMAGE"),
    ],
)  # fmt: skip
def test_a_bad_or_missing_image_in_the_environment(rt, environ, status, message):
    result = shifter_as(rt, ["true"], **environ)
    assert result.returncode == status and result.stderr.startswith(message), result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "env, problem",
    [
        ("=x", "the name before '=' is empty"),
        ("1A=x", "the name '1A' starts with a digit"),
        ("A-B=1", "the name 'A-B' has characters other than letters, digits and _"),
        ("", "it is empty"),
    ],
)
def test_a_malformed_env_is_one_line_and_exit_125(rt, env, problem):
    for args in (["-e", env], [f"--env={env}"]):
        result = shifter_as(rt, [f"--image=id:{rt.testimg}", *args, "true"])
        assert result.returncode == 125, result.stderr
        assert result.stderr.startswith("shifter: invalid environment variable ")
        assert f"in --env: {problem};" in result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_env_file_env_and_clearenv_combine(rt):
    """Files in order, then --env in order (the last wins); -E keeps only those, the image's,
    the modules' and the site's; a bad line names the file and line."""
    first, second = rt.base / "first.env", rt.base / "second.env"
    first.write_text("# first\nA=first\nB=first\nexport C=first\n")
    second.write_text("B=second\nC=second\n")
    for path in (first, second):
        path.chmod(0o644)
    image = f"--image=id:{rt.testimg}"
    args = [image, "-E", f"--env-file={first}", "--env-file", str(second), "-e", "C=env1",
            "-eC=env2", "-e", "HOME", "env"]  # fmt: skip
    out = ok(shifter_as(rt, args, HOME="/home/alice", CALLER_ONLY="x"))
    env = dict(line.split("=", 1) for line in out.splitlines())
    assert (env["A"], env["B"], env["C"], env["HOME"]) == ("first", "second", "env2", "/home/alice")
    assert "CALLER_ONLY" not in env and env["IMG_VAR"] == "image" and env["SITE_VAR"] == "site"
    bad = rt.base / "bad.env"
    bad.write_text("GOOD=1\nMY-VAR=2\n")
    bad.chmod(0o644)
    result = shifter_as(rt, [image, f"--env-file={bad}", "true"])
    assert result.returncode == 125
    assert f"in --env-file {bad}, line 2: the name 'MY-VAR' has characters" in result.stderr


def test_entrypoint_forms(rt):
    """--entrypoint (or Shifter's --entry): ENTRYPOINT + CMD, or + COMMAND; =PROG: PROG +
    COMMAND, never the image's CMD."""
    image = f"--image=id:{rt.testimg}"
    assert ok(shifter_as(rt, [image, "--entry"])) == "entry from-cmd\n"
    assert ok(shifter_as(rt, [image, "--entry", "x"])) == "entry x\n"
    assert ok(shifter_as(rt, [image, "--entrypoint=/bin/echo"])) == "\n"
    assert ok(shifter_as(rt, [image, "--entrypoint=/bin/echo", "y"])) == "y\n"


def test_site_volume_slave_propagation(rt, shared_sources, tmp_path):
    """Shifter's ``slave`` site-volume flag (Cray DWS paths): a file system the host mounts
    below the source after the container started shows in the container; below a volume
    without it, it does not; and nothing made in the container reaches the host."""
    slave, plain = shared_sources
    config = config_with_site_volumes(
        rt, f"propagation-{tmp_path.name}", [f"{slave}:/dws:slave", f"{plain}:/plain"]
    )
    script = (
        "echo ready; i=0; while [ ! -e /dws/sub/marker ] && [ $i -lt 100 ]; do sleep 0.05; "
        "i=$((i+1)); done; cat /dws/sub/marker; cat /plain/sub/marker 2>/dev/null || "
        "echo no-plain-marker; grep -c ' /dws/sub ' /proc/self/mountinfo"
    )
    variables = user_env(SHIFTER_CONFIG=str(config), SHIFTER_LAUNCH_DEBUG="1")
    command = ["runuser", "-u", "alice", "--", "env", "-i",
               *(f"{k}={v}" for k, v in variables.items()),
               SHIFTER, f"--image=id:{rt.busybox}", "sh", "-c", script]  # fmt: skip
    for attempt in ("python runtime", "launcher"):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd="/tmp", stdin=subprocess.DEVNULL)  # fmt: skip
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n", proc.communicate(timeout=30)
            for path in (slave, plain):
                subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "dws", f"{path}/sub"],
                               check=True)  # fmt: skip
                (path / "sub" / "marker").write_text(f"{path.name} marker\n")
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
            for path in (slave, plain):
                subprocess.run(["umount", "-l", f"{path}/sub"], check=False)
        assert proc.returncode == 0, (attempt, out, err)
        assert out.splitlines() == [f"{slave.name} marker", "no-plain-marker", "1"], (attempt, err)
        if attempt == "launcher":
            assert "running the Python runtime" not in err, err
