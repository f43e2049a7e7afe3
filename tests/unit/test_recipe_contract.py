"""The launcher executes exactly what the Python runtime emits (issue 10, deliverable 1).

For several plans, the operations :mod:`shifter_core.runtime.recipe` builds from the
runtime's decisions are written as a recipe, and the C launcher's dry run
(``SHIFTER_LAUNCH_DRY_RUN=FILE``: parse and print, execute nothing, no root needed) must
print exactly Python's canonical rendering of them. The launcher's source must hold no
mount-flag or mount-kind decision.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from shifter_core import config, syscalls
from shifter_core.runtime import assemble, execute
from shifter_core.runtime.launch import private_root_ops
from shifter_core.runtime.plan import RunRequest, User, build_plan
from shifter_core.runtime.recipe import (
    Op,
    command_ops,
    job_root_ops,
    parse,
    render,
    request_ops,
    serialise,
)

CHECKOUT = Path(__file__).resolve().parents[2]
LAUNCHER = os.environ.get("SHIFTER_TEST_LAUNCHER", str(CHECKOUT / ".venv" / "bin" / "shifter"))
SOURCE = CHECKOUT / "launcher" / "shifter_launch.c"
IMAGE_ID = "ab" * 32
EXIT_REFUSED = 3


def dry_run(path: Path, data: bytes) -> subprocess.CompletedProcess[str]:
    """The launcher's dry run of the recipe ``data`` (written to ``path``)."""
    path.write_bytes(data)
    return subprocess.run(
        [LAUNCHER],
        env={"PATH": "/usr/bin:/bin", "SHIFTER_LAUNCH_DRY_RUN": str(path)},
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=30,
        check=False,
    )


@pytest.fixture(scope="module")
def launcher() -> str:
    with open(LAUNCHER, "rb") as fh:
        assert fh.read(4) == b"\x7fELF", f"{LAUNCHER} is not the C launcher (make launcher)"
    return LAUNCHER


def _user() -> User:
    if os.getuid() != 0:
        return User.current()
    return User(1001, 1002, (1002, 1001), "alice", "/home/alice", "/bin/sh", "", ())


def _image_tree(root: Path) -> Path:
    """A directory standing for the image (targets are resolved in it)."""
    for directory in ("etc", "bin", "usr/lib", "proc", "sys", "dev", "tmp", "work"):
        (root / directory).mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "lib").symlink_to("usr/lib")
    return root


def plan_ops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: RunRequest, text: str):
    """The operations of the recipe the Python runtime would leave for ``request`` with the
    configuration ``text``: its mounts collected and resolved as the build does it."""
    cfg = config.parse(text, "test.yaml")
    meta_env = ("PATH=/usr/bin:/bin", "FROM_IMAGE=image")
    try:
        from shifter_core.image.store import ImageMetadata
    except ImportError:  # before the image subpackage
        from shifter_core.store import ImageMetadata  # type: ignore[no-redef]

    meta = ImageMetadata(
        id=IMAGE_ID,
        source="docker.io/library/busybox:latest",
        digest="sha256:" + "cd" * 32,
        platform="linux/amd64",
        env=meta_env,
        workdir="/work",
    )
    plan = build_plan(
        request, cfg, meta, f"/store/{IMAGE_ID}.squashfs", _user(),
        caller_env={"HOME": "/home/alice", "PATH": "/bin"}, cwd="/home/alice",
    )  # fmt: skip

    # What only privilege changes (the tree of /tmp, opening sources as the user) is opened
    # plainly: the recipe needs the paths, not the privilege.
    def open_plain(_user: User, paths: list[str], _what: list[str]) -> list[int]:
        return [os.open(p, os.O_PATH | os.O_CLOEXEC) for p in paths]

    monkeypatch.setattr(syscalls, "open_tree", lambda path, _flags: os.open(path, os.O_PATH))
    monkeypatch.setattr(assemble, "open_as_user", open_plain)
    # The operations the build would run, not run: the recipe is made of them.
    monkeypatch.setattr(execute.Executor, "run", lambda _self, _ops: None)
    builder = assemble.RootBuilder(
        plan, str(tmp_path / "root"), str(tmp_path / "staging"), privileged=False,
        mount_image=lambda _target: None,
    )  # fmt: skip
    image = _image_tree(tmp_path / "image")
    lower_fd = os.open(image, os.O_PATH | os.O_DIRECTORY)
    try:
        builder.collect()
        builder._plan_targets(lower_fd)
        builder._fill(lower_fd)
        sources = {
            id(s): s.target if s.kind == "tree" else os.readlink(f"/proc/self/fd/{s.source_fd}")
            for s in builder.specs
            if s.source_fd is not None
        }
        ops = private_root_ops(
            builder.specs,
            builder.ops,
            lambda spec: sources[id(spec)],
            image=plan.image_file,
            directory="/tmp/shifter-launch-1001/0123456789abcdef",
            uid=plan.user.uid,
            gid=plan.user.gid,
        )
    finally:
        os.close(lower_fd)
        builder.close()
    key = "shifter-launch-recipe-2\nuid=1001 gid=1002\n"
    head = request_ops(key, [("/etc/passwd", "2049:12:1234:1700000000000000000")], 1800000000)
    return plan, [*head, *ops, *command_ops(plan)]


def _dirs(tmp_path: Path, *names: str) -> list[Path]:
    paths = []
    for name in names:
        path = tmp_path / "host" / name
        path.mkdir(parents=True)
        paths.append(path)
    return paths


def _plans(tmp_path: Path) -> dict[str, tuple[RunRequest, str]]:
    data, site, lib = _dirs(tmp_path, "data", "site", "lib")
    (data / "file").write_text("x")
    devices = sorted(str(p) for p in Path("/dev").iterdir() if p.is_char_device())[:3]
    return {
        "volumes": (
            RunRequest(
                image=f"id:{IMAGE_ID}",
                volumes=(f"{data}:/data", f"{data}/file:/a/b/file:ro", f"{site}:/srv/x:rw"),
                command=("true",),
            ),
            f"runtime:\n  site_volumes: ['{site}:/site', '{site}:/dws:slave']\n",
        ),
        "modules with devices": (
            RunRequest(image=f"id:{IMAGE_ID}", modules="gpu", command=("nvidia-smi",)),
            "modules:\n  gpu:\n"
            f"    devices: {devices!r}\n"
            f"    binds: ['{lib}:/opt/gpu/lib', '{lib}:/usr/lib/gpu:rw']\n"
            "    env:\n      prepend: {LD_LIBRARY_PATH: /opt/gpu/lib}\n",
        ),
        "private tmp": (
            RunRequest(
                image=f"id:{IMAGE_ID}", volumes=(f"{data}:/tmp/in/data",), command=("ls",)
            ),
            "runtime:\n  tmp: private\n",
        ),
        "env ops": (
            RunRequest(
                image=f"id:{IMAGE_ID}",
                env=("X=1", "SPACE=a b", "NL=line\nline", "EMPTY="),
                clearenv=True,
                workdir="/work",
                command=("env",),
            ),
            "runtime:\n  env:\n    set: {SITE: 'yes'}\n    append: {PATH: /site/bin}\n"
            "    unset: [FROM_IMAGE]\n",
        ),
    }


PLANS = ("volumes", "modules with devices", "private tmp", "env ops")


@pytest.mark.parametrize("name", PLANS)
def test_the_launcher_reads_what_python_writes(
    name: str, launcher: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    request, text = _plans(tmp_path)[name]
    plan, ops = plan_ops(tmp_path, monkeypatch, request, text)
    data = serialise(ops)
    assert parse(data) == ops
    result = dry_run(tmp_path / "recipe", data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == render(ops)
    names = [op.name for op in ops]
    if name == "modules with devices":
        attaches = [op.args[1] for op in ops if op.name == "attach"]
        assert "/opt/gpu/lib" in attaches and all(
            d in attaches for d in plan.modules[0][1].devices
        )
    if name == "private tmp":
        assert Op("mkdir", "/tmp/in", 0o755) in ops and Op("mkdir", "/tmp/in/data", 0o755) in ops
        assert "clone" in names and not any(o.name == "clone" and o.args[1] == "/tmp" for o in ops)
    if name == "env ops":
        assert names[-3:] == ["env-unset", "env-set", "exec"] or "env-clear" in names
        assert Op("chdir", "/work") in ops and Op("env-set", "NL", "line\nline") in ops


def test_a_job_root_recipe(launcher: str, tmp_path: Path, monkeypatch) -> None:
    request = RunRequest(image=f"id:{IMAGE_ID}", command=("id",))
    plan, _ = plan_ops(tmp_path, monkeypatch, request, "")
    root = "/var/run/shifter/n1/42/root"
    for userns in ("/var/run/shifter/n1/42/userns", None):
        ops = [*request_ops("key\n", [], None), *job_root_ops(root, userns), *command_ops(plan)]
        result = dry_run(tmp_path / "recipe", serialise(ops))
        assert result.returncode == 0, result.stderr
        assert result.stdout == render(ops)
        assert f"chroot {root}\n" in result.stdout


def test_the_flags_are_the_builds(tmp_path: Path, monkeypatch) -> None:
    """The recipe's flags are what assemble gives each mount: nosuid everywhere, nodev except
    where devices are passed, noexec for /proc, /sys, /dev and device nodes, read-only /sys,
    read-only volumes as asked, and a read-only root and /dev; private mount propagation
    except for a site volume with ``slave``."""
    request, text = _plans(tmp_path)["volumes"]
    _, ops = plan_ops(tmp_path, monkeypatch, request, text)
    text = render(ops)
    assert re.search(r"^clone \d+ /proc recursive nosuid,nodev,noexec private$", text, re.M)
    assert re.search(r"^clone \d+ /sys recursive ro,nosuid,nodev,noexec private$", text, re.M)
    assert re.search(r'^clone \d+ /dev/null "" nosuid,noexec private$', text, re.M)
    assert re.search(r"^clone \d+ /dev/pts recursive nosuid private$", text, re.M)
    host = tmp_path / "host"
    assert re.search(rf"^clone \d+ {host}/data/file recursive ro,nosuid,nodev private$", text, re.M)
    assert re.search(rf"^clone \d+ {host}/site recursive nosuid,nodev private$", text, re.M)
    assert re.search(rf"^clone \d+ {host}/site recursive nosuid,nodev slave$", text, re.M)
    assert "mount tmpfs /dev tmpfs nosuid,noexec mode=755\n" in text
    assert "overlay /tmp/shifter-launch-1001/0123456789abcdef/root nosuid,nodev " in text
    assert "fuse /tmp/shifter-launch-1001/0123456789abcdef/lower ro,nosuid,nodev " in text
    assert 'setattr /dev ro ""\nsetattr / ro ""\npivot\n' in text
    assert "symlink /proc/self/fd /dev/fd\n" in text


def _container_ops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, privileged: bool
) -> tuple[list[Op], dict[str, str]]:
    """The container operations a build runs for the "volumes" plan, with the sources named
    by their host paths, as a privileged (prolog, step root) or unprivileged build."""
    request, text = _plans(tmp_path)["volumes"]
    cfg = config.parse(text, "test.yaml")
    from shifter_core.image.store import ImageMetadata

    meta = ImageMetadata(id=IMAGE_ID, source="docker.io/library/busybox:latest",
                         digest="sha256:" + "cd" * 32, platform="linux/amd64", env=(),
                         workdir="/")  # fmt: skip
    plan = build_plan(request, cfg, meta, f"/store/{IMAGE_ID}.squashfs", _user(),
                      caller_env={}, cwd="/")  # fmt: skip
    monkeypatch.setattr(syscalls, "open_tree", lambda path, _flags: os.open(path, os.O_PATH))
    monkeypatch.setattr(assemble, "open_as_user", lambda _u, paths, _w: [
        os.open(p, os.O_PATH | os.O_CLOEXEC) for p in paths])  # fmt: skip
    monkeypatch.setattr(execute.Executor, "run", lambda _self, _ops: None)
    image = _image_tree(tmp_path / "image")
    builder = assemble.RootBuilder(plan, str(tmp_path / "root"), str(tmp_path / "staging"),
                                   privileged=privileged, mount_image=lambda _t: None)  # fmt: skip
    lower_fd = os.open(image, os.O_PATH | os.O_DIRECTORY)
    try:
        builder.collect()
        builder._plan_targets(lower_fd)
        builder._fill(lower_fd)
        names = {f"/proc/self/fd/{s.source_fd}": s.target for s in builder.specs if s.source_fd}
    finally:
        os.close(lower_fd)
        builder.close()
    renamed = [
        Op(op.name, op.args[0], names[str(op.args[1])], *op.args[2:]) if op.name == "clone" else op
        for op in builder.ops
    ]
    return renamed, names


def test_every_build_runs_the_same_operations(tmp_path: Path, monkeypatch) -> None:
    """A root prepared by Slurm (privileged) and one of ``shifter`` (unprivileged) are made of
    the same operations, with the same flags; only /proc (mounted fresh with privilege, else
    a copy of the host's) and the host's /tmp (a copy of the whole tree in a user namespace)
    differ, as the build decides in mountops."""
    ran = {}
    for privileged in (True, False):
        (tmp_path / str(privileged)).mkdir()
        ran[privileged] = _container_ops(tmp_path / str(privileged), monkeypatch, privileged)[0]

    def common(ops: list[Op]) -> list[str]:
        lines = render(op for op in ops if op.name != "clone" and op.name != "attach")
        return [ln for ln in lines.splitlines() if " /proc " not in f"{ln} "]

    assert common(ran[True]) == common(ran[False])
    clones = {p: {op for op in ops if op.name == "clone"} for p, ops in ran.items()}

    def without_slot(ops: set[Op]) -> set[tuple[object, ...]]:
        return {op.args[1:] for op in ops if op.args[1] not in ("/proc", "/tmp")}

    assert without_slot(clones[True]) == without_slot(clones[False])
    assert Op("mount", "proc", "/proc", "proc", syscalls.MS_NOSUID | syscalls.MS_NODEV
              | syscalls.MS_NOEXEC, "") in ran[True]  # fmt: skip
    assert not any(op.name == "mount" and op.args[2] == "proc" for op in ran[False])


def test_the_launcher_decides_nothing() -> None:
    """No mount flag, attribute or mount kind is chosen in C: the flag constants appear only
    in the table of their names (and the fallback definitions of the constants)."""
    source = SOURCE.read_text()
    code = re.sub(r"/\*.*?\*/", "", source, flags=re.S)
    table = re.search(r"mount_flag_names\[\] = \{.*?\};.*?mount_attr_names\[\] = \{.*?\};", code,
                      re.S)  # fmt: skip
    assert table, "the flag name tables are gone"
    rest = code.replace(table.group(0), "")
    flags = r"\b(MS_RDONLY|MS_NOSUID|MS_NODEV|MS_NOEXEC|MS_BIND|MOUNT_ATTR_\w+)\b"
    lines = [ln for ln in rest.splitlines() if re.search(flags, ln) and not ln.startswith("#")]
    assert lines == []
    kinds = r'"(proc|sys|tmpfs|device|tree|bind|dev|pernode)"'
    assert re.findall(kinds, rest) == []
    assert re.findall(r'"/(dev|tmp|proc|sys)"', rest) == [] and "mode=" not in rest
