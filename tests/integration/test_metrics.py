"""Metrics on the box: the gateway's ``/metrics`` (curl, as Prometheus scrapes it) moves with a
pull; the prolog and epilog count their runs per node in node_exporter's textfile format."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Box
from .slurm import run_as, wait_for_idle_cluster
from .test_pull_on_submit import push_image

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _scrape() -> Samples:
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl is not installed (tools/box/setup.sh installs it)")
    out = subprocess.run([curl, "-fsS", "http://127.0.0.1:7080/metrics"], capture_output=True,
                         text=True, timeout=30, check=True).stdout  # fmt: skip
    return _parse(out)


def test_the_gateways_counters_move_after_a_pull(box: Box):
    ready = ("shifter_gateway_job_transitions_total", (("kind", "pull"), ("state", "ready")))
    requests = "shifter_gateway_request_seconds_count"
    name, _ = push_image()  # new: a recent pull of a known image would be answered at once
    before = _scrape()
    pull = run_as(["shifterimg", "pull", name], timeout=300)
    assert pull.returncode == 0, pull.stderr
    after = _scrape()
    assert after[ready] == before.get(ready, 0) + 1
    posted = (requests, (("method", "POST"), ("route", "/api/v1/pull"), ("status", "200")))
    assert after[posted] >= before.get(posted, 0) + 1
    assert after[("shifter_gateway_layer_cache_bytes", ())] > 0
    made = ("shifter_gateway_image_bytes_total", ())
    assert after[made] > before.get(made, 0)
    stage = ("shifter_gateway_job_stage_seconds_count", (("stage", "pulling"),))
    assert after[stage] == before.get(stage, 0) + 1


def test_prologs_and_epilogs_are_counted_per_node(box: Box):
    directory = box.root / "metrics"

    def runs(node: str, script: str) -> float:
        path = directory / f"shifter_{node}.prom"
        if not path.exists():
            return 0
        key = ("shifter_job_script_runs_total",
               (("node", node), ("result", "ok"), ("script", script)))  # fmt: skip
        return _parse(path.read_text()).get(key, 0)

    before = {(n, s): runs(n, s) for n in box.nodes for s in ("prolog", "epilog")}
    result = run_as(["srun", "-N3", "--image=busybox", "true"], timeout=120)
    assert result.returncode == 0, result.stderr
    wait_for_idle_cluster(timeout=60)  # the epilogs ran
    for node in box.nodes:
        for script in ("prolog", "epilog"):
            assert runs(node, script) == before[(node, script)] + 1, (node, script)
