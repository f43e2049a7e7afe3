"""Prolog and epilog runs per node, for node_exporter's textfile collector.

``slurm.metrics_dir`` names the collector's directory; each node keeps one file there,
``shifter_NODE.prom``, rewritten atomically (``prometheus_client.write_to_textfile``) after
every prolog and epilog that ran Python (the shim ends the epilog of a job that left nothing
on the node without it: those are not counted). Counters survive as the file's own values:
each run reads them back under a lock, adds its own and writes the file again.

Besides runs and wall-clock seconds, the CPU seconds of each script (user + system, of the
script's process and of the programs it ran and waited for: :func:`cpu_seconds` before and
after) are counted, so a site sees what a prolog costs a node, not only how long it took.
Both start once the configuration is loaded: the start of the prolog's process (Slurm's
``slurmstepd spank prolog``, the plugin, Python and its imports) comes before and is not
counted; slurmd's cutime + cstime shows it (``tools/bench/bench_scale.py``).
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import resource
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

RUNS = "shifter_job_script_runs"  # counter: node, script (prolog, epilog), result
SECONDS = "shifter_job_script_seconds"  # counter: node, script
CPU = "shifter_job_script_cpu_seconds"  # counter: node, script (user + system)
LAST = "shifter_job_script_last_seconds"  # gauge: node, script
RESULTS = ("ok", "job_error", "node_fault")
_NODE_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def metrics_file(directory: str, node: str) -> str:
    """The node's file in the collector's directory."""
    return os.path.join(directory, f"shifter_{_NODE_SAFE.sub('_', node) or 'node'}.prom")


class _Values:
    """The counters of one node, as read from its file and updated by one run."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, str, str], float] = {}
        self.seconds: dict[tuple[str, str], float] = {}
        self.cpu: dict[tuple[str, str], float] = {}
        self.last: dict[tuple[str, str], float] = {}

    def read(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError:
            return
        try:
            self._parse(text)
        except (ValueError, KeyError):  # a damaged file starts the counts again
            self.runs.clear()
            self.seconds.clear()
            self.cpu.clear()
            self.last.clear()

    def _parse(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if sample.name == f"{RUNS}_total":
                    self.runs[(labels["node"], labels["script"], labels["result"])] = sample.value
                elif sample.name == f"{SECONDS}_total":
                    self.seconds[(labels["node"], labels["script"])] = sample.value
                elif sample.name == f"{CPU}_total":
                    self.cpu[(labels["node"], labels["script"])] = sample.value
                elif sample.name == LAST:
                    self.last[(labels["node"], labels["script"])] = sample.value

    def collect(self) -> Iterator[Metric]:
        runs = CounterMetricFamily(RUNS, "prolog and epilog runs by result",
                                   labels=["node", "script", "result"])  # fmt: skip
        for run, value in sorted(self.runs.items()):
            runs.add_metric(list(run), value)
        seconds = CounterMetricFamily(SECONDS, "seconds in prologs and epilogs",
                                      labels=["node", "script"])  # fmt: skip
        cpu = CounterMetricFamily(CPU, "CPU seconds of prologs and epilogs, with the "
                                  "programs they ran (user + system)",
                                  labels=["node", "script"])  # fmt: skip
        last = GaugeMetricFamily(LAST, "seconds of the last prolog or epilog",
                                 labels=["node", "script"])  # fmt: skip
        for key, value in sorted(self.seconds.items()):
            seconds.add_metric(list(key), value)
        for key, value in sorted(self.cpu.items()):
            cpu.add_metric(list(key), value)
        for key, value in sorted(self.last.items()):
            last.add_metric(list(key), value)
        yield from (runs, seconds, cpu, last)


def cpu_seconds() -> float:
    """User + system CPU seconds used so far by this process and by the children it waited
    for (``getrusage``): the difference of two readings is what happened in between. 0.0
    if the kernel cannot tell (never raises)."""
    try:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
    except (OSError, ValueError):
        return 0.0
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def record(
    directory: str,
    node: str,
    script: str,
    result: str,
    seconds: float,
    cpu: float | None = None,
) -> None:
    """Count one run of ``script`` (prolog or epilog) on ``node`` with its ``result`` (one of
    :data:`RESULTS`), duration and, when given, the CPU seconds it used (a difference of
    :func:`cpu_seconds`; a negative or non-finite value counts as 0). Never raises: metrics
    must not fail a prolog."""
    path = metrics_file(directory, node)
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        lock = os.open(path + ".lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        values = _Values()
        values.read(path)
        key = (node, script, result)
        values.runs[key] = values.runs.get(key, 0.0) + 1
        values.seconds[(node, script)] = values.seconds.get((node, script), 0.0) + seconds
        if cpu is not None:
            used = cpu if math.isfinite(cpu) and cpu > 0 else 0.0
            values.cpu[(node, script)] = values.cpu.get((node, script), 0.0) + used
        values.last[(node, script)] = seconds
        registry = CollectorRegistry()
        registry.register(values)
        write_to_textfile(path, registry)
        os.chmod(path, 0o644)
    except Exception:  # metrics never fail a prolog or epilog
        pass
    finally:
        os.close(lock)
