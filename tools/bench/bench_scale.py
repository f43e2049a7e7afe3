"""How the cost of a container job grows with its node count (issue 12).

For each node count N (a box of N nodes is brought up for each: ``box.py down``, then
``SHIFTER_BOX_NODES=N box.py up``), each store mode (how the prolog gets the image onto the
node, :data:`MODES`) and each image (busybox, ~1 MB; debian:bookworm, ~120 MB unpacked,
built by ``tools/images/debian.py``), one cold run (the image out of every node cache and out
of the host's page cache) and ``--warm`` warm runs of, as the test user::

    sbatch -N N --ntasks-per-node=1 --image=X --wrap "srun --image=X sh -c '<timestamp>'"

and measures, per job:

- the time from submission (just before ``sbatch``) to each task running in the container
  (the task's own wall-clock timestamp: busybox ash's ``$EPOCHREALTIME``, else
  ``date +%s.%N``): median and max over the nodes;
- the prolog's CPU seconds per node (``shifter_job_script_cpu_seconds_total`` of the
  node's textfile metrics, ``slurm.metrics_dir``: getrusage of the prolog and the programs it
  ran): median and max over the nodes; and the whole prolog and epilog processes per node
  (``slurmstepd spank prolog``: Slurm, the plugin, Python's start and the script; the
  cutime + cstime of the node's slurmd, which waits for them), median over the nodes;
- bytes read from the image store per job: ``stage``: the node caches' new copies
  (``stats.json``) x the image's size; ``mount``: what the loop devices backed by the
  store's file read (``/sys/block/loopN/stat`` read sectors x 512, sampled while the job runs:
  every task sleeps a second after its timestamp, so the epilog detaches them after the last
  sample); ``registry``: ``http.response.written`` of the blob GETs in the artifact
  registry's log during the job; ``mirror`` (registry mode with the nodes reading the box's
  rack mirror, ``artifacts.node_registry``, emptied before each cold run): the same, of
  the token front the mirror reads the artifact storage through; ``mirror-hit``: the same
  with the mirror holding the image already, as for a job on other nodes of the rack (the
  loop devices' reads
  are kept in the JSON for every mode);
- the image gateway's CPU seconds (utime + stime, children included, ``/proc/PID/stat``)
  from submission until the cluster is idle again (epilogs done).

Each node count also runs ``--baseline`` jobs without ``--image`` (Slurm alone). Then it
prints the table (stdout), the growth per added node of each series (the slope of
a least-squares fit over N), what the jobs left behind (loop devices on the box's images or
node caches, mounts below the run directory or the node caches, job directories, node-cache
holds, partial copies: there must be none) and PASS/FAIL for the targets: per-node prolog
CPU of a warm image flat in N (the fitted rise over the N range at most 50 ms or 25% of
its mean) and <= 0.2 s on every node; store bytes per staged job <= N x image size;
``registry`` and ``mirror`` bytes per job against the image size (reported, not judged:
about one image size is the aim with a mirror). A mode whose patch
the configuration schema refuses, or ``registry`` while the box's shifter.yaml sets no
``artifacts.registry`` (the prolog would fail and drain the nodes), is reported as not run.
Progress goes to stderr, the results as JSON to ``--json``.

The box's shifter.yaml is patched per mode (loaded, deep-merged with the mode's patch from
:data:`MODES`, written atomically, root-owned 0644; the plugin re-reads it) and restored
at the end, and so is the box: the size it had when the benchmark started, or down.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.integration.conftest import load_box_module  # noqa: E402
from tests.integration.slurm import (  # noqa: E402
    BOX,
    SHIFTER_CONFIG,
    SLURM_CONF,
    USER,
    run_as,
    wait_for_idle_cluster,
)

# How the prolog gets the image onto a node: mode -> patch of the box's shifter.yaml
# (deep-merged). The one place to change when the switch changes.
MODES: dict[str, dict[str, Any]] = {
    "stage": {"slurm": {"image_source": "stage"}},  # copied into the node cache, loop-mounted
    "mount": {"slurm": {"image_source": "mount"}},  # loop-mounted straight from the store
    "registry": {"slurm": {"image_source": "registry"}},  # the artifact, into the node cache
    # the same through the box's rack mirror (a pull-through cache of the artifact storage)
    "mirror": {"slurm": {"image_source": "registry"},
               "artifacts": {"node_registry": "http://127.0.0.1:5004"}},
    # ... and the mirror holds the image already (a job on other nodes of the rack)
    "mirror-hit": {"slurm": {"image_source": "registry"},
                   "artifacts": {"node_registry": "http://127.0.0.1:5004"}},
}
IMAGES = {"busybox": "busybox", "debian": "debian:bookworm"}  # name in the table: request
DEBIAN_BUILDER = ROOT / "tools" / "images" / "debian.py"
BOX_PY = ROOT / "tools" / "box" / "box.py"
PYTHON = ROOT / ".venv" / "bin" / "python"
RUN_DIR = Path("/run/shifter-box")  # runtime.run_dir of the box (box.py RUN_DIR)
METRICS = BOX / "metrics"
OUT = Path("/tmp/shifter-bench-scale")  # the jobs' output (the test user writes it)
TICKS = os.sysconf("SC_CLK_TCK")
PUSHED: list[str] = []  # images pushed to the box registry by this run
PROLOG_CPU_TARGET = 0.2  # s per node, warm image
# The task: its wall-clock time when it runs in the container, then a second of sleep so
# that the loop devices are sampled after its reads and before the epilog detaches them.
TASK = (
    't=$EPOCHREALTIME; [ -n "$t" ] || t=$(date +%s.%N); '
    'echo "shifter-bench $SLURMD_NODENAME $t"; sleep 1'
)


def progress(message: str) -> None:
    print(f"[bench-scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- the box ---------------------------------------------------------------------------------


def slurm(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SLURM_CONF": str(SLURM_CONF)}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)


def box_size() -> int | None:
    """The node count of the running box, None when its slurmctld does not answer."""
    if not SLURM_CONF.exists():
        return None
    try:
        result = slurm(["sinfo", "-h", "-N", "-o", "%N"], timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return len(set(result.stdout.split())) if result.returncode == 0 else None


def box(command: str, nodes: int | None = None) -> None:
    env = dict(os.environ)
    env.pop("SHIFTER_BOX_NODES", None)
    if nodes is not None:
        env["SHIFTER_BOX_NODES"] = str(nodes)
    started = time.monotonic()
    result = subprocess.run(
        [str(PYTHON), str(BOX_PY), command], capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"box.py {command} failed:\n{result.stdout}{result.stderr}")
    progress(f"box.py {command}{f' ({nodes} nodes)' if nodes else ''}: "
             f"{time.monotonic() - started:.1f} s")  # fmt: skip


def box_of(nodes: int) -> None:
    """A running box of exactly ``nodes`` nodes."""
    if box_size() == nodes:
        return
    box("down")
    box("up", nodes)
    size = box_size()
    if size != nodes:
        raise SystemExit(f"asked for a box of {nodes} nodes, sinfo shows {size}")
    wait_for_idle_cluster(timeout=120)


# ---- configuration ---------------------------------------------------------------------------


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def write_config(text: str) -> None:
    """Replace the box's shifter.yaml atomically, root-owned 0644."""
    fd, partial = tempfile.mkstemp(prefix=".shifter.yaml.", dir=SHIFTER_CONFIG.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chown(partial, 0, 0)
        os.chmod(partial, 0o644)
        os.replace(partial, SHIFTER_CONFIG)
    except BaseException:
        with suppress(OSError):
            os.unlink(partial)
        raise


def mode_config(base_text: str, mode: str) -> tuple[str | None, str]:
    """The box's shifter.yaml for ``mode`` and "", or None and why the mode cannot run
    (this checkout's configuration schema does not take the mode's patch, or the box lacks
    what it needs)."""
    from shifter_core.config import parse

    text = yaml.safe_dump(deep_merge(yaml.safe_load(base_text), MODES[mode]), sort_keys=False)
    try:
        config = parse(text, str(SHIFTER_CONFIG))
    except Exception as err:
        return None, f"{MODES[mode]} is not a valid configuration here ({err})"
    artifacts = getattr(config, "artifacts", None)
    if mode.startswith(("registry", "mirror")) and not getattr(artifacts, "registry", ""):
        # the prolog would fail with a NodeFault, and Slurm drain every node
        return None, "the box's shifter.yaml sets no artifacts.registry"
    return text, ""


@contextmanager
def config_restored() -> Iterator[str]:
    """The box's shifter.yaml as it is now; written back as it was on the way out."""
    original = SHIFTER_CONFIG.read_text()
    try:
        yield original
    finally:
        if SHIFTER_CONFIG.exists() and SHIFTER_CONFIG.read_text() != original:
            write_config(original)


def node_cache_dir(config: dict[str, Any], node: str) -> Path:
    template = str(config.get("slurm", {}).get("node_cache", "/var/cache/shifter/%n"))
    return Path(template.replace("%n", node))


# ---- images ----------------------------------------------------------------------------------


def lookup(request: str) -> str:
    result = run_as(["shifterimg", "lookup", request])
    if result.returncode != 0:
        progress(f"shifterimg pull {request}")
        pull = run_as(["shifterimg", "pull", request], timeout=900)
        if pull.returncode != 0:
            raise SystemExit(f"cannot pull {request}: {pull.stdout}{pull.stderr}")
        result = run_as(["shifterimg", "lookup", request])
    if result.returncode != 0:
        raise SystemExit(f"shifterimg lookup {request}: {result.stderr}")
    return result.stdout.strip().splitlines()[-1]


def push_debian() -> None:
    """debian:bookworm in the box registry (a cached build after the first, ~1 min)."""
    progress("tools/images/debian.py --push")
    result = subprocess.run(
        [str(PYTHON), str(DEBIAN_BUILDER), "--push"], capture_output=True, text=True,
        check=False, timeout=1200,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"{DEBIAN_BUILDER} --push failed:\n{result.stderr[-3000:]}")


def empty_the_mirror() -> None:
    """Restart the box's rack mirror with an empty cache (a cold mirror)."""
    box = load_box_module()
    daemon = box.registry_mirror_daemon(box.PATHS)
    if pid := daemon.pid():
        box.stop_pids({daemon.name: pid})
    shutil.rmtree(box.PATHS.mirror, ignore_errors=True)
    box.PATHS.mirror.mkdir(mode=0o755)
    box.start_registry(box.PATHS)


def prime_the_mirror(image_id: str) -> None:
    """Read the image once through the rack mirror (as a job on other nodes would have)."""
    from shifter_core.config import load
    from shifter_core.image.artifact import ArtifactRegistry, read_credential

    config = load(str(SHIFTER_CONFIG), privileged=True)
    credential = read_credential(config.artifacts.node_credentials, owner=0)
    mirror = ArtifactRegistry("http://127.0.0.1:5004", config.artifacts.repository, credential)
    meta = mirror.metadata(image_id)
    if meta is not None:
        with mirror.open_squashfs(meta) as stream:
            while stream.read(1 << 20):
                pass
    # The mirror stores what it fetched in the background: wait until the artifact storage
    # has served it (its logs stop growing), so that the job's count starts after that.
    sizes: list[int] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        sizes.append(sum(p.stat().st_size for p in RegistryLog.logs()))
        if len(sizes) > 4 and len(set(sizes[-4:])) == 1:
            break
        time.sleep(0.25)


def evict_page_cache(path: Path) -> None:
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- measurements ----------------------------------------------------------------------------


def metric_values(node: str) -> dict[tuple[str, str], float]:
    """(sample name, script) -> value, of the node's textfile metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = (METRICS / f"shifter_{node}.prom").read_text()
    except OSError:
        return {}
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_total") and "script" in sample.labels:
                key = (sample.name, sample.labels["script"])
                values[key] = values.get(key, 0.0) + sample.value
    return values


def cache_stats(directory: Path) -> dict[str, int]:
    try:
        stats = json.loads((directory / "stats.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: int(v) for k, v in stats.items() if isinstance(v, int | float)}


def gateway_cpu() -> float | None:
    """utime + stime of the gateway and its waited-for children, in seconds."""
    try:
        pid = int((BOX / "run" / "gateway.pid").read_text().split()[0])
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError, IndexError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICKS  # utime stime cutime cstime


def slurmd_children_cpu(node: str) -> float | None:
    """CPU seconds of the processes the node's slurmd waited for (cutime + cstime): its
    prolog and epilog processes (``slurmstepd spank prolog``: Slurm, the plugin, Python's
    start and the script), not the steps' slurmstepd (they detach)."""
    try:
        pid = int((BOX / "run" / f"slurmd-{node}.pid").read_text().split()[0])
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError, IndexError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[13]) + int(fields[14])) / TICKS


def loop_devices() -> dict[str, tuple[str, int]]:
    """loopN -> (backing file or "", sectors read since the device was made)."""
    found = {}
    for device in Path("/sys/block").glob("loop*"):
        try:
            sectors = int((device / "stat").read_text().split()[2])
        except (OSError, ValueError, IndexError):
            continue
        try:
            backing = (device / "loop" / "backing_file").read_text().strip()
        except OSError:
            backing = ""
        found[device.name] = (backing, sectors)
    return found


class LoopSampler:
    """Samples the loop devices while a job runs: the sectors read by the devices backed by
    a file of ``image_id`` (the store's or a node cache's copy), before the epilog detaches
    them. Counters of /sys/block/loopN/stat survive detach and attach: read since the start."""

    def __init__(self, image_id: str, interval: float = 0.2) -> None:
        self.image_id = image_id
        self.interval = interval
        self.base = {name: sectors for name, (_, sectors) in loop_devices().items()}
        self.read: dict[tuple[str, str], int] = {}  # (device, backing) -> sectors
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LoopSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        for name, (backing, sectors) in loop_devices().items():
            if not self.image_id or self.image_id not in backing:
                continue
            base = self.base.get(name, 0)
            read = sectors - base if sectors >= base else sectors
            key = (name, backing.removesuffix(" (deleted)"))
            self.read[key] = max(self.read.get(key, 0), read)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def bytes(self, store: Path | None) -> tuple[int, int]:
        """(bytes read by devices on the store's file, bytes read by all of them)."""
        on_store = sum(s for (_, b), s in self.read.items() if b == str(store)) * 512
        return on_store, sum(self.read.values()) * 512


class RegistryLog:
    """Bytes of blob GETs the box's artifact registry served from now on
    (``http.response.written`` in its log)."""

    LINE = re.compile(
        r'http\.request\.method=GET .*?http\.request\.uri="[^"]*/blobs/[^"]*".*?'
        r"http\.response\.written=(\d+)"
    )

    def __init__(self) -> None:
        self.offsets = {log: log.stat().st_size for log in self.logs()}

    @staticmethod
    def logs() -> list[Path]:
        # The artifact storage's two fronts: the registry the nodes read in registry mode,
        # the token front the rack mirror reads in mirror mode (not the mirror's own log).
        return sorted((BOX / "log").glob("registry-artifacts*.log"))

    def written(self) -> int:
        total = 0
        for log in self.logs():
            with open(log, "rb") as fh:
                fh.seek(self.offsets.get(log, 0))
                text = fh.read().decode(errors="replace")
            total += sum(int(m) for m in self.LINE.findall(text))
        return total


def leftovers(nodes: list[str], caches: list[Path]) -> list[str]:
    """What jobs left on the host: there must be nothing once the cluster is idle."""
    found = []
    for name, (backing, _) in loop_devices().items():
        if backing and (backing.startswith(str(BOX)) or backing.startswith(str(RUN_DIR))):
            found.append(f"loop device {name} on {backing}")
    roots = (str(RUN_DIR), *(str(c) for c in caches))
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].replace("\\040", " ")
        if any(point.startswith(r + "/") for r in roots):  # the run dir is a mount itself
            found.append(f"mount {point}")
    for node in nodes:
        with suppress(OSError):
            found += [f"job dir {e}" for e in (RUN_DIR / node).iterdir()
                      if not e.name.startswith(".")]  # fmt: skip
    for cache in caches:
        found += [f"node-cache hold {h}" for h in cache.glob("holds/*/*")]
        found += [f"partial copy {p}" for p in cache.glob(".*.partial")]
    return found


@dataclass
class Run:
    nodes: int
    image: str
    mode: str
    kind: str  # cold, warm
    job: str = ""
    start_s: dict[str, float] = field(default_factory=dict)  # node -> submission to running
    prolog_cpu_s: dict[str, float] = field(default_factory=dict)
    prolog_wall_s: dict[str, float] = field(default_factory=dict)
    epilog_cpu_s: dict[str, float] = field(default_factory=dict)
    # prolog + epilog processes per node, whole (slurmd's cutime + cstime)
    script_procs_cpu_s: dict[str, float] = field(default_factory=dict)
    store_bytes: int | None = None
    copies: int = 0
    loop_store_bytes: int = 0
    loop_bytes: int = 0
    registry_bytes: int = 0
    gateway_cpu_s: float | None = None
    job_s: float = 0.0  # submission to idle cluster
    leftovers: list[str] = field(default_factory=list)
    error: str = ""

    def start_median(self) -> float | None:
        return statistics.median(self.start_s.values()) if self.start_s else None

    def start_max(self) -> float | None:
        return max(self.start_s.values()) if self.start_s else None

    def cpu_median(self) -> float | None:
        return statistics.median(self.prolog_cpu_s.values()) if self.prolog_cpu_s else None

    def cpu_max(self) -> float | None:
        return max(self.prolog_cpu_s.values()) if self.prolog_cpu_s else None

    def procs_median(self) -> float | None:
        values = self.script_procs_cpu_s.values()
        return statistics.median(values) if values else None


def submit(nodes: int, request: str | None) -> tuple[str, float]:
    """sbatch the job as the test user (without an image: the baseline): (job id,
    submission time)."""
    image = [f"--image={request}"] if request else []
    wrap = " ".join(["srun", *image, "sh", "-c", f"'{TASK}'"])
    argv = ["sbatch", "--parsable", f"-N{nodes}", "--ntasks-per-node=1", *image,
            "-J", "bench-scale", "-o", f"{OUT}/%j.out", "--wrap", wrap]  # fmt: skip
    submitted = time.time()
    result = run_as(argv, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0], submitted


def wait_job(job: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = slurm(["squeue", "-h", "-j", job, "-t", "PD,R,CG,CF,S", "-o", "%T"])
        if result.returncode == 0 and not result.stdout.strip():
            return
        time.sleep(0.2)
    slurm(["scancel", job])
    raise TimeoutError(f"job {job} still running after {timeout:.0f} s (cancelled)")


def resume_drained() -> None:
    """Nodes a failed prolog or epilog drained: reported and resumed, so the box goes on."""
    result = slurm(["sinfo", "-h", "-N", "-t", "drain,drained,draining,down", "-o", "%N %E"])
    for line in sorted(set(result.stdout.splitlines())):
        node, _, reason = line.partition(" ")
        progress(f"node {node} drained ({reason}): resumed")
        slurm(["scontrol", "update", f"NodeName={node}", "State=RESUME"])


def run_job(
    run: Run, request: str | None, image_id: str, store: Path | None, nodes: list[str],
    caches: list[Path],
) -> Run:  # fmt: skip
    size = store.stat().st_size if store else 0
    before_metrics = {n: metric_values(n) for n in nodes}
    before_stats = {c: cache_stats(c) for c in caches}
    before_procs = {n: slurmd_children_cpu(n) for n in nodes}
    registry = RegistryLog()
    gateway_before = gateway_cpu()
    started = time.monotonic()
    try:
        with LoopSampler(image_id) as loops:
            run.job, submitted = submit(run.nodes, request)
            wait_job(run.job, timeout=120 + 10 * run.nodes)
            loops.sample()
        wait_for_idle_cluster(timeout=120 + 5 * run.nodes)
    except (RuntimeError, TimeoutError) as err:
        run.error = str(err)
    resume_drained()
    if run.error:
        with suppress(TimeoutError):
            wait_for_idle_cluster(timeout=120)
        return run
    run.job_s = time.monotonic() - started
    gateway_after = gateway_cpu()
    if gateway_before is not None and gateway_after is not None:
        run.gateway_cpu_s = gateway_after - gateway_before
    output = OUT / f"{run.job}.out"
    with suppress(OSError):
        for line in output.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "shifter-bench":
                with suppress(ValueError):
                    run.start_s[parts[1]] = float(parts[2]) - submitted
        output.unlink()
    if len(run.start_s) != run.nodes:
        state = slurm(["sacct", "-n", "-X", "-j", run.job, "-o", "State,ExitCode"]).stdout
        comment = slurm(["scontrol", "show", "job", run.job]).stdout
        admin = re.search(r"AdminComment=(.*)", comment)
        run.error = (f"{len(run.start_s)} of {run.nodes} tasks ran; job {state.strip()}"
                     + (f"; {admin.group(1)}" if admin else ""))  # fmt: skip
    for node in nodes:
        after = metric_values(node)
        before = before_metrics[node]

        def delta(name: str, script: str, after: dict[tuple[str, str], float] = after,
                  before: dict[tuple[str, str], float] = before) -> float:  # fmt: skip
            key = (name, script)
            return after.get(key, 0.0) - before.get(key, 0.0)

        if delta("shifter_job_script_runs_total", "prolog") > 0:
            run.prolog_cpu_s[node] = delta("shifter_job_script_cpu_seconds_total", "prolog")
            run.prolog_wall_s[node] = delta("shifter_job_script_seconds_total", "prolog")
        if delta("shifter_job_script_runs_total", "epilog") > 0:
            run.epilog_cpu_s[node] = delta("shifter_job_script_cpu_seconds_total", "epilog")
        procs_before, procs_after = before_procs[node], slurmd_children_cpu(node)
        if procs_before is not None and procs_after is not None:
            run.script_procs_cpu_s[node] = procs_after - procs_before
    run.copies = sum(
        cache_stats(c).get("copies", 0) - before_stats[c].get("copies", 0) for c in caches
    )
    run.loop_store_bytes, run.loop_bytes = loops.bytes(store)
    run.registry_bytes = registry.written()
    if request:
        run.store_bytes = {
            "stage": run.copies * size,
            "mount": run.loop_store_bytes,
            "registry": run.registry_bytes,
            "mirror": run.registry_bytes,
            "mirror-hit": run.registry_bytes,
        }.get(run.mode)
    for _ in range(10):  # the last epilog's detach may still be on its way
        run.leftovers = leftovers(nodes, caches)
        if not run.leftovers:
            break
        time.sleep(0.3)
    return run


# ---- reporting -------------------------------------------------------------------------------


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x; None with fewer than two distinct x."""
    xs = {x for x, _ in points}
    if len(xs) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def fmt(value: float | None, unit: str = "", digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}{unit}"


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


@dataclass
class Row:
    """One line of the table: a cold run, or the medians of the warm runs."""

    nodes: int
    image: str
    mode: str
    kind: str
    runs: int
    start_median: float | None
    start_max: float | None
    cpu_median: float | None
    cpu_max: float | None
    procs_cpu: float | None
    store_bytes: float | None
    gateway_cpu: float | None
    image_bytes: int
    errors: list[str]


def med(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def rows_of(runs: list[Run], sizes: dict[str, int]) -> list[Row]:
    groups: dict[tuple[int, str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.nodes, run.image, run.mode, run.kind), []).append(run)
    rows = []
    for (nodes, image, mode, kind), group in groups.items():
        ok = [r for r in group if not r.error]
        rows.append(Row(
            nodes, image, mode, kind, len(ok),
            med([r.start_median() for r in ok]), med([r.start_max() for r in ok]),
            med([r.cpu_median() for r in ok]), med([r.cpu_max() for r in ok]),
            med([r.procs_median() for r in ok]),
            med([None if r.store_bytes is None else float(r.store_bytes) for r in ok]),
            med([r.gateway_cpu_s for r in ok]), sizes.get(image, 0),
            [f"job {r.job}: {r.error}" for r in group if r.error],
        ))  # fmt: skip
    return rows


def print_table(rows: list[Row], warm: int, baseline: int) -> None:
    print(f"as {USER}: sbatch -N N --ntasks-per-node=1 --image=X --wrap 'srun --image=X ...'"
          f" (base: neither --image); warm and base: medians of {warm} and {baseline} runs\n"
          "start: submission to the task running in the container, median and max over the "
          "nodes\nprolog CPU: the prolog's own CPU seconds per node (nodemetrics), median "
          "and max over the nodes\nprocs CPU: the prolog and epilog processes per node, "
          "whole (Slurm, Python's start, the plugin; slurmd's cutime+cstime), median\n"
          "store/job: bytes read from the image store per job (stage: node-cache copies x "
          "image size; mount: loop-device reads; registry, mirror: blob bytes the artifact "
          "storage served)\n"
          "gw CPU: the gateway's CPU seconds over the job")  # fmt: skip
    header = (f"{'N':>3} {'image':<7} {'mode':<10} {'run':<4} {'start med':>9} {'start max':>9} "
              f"{'prolog CPU':>10} {'max':>7} {'procs CPU':>9} {'store/job':>10} "
              f"{'(N x img)':>10} {'gw CPU':>7}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.nodes:>3} {row.image:<7} {row.mode:<10} {row.kind:<4} "
            f"{fmt(row.start_median, ' s'):>9} {fmt(row.start_max, ' s'):>9} "
            f"{fmt(row.cpu_median, ' s', 3):>10} {fmt(row.cpu_max, ' s', 3):>7} "
            f"{fmt(row.procs_cpu, ' s'):>9} {fmt_bytes(row.store_bytes):>10} "
            f"{fmt_bytes(row.nodes * row.image_bytes if row.image_bytes else None):>10} "
            f"{fmt(row.gateway_cpu, ' s'):>7}"
            + (f"  FAILED {len(row.errors)}" if row.errors else "")
        )
        for error in row.errors:
            print(f"      {error}")


SERIES = {  # name: (row attribute, unit)
    "start median": ("start_median", "s"),
    "start max": ("start_max", "s"),
    "prolog CPU/node": ("cpu_median", "s"),
    "procs CPU/node": ("procs_cpu", "s"),
    "store bytes/job": ("store_bytes", "B"),
    "gateway CPU": ("gateway_cpu", "s"),
}


def growth(rows: list[Row]) -> dict[str, dict[str, float | None]]:
    by_series: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        by_series.setdefault((row.image, row.mode, row.kind), []).append(row)
    result: dict[str, dict[str, float | None]] = {}
    if not any(len({r.nodes for r in group}) > 1 for group in by_series.values()):
        return result
    print("\ngrowth per added node (least-squares slope over N):")
    for (image, mode, kind), group in sorted(by_series.items()):
        slopes: dict[str, float | None] = {}
        for name, (attribute, _) in SERIES.items():
            points = [(float(r.nodes), float(v)) for r in group
                      if (v := getattr(r, attribute)) is not None]  # fmt: skip
            slopes[name] = slope(points)
        result[f"{image}/{mode}/{kind}"] = slopes
        store = slopes["store bytes/job"]
        print(
            f"  {image:<7} {mode:<10} {kind:<4} start med {fmt_ms(slopes['start median'])}, "
            f"start max {fmt_ms(slopes['start max'])}, prolog CPU "
            f"{fmt_ms(slopes['prolog CPU/node'])}, procs CPU {fmt_ms(slopes['procs CPU/node'])}"
            f", store {fmt_bytes(store)}/node, "
            f"gateway CPU {fmt_ms(slopes['gateway CPU'])}"
        )
    return result


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:+.1f} ms/node"


def targets(rows: list[Row]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    print("\ntargets:")
    series: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        if row.kind == "warm" and row.cpu_median is not None:
            series.setdefault((row.image, row.mode), []).append(row)
    for (image, mode), group in sorted(series.items()):
        worst = max(r.cpu_max or 0.0 for r in group)
        values = [r.cpu_median or 0.0 for r in group]
        fit = slope([(float(r.nodes), r.cpu_median or 0.0) for r in group])
        span = max(r.nodes for r in group) - min(r.nodes for r in group)
        rise = (fit or 0.0) * span  # over the N range
        flat = rise <= max(0.05, 0.25 * statistics.fmean(values))
        ok = worst <= PROLOG_CPU_TARGET and flat
        checks.append({"target": "warm prolog CPU per node flat in N and <= 0.2 s",
                       "image": image, "mode": mode, "worst_node_s": worst,
                       "rise_over_n_range_s": rise, "pass": ok})  # fmt: skip
        print(f"  {'PASS' if ok else 'FAIL'} warm prolog CPU/node, {image} {mode}: worst node "
              f"{worst:.3f} s (<= {PROLOG_CPU_TARGET} s), fitted rise over N "
              f"{min(r.nodes for r in group)}..{max(r.nodes for r in group)} "
              f"{rise * 1000:+.1f} ms ({'flat' if flat else 'GROWS'})")  # fmt: skip
        procs = [r.procs_cpu for r in group if r.procs_cpu is not None]
        if procs:
            print(f"  INFO warm prolog+epilog processes CPU/node, whole, {image} {mode}: "
                  f"{min(procs):.2f}..{max(procs):.2f} s over N")  # fmt: skip
    for row in rows:
        if row.mode == "stage" and row.store_bytes is not None:
            limit = row.nodes * row.image_bytes
            ok = row.store_bytes <= limit
            checks.append({"target": "store bytes per staged job <= N x image size",
                           "nodes": row.nodes, "image": row.image, "kind": row.kind,
                           "bytes": row.store_bytes, "limit": limit, "pass": ok})  # fmt: skip
            print(f"  {'PASS' if ok else 'FAIL'} store bytes, stage, N={row.nodes} {row.image} "
                  f"{row.kind}: {fmt_bytes(row.store_bytes)} <= {fmt_bytes(limit)}")
        if row.mode.startswith(("registry", "mirror")) and row.store_bytes is not None:
            ratio = row.store_bytes / row.image_bytes if row.image_bytes else math.nan
            checks.append({"target": "registry bytes per job about one image size",
                           "nodes": row.nodes, "image": row.image, "kind": row.kind,
                           "bytes": row.store_bytes, "ratio": ratio, "pass": None})  # fmt: skip
            print(f"  INFO {row.mode} bytes, N={row.nodes} {row.image} {row.kind}: "
                  f"{fmt_bytes(row.store_bytes)} = {ratio:.2f} x image size (target ~1)")
    return checks


# ---- the sweep -------------------------------------------------------------------------------


def summary(run: Run) -> str:
    if run.error:
        return f"FAILED: {run.error}"
    return (
        f"start med {fmt(run.start_median(), ' s')} max {fmt(run.start_max(), ' s')}, prolog "
        f"CPU med {fmt(run.cpu_median(), ' s', 3)}, prolog+epilog processes CPU med "
        f"{fmt(run.procs_median(), ' s')}, store {fmt_bytes(run.store_bytes)}, gateway CPU "
        f"{fmt(run.gateway_cpu_s, ' s')}, {run.job_s:.1f} s"
        + (f"; LEFT: {run.leftovers}" if run.leftovers else "")
    )


def sweep_size(
    nodes: int, args: argparse.Namespace, runs: list[Run], sizes: dict[str, int],
    skipped: dict[str, str],
) -> None:  # fmt: skip
    box_of(nodes)
    names = [f"n{i}" for i in range(1, nodes + 1)]
    if "debian" in args.images and not PUSHED:
        push_debian()  # the registry runs now
        PUSHED.append("debian")
    ids = {image: lookup(IMAGES[image]) for image in args.images}
    stores = {}
    for image, image_id in ids.items():
        stores[image] = BOX / "images" / f"{image_id}.squashfs"
        sizes[image] = stores[image].stat().st_size
    with config_restored() as base_text:
        base = yaml.safe_load(base_text)
        caches = [node_cache_dir(base, n) for n in names]
        for _ in range(args.baseline):  # Slurm alone: no --image
            wait_for_idle_cluster(timeout=120)
            run = run_job(Run(nodes, "(none)", "-", "base"), None, "", None, names, caches)
            runs.append(run)
            progress(f"N={nodes} no image: job {run.job} " + summary(run))
        for mode in args.modes:
            text, why = mode_config(base_text, mode)
            if text is None:
                progress(f"mode {mode} not run: {why}")
                skipped[mode] = why
                continue
            write_config(text)
            for image in args.images:
                for i in range(1 + args.warm):
                    kind = "cold" if i == 0 else "warm"
                    wait_for_idle_cluster(timeout=120)
                    if kind == "cold":  # no job runs: take the image out of every cache
                        for cache in caches:
                            (cache / f"{ids[image]}.squashfs").unlink(missing_ok=True)
                        evict_page_cache(stores[image])
                        if mode == "mirror":
                            empty_the_mirror()
                        elif mode == "mirror-hit":
                            prime_the_mirror(ids[image])
                    run = run_job(Run(nodes, image, mode, kind), IMAGES[image], ids[image],
                                  stores[image], names, caches)  # fmt: skip
                    runs.append(run)
                    progress(f"N={nodes} {image} {mode} {kind}: job {run.job} " + summary(run))
        final = leftovers(names, caches)
        if final:
            progress(f"N={nodes}: left after the jobs: {final}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="3,8,16,32", help="node counts (default 3,8,16,32)")
    parser.add_argument("--modes", default="stage,mount,registry,mirror,mirror-hit",
                        help=f"store modes, of {', '.join(MODES)} (default all)")  # fmt: skip
    parser.add_argument("--images", default="busybox,debian",
                        help=f"images, of {', '.join(IMAGES)} (default both)")  # fmt: skip
    parser.add_argument("--warm", type=int, default=3, help="warm runs per series (default 3)")
    parser.add_argument("--baseline", type=int, default=2,
                        help="runs without --image per node count (default 2)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    args.nodes = [int(n) for n in args.nodes.split(",") if n.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.images = [i.strip() for i in args.images.split(",") if i.strip()]
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    for image in args.images:
        if image not in IMAGES:
            parser.error(f"unknown image {image!r}; known: {', '.join(IMAGES)}")
    if os.geteuid() != 0:
        parser.error("run as root (box, node caches, shifter.yaml)")

    OUT.mkdir(exist_ok=True)
    os.chmod(OUT, 0o1777)
    initial = box_size()
    progress(f"box at start: {f'{initial} nodes' if initial else 'down'}; sweep N={args.nodes}, "
             f"modes {args.modes}, images {args.images}, 1 cold + {args.warm} warm runs")
    original_config = SHIFTER_CONFIG.read_text() if SHIFTER_CONFIG.exists() else None
    runs: list[Run] = []
    sizes: dict[str, int] = {}
    skipped: dict[str, str] = {}
    started = time.monotonic()
    try:
        for nodes in args.nodes:
            sweep_size(nodes, args, runs, sizes, skipped)
    finally:
        if original_config is not None and SHIFTER_CONFIG.exists() \
                and SHIFTER_CONFIG.read_text() != original_config:  # fmt: skip
            write_config(original_config)
        if box_size() != initial:  # the box as it was found
            box("down")
            if initial:
                box("up", initial)
    elapsed = time.monotonic() - started

    rows = rows_of(runs, sizes)
    print_table(rows, args.warm, args.baseline)
    for mode, why in skipped.items():
        print(f"mode {mode}: not run ({why})")
    slopes = growth(rows)
    left = sorted({item for run in runs for item in run.leftovers})
    print(f"\nleft after the jobs (loop devices, mounts of {RUN_DIR} or the node caches, job "
          f"dirs, holds, partial copies): {left or 'nothing'}")  # fmt: skip
    checks = targets(rows)
    checks.append({"target": "nothing left after the jobs", "left": left, "pass": not left})
    print(f"  {'PASS' if not left else 'FAIL'} nothing left after the jobs")
    print(f"\n{len(runs)} jobs in {elapsed / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps({
            "image_bytes": sizes, "modes": {m: MODES[m] for m in args.modes},
            "skipped_modes": skipped, "runs": [asdict(r) for r in runs],
            "rows": [asdict(r) for r in rows], "growth_per_node": slopes,
            "targets": checks, "seconds": elapsed,
        }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
