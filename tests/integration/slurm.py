"""Helpers for tests that drive the box's Slurm cluster as a test user."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BOX = ROOT / ".box"
SLURM_CONF = BOX / "etc" / "slurm.conf"
SHIFTER_CONFIG = BOX / "etc" / "shifter.yaml"
PLUGSTACK = BOX / "etc" / "plugstack.conf"
USER = "alice"
OTHER_USER = "bob"


def user_env(**extra: str) -> dict[str, str]:
    """A clean environment for a test user's commands."""
    env = {
        "PATH": f"{ROOT / '.venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "SLURM_CONF": str(SLURM_CONF),
        "SHIFTER_CONFIG": str(SHIFTER_CONFIG),
        "LANG": "C.UTF-8",
    }
    env.update(extra)
    return env


def run_as(
    argv: list[str],
    user: str = USER,
    timeout: float = 120,
    input_text: str | None = None,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user`` (in /tmp), with ``input_text`` on its standard input, and
    capture its output."""
    command = [
        "runuser",
        "-u",
        user,
        "--",
        "env",
        "-i",
        *(f"{k}={v}" for k, v in user_env(**env).items()),
        *argv,
    ]
    # A session of its own, so that a timeout kills salloc/srun and what they started, not
    # only runuser: a client left behind keeps its allocation and the next tests find no node.
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/tmp",
        stdin=None if input_text is None else subprocess.PIPE,
        start_new_session=True,
    ) as proc:  # fmt: skip
        try:
            stdout, stderr = proc.communicate(input_text, timeout=timeout)
        except BaseException:  # the timeout here, or pytest-timeout's for the whole test
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def unique_name(prefix: str = "t") -> str:
    """A job name no other test uses, to look a job up in squeue."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def jobs_named(name: str) -> list[str]:
    """Ids of jobs with this name in any state that slurmctld still remembers."""
    return _slurm(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i"]).split()


def slurmd_logs() -> str:
    """Everything the three slurmd (and their slurmstepd) logged."""
    return "".join(p.read_text(errors="replace") for p in sorted((BOX / "log").glob("slurmd-*")))


def _slurm(argv: list[str]) -> str:
    env = {**os.environ, "SLURM_CONF": str(SLURM_CONF)}
    return subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout


def wait_for_idle_cluster(timeout: float = 60) -> None:
    """Wait until no job runs or completes (epilogs included) and every node is idle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = _slurm(["squeue", "-h", "-t", "PD,R,CG,CF", "-o", "%i"]).split()
        states = set(_slurm(["sinfo", "-h", "-N", "-o", "%t"]).split())
        if not jobs and states == {"idle"}:
            return
        time.sleep(0.2)
    raise TimeoutError(f"cluster not idle after {timeout} s: jobs {jobs}, node states {states}")


def cancel_leftover_jobs(users: tuple[str, ...] = (USER, OTHER_USER)) -> list[str]:
    """Cancel the test users' jobs still known to slurmctld and wait for an idle cluster.

    Returns the ids cancelled (empty when the test left nothing).
    """
    jobs = _slurm(["squeue", "-h", "-t", "PD,R,S", "-u", ",".join(users), "-o", "%i"]).split()
    if jobs:
        _slurm(["scancel", *jobs])
    wait_for_idle_cluster(timeout=120)
    return jobs
