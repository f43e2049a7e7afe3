"""The SPANK plugin in a real Slurm cluster (the box): options, validation, exports."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .slurm import (
    SHIFTER_CONFIG,
    jobs_named,
    run_as,
    slurmd_logs,
    unique_name,
    wait_for_idle_cluster,
)

pytestmark = pytest.mark.usefixtures("box")


@pytest.fixture
def user_tmp() -> Iterator[Path]:
    """A scratch directory the test user can write to."""
    path = Path(tempfile.mkdtemp(prefix="shifter-test-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("command", ["srun", "sbatch", "salloc"])
def test_help_lists_the_options(command):
    result = run_as([command, "--help"])
    assert result.returncode == 0, result.stderr
    for option in ("--image=IMAGE", "--volume=SRC:DST[:FLAGS]", "--module=NAME[,NAME]"):
        assert option in result.stdout


def test_bad_image_fails_srun_before_a_job_exists():
    name = unique_name()
    result = run_as(["srun", "-J", name, "--image=bad image!", "true"])
    assert result.returncode != 0
    assert "invalid image reference 'bad image!'" in result.stderr
    assert jobs_named(name) == []


def test_empty_image_fails_sbatch_before_a_job_exists():
    name = unique_name()
    result = run_as(["sbatch", "-J", name, "--image=", "--wrap", "true"])
    assert result.returncode != 0
    assert "empty image name" in result.stderr
    assert jobs_named(name) == []


@pytest.mark.parametrize(
    "option, message",
    [
        ("--volume=relative:/x", "not an absolute path"),
        ("--volume=/a:/b:bogus", "unknown flag 'bogus'"),
        ("--module=none,gpu", "cannot be combined"),
    ],
)
def test_bad_volume_and_module_values_fail_the_submission(option, message):
    name = unique_name()
    result = run_as(["sbatch", "-J", name, "--image=busybox", option, "--wrap", "true"])
    assert result.returncode != 0
    assert message in result.stderr
    assert jobs_named(name) == []


def test_volume_without_image_is_refused():
    result = run_as(["srun", "--volume=/a:/b", "true"])
    assert result.returncode != 0
    assert "need --image" in result.stderr


def test_hostile_python_environment_cannot_break_srun():
    result = run_as(
        ["srun", "-N1", "--image=busybox", "true"],
        PYTHONHOME="/nonexistent",
        PYTHONPATH="/nonexistent",
        PYTHONSTARTUP="/nonexistent",
    )
    assert result.returncode == 0, result.stderr
    plain = run_as(["srun", "-N1", "true"], PYTHONHOME="/nonexistent", PYTHONPATH="/nonexistent")
    assert plain.returncode == 0, plain.stderr


def test_srun_exports_every_volume_to_tasks_on_all_nodes():
    result = run_as(
        [
            "srun",
            "-N3",
            "--image=busybox",
            "--volume=/tmp:/a",
            "--volume=/var/tmp:/b:ro",
            "--module=none",
            "sh",
            "-c",
            'echo "$SLURMD_NODENAME|$SHIFTER_IMAGEREQUEST|$SHIFTER_VOLUME|$SHIFTER_MODULE"',
        ]
    )
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.split())
    assert [line.split("|")[0] for line in lines] == ["n1", "n2", "n3"]
    for line in lines:
        # SHIFTER_IMAGEREQUEST: the --image as typed (job scripts compare it)
        assert line.split("|")[1:] == ["busybox", "/tmp:/a:rw;/var/tmp:/b:ro", "none"]


def test_batch_job_and_its_steps_see_every_volume(user_tmp):
    output = user_tmp / "job.out"
    script = (
        'echo "batch $SHIFTER_IMAGEREQUEST $SHIFTER_VOLUME"\n'
        "srun -N3 sh -c 'echo \"step $SLURMD_NODENAME $SHIFTER_IMAGEREQUEST $SHIFTER_VOLUME\"'\n"
    )
    result = run_as(
        [
            "sbatch",
            "-N3",
            "--wait",
            "-o",
            str(output),
            "--image=docker:busybox:latest",
            "--volume=/tmp:/a;/var/tmp:/b",
            "--volume=/opt:/c:ro",
            "--wrap",
            script,
        ],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = output.read_text().splitlines()
    volumes = "/tmp:/a:rw;/var/tmp:/b:rw;/opt:/c:ro"
    assert f"batch docker:busybox:latest {volumes}" in lines
    steps = sorted(line for line in lines if line.startswith("step "))
    assert steps == [f"step {n} docker:busybox:latest {volumes}" for n in ("n1", "n2", "n3")]


def test_plugin_logs_its_hooks_on_every_node():
    name = unique_name()
    result = run_as(["srun", "-J", name, "-N3", "--image=busybox", "true"])
    assert result.returncode == 0, result.stderr
    (job,) = jobs_named(name)
    logs = slurmd_logs()
    for node in ("n1", "n2", "n3"):
        assert re.search(rf"shifter: user_init: job {job} step \d+ on node {node}: image", logs)
        assert re.search(rf"shifter: prolog: job {job} on node {node}: image busybox", logs)


def test_fifty_steps_in_one_allocation_do_not_hang():
    """... and leave nothing: the allocation has no --image, so no prolog of ours runs for
    it; the steps share one root per node, which the epilog removes."""
    script = (
        "echo $SLURM_JOB_ID; "
        "for i in $(seq 50); do timeout 60 srun -N3 -n6 --image=busybox true || exit $i; done"
    )
    result = run_as(["salloc", "-N3", "-n6", "sh", "-c", script], timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    job = result.stdout.split()[0]
    # The last step's slurmstepd may still be tearing down when salloc returns.
    deadline = time.monotonic() + 30
    while (left := list(Path("/run/shifter-box").glob(f"*/{job}"))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []  # below runtime.run_dir of the box


def _plain_job_epilogs(hint: bool) -> list[str]:
    """Run a job without Shifter options on three nodes, with or without the shim's hint
    beside the configuration; the nodes whose epilog started Python for it."""
    hint_file = SHIFTER_CONFIG.with_name(f".{SHIFTER_CONFIG.name}.shim")
    if not hint:
        hint_file.unlink(missing_ok=True)
    else:  # any root-side load writes it
        subprocess.run([sys.executable, "-c", "from shifter_core.config import load; "
                        f"load('{SHIFTER_CONFIG}', privileged=True)"], check=True)  # fmt: skip
        assert hint_file.exists()
    result = run_as(["sbatch", "--parsable", "-N3", "-o", "/dev/null", "--wrap", "true"])
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    wait_for_idle_cluster()
    return re.findall(rf"epilog: job {job} on node (n\d): nothing of it here", slurmd_logs())


def test_the_epilog_of_a_job_without_shifter_starts_no_python():
    """The shim tells from the hint Python left beside the configuration that a job left
    nothing on a node, and starts no interpreter for its epilog; without the hint, Python
    looks (and writes the hint again)."""
    assert sorted(_plain_job_epilogs(hint=False)) == ["n1", "n2", "n3"]
    assert _plain_job_epilogs(hint=True) == []


@pytest.fixture
def broken_config() -> Iterator[None]:
    """Put an unknown key into the box's configuration for the duration of a test."""
    wait_for_idle_cluster()  # no epilog of an earlier job may see the broken file
    saved = SHIFTER_CONFIG.with_name("shifter.yaml.saved")
    shutil.copy2(SHIFTER_CONFIG, saved)
    try:
        partial = SHIFTER_CONFIG.with_name("shifter.yaml.partial")
        partial.write_text(SHIFTER_CONFIG.read_text() + "image_pth: /typo\n")
        partial.chmod(0o644)
        partial.replace(SHIFTER_CONFIG)
        yield
    finally:
        saved.replace(SHIFTER_CONFIG)
    wait_for_idle_cluster()  # and no node was drained by it


@pytest.mark.usefixtures("broken_config")
@pytest.mark.parametrize(
    "argv",
    [
        ["srun", "-N1", "--image=busybox", "true"],
        ["sbatch", "--image=busybox", "--wrap", "true"],
        ["salloc", "--image=busybox", "true"],
        ["srun", "-N1", "--module=none", "--image=busybox", "true"],
    ],
)
def test_unknown_config_key_fails_every_shifter_command(argv):
    name = unique_name()
    result = run_as([argv[0], "-J", name, *argv[1:]])
    assert result.returncode != 0
    assert "unknown key 'image_pth'" in result.stderr
    assert "shifter.yaml, line" in result.stderr
    assert jobs_named(name) == []


@pytest.mark.usefixtures("broken_config")
def test_jobs_without_shifter_options_do_not_depend_on_its_config():
    # The plugin stays out of jobs that do not use it: a typo in shifter.yaml must not
    # stop every srun on the cluster.
    assert run_as(["srun", "-N3", "true"]).returncode == 0
    result = run_as(["sbatch", "--wait", "-o", "/dev/null", "--wrap", "true"])
    assert result.returncode == 0, result.stderr
