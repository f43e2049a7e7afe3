"""Hostile jobs, as an ordinary user submits them, never drain a node nor leave anything.

Every class of job error the root side meets (volumes the user may not read, forbidden
targets, unknown modules, a prolog that fails because of the job, a step root of its own
that fails in an allocation without --image, values refused at submission) is submitted
through the real srun/sbatch, the plugin, the prolog and the epilog. Each job's user sees
why it failed; afterwards every node is idle (none drained) and no mount, loop device or job
directory is left.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.slurm import SLURM_CONF, run_as, wait_for_idle_cluster
from tests.integration.test_slurm_containers import leftovers, pull

pytestmark = pytest.mark.usefixtures("box")


@pytest.fixture(scope="module")
def busybox() -> str:
    return pull("busybox")


@pytest.fixture
def out_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="shifter-hostile-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _slurm(*argv: str) -> str:
    env = {"SLURM_CONF": str(SLURM_CONF), "PATH": "/usr/bin:/bin"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout


def node_states() -> set[str]:
    return set(_slurm("sinfo", "-h", "-N", "-o", "%T").split())


def admin_comment(job: str) -> str:
    match = re.search(r"AdminComment=(.*)", _slurm("scontrol", "show", "job", job))
    return match.group(1) if match else ""


# (what the user runs, what they must be told). A value refused at submission creates no job.
STEPS = [
    (["--volume=/root:/data"], "the source /root cannot be used: Permission denied"),
    (["--volume=/nonexistent:/data"], "the source /nonexistent cannot be used"),
    (["--volume=/tmp:/etc/foo"], "the target may not be /etc"),
    (["--volume=/tmp:/proc/x"], "the target may not be /proc"),
    (["--module=nosuch"], "unknown module 'nosuch'"),
    ([f"--volume=/tmp:/{'a' * 300}"], "--volume"),
    (["--volume=/tmp:/a\tb"], "--volume"),
    ([f"--volume={';'.join(f'/tmp:/v{i}' for i in range(100))}"], "--volume"),
    (["--module=" + ",".join(f"m{i}" for i in range(100))], "--module"),
    (["--volume=/tmp:/scratch:perNodeCache=size=999999T"], "size"),
]


def hostile_step(options: list[str], expected: str) -> None:
    result = run_as(["srun", "-N1", "--image=busybox", *options, "true"], timeout=120)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def step_root_in_plain_allocation(out_dir: Path, n: int) -> None:
    """A job without --image whose step needs a root of its own, and that root fails."""
    output = out_dir / f"plain-{n}.out"
    result = run_as(
        [
            "sbatch", "--wait", "-N1", "-o", str(output), "--wrap",
            "srun --image=busybox --volume=/root:/d true; echo step-exit=$?; "
            "echo mounts=$(grep -c /run/shifter-box/$SLURMD_NODENAME/$SLURM_JOB_ID/ "
            "/proc/self/mountinfo); true",
        ],
        timeout=120,
    )  # fmt: skip
    text = output.read_text()
    assert result.returncode == 0, result.stderr + text
    assert "the source /root cannot be used" in text and "step-exit=1" in text, text
    # nothing of the failed root stays mounted, before the job's epilog removes the rest
    assert "mounts=0" in text, text


def prolog_fails_because_of_the_job(out_dir: Path, n: int) -> None:
    """The job's own --volume cannot be set up: the prolog records it, the node stays up,
    the job's container steps and its admin comment say why."""
    output = out_dir / f"prolog-{n}.out"
    result = run_as(
        [
            "sbatch", "--wait", "--parsable", "-N1", "--image=busybox", "--volume=/root:/data",
            "-o", str(output), "--wrap", "srun --image=busybox true; echo step-exit=$?",
        ],
        timeout=120,
    )  # fmt: skip
    text = output.read_text()
    job = result.stdout.strip().split(";")[0]
    assert result.returncode == 0, result.stderr + text
    assert "the container of this job could not be set up" in text, text
    assert "the source /root cannot be used" in text and "step-exit=1" in text, text
    assert "shifter:" in admin_comment(job) and "/root" in admin_comment(job)


@pytest.mark.slow
def test_fifty_hostile_jobs_drain_nothing_and_leave_nothing(busybox, out_dir):
    jobs = itertools.cycle(
        [lambda n, s=s: hostile_step(*s) for s in STEPS]
        + [
            lambda n: step_root_in_plain_allocation(out_dir, n),
            lambda n: prolog_fails_because_of_the_job(out_dir, n),
        ]
    )
    for n, job in zip(range(50), jobs, strict=False):
        job(n)
        assert not {"drained", "draining", "down"} & node_states(), f"after hostile job {n}"
    wait_for_idle_cluster(timeout=120)
    assert leftovers() == []
    # the nodes still run containers
    result = run_as(["srun", "-N3", "--image=busybox", "true"])
    assert result.returncode == 0, result.stderr


def test_a_forged_job_environment_does_not_change_the_image(busybox):
    """SHIFTER_* variables of the user's environment stand in for nothing."""
    forged = "0" * 64
    result = run_as(
        ["srun", "-N1", "--image=busybox", "sh", "-c", "echo $SHIFTER_IMAGE"],
        SHIFTER_IMAGE=forged,
        SHIFTER_IMAGEREQUEST="docker:busybox:latest",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == busybox


def test_the_epilog_of_a_job_without_image_removes_a_killed_steps_root(busybox):
    """A job without Shifter options whose container step's slurmstepd dies (no exit
    callback runs): the job's epilog still removes the step's root."""
    wait_for_idle_cluster(timeout=120)
    result = run_as(
        ["sbatch", "--parsable", "-N1", "-w", "n2", "-o", "/dev/null", "--wrap",
         "srun --image=busybox sleep 67; sleep 67"]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    root = f"/run/shifter-box/n2/{job}/roots/"
    deadline = time.monotonic() + 60
    while root not in Path("/proc/self/mountinfo").read_text():
        assert time.monotonic() < deadline, "the step never made its root"
        time.sleep(0.2)
    # (check=False: a step whose task ended already has no slurmstepd left to kill; its
    # shared root stays for the epilog either way)
    subprocess.run(["pkill", "-KILL", "-f", rf"slurmstepd: \[{job}\.0\]"], check=False)
    subprocess.run(["scancel", job], env={"SLURM_CONF": str(SLURM_CONF)}, check=True)
    # linuxproc loses the step's tasks with their slurmstepd: end them as a site's cgroup would
    subprocess.run(["pkill", "-KILL", "-u", "alice", "-f", "sleep 67"], check=False)
    wait_for_idle_cluster(timeout=120)
    assert not {"drained", "draining", "down"} & node_states()
    assert leftovers() == []
