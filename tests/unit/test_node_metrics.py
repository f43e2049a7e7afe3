"""Prolog and epilog counts in node_exporter's textfile format (slurm/nodemetrics.py)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from shifter_core.slurm.nodemetrics import metrics_file, record


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
