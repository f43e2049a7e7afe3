"""Wake HTTP handlers waiting for a job to change state, from the gateway's worker threads.

A status request may ask to wait (``GET /jobs/ID?wait=S&state=STATE``): its handler registers
before it reads the job, so no change is lost between the read and the wait, and returns as
soon as any job changes state or ``S`` seconds have passed.  Clients then see a finished pull
at once without polling fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator


class StateChanges:
    """A broadcast from worker threads to coroutines (any event loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def notify(self) -> None:
        """A job changed state: wake every waiter (callable from any thread)."""
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(event.set)

    @contextlib.contextmanager
    def watch(self) -> Iterator[asyncio.Event]:
        """An event set at the next change after this call (use from a coroutine)."""
        key = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.add(key)
        try:
            yield key[1]
        finally:
            with self._lock:
                self._waiters.discard(key)


async def wait_for(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``event``; True when it was set."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True
