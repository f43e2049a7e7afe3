"""Cost of the SPANK plugin per job step, measured in one allocation of the box.

Runs, as the test user, ``srun -N3 -n6 true`` steps in three variants, interleaved step
by step so that machine noise hits all of them alike:

- ``no plugin``:        plugstack.conf without the Shifter line
- ``plugin``:           the plugin loaded, no ``--image``
- ``plugin + --image``: ``srun -N3 -n6 --image=busybox true``

and prints the median and 90th percentile of each with the difference to the baseline.
srun and every slurmstepd read plugstack.conf when they start, so swapping the file
between steps switches the plugin on and off without restarting Slurm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.integration.slurm import PLUGSTACK, USER, run_as  # noqa: E402

VARIANTS = ("no plugin", "plugin", "plugin + --image")


def _set_plugstack(text: str) -> None:
    partial = PLUGSTACK.with_name("plugstack.conf.bench")
    partial.write_text(text)
    partial.chmod(0o644)
    partial.replace(PLUGSTACK)


def _allocate() -> str:
    result = run_as(["salloc", "-N3", "-n6", "--no-shell", "-J", "bench-spank"], timeout=120)
    for word in result.stderr.split():
        if word.isdigit():
            return word
    raise SystemExit(f"salloc failed: {result.stderr}")


def _step(job: str, image: bool) -> float:
    argv = ["srun", f"--jobid={job}", "-N3", "-n6"] + (["--image=busybox"] if image else [])
    start = time.perf_counter()
    result = run_as([*argv, "true"], timeout=120)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"step failed: {' '.join(argv)}: {result.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="steps per variant (default 50)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    with_plugin = PLUGSTACK.read_text()
    without_plugin = "".join(
        line for line in with_plugin.splitlines(keepends=True) if "shifter_spank" not in line
    )
    if with_plugin == without_plugin:
        raise SystemExit(f"{PLUGSTACK} has no shifter_spank line: run `make box` first")
    job = _allocate()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for _ in range(args.steps):
            _set_plugstack(without_plugin)
            times["no plugin"].append(_step(job, image=False))
            _set_plugstack(with_plugin)
            times["plugin"].append(_step(job, image=False))
            times["plugin + --image"].append(_step(job, image=True))
    finally:
        _set_plugstack(with_plugin)
        subprocess.run(
            ["scancel", job], check=False, env={"SLURM_CONF": str(PLUGSTACK.parent / "slurm.conf")}
        )

    base = statistics.median(times["no plugin"])
    report = {}
    print(f"srun -N3 -n6 true as {USER}, {args.steps} steps per variant, job {job}")
    print(f"{'variant':<18} {'median ms':>10} {'p90 ms':>8} {'vs no plugin':>13}")
    for variant, values in times.items():
        median = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1]
        delta = (median - base) * 1000
        report[variant] = {"median_s": median, "p90_s": p90, "delta_ms": delta}
        print(f"{variant:<18} {median * 1000:>10.1f} {p90 * 1000:>8.1f} {delta:>+12.1f}")
    target = 60.0
    verdict = "OK" if report["plugin + --image"]["delta_ms"] <= target else "OVER TARGET"
    print(
        f"plugin + --image costs {report['plugin + --image']['delta_ms']:+.1f} ms per step "
        f"(target <= +{target:.0f} ms): {verdict}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
