"""Prolog and epilog counts in node_exporter's textfile format (slurm/nodemetrics.py)."""

from __future__ import annotations

import math
import multiprocessing
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from shifter_core.slurm.nodemetrics import cpu_seconds, metrics_file, record


def _samples(path: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = Path(path).read_text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_runs_add_up_across_calls_and_results(tmp_path):
    directory = str(tmp_path / "textfile")
    record(directory, "n1", "prolog", "ok", 0.25)
    record(directory, "n1", "prolog", "ok", 0.5)
    record(directory, "n1", "prolog", "job_error", 1.0)
    record(directory, "n1", "epilog", "ok", 0.125)
    path = metrics_file(directory, "n1")
    assert path.endswith("/shifter_n1.prom")
    samples = _samples(path)
    runs = "shifter_job_script_runs_total"
    node = ("node", "n1")
    assert samples[(runs, (node, ("result", "ok"), ("script", "prolog")))] == 2
    assert samples[(runs, (node, ("result", "job_error"), ("script", "prolog")))] == 1
    assert samples[(runs, (node, ("result", "ok"), ("script", "epilog")))] == 1
    seconds = samples[("shifter_job_script_seconds_total", (node, ("script", "prolog")))]
    assert seconds == 1.75
    assert samples[("shifter_job_script_last_seconds", (node, ("script", "prolog")))] == 1.0
    assert oct(Path(path).stat().st_mode & 0o777) == "0o644"


def _one(directory: str) -> None:
    record(directory, "n2", "epilog", "ok", 0.01)


def test_concurrent_runs_lose_no_count(tmp_path):
    directory = str(tmp_path)
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_one, [directory] * 40)
    labels = (("node", "n2"), ("result", "ok"), ("script", "epilog"))
    key = ("shifter_job_script_runs_total", labels)
    assert _samples(metrics_file(directory, "n2"))[key] == 40


def test_a_damaged_file_starts_again_and_an_odd_node_name_is_safe(tmp_path):
    path = metrics_file(str(tmp_path), "../x y")
    assert Path(path).parent == tmp_path and "/" not in Path(path).name
    Path(path).write_text("not { prometheus\n")
    record(str(tmp_path), "../x y", "prolog", "node_fault", 2.0)
    assert any(value == 1 for value in _samples(path).values())


def test_an_unwritable_directory_is_no_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    record(str(blocker / "below"), "n1", "prolog", "ok", 0.1)  # no exception


def test_cpu_seconds_add_up_per_node_and_script(tmp_path):
    directory = str(tmp_path)
    record(directory, "n1", "prolog", "ok", 1.0, 0.25)
    record(directory, "n1", "prolog", "job_error", 1.0, 0.5)
    record(directory, "n1", "epilog", "ok", 1.0, 0.125)
    record(directory, "n1", "prolog", "ok", 1.0)  # no CPU reading: runs and seconds only
    samples = _samples(metrics_file(directory, "n1"))
    cpu = "shifter_job_script_cpu_seconds_total"
    node = ("node", "n1")
    assert samples[(cpu, (node, ("script", "prolog")))] == 0.75
    assert samples[(cpu, (node, ("script", "epilog")))] == 0.125
    assert samples[("shifter_job_script_seconds_total", (node, ("script", "prolog")))] == 3.0
    ok = (node, ("result", "ok"), ("script", "prolog"))
    assert samples[("shifter_job_script_runs_total", ok)] == 2


def test_a_bad_cpu_reading_counts_as_nothing(tmp_path):
    directory = str(tmp_path)
    record(directory, "n1", "prolog", "ok", 0.1, 0.5)
    for bad in (-3.0, math.nan, math.inf):
        record(directory, "n1", "prolog", "ok", 0.1, bad)
    key = ("shifter_job_script_cpu_seconds_total", (("node", "n1"), ("script", "prolog")))
    assert _samples(metrics_file(directory, "n1"))[key] == 0.5


def test_cpu_seconds_count_the_process_and_the_children_it_waited_for():
    before = cpu_seconds()
    deadline = before + 0.05
    while cpu_seconds() < deadline:  # burn CPU in this process
        pass
    own = cpu_seconds() - before
    assert own >= 0.05
    before = cpu_seconds()
    loop = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.1: pass"
    subprocess.run(["python3", "-c", loop], check=True)
    assert cpu_seconds() - before >= 0.1  # the child's CPU, once waited for


def test_a_file_with_foreign_labels_starts_again(tmp_path):
    path = metrics_file(str(tmp_path), "n1")
    Path(path).write_text(
        "# TYPE shifter_job_script_cpu_seconds counter\n"
        'shifter_job_script_cpu_seconds_total{other="x"} 7\n'
    )
    record(str(tmp_path), "n1", "prolog", "ok", 0.5, 0.25)  # no exception
    key = ("shifter_job_script_cpu_seconds_total", (("node", "n1"), ("script", "prolog")))
    assert _samples(path)[key] == 0.25
