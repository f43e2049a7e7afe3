"""The gateway's Prometheus metrics (``GET /metrics``), with ``prometheus_client``.

Counted as they happen: job state changes by kind and state, the seconds each job spent in
each stage (pending: queued; pulling: layers fetched; converting: flattened to squashfs),
bytes of the squashfs images made, and request latency by route. Read from the gateway at
each scrape: the layer cache (downloads, hits, bytes, cap), the jobs by state in the database
(gauge), the queue depth and the workers. Image names never appear in a label.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .models import GatewayStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _StatsCollector:
    """What the gateway knows at scrape time (:meth:`Gateway.stats`)."""

    def __init__(self, stats: Callable[[], GatewayStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        cache = stats.layer_cache
        prefix = "shifter_gateway_layer_cache"
        yield CounterMetricFamily(f"{prefix}_downloads", "layers downloaded", cache.downloads)
        yield CounterMetricFamily(f"{prefix}_hits", "layers found in the cache", cache.hits)
        yield CounterMetricFamily(
            f"{prefix}_waits", "layers another pull was downloading", cache.waited
        )
        yield CounterMetricFamily(
            f"{prefix}_written_bytes", "bytes written to the cache", cache.bytes_written
        )
        yield GaugeMetricFamily(f"{prefix}_bytes", "bytes in the layer cache", cache.bytes)
        yield GaugeMetricFamily(f"{prefix}_max_bytes", "the cache's cap (0: none)", cache.max_bytes)
        jobs = GaugeMetricFamily(
            "shifter_gateway_jobs", "jobs in the database by state", labels=["state"]
        )
        for state, count in sorted(stats.jobs.items()):
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily("shifter_gateway_queue_depth", "jobs waiting", stats.queued)
        yield GaugeMetricFamily("shifter_gateway_workers", "pulls at once", stats.workers)


class GatewayMetrics:
    """The gateway's metrics, in a registry of their own."""

    def __init__(self, stats: Callable[[], GatewayStats]) -> None:
        self.registry = CollectorRegistry()
        self.transitions = Counter(
            "shifter_gateway_job_transitions",
            "job state changes, by job kind (pull, import) and the state entered",
            ["kind", "state"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "shifter_gateway_job_stage_seconds",
            "seconds a job spent in a stage (pending, pulling, converting)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.image_bytes = Counter(
            "shifter_gateway_image_bytes",
            "bytes of the squashfs images made",
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "shifter_gateway_request_seconds",
            "request latency by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.registry.register(_StatsCollector(stats))
        self._entered: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def job_state(self, job_id: str, kind: str, state: str, created: float) -> None:
        """A job entered ``state``: count the change and time the stage it left (a job not
        seen yet left ``pending``, where it was from ``created``; the same state again, with
        a new message, is no change)."""
        now = time.time()
        with self._lock:
            left = self._entered.pop(job_id, ("pending", created))
            if left[0] == state:
                self._entered[job_id] = left
                return
            if state not in ("ready", "failed"):
                self._entered[job_id] = (state, now)
        self.transitions.labels(kind=kind, state=state).inc()
        self.stage_seconds.labels(stage=left[0]).observe(max(0.0, now - left[1]))

    def image_made(self, size: int) -> None:
        self.image_bytes.inc(size)

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.request_seconds.labels(route=route, method=method, status=str(status)).observe(
            seconds
        )

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
