"""The development cluster itself (tools/box/box.py): nodes, users, registry, configuration."""

from __future__ import annotations

import grp
import json
import pwd
import subprocess
import time
import urllib.request

import pytest

from .conftest import Box


def run_as(
    box: Box, user: str, argv: list[str], timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run a Slurm client command as a test user, with a clean environment."""
    env = ["PATH=/usr/bin:/bin", "LANG=C.UTF-8", f"SLURM_CONF={box.slurm_conf}"]
    return subprocess.run(
        ["runuser", "-u", user, "--", "env", "-i", *env, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/tmp",
        check=False,
    )


def wait_all_idle(box: Box, timeout: float = 60) -> dict[str, str]:
    """Node states once every node is idle (jobs of earlier tests may still be completing)."""
    deadline = time.monotonic() + timeout
    while True:
        states = box.module.node_states(box.module.PATHS, reasons=True)
        if all(states.get(n) == "idle" for n in box.nodes) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def registry_get(box: Box, path: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{box.registry}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def test_three_nodes_idle(box: Box):
    states = wait_all_idle(box)
    assert states == {"n1": "idle", "n2": "idle", "n3": "idle"}


def test_sinfo_shows_the_debug_partition(box: Box):
    out = subprocess.run(
        ["sinfo", "--noheader", "--format", "%P %a %D %N"],
        capture_output=True,
        text=True,
        env=box.slurm_env(),
        check=True,
    ).stdout.split()
    assert out == ["debug*", "up", "3", "n[1-3]"]


def test_srun_on_three_nodes_as_alice(box: Box):
    result = run_as(box, "alice", ["srun", "-N3", "hostname"])
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3, result.stdout


def test_six_tasks_run_as_the_user_on_every_node(box: Box):
    result = run_as(
        box, "bob", ["srun", "-N3", "-n6", "sh", "-c", 'echo "$SLURMD_NODENAME $(id -un)"']
    )
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.splitlines())
    assert lines == sorted(f"{n} bob" for n in box.nodes for _ in range(2))


def test_test_users_share_the_science_group(box: Box):
    members = set(grp.getgrnam(box.group).gr_mem)
    for user in box.users:
        entry = pwd.getpwnam(user)
        assert user in members
        assert entry.pw_shell == "/bin/sh"
        assert entry.pw_dir == f"/home/{user}"


def test_registry_lists_the_seed_images(box: Box):
    if not (box.checkout / "tools" / "images" / "build.py").exists():
        pytest.skip("tools/images/build.py does not exist yet: the registry is not seeded")
    repositories = registry_get(box, "/v2/_catalog")["repositories"]
    assert "library/busybox" in repositories
    assert "latest" in registry_get(box, "/v2/library/busybox/tags/list")["tags"]


def test_shifter_config_is_accepted_by_privileged_readers(box: Box):
    from shifter_core import config

    loaded = config.load(str(box.shifter_config), privileged=True)
    assert loaded.image_path == str(box.image_path)
    assert oct(box.shifter_config.stat().st_mode & 0o777) == oct(0o644)


def test_plugstack_enables_the_plugin_once_built(box: Box):
    plugin = box.checkout / "build" / "shifter_spank.so"
    active = [
        line for line in box.plugstack_conf.read_text().splitlines() if line.startswith("required")
    ]
    if plugin.exists():
        assert active == [f"required {plugin} config={box.shifter_config}"]
    else:
        assert active == []


def test_daemons_listen_on_loopback_only(box: Box):
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=False).stdout
    if not out:
        pytest.skip("ss (iproute2) is not available")
    for line in out.splitlines():
        if any(name in line for name in ('"slurmctld"', '"slurmd"', '"docker-registry"')):
            local = line.split()[3]
            assert local.startswith("127.0.0.1:"), line


def test_the_node_count_comes_from_make_box_nodes_or_the_running_box(tmp_path, monkeypatch):
    """``make box NODES=N`` (SHIFTER_BOX_NODES); without it, the size slurm.conf was written
    with (so box-down stops all of them); else 3. slurm.conf names N nodes and N ports.
    (A 32-node box was brought up by hand: 32 idle nodes, srun -N32 --image=busybox ran 32
    tasks in the image, box-down left nothing; see README.)"""
    from .conftest import load_box_module

    module = load_box_module()
    conf = tmp_path / "slurm.conf"
    monkeypatch.delenv(module.NODE_COUNT_VAR, raising=False)
    assert module.node_count(conf) == 3  # no box yet
    monkeypatch.setattr(module, "NODES", tuple(f"n{i}" for i in range(1, 33)))
    text = module.rendered_configs(module.PATHS, plugin=True)["slurm.conf"]
    assert "NodeName=n[1-32] " in text and " Port=[17001-17032] " in text
    assert "PartitionName=debug Nodes=n[1-32] " in text
    conf.write_text(text)
    assert module.node_count(conf) == 32  # a running 32-node box
    monkeypatch.setenv(module.NODE_COUNT_VAR, "8")
    assert module.node_count(conf) == 8
    monkeypatch.setenv(module.NODE_COUNT_VAR, "0")
    with pytest.raises(SystemExit, match="give 1 to 64"):
        module.node_count(conf)
