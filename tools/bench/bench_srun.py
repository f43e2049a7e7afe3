"""Cost of running job steps in a container, and of the prolog that prepares it.

In two allocations of the box's three nodes, as the test user, against ``srun -N3 true`` in
an allocation made without ``--image`` (the plugin stays out):

- ``srun -N3 --image=busybox true`` in that same allocation (the first step prepares a root
  per node, shared by the job's later steps; srun asks the gateway for the image);
- ``srun -N3 --image=busybox true`` in an allocation made with ``--image=busybox`` (its
  prolog prepared the root; the steps get the environment a job script has, so srun does
  not ask the gateway, as in a real job);
- ``srun -N3 --image=mpich-hello true`` in that allocation: another image than the job's
  (a shared root, as in the first allocation);

interleaved step by step, medians over 30 steps each, after one warm-up step of each. It
also checks that the measured steps do no image I/O (no new loop device, no new root), and
times the prolog per node for an image already in the node cache and for one that is not
(read from the prolog's own log lines).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.integration.slurm import (  # noqa: E402
    BOX,
    SLURM_CONF,
    USER,
    run_as,
    slurmd_logs,
    unique_name,
    wait_for_idle_cluster,
)

NODES = ("n1", "n2", "n3")
BASE = "no --image alloc: srun (no image)"
PREPARED = r"prepared /\S+/root |prepared a root for the job's steps"  # prolog, stepd


def lookup(image: str) -> str:
    result = run_as(["shifterimg", "lookup", image])
    if result.returncode != 0:
        pull = run_as(["shifterimg", "pull", image], timeout=600)
        if pull.returncode != 0:
            raise SystemExit(f"cannot pull {image}: {pull.stderr}")
        result = run_as(["shifterimg", "lookup", image])
    return result.stdout.strip()


def allocate(*options: str) -> tuple[str, str]:
    name = unique_name("bench-srun")
    result = run_as(["salloc", "-J", name, "-N3", "--no-shell", *options], timeout=300)
    match = re.search(r"Granted job allocation (\d+)", result.stderr)
    if not match:
        raise SystemExit(f"salloc failed: {result.stderr}")
    return match.group(1), name


def step(job: str, env: dict[str, str], image: str | None) -> float:
    argv = ["srun", f"--jobid={job}", "-N3"] + ([f"--image={image}"] if image else []) + ["true"]
    start = time.perf_counter()
    result = run_as(argv, **env)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {result.stderr}")
    return elapsed


def prolog_seconds(job: str) -> dict[str, float]:
    """Per node: from the prolog's first log line to its "ready" line."""
    stamps: dict[str, list[datetime]] = {}
    pattern = re.compile(rf"^\[(\S+)\] shifter: prolog: job {job} on (?:node )?(n\d)[: ]", re.M)
    for when, node in pattern.findall(slurmd_logs()):
        stamps.setdefault(node, []).append(datetime.fromisoformat(when))
    return {node: (max(t) - min(t)).total_seconds() for node, t in sorted(stamps.items())}


def loop_devices() -> int:
    return len(list(Path("/sys/block").glob("loop*/loop/backing_file")))


def scancel(job: str) -> None:
    subprocess.run(["scancel", job], check=False, env={"SLURM_CONF": str(SLURM_CONF)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    busybox = lookup("busybox")
    mpi = lookup("mpich-hello")
    wait_for_idle_cluster()
    # The uncached prolog: take the MPI image out of every node cache first.
    for node in NODES:
        (BOX / "cache" / "nodes" / node / f"{mpi}.squashfs").unlink(missing_ok=True)
    uncached_job, _ = allocate("--image=mpich-hello")
    scancel(uncached_job)
    wait_for_idle_cluster()

    plain, _ = allocate()
    contained, _ = allocate("--image=busybox")
    env = {  # what a job submitted with --image=busybox has in its environment
        "SHIFTER_IMAGEREQUEST": "docker:busybox",
        "SHIFTER_IMAGE": busybox,
        "SLURM_SPANK__SLURM_SPANK_OPTION_shifter_image": "busybox",
    }
    variants = {  # name: (job, environment, image)
        BASE: (plain, {}, None),
        "no --image alloc: srun --image=busybox": (plain, {}, "busybox"),
        "--image alloc: srun --image=busybox": (contained, env, "busybox"),
        "--image alloc: srun --image=mpich-hello": (contained, env, "mpich-hello"),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for job, environment, image in variants.values():  # warm-up: the first steps
            step(job, environment, image)
        prepared_before = len(re.findall(PREPARED, slurmd_logs()))
        loops_before = loop_devices()
        for _ in range(args.steps):
            for name, (job, environment, image) in variants.items():
                times[name].append(step(job, environment, image))
        loops_after = loop_devices()
    finally:
        scancel(plain)
        scancel(contained)
    wait_for_idle_cluster()
    prepared = len(re.findall(PREPARED, slurmd_logs())) - prepared_before

    base = statistics.median(times[BASE])
    report: dict[str, object] = {}
    print(f"as {USER}, {args.steps} steps per variant, interleaved")
    print(f"{'variant (srun -N3 ... true)':<42} {'median ms':>10} {'p90 ms':>8} {'vs plain':>9}")
    for variant, values in times.items():
        median = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1]
        report[variant] = {"median_s": median, "p90_s": p90, "delta_ms": (median - base) * 1000}
        print(
            f"{variant:<42} {median * 1000:>10.1f} {p90 * 1000:>8.1f} "
            f"{(median - base) * 1000:>+8.1f}"
        )
    worst_step = max(statistics.median(v) for v in times.values()) - base
    print(
        f"per-step cost of the container, worst variant: {worst_step * 1000:+.1f} ms "
        f"(target <= +50 ms): {'OK' if worst_step <= 0.05 else 'OVER TARGET'}"
    )
    io_free = loops_after == loops_before and prepared == 0
    print(
        f"image I/O in the measured steps: loop devices {loops_before} -> {loops_after}, "
        f"roots prepared: {prepared}: {'none' if io_free else 'SOME'}"
    )
    cached = prolog_seconds(contained)
    uncached = prolog_seconds(uncached_job)
    print(
        "prolog per node, image cached (busybox):   "
        + ", ".join(f"{n} {s:.3f} s" for n, s in cached.items())
    )
    print(
        "prolog per node, image uncached (mpich):   "
        + ", ".join(f"{n} {s:.3f} s" for n, s in uncached.items())
    )
    worst = max(cached.values(), default=0.0)
    print(
        f"cached prolog: worst node {worst:.3f} s (target <= 0.2 s): "
        f"{'OK' if worst <= 0.2 else 'OVER TARGET'}"
    )
    report.update(
        {
            "loop_devices": [loops_before, loops_after],
            "roots_prepared": prepared,
            "prolog_cached_s": cached,
            "prolog_uncached_s": uncached,
        }
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
