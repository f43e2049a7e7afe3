"""Pulling debian:bookworm into a squashfs: Shifter's pipeline against skopeo + umoci + mksquashfs.

Runs as root on an up box (``make bench-pull``).  First makes sure the box registry serves
``127.0.0.1:5000/library/debian:bookworm`` (``tools/images/debian.py --push``: a cached,
reproducible debootstrap minbase image, one gzip layer of ~48 MB, 120 MB unpacked), then times,
interleaved round by round (the order rotates every round) and with ``sync`` before every run:

- ``ours``: ``shifter_core.image.pipeline.pull_image("docker.io/library/debian:bookworm")`` through
  the box registry as a docker.io mirror, with a FRESH layer cache and image store each run
  (zstd level 3, the default).  Stages come from the pipeline's own progress reports:
  resolve (manifest and config), download (layer into the cache, verified, fsynced) and
  convert (flatten piped into tar2sqfs, then publish with fsync); CPU is split into this
  process's (the flattener) and its child processes' (tar2sqfs, and any decompressor the
  flattener runs).
- ``shifterimg``: ``shifterimg pull docker:debian:bookworm`` as the test user through the box
  gateway, with the image removed and its layers deleted from the gateway's layer cache
  before each run - only when ``.venv/bin/shifterimg`` exists and the gateway answers.
- ``baseline``: ``skopeo copy`` to an OCI layout, ``umoci unpack``, ``mksquashfs`` with its
  defaults (gzip), each stage timed.

Every scratch directory is on the same file system (``--scratch``, default /var/tmp; never
tmpfs, since writing the unpacked tree to disk is what the baseline pays for) and removed
afterwards.  Prints the median seconds (and CPU seconds) per stage and the ratio
``ours / baseline`` against the target of 0.2; ``shifterimg`` is the figure the target is
about when it could be measured, the pipeline's otherwise.  ``--json PATH`` writes it all;
``--profile`` adds a cProfile of one extra pipeline run and a breakdown of its parts.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gzip
import io
import json
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from isal import igzip

from shifter_core.config import Config, parse
from shifter_core.image.convert import SquashfsOptions, tar_to_squashfs
from shifter_core.image.flatten.twopass import flatten
from shifter_core.image.layercache import LayerCache
from shifter_core.image.pipeline import CONVERTING, PULLING, READY, Progress, pull_image
from shifter_core.image.registry.client import RegistryClient
from shifter_core.image.registry.settings import RegistrySettings
from shifter_core.image.store import ImageStore

ROOT = Path(__file__).resolve().parents[2]
BOX = ROOT / ".box"
VENV_BIN = ROOT / ".venv" / "bin"
SHIFTERIMG = VENV_BIN / "shifterimg"
SLURM_CONF = BOX / "etc" / "slurm.conf"
SHIFTER_CONFIG = BOX / "etc" / "shifter.yaml"
POLICY = BOX / "etc" / "policy.json"
DEBIAN_BUILDER = ROOT / "tools" / "images" / "debian.py"
USER = "alice"

REGISTRY = "127.0.0.1:5000"
REFERENCE = "docker.io/library/debian:bookworm"
SHIFTER_IMAGE = "docker:debian:bookworm"
BOX_REF = f"{REGISTRY}/library/debian:bookworm"
TARGET = 0.2

VARIANTS = ("ours", "shifterimg", "baseline")
STAGES = {
    "ours": ("resolve", "download", "convert", "total"),
    "shifterimg": ("total",),
    "baseline": ("skopeo copy", "umoci unpack", "mksquashfs", "total"),
}

Timings = dict[str, float]


# --------------------------------------------------------------------------------------------
# Helpers


def log(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[bench-pull] {message}", file=sys.stderr, flush=True)


def cpu(who: int) -> float:
    """User + system CPU seconds of this process (all threads) or of its reaped children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def fs_type(path: Path) -> str:
    """The type of the file system holding ``path`` (longest mount point prefix)."""
    best, kind = "", "?"
    resolved = str(path.resolve())
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        point = fields[1].replace("\\040", " ")
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    """Run ``argv`` (no shell); return stdout, raise SystemExit with its output on failure."""
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(argv)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-2000:]}"
        )
    return proc.stdout


def http_status(url: str, timeout: float = 3) -> int | None:
    """The HTTP status ``url`` answers with (no proxy), or None when nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@contextlib.contextmanager
def scratch_dir(base: Path, prefix: str) -> Iterator[Path]:
    """A fresh directory under ``base``, removed (and synced away) afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def settle() -> None:
    """Flush dirty pages, so that one run's writeback is not billed to the next."""
    os.sync()


def registry_client() -> RegistryClient:
    """The client the issue prescribes: the box registry as docker.io's mirror."""
    return RegistryClient(
        RegistrySettings(
            mirrors={"docker.io": [f"http://{REGISTRY}"]}, insecure=frozenset({REGISTRY})
        )
    )


# --------------------------------------------------------------------------------------------
# The image


def ensure_image() -> str:
    """Build (cached) and push the debian image; return its manifest digest."""
    log("tools/images/debian.py --push (cached after the first build, ~40 s)")
    proc = subprocess.run(
        [sys.executable, str(DEBIAN_BUILDER), "--push"],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{DEBIAN_BUILDER} failed (its log is above)")
    return proc.stdout.strip().splitlines()[-1]


def warm_registry() -> tuple[int, int]:
    """Fetch the image once (untimed), so every timed run finds the registry's blobs in the
    page cache; return (compressed bytes, layers)."""
    with registry_client() as client:
        resolved = client.resolve(REFERENCE)
        total = 0
        for layer in resolved.layers:
            sink = _NullSink()
            total += client.download_blob(resolved, layer, sink)  # type: ignore[arg-type]
    return total, len(resolved.layers)


class _NullSink(io.RawIOBase):
    """A writable, tellable sink that keeps nothing."""

    def __init__(self) -> None:
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position


# --------------------------------------------------------------------------------------------
# The variants


def time_ours(base: Path) -> Timings:
    """One pipeline pull with a fresh layer cache and store; stage times from its progress."""
    marks: dict[str, tuple[float, float, float]] = {}

    def progress(event: Progress) -> None:
        if event.layer is None:  # state changes come from this thread
            marks[event.state] = (
                time.perf_counter(),
                cpu(resource.RUSAGE_SELF),
                cpu(resource.RUSAGE_CHILDREN),
            )

    with scratch_dir(base, "ours-") as tmp:
        settle()
        start = (time.perf_counter(), cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN))
        with registry_client() as client:
            image = pull_image(
                REFERENCE,
                client=client,
                cache=LayerCache(tmp / "layers"),
                store=ImageStore(tmp / "images"),
                progress=progress,
            )
        end = (time.perf_counter(), cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN))
    pulling, converting = marks[PULLING], marks[CONVERTING]
    assert READY in marks, "the pipeline did not report READY"
    return {
        "resolve": pulling[0] - start[0],
        "download": converting[0] - pulling[0],
        "convert": end[0] - converting[0],
        "total": end[0] - start[0],
        "cpu python download": converting[1] - pulling[1],
        "cpu python convert (flatten)": end[1] - converting[1],
        "cpu child processes": end[2] - converting[2],
        "squashfs bytes": float(image.size),
    }


def time_baseline(base: Path) -> Timings:
    """skopeo copy, umoci unpack, mksquashfs (defaults: gzip), each stage timed."""
    times: Timings = {}
    with scratch_dir(base, "baseline-") as tmp:
        layout, bundle, output = tmp / "oci", tmp / "bundle", tmp / "out.sqfs"
        skopeo = ["skopeo", *(["--policy", str(POLICY)] if POLICY.is_file() else [])]
        stages = (
            (
                "skopeo copy",
                [
                    *skopeo,
                    "copy",
                    "--quiet",
                    "--src-tls-verify=false",
                    f"docker://{BOX_REF}",
                    f"oci:{layout}:latest",
                ],
            ),
            ("umoci unpack", ["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)]),
            ("mksquashfs", ["mksquashfs", str(bundle / "rootfs"), str(output)]),
        )
        settle()
        for stage, argv in stages:
            started, children = time.perf_counter(), cpu(resource.RUSAGE_CHILDREN)
            run(argv)
            times[stage] = time.perf_counter() - started
            times[f"cpu {stage}"] = cpu(resource.RUSAGE_CHILDREN) - children
        times["total"] = sum(times[stage] for stage, _ in stages)
        times["squashfs bytes"] = float(output.stat().st_size)
    return times


class Shifterimg:
    """``shifterimg pull`` through the box gateway, as the test user."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = ImageStore(config.image_path)
        self.layer_cache = Path(config.gateway.layer_cache)
        self.env = {
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "SLURM_CONF": str(SLURM_CONF),
            "SHIFTER_CONFIG": str(SHIFTER_CONFIG),
            "LANG": "C.UTF-8",
        }
        self.layers: list[str] = []

    @classmethod
    def unavailable(cls) -> str | None:
        """Why the gateway variant cannot run, or None when it can."""
        if not SHIFTERIMG.exists():
            return f"{SHIFTERIMG} does not exist (the gateway is not built yet)"
        try:
            config = parse(SHIFTER_CONFIG.read_text(), str(SHIFTER_CONFIG))
        except Exception as exc:  # a broken or missing config: say so, do not crash the bench
            return f"cannot read {SHIFTER_CONFIG}: {exc}"
        if http_status(config.gateway.url) is None:
            return f"the gateway at {config.gateway.url} does not answer"
        return None

    def _image(self) -> Any:
        for image in self.store:
            if image.source == REFERENCE:
                return image
        return None

    def reset(self) -> None:
        """Remove the image (``shifterimg rm`` as root, else its files) and its cached layers."""
        proc = subprocess.run(
            [str(SHIFTERIMG), "rm", SHIFTER_IMAGE],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
            check=False,
        )
        image = self._image()
        if image is not None:
            log(
                f"shifterimg rm left the image (exit {proc.returncode}: "
                f"{proc.stderr.strip()[-200:]}); deleting its files"
            )
            self.store.remove(image.id)
        for digest in self.layers:
            algo, _, hexdigest = digest.partition(":")
            (self.layer_cache / algo / hexdigest).unlink(missing_ok=True)

    def time(self) -> Timings:
        """One ``shifterimg pull`` as the test user, from an empty layer cache and store."""
        self.reset()
        settle()
        argv = [
            "runuser",
            "-u",
            USER,
            "--",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in self.env.items()),
            str(SHIFTERIMG),
            "pull",
            SHIFTER_IMAGE,
        ]
        wall_clock = time.time()
        started, children = time.perf_counter(), cpu(resource.RUSAGE_CHILDREN)
        run(argv)
        image = self._image()
        deadline = time.monotonic() + 600
        while image is None and time.monotonic() < deadline:  # in case pull returns early
            time.sleep(0.05)
            image = self._image()
        elapsed = time.perf_counter() - started
        if image is None:
            raise SystemExit("shifterimg pull finished but the image never reached the store")
        if image.created < wall_clock:
            raise SystemExit(
                f"shifterimg pull did not rebuild the image (created {image.created:.0f}, "
                f"before the run): the gateway still had it after `shifterimg rm`"
            )
        self.layers = [layer["digest"] for layer in image.layers]
        missing = [d for d in self.layers if not (self.layer_cache / d.replace(":", "/")).exists()]
        if missing:
            log(f"warning: layers not in the gateway cache after the pull: {missing}")
        return {
            "total": elapsed,
            "cpu client": cpu(resource.RUSAGE_CHILDREN) - children,
            "squashfs bytes": float(image.size),
        }


# --------------------------------------------------------------------------------------------
# Profile


def profile_pipeline(base: Path, top: int) -> dict[str, Any]:
    """cProfile one pipeline pull, then time its parts alone: gunzip, flatten, tar2sqfs."""
    result: dict[str, Any] = {}
    with scratch_dir(base, "profile-") as tmp:
        cache = LayerCache(tmp / "layers")
        profiler = cProfile.Profile()
        settle()
        with registry_client() as client:
            profiler.enable()
            pull_image(REFERENCE, client=client, cache=cache, store=ImageStore(tmp / "images"))
            profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(top)
        result["cprofile_tottime"] = out.getvalue()

        layers = [cache.path(d) for d in cache.digests()]
        parts: dict[str, float] = {}

        def timed(name: str, action: Callable[[], object]) -> None:
            started = time.perf_counter()
            action()
            parts[name] = time.perf_counter() - started

        def gunzip(module: Any, read_size: int) -> None:
            for layer in layers:
                with module.open(layer, "rb") as fh:
                    while fh.read(read_size):
                        pass

        flat = tmp / "flat.tar"

        def flatten_to_file() -> None:
            with flat.open("wb") as fh:
                flatten(layers, fh)

        def flatten_to_null() -> None:
            with open(os.devnull, "wb") as fh:
                flatten(layers, fh)

        def tar2sqfs_from_file() -> None:
            argv = SquashfsOptions().argv(tmp / "from-file.sqfs")
            with flat.open("rb") as fh:
                subprocess.run(argv, stdin=fh, stdout=subprocess.DEVNULL, check=True)

        def tar2sqfs_from_layer() -> None:
            # No flattening at all (valid for a single layer only): zcat | tar2sqfs.
            argv = SquashfsOptions().argv(tmp / "from-layer.sqfs")
            with subprocess.Popen(["zcat", *map(str, layers)], stdout=subprocess.PIPE) as zcat:
                subprocess.run(argv, stdin=zcat.stdout, stdout=subprocess.DEVNULL, check=True)

        def pipeline_convert_only() -> None:
            tar_to_squashfs(lambda pipe: flatten(layers, pipe), tmp / "convert.sqfs")

        timed("gunzip layers, zlib (64 KiB reads)", lambda: gunzip(gzip, 1 << 16))
        timed("gunzip layers, ISA-L (the flattener's)", lambda: gunzip(igzip, 1 << 20))
        timed("flatten -> /dev/null", flatten_to_null)
        timed("flatten -> file (page cache)", flatten_to_file)
        timed("tar2sqfs zstd-3 < flattened tar file", tar2sqfs_from_file)
        timed("zcat layer | tar2sqfs zstd-3 (no flattener)", tar2sqfs_from_layer)
        timed("flatten | tar2sqfs (convert step alone)", pipeline_convert_only)
        result["parts"] = parts
    return result


# --------------------------------------------------------------------------------------------
# Report


def medians(runs: list[Timings]) -> Timings:
    """The median of every key over ``runs``."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def print_table(report: dict[str, Any]) -> None:
    """The results table on stdout."""
    print(
        f"\n{REFERENCE} ({report['layers']} layer, {report['compressed_bytes'] / 1e6:.1f} MB "
        f"compressed, {report['digest'][:19]}), median of {report['runs']} interleaved runs, "
        f"scratch on {report['scratch']} ({report['scratch_fs']}), load average "
        f"{report['loadavg_before'][0]:.2f} before, {report['loadavg_after'][0]:.2f} after"
    )
    print(f"{'variant / stage':<40} {'median s':>9} {'cpu s':>7}")
    labels = {
        "ours": "ours: shifter_core pipeline (zstd-3)",
        "shifterimg": "ours: shifterimg pull (gateway)",
        "baseline": "baseline: skopeo + umoci + mksquashfs",
    }
    cpu_keys = {
        ("ours", "download"): ["cpu python download"],
        ("ours", "convert"): ["cpu python convert (flatten)", "cpu child processes"],
        ("shifterimg", "total"): ["cpu client"],
        ("baseline", "skopeo copy"): ["cpu skopeo copy"],
        ("baseline", "umoci unpack"): ["cpu umoci unpack"],
        ("baseline", "mksquashfs"): ["cpu mksquashfs"],
    }
    for variant in VARIANTS:
        data = report[variant]
        if "median" not in data:
            print(f"{labels[variant]:<40} skipped: {data.get('skipped', '?')}")
            continue
        med = data["median"]
        print(
            f"{labels[variant]:<40} {'':>9} {'':>7}   squashfs {med['squashfs bytes'] / 1e6:.1f} MB"
        )
        for stage in STAGES[variant]:
            keys = cpu_keys.get((variant, stage), [])
            cpu_s = f"{sum(med[k] for k in keys):7.2f}" if keys else f"{'':>7}"
            print(f"  {stage:<38} {med[stage]:9.2f} {cpu_s}")
        if variant == "ours":
            print(
                f"  {'(cpu: python flatten / child procs)':<38} {'':>9} "
                f"{med['cpu python convert (flatten)']:7.2f} / {med['cpu child processes']:.2f}"
            )
    ratio = report["ratio"]
    verdict = "OK" if ratio <= TARGET else "OVER TARGET"
    print(
        f"\nratio ours/baseline = {ratio:.3f} ({report['ratio_uses']}: "
        f"{report['ratio_ours_s']:.2f} s / {report['baseline']['median']['total']:.2f} s), "
        f"target <= {TARGET}: {verdict}"
    )
    if "pipeline_ratio" in report:
        print(f"(pipeline alone: {report['pipeline_ratio']:.3f})")
    profile = report.get("profile")
    if profile:
        print("\nparts of the pipeline, timed alone (one run each, s):")
        for name, seconds in profile["parts"].items():
            print(f"  {name:<52} {seconds:6.2f}")
        print("\ncProfile of one pipeline pull (main thread + its callees), by tottime:")
        print(profile["cprofile_tottime"])


# --------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> int:
    """Build/push the image, run the variants interleaved, print and save the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per variant (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--scratch", type=Path, default=Path("/var/tmp"), help="scratch base (not tmpfs)"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile + parts breakdown")
    parser.add_argument("--top", type=int, default=25, help="cProfile rows (default 25)")
    parser.add_argument(
        "--check", action="store_true", help=f"exit 1 when the ratio is above {TARGET}"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run as root (umoci unpack, runuser, the gateway's cache)")
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")
    kind = fs_type(args.scratch)
    if kind in ("tmpfs", "ramfs"):
        raise SystemExit(f"--scratch {args.scratch} is {kind}: the baseline must write to disk")
    if fs_type(BOX) != kind:
        log(f"warning: scratch is {kind}, the box dir is {fs_type(BOX)}")

    load_before = os.getloadavg()
    if load_before[0] > 1.0:
        log(f"warning: load average {load_before[0]:.2f}: other work will skew the figures")
    digest = ensure_image()
    compressed, layers = warm_registry()
    skipped = Shifterimg.unavailable()
    gateway = None
    if skipped is None:
        gateway = Shifterimg(parse(SHIFTER_CONFIG.read_text(), str(SHIFTER_CONFIG)))
    else:
        log(f"shifterimg variant skipped: {skipped}")

    runs: dict[str, list[Timings]] = {v: [] for v in VARIANTS}
    order = [v for v in VARIANTS if v != "shifterimg" or gateway is not None]
    actions: dict[str, Callable[[], Timings]] = {
        "ours": lambda: time_ours(args.scratch),
        "baseline": lambda: time_baseline(args.scratch),
    }
    if gateway is not None:
        actions["shifterimg"] = gateway.time
    try:
        for round_ in range(args.runs):
            rotated = order[round_ % len(order) :] + order[: round_ % len(order)]
            for variant in rotated:
                result = actions[variant]()
                runs[variant].append(result)
                log(f"round {round_ + 1}: {variant} {result['total']:.2f} s")
    finally:
        if gateway is not None:
            gateway.reset()  # leave no image or layers behind for the other engineers

    report: dict[str, Any] = {
        "image": REFERENCE,
        "registry_ref": BOX_REF,
        "digest": digest,
        "layers": layers,
        "compressed_bytes": compressed,
        "runs": args.runs,
        "scratch": str(args.scratch),
        "scratch_fs": kind,
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "target": TARGET,
    }
    for variant in VARIANTS:
        if runs[variant]:
            report[variant] = {"median": medians(runs[variant]), "runs": runs[variant]}
        else:
            report[variant] = {"skipped": skipped}
    base = report["baseline"]["median"]["total"]
    if gateway is not None:
        report["ratio_uses"] = "shifterimg pull"
        report["ratio_ours_s"] = report["shifterimg"]["median"]["total"]
        report["pipeline_ratio"] = report["ours"]["median"]["total"] / base
    else:
        report["ratio_uses"] = "pipeline (shifterimg/gateway not available)"
        report["ratio_ours_s"] = report["ours"]["median"]["total"]
    report["ratio"] = report["ratio_ours_s"] / base
    report["verdict"] = "OK" if report["ratio"] <= TARGET else "OVER TARGET"
    if args.profile:
        log("profiling one more pipeline pull")
        report["profile"] = profile_pipeline(args.scratch, args.top)

    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if args.check and report["ratio"] > TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
