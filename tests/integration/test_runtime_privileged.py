"""The privileged realisation (as the prolog and slurmstepd use it): prepare a job's root, let
other processes enter it (root dropping to the user; the user's own ``shifter`` on the fast
path), tear it down; perNodeCache; cleanup after failures."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shifter_core import config as config_module
from shifter_core.jobroot import read_record
from shifter_core.runtime import (
    RunRequest,
    User,
    build_plan,
    drop,
    enter,
    privileged,
    resolve_image,
    userns,
)
from shifter_core.runtime.errors import ModuleError

from .test_runtime_support import (  # noqa: F401 - fixtures 'rt', 'tmp_submount', ...
    config_with_site_volumes,
    host_mounts_with,
    loop_devices_of,
    runtime_fixture,
    shared_sources_fixture,
    shifter_as,
    tmp_submount_fixture,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the privileged path needs root")


def make_plan(rt, image_id: str, config: Path | None = None, **request):
    cfg = config_module.load(str(config or rt.config))
    user = User.from_uid(1001)
    meta, image_file = resolve_image(f"id:{image_id}", cfg, user)
    req = RunRequest(image=f"id:{image_id}", **request)
    return cfg, build_plan(req, cfg, meta, image_file, user, cwd="/tmp")


def enter_and_run(plan, root: str) -> subprocess.CompletedProcess[str]:
    """A second process (forked, as root) enters the prepared root and execs the command."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.dup2(write_end, 1)
            os.dup2(write_end, 2)
            # as a slurmstepd task does: pivot in as root, then drop to the user and exec
            enter.pivot_into(root)
            drop.drop_privileges(plan.user)
            drop.change_directory(plan.workdir, plan.workdir_explicit)
            drop.exec_command(plan.argv, plan.environ())
        finally:
            os._exit(99)
    os.close(write_end)
    with os.fdopen(read_end) as fh:
        output = fh.read()
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess([], os.waitstatus_to_exitcode(status), output, "")


def test_prepare_enter_teardown(rt):
    script = (
        "id; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs)' /proc/self/status; "
        "/bin/catroot; touch /usr/x 2>&1; echo $SHIFTER_RUNTIME; ls /a/b"
    )
    volume = rt.base / "priv-vol"
    volume.mkdir(exist_ok=True)
    os.chown(volume, 1001, 1002)
    cfg, plan = make_plan(
        rt, rt.testimg, volumes=(f"{volume}:/a/b/c",), command=("sh", "-c", script)
    )
    prepared = privileged.prepare_job(plan, cfg.runtime.run_dir, "n1", "1001")
    job = Path(cfg.runtime.run_dir) / "n1" / "1001"
    try:
        record = read_record(str(job))
        assert record is not None and record.root == prepared.root == str(job / "root")
        assert record.serves(plan.root_key()) and record.uid == 1001
        assert not record.serves(plan._replace(writable=True).root_key())
        assert prepared.loop_devices and loop_devices_of(rt.testimg)
        assert oct((job / "job.marshal").stat().st_mode & 0o777) == "0o644"
        result = enter_and_run(plan, prepared.root)
        assert result.returncode == 0, result.stdout
        lines = result.stdout.splitlines()
        # as root drops to the user, the real groups are kept (and named)
        assert lines[0] == "uid=1001(alice) gid=1002(alice) groups=1001(science),1002(alice)"
        assert lines[1:5] == [
            "CapPrm:\t0000000000000000",
            "CapEff:\t0000000000000000",
            "CapBnd:\t0000000000000000",
            "NoNewPrivs:\t1",
        ]
        assert "euid=1001" in lines and "denied: Permission denied" in lines
        assert "touch: /usr/x: Read-only file system" in lines
        assert lines[-2:] == ["1", "c"]
        # the user's own shifter in the job takes the fast path into the same root
        env = {
            "SLURM_JOB_ID": "1001",
            "SLURMD_NODENAME": "n1",
            "SHIFTER_IMAGE": rt.testimg,
            "SHIFTER_VOLUME": f"{volume}:/a/b/c",
        }
        out = shifter_as(rt, ["-v", "sh", "-c", "touch /a/b/c/from-shifter && id -u"], **env)
        assert out.returncode == 0, out.stderr
        assert f"entering the root prepared for this job: {prepared.root}" in out.stderr
        assert out.stdout == "1001\n"
        assert (volume / "from-shifter").stat().st_uid == 1001
        # another request (a different volume) builds a private root instead
        out = shifter_as(rt, ["-v", "-V/tmp:/other", "true"], **env)
        assert out.returncode == 0 and "made for another request" in out.stderr
    finally:
        problems = privileged.teardown_job(cfg.runtime.run_dir, "n1", "1001")
    assert problems == []
    assert not job.exists()
    assert host_mounts_with(str(job)) == []
    assert loop_devices_of(rt.testimg) == []
    assert privileged.teardown_job(cfg.runtime.run_dir, "n1", "1001") == []  # idempotent


JOIN = """
import os, sys
from shifter_core import syscalls
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    syscalls.setns(fd, syscalls.CLONE_NEWUSER)
except OSError as err:
    print(err.errno)
else:
    print("joined")
"""


def test_fast_path_joins_the_user_namespace_pinned_for_the_job(rt):
    """prepare_job pins a user namespace owned by the user in which all its gids are mapped:
    the user's shifter on the fast path joins it and shows its groups by their gids
    (setgroups stays denied); another user cannot join it; when it is gone shifter makes its
    own (groups shown as 65534); teardown unmounts it."""
    cfg, plan = make_plan(rt, rt.busybox)
    alice = pwd.getpwnam("alice")
    groups = sorted(os.getgrouplist("alice", alice.pw_gid))
    assert len(groups) > 1  # alice is in 'science' too
    prepared = privileged.prepare_job(plan, cfg.runtime.run_dir, "n1", "1002")
    # the namespace was cloned while this thread held alice's ids: it is root again
    assert os.getresuid() == (0, 0, 0) and os.getresgid() == (0, 0, 0)
    job = Path(cfg.runtime.run_dir) / "n1" / "1002"
    pinned = job / "userns"
    env = {"SLURM_JOB_ID": "1002", "SLURMD_NODENAME": "n1", "SHIFTER_IMAGE": rt.busybox}
    try:
        record = read_record(str(job))
        assert record is not None and record.userns == str(pinned)
        mounts = host_mounts_with(str(pinned))
        assert [line.split(" - ")[1].split()[0] for line in mounts] == ["nsfs"]
        assert pinned.stat().st_uid == 0
        script = "id -G; cat /proc/self/uid_map /proc/self/gid_map /proc/self/setgroups"
        out = shifter_as(rt, ["-v", "sh", "-c", script], **env)
        assert out.returncode == 0, out.stderr
        assert f"entering the root prepared for this job: {prepared.root}" in out.stderr
        lines = out.stdout.splitlines()
        assert sorted(int(g) for g in lines[0].split()) == groups
        assert lines[1].split() == [str(alice.pw_uid), str(alice.pw_uid), "1"]
        mapped = {
            first + i
            for first, _, count in (map(int, line.split()) for line in lines[2:-1])
            for i in range(count)
        }
        assert mapped == set(groups) and lines[-1] == "deny"
        # the namespace is alice's: bob cannot even reach it (the job directory is alice's only)
        bob = subprocess.run(
            ["runuser", "-u", "bob", "--", sys.executable, "-c", JOIN, str(pinned)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/tmp",
            check=False,
        )
        assert bob.returncode != 0 and "Permission denied" in bob.stderr, bob.stdout + bob.stderr
        # no pinned namespace any more: shifter falls back to a namespace of its own
        assert userns.release(str(pinned)) == [] and not pinned.exists()
        out = shifter_as(rt, ["-vv", "id", "-G"], **env)
        assert out.returncode == 0, out.stderr
        assert "no user namespace pinned for this job" in out.stderr
        shown = [int(g) for g in out.stdout.split()]
        assert alice.pw_gid in shown and 65534 in shown
    finally:
        problems = privileged.teardown_job(cfg.runtime.run_dir, "n1", "1002")
    assert problems == []
    assert host_mounts_with(str(job)) == [] and not job.exists()


def test_prepare_with_a_mount_below_host_tmp(rt, tmp_submount):
    """A root prepared as root, in the host's mount namespace (no locked mounts), still binds
    the host's /tmp alone, nosuid and nodev, when a mount exists below it."""
    host_file = Path(f"/tmp/shifter-test-hostfile-{os.getpid()}")
    host_file.write_text("from the host\n")
    script = f"cat {host_file} && grep ' /tmp ' /proc/self/mountinfo"
    _, plan = make_plan(rt, rt.busybox, command=("sh", "-c", script))
    root = str(rt.base / "tmp-submount-root")
    try:
        prepared = privileged.prepare(plan, root)
        try:
            result = enter_and_run(plan, prepared.root)
        finally:
            assert privileged.teardown(root, prepared.loop_devices) == []
    finally:
        host_file.unlink()
    assert result.returncode == 0, result.stdout
    first, mount = result.stdout.splitlines()
    assert first == "from the host"
    assert {"nosuid", "nodev"} <= set(mount.split()[5].split(","))
    assert host_mounts_with(root) == []


def test_site_volume_slave_propagation_in_a_job_root(rt, shared_sources, tmp_path):
    """A job's root (the prolog's, in the host's mount namespace) and the task that entered
    it: what the host mounts below a ``:slave`` site volume's source afterwards shows in the
    task; below a volume without the flag it does not."""
    slave, plain = shared_sources
    config = config_with_site_volumes(
        rt, f"job-propagation-{tmp_path.name}", [f"{slave}:/dws:slave", f"{plain}:/plain"]
    )
    script = (
        "i=0; while [ ! -e /dws/sub/marker ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); "
        "done; cat /dws/sub/marker; cat /plain/sub/marker 2>/dev/null || echo no-plain-marker"
    )
    cfg, plan = make_plan(rt, rt.busybox, config, command=("sh", "-c", script))
    prepared = privileged.prepare_job(plan, cfg.runtime.run_dir, "n1", "1002")

    def mount_below_the_sources() -> None:
        for path in (slave, plain):
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "dws", f"{path}/sub"],
                           check=True)  # fmt: skip
            (path / "sub" / "marker").write_text(f"{path.name} marker\n")

    timer = threading.Timer(1.0, mount_below_the_sources)  # after the task entered the root
    timer.start()
    try:
        result = enter_and_run(plan, prepared.root)
    finally:
        timer.join()
        assert privileged.teardown_job(cfg.runtime.run_dir, "n1", "1002") == []
        for path in (slave, plain):
            subprocess.run(["umount", "-l", f"{path}/sub"], check=False)
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines() == [f"{slave.name} marker", "no-plain-marker"]
    assert host_mounts_with(str(prepared.root)) == []


def test_per_node_cache(rt):
    _, plan = make_plan(rt, rt.busybox, volumes=("/dev/null:/scratch:perNodeCache=size=64M",))
    cache_dir = Path(plan.runtime.per_node_cache_dir)
    root = str(rt.base / "pnc-root")
    prepared = privileged.prepare(plan, root)
    try:
        assert list(cache_dir.iterdir()) == []  # unlinked once mounted
        script = "stat -c '%u %a' /scratch; echo x > /scratch/f && df -k /scratch | tail -1"
        plan = plan._replace(argv=("sh", "-c", script))
        result = enter_and_run(plan, prepared.root)
        assert result.returncode == 0, result.stdout
        first, df = result.stdout.splitlines()
        assert first == "1001 700"
        assert 50_000 < int(df.split()[1]) <= 65_536
        assert len(prepared.loop_devices) == 2
    finally:
        assert privileged.teardown(root, prepared.loop_devices) == []
    assert host_mounts_with(root) == []
    assert loop_devices_of(str(cache_dir)) == [] and loop_devices_of(rt.busybox) == []
    # shifter itself refuses perNodeCache (it needs root)
    out = shifter_as(rt, [f"--image=id:{rt.busybox}", "-V/x:/s:perNodeCache=size=1M", "true"])
    assert out.returncode == 125 and "perNodeCache needs a root prepared by Slurm" in out.stderr


def test_failed_prepare_leaves_nothing(rt):
    hook = rt.base / "failing-hook"
    hook.write_text("#!/bin/sh\necho hook ran on $1 >&2\nexit 3\n")
    hook.chmod(0o755)
    cfg, plan = make_plan(rt, rt.busybox)
    module = config_module.ModuleConfig(root_hook=str(hook))
    plan = plan._replace(modules=(("hooked", module),))
    root = str(rt.base / "failed-root")
    with pytest.raises(ModuleError, match=r"root hook .* failed \(exit 3\): hook ran on"):
        privileged.prepare(plan, root)
    assert host_mounts_with(root) == []
    assert loop_devices_of(rt.busybox) == []
    assert not Path(root).exists() and not Path(root + ".staging").exists()
    # a stale job directory (a crashed prepare) does not stop the next prolog
    job = Path(cfg.runtime.run_dir) / "n2" / "77"
    (job / "root").mkdir(parents=True)
    (job / "job.marshal").write_text("{}")
    _, plan = make_plan(rt, rt.busybox)
    prepared = privileged.prepare_job(plan, cfg.runtime.run_dir, "n2", "77")
    assert privileged.teardown_job(cfg.runtime.run_dir, "n2", "77") == []
    assert host_mounts_with(prepared.root) == [] and not job.exists()


def test_refusals(rt):
    _, plan = make_plan(rt, rt.busybox)
    root_user = plan._replace(user=User(0, 0, (0,), "root"))
    with pytest.raises(Exception, match="as root"):
        drop.drop_privileges(root_user.user)
