"""The downloads of running pulls, kept in memory for status requests."""

from __future__ import annotations

import threading
import time

from .models import LayerProgress, PullProgress


class JobProgress:
    """Bytes downloaded per layer of one running job (in memory only)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.layers: dict[str, list[int]] = {}
        self.started = time.monotonic()

    def expect(self, layers: dict[str, int]) -> None:
        """The layers the job will download, with their sizes."""
        with self._lock:
            for digest, size in layers.items():
                self.layers.setdefault(digest, [0, size])

    def update(self, digest: str, done: int, total: int) -> None:
        with self._lock:
            self.layers[digest] = [done, total]

    def snapshot(self) -> PullProgress:
        """Where the downloads are, and their rate since the job started."""
        with self._lock:
            layers = tuple(LayerProgress(d, v[0], v[1]) for d, v in self.layers.items())
        done = sum(layer.done for layer in layers)
        elapsed = max(time.monotonic() - self.started, 1e-3)
        return PullProgress(layers, done, sum(layer.total for layer in layers), done / elapsed)
