"""Container start-up: ``shifter --image=X true`` against ``ch-run`` and ``bwrap``.

Run as root (``make bench-start``); the commands themselves run as the test user, timed by a
small harness that runs as that user (so ``runuser`` is not part of the figures), in rounds
that interleave all variants so machine noise hits them alike. Variants:

- ``shifter``: the checkout's ``.venv/bin/shifter``, the C launcher (``launcher/``), which
  replays the recipe the Python runtime left on the warm-up run (the figure the target is
  about);
- ``shifter, Python runtime``: the same launcher with ``SHIFTER_LAUNCH_DISABLE=1``, so every
  start runs the Python implementation (``python -m shifter_core.cli.shifter``);
- ``shifter (wheel script)``: the Python ``main()`` behind the script ``pip install .`` writes;
- ``shifter in a job`` (the launcher) and ``shifter in a job, Python``: entering a root
  prepared as root, as the prolog does;
- ``ch-run squashfs``: Charliecloud 0.31 on the same squashfs (squashfuse in-process);
- ``ch-run directory`` and ``bwrap directory``: an unpacked copy of the image (tmpfs);
- floors: ``python3 -I -S -c pass`` (an interpreter that does nothing) and ``true``.

Prints medians and 90th percentiles in milliseconds and ratios to ``ch-run squashfs``
(target: shifter no slower). ``/dev/fuse`` is made 0666 for the run (and restored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shifter_core import config as config_module  # noqa: E402
from shifter_core.image.layercache import LayerCache  # noqa: E402
from shifter_core.image.pipeline import pull_image  # noqa: E402
from shifter_core.image.registry.client import RegistryClient  # noqa: E402
from shifter_core.image.registry.settings import RegistrySettings  # noqa: E402
from shifter_core.image.store import ImageStore  # noqa: E402
from shifter_core.runtime import RunRequest, User, build_plan, resolve_image  # noqa: E402
from shifter_core.runtime.privileged import prepare_job, teardown_job  # noqa: E402

USER = "alice"
REGISTRY = "127.0.0.1:5000"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python3"
REFERENCE = "ch-run squashfs"
TOOLS = {"ch-run": "charliecloud-runtime", "bwrap": "bubblewrap", "unsquashfs": "squashfs-tools"}

WHEEL_SCRIPT = f"""#!{VENV_PYTHON}
# What pip writes for a console script when the package is installed from a wheel.
import re
import sys
from shifter_core.cli.shifter import main
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit(main())
"""

HARNESS = r"""
import json, os, subprocess, sys, time
spec = json.loads(sys.argv[1])
times = {name: [] for name, _, _ in spec["variants"]}
for name, argv, extra in spec["variants"]:  # warm-up, and a check that each one works
    env = {**os.environ, **extra}
    result = subprocess.run(argv, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{name} failed (exit {result.returncode}): {result.stderr}")
for _ in range(spec["rounds"]):
    for name, argv, extra in spec["variants"]:
        env = {**os.environ, **extra}
        start = time.perf_counter()
        subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        times[name].append(time.perf_counter() - start)
print(json.dumps(times))
"""


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def setup(scratch: Path) -> dict[str, object]:
    """Store with busybox, config (and its cache), unpacked copy, prepared job root."""
    store = ImageStore(scratch / "images")
    settings = RegistrySettings(
        mirrors={"docker.io": [f"http://{REGISTRY}"]}, insecure=frozenset({REGISTRY})
    )
    with RegistryClient(settings) as client:
        image = pull_image("busybox", client=client, cache=LayerCache(scratch / "l"), store=store)
    config_file = scratch / "shifter.yaml"
    config_file.write_text(f"image_path: {store.path}\nruntime:\n  run_dir: {scratch}/run\n")
    config_file.chmod(0o644)
    cfg = config_module.load(str(config_file))  # as root: writes the cache users start from
    rootfs = Path(tempfile.mkdtemp(prefix="bench-start-rootfs-", dir="/dev/shm"))
    rootfs.rmdir()
    subprocess.run(
        ["unsquashfs", "-q", "-n", "-d", str(rootfs), str(store.image_file(image.id))],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    rootfs.chmod(0o755)
    script = scratch / "shifter"
    script.write_text(WHEEL_SCRIPT)
    script.chmod(0o755)
    user = User.from_uid(int(subprocess.check_output(["id", "-u", USER], text=True)))
    meta, image_file = resolve_image(f"id:{image.id}", cfg, user)
    plan = build_plan(RunRequest(image=f"id:{image.id}"), cfg, meta, image_file, user)
    for path in [scratch, *scratch.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o055)
    prepare_job(plan, cfg.runtime.run_dir, "bench", "1")
    return {
        "id": image.id,
        "squashfs": str(store.image_file(image.id)),
        "config": str(config_file),
        "rootfs": str(rootfs),
        "script": str(script),
        "run_dir": cfg.runtime.run_dir,
    }


def variants(s: dict[str, object]) -> list[tuple[str, list[str], dict[str, str]]]:
    image = f"--image=id:{s['id']}"
    job = {"SLURM_JOB_ID": "1", "SLURMD_NODENAME": "bench", "SHIFTER_IMAGE": str(s["id"])}
    rootfs = str(s["rootfs"])
    bwrap = ["bwrap", "--unshare-user", "--unshare-pid", "--ro-bind", rootfs, "/"]
    return [
        ("shifter", [str(ROOT / ".venv" / "bin" / "shifter"), image, "true"], {}),
        (
            "shifter, Python runtime",
            [str(ROOT / ".venv" / "bin" / "shifter"), image, "true"],
            {"SHIFTER_LAUNCH_DISABLE": "1"},
        ),
        ("shifter (wheel script)", [str(s["script"]), image, "true"], {}),
        ("shifter in a job", [str(ROOT / ".venv" / "bin" / "shifter"), "true"], job),
        ("shifter in a job, Python", [str(s["script"]), "true"], job),
        (REFERENCE, ["ch-run", str(s["squashfs"]), "--", "true"], {}),
        ("ch-run directory", ["ch-run", rootfs, "--", "true"], {}),
        ("bwrap directory", [*bwrap, "--proc", "/proc", "--dev", "/dev", "true"], {}),
        ("python3 -I -S (floor)", [str(VENV_PYTHON), "-I", "-S", "-c", "pass"], {}),
        ("true (floor)", ["/bin/true"], {}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="runs per variant (default 40)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (make bench-start): it prepares a job root")
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        say(f"installing {' '.join(missing)} (Debian packages the comparison needs)")
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    # Users cannot write __pycache__ in the checkout: compile what they will import.
    subprocess.run([str(VENV_PYTHON), "-m", "compileall", "-q", str(ROOT / "src")], check=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-start-", dir="/var/tmp"))
    scratch.chmod(0o755)
    fuse_mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o666)
    s: dict[str, object] = {}
    try:
        s = setup(scratch)
        spec = {"rounds": args.rounds, "variants": variants(s)}
        harness = scratch / "harness.py"
        harness.write_text(HARNESS)
        harness.chmod(0o644)
        env = [f"USER={USER}", "PATH=/usr/bin:/bin", f"SHIFTER_CONFIG={s['config']}"]
        say(f"{len(spec['variants'])} variants x {args.rounds} rounds, as {USER} ...")
        out = subprocess.run(
            ["runuser", "-u", USER, "--", "env", "-i", "HOME=/tmp", *env,
             "/usr/bin/python3", "-I", str(harness), json.dumps(spec)],
            capture_output=True, text=True, cwd="/tmp", check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise SystemExit(f"harness failed: {out.stderr}")
        times: dict[str, list[float]] = json.loads(out.stdout)
    finally:
        os.chmod("/dev/fuse", fuse_mode)
        if s:
            for problem in teardown_job(str(s["run_dir"]), "bench", "1"):
                say(f"teardown: {problem}")
            shutil.rmtree(str(s["rootfs"]), ignore_errors=True)
        from shifter_core.mounts import mounts_under
        from shifter_core.syscalls import MNT_DETACH, umount2

        for entry in mounts_under(str(scratch)):
            umount2(entry.target, MNT_DETACH)
        shutil.rmtree(scratch, ignore_errors=True)
    reference = median(times[REFERENCE])
    say(f"\n{'variant':<24} {'median ms':>10} {'p90 ms':>8} {'x ' + REFERENCE:>18}")
    for name, values in times.items():
        ratio = median(values) / reference
        say(f"{name:<24} {1000 * median(values):>10.1f} {1000 * p90(values):>8.1f} {ratio:>18.2f}")
    ratio = median(times["shifter"]) / reference  # the launcher, as users run it
    verdict = "met" if ratio <= 1.0 else "NOT met"
    say(f"\ntarget (shifter no slower than {REFERENCE}): {verdict}, ratio {ratio:.2f}")
    if args.json:
        figures = {k: {"median": median(v), "p90": p90(v), "runs": v} for k, v in times.items()}
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
