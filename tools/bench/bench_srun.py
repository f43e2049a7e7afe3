"""Cost of running job steps in a container, and of the prolog that prepares it.

In two allocations of the box's three nodes, as the test user:

- ``srun -N3 true`` in an allocation without ``--image`` (the plugin stays out), against
- ``srun -N3 --image=busybox true`` in an allocation made with ``--image=busybox`` (its
  prolog prepared the root; every task enters it),

interleaved step by step, medians over 30 steps each. The steps get the environment a job
script has (``SHIFTER_IMAGE`` etc.), so srun does not ask the gateway, as in a real job.
It also checks that steps do no image I/O (no new loop device, no new "prepared" root), and
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


def step(job: str, env: dict[str, str], image: bool) -> float:
    argv = ["srun", f"--jobid={job}", "-N3"] + (["--image=busybox"] if image else []) + ["true"]
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
    times: dict[str, list[float]] = {"srun -N3 true": [], "srun -N3 --image=busybox true": []}
    try:
        step(contained, env, image=True)  # warm-up
        loops_before = loop_devices()
        for _ in range(args.steps):
            times["srun -N3 true"].append(step(plain, {}, image=False))
            times["srun -N3 --image=busybox true"].append(step(contained, env, image=True))
        loops_after = loop_devices()
    finally:
        scancel(plain)
        scancel(contained)
    wait_for_idle_cluster()
    prepared = len(re.findall(rf"prepared \S+/n\d/{contained}/root ", slurmd_logs()))

    base = statistics.median(times["srun -N3 true"])
    report: dict[str, object] = {}
    print(f"as {USER}, {args.steps} steps per variant, interleaved")
    print(f"{'variant':<32} {'median ms':>10} {'p90 ms':>8} {'vs plain':>9}")
    for variant, values in times.items():
        median = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1]
        report[variant] = {"median_s": median, "p90_s": p90, "delta_ms": (median - base) * 1000}
        print(
            f"{variant:<32} {median * 1000:>10.1f} {p90 * 1000:>8.1f} "
            f"{(median - base) * 1000:>+8.1f}"
        )
    delta = (statistics.median(times["srun -N3 --image=busybox true"]) - base) * 1000
    print(
        f"per-step cost of the container: {delta:+.1f} ms (target <= +50 ms): "
        f"{'OK' if delta <= 50 else 'OVER TARGET'}"
    )
    io_free = loops_after == loops_before and prepared == 3
    print(
        f"image I/O per step: loop devices {loops_before} -> {loops_after}, roots prepared "
        f"for the job: {prepared} (one per node): {'none' if io_free else 'SOME'}"
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
