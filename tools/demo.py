"""``make demo``: show what Shifter-in-a-box can do, step by step, as a test user.

Each step prints the command, runs it, prints its output and checks it; the demo exits
non-zero at the first step that does not do what it should.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.slurm import (  # noqa: E402
    SLURM_CONF,
    USER,
    jobs_named,
    run_as,
    slurmd_logs,
    unique_name,
)


def say(text: str) -> None:
    """Demo output goes to the terminal: that is the point of a demo."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def step(
    title: str, argv: list[str], check: Callable[[str], str | None], as_user: bool = True
) -> str:
    """Run one demo step; ``check`` returns None when the output is right, else why not."""
    say(f"\n=== {title}")
    say(f"$ {' '.join(argv)}" + (f"    (as {USER})" if as_user else ""))
    if as_user:
        result = run_as(argv)
    else:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            check=False,
            env={"SLURM_CONF": str(SLURM_CONF), "PATH": "/usr/bin:/bin"},
        )
    output = result.stdout + result.stderr
    say(output.rstrip())
    problem = check(output) if result.returncode == 0 else f"exit code {result.returncode}"
    if problem:
        say(f"!!! demo step failed: {problem}")
        raise SystemExit(1)
    return output


def three_idle_nodes(output: str) -> str | None:
    nodes = re.findall(r"^(n\d)\s+\S+\s+idle", output, re.M)
    return None if sorted(nodes) == ["n1", "n2", "n3"] else "expected n1, n2, n3 idle"


def expect(pattern: str, count: int, what: str) -> Callable[[str], str | None]:
    """A check: ``pattern`` occurs ``count`` times in the output."""

    def check(output: str) -> str | None:
        found = len(re.findall(pattern, output, re.M))
        return None if found == count else f"expected {count} x {what}, saw {found}"

    return check


def plugin_evidence(job: str) -> None:
    """Show the plugin's prolog and step log lines of ``job`` from every node's slurmd log."""
    say(f"\n=== The plugin's evidence for job {job} in the slurmd logs of all three nodes")
    pattern = re.compile(rf"shifter: (user_init|prolog): job {job}\b.* on (?:node )?(n\d)")
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in slurmd_logs().splitlines() if pattern.search(line)]
        nodes = {pattern.search(line).group(2) for line in lines}
        if nodes == {"n1", "n2", "n3"} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for line in sorted(lines, key=lambda text: pattern.search(text).group(2)):
        say(line)
    if nodes != {"n1", "n2", "n3"}:
        say("!!! no plugin log lines from every node")
        raise SystemExit(1)


def main() -> None:
    step(
        "The box's Slurm cluster: three nodes on this machine",
        ["sinfo", "-N", "-o", "%N %P %t"],
        three_idle_nodes,
        as_user=False,
    )
    step(
        "The plugin's options are in srun --help",
        ["sh", "-c", "srun --help | grep -A1 -E -- '--(image|volume|module)='"],
        lambda out: None if out.count("Shifter:") == 3 else "options missing",
    )
    step(
        "A bad image name fails the submission, with the reason",
        ["sh", "-c", "srun --image='bad image!' true; echo exit code $?"],
        lambda out: (
            None
            if "invalid image reference" in out and "exit code 0" not in out
            else "srun should have failed"
        ),
    )
    step(
        "shifterimg pull busybox: the image gateway pulls it into the image store",
        ["shifterimg", "pull", "busybox"],
        lambda out: None if "is READY:" in out else "the pull did not end READY",
    )
    step(
        "shifterimg images: the image is READY for everyone",
        ["shifterimg", "images"],
        lambda out: (
            None
            if re.search(r"^READY\s+[0-9a-f]{12}\s.*docker\.io/library/busybox:latest$", out, re.M)
            else "busybox is not listed READY"
        ),
    )
    step(
        "shifter on a login node: the container runs as the user, without privilege",
        [
            "sh",
            "-c",
            'shifter --image=busybox sh -c \'id; grep -E "^(CapEff|NoNewPrivs)" '
            "/proc/self/status; cat /etc/shifter-test-image'",
        ],
        expect(r"^shifter busybox test image$", 1, "the image's file"),
    )
    name = unique_name("demo")
    step(
        "srun -N3 --image=busybox: every task in the container, on three nodes",
        [
            "srun",
            "-J",
            name,
            "-N3",
            "--image=busybox",
            "sh",
            "-c",
            'echo "$SLURMD_NODENAME: $(cat /etc/shifter-test-image)"',
        ],
        expect(r"^n\d: shifter busybox test image$", 3, "a task in the container"),
    )
    (job,) = jobs_named(name)
    plugin_evidence(job)
    step(
        "The same command without --image runs on the host, where the file does not exist",
        ["sh", "-c", "srun -N3 cat /etc/shifter-test-image; echo exit code $?"],
        expect(r"No such file or directory", 3, "a task on the host"),
    )
    script = (
        'echo "batch script on $(hostname), image $SHIFTER_IMAGEREQUEST"; '
        "srun -N3 shifter cat /etc/shifter-test-image; "
        "srun -N3 --image=busybox sh -c 'echo $SLURMD_NODENAME in the container: "
        "$(cat /etc/shifter-test-image)'"
    )
    output = f"/tmp/{unique_name('demo-batch')}.out"
    batch = (
        f"sbatch --wait -N3 --image=busybox -o {output} --wrap {shlex.quote(script)} && "
        f"cat {output}; rm -f {output}"
    )
    step(
        "sbatch --image=busybox: the prolog prepares the container once per node; "
        "`srun shifter` and `srun --image` steps enter it",
        ["sh", "-c", batch],
        expect(r"shifter busybox test image$", 6, "a line from the container"),
    )
    step(
        "shifterimg pull mpich-hello: an image with MPICH and a compiled MPI program",
        ["shifterimg", "pull", "mpich-hello"],
        lambda out: None if "is READY:" in out else "the pull did not end READY",
    )
    step(
        "MPICH ranks sharing a node: srun --mpi=pmi2 -N1 -n2 --image=mpich-hello (across the "
        "box's nodes MPICH's UCX TCP transport may hang in MPI_Finalize: openucx/ucx#8738)",
        ["srun", "--mpi=pmi2", "-N1", "-n2", "--image=mpich-hello", "/usr/local/bin/mpi-hello"],
        expect(r"^hello from rank \d of 2 on \S+ \(SLURMD_NODENAME=n\d\)$", 2, "an MPI rank"),
    )
    step(
        "shifterimg pull openmpi-hello: the same program built with Open MPI",
        ["shifterimg", "pull", "openmpi-hello"],
        lambda out: None if "is READY:" in out else "the pull did not end READY",
    )
    step(
        "MPI across the cluster, Open MPI over PMIx: srun --mpi=pmix -N3 -n6 --image=openmpi-hello "
        "(OMPI_MCA_btl=self,tcp: the box's three nodes share one host's shared memory)",
        [
            "env",
            "OMPI_MCA_btl=self,tcp",
            "PMIX_MCA_gds=hash",
            "srun",
            "--mpi=pmix",
            "-N3",
            "-n6",
            "--image=openmpi-hello",
            "/usr/local/bin/mpi-hello",
        ],
        expect(r"^hello from rank \d of 6 on \S+ \(SLURMD_NODENAME=n\d\)$", 6, "an MPI rank"),
    )
    say("\nDemo finished: every step did what it should.")


if __name__ == "__main__":
    main()
