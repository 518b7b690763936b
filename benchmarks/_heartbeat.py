"""The event-loop stall probe the benchmarks share.

A task sleeps ``HEARTBEAT`` at a time and records how late it wakes: the
worst lateness while the measured work runs is the worst stall of the event
loop (any backend).  Imported by the benchmark scripts, which Python runs
with this directory first on ``sys.path``.
"""

from __future__ import annotations

import time

import anyio

HEARTBEAT = 0.005


class Heartbeat:
    """``tg.start_soon(heartbeat.run, done)``; ``heartbeat.worst`` in seconds."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def run(self, done: anyio.Event) -> None:
        while not done.is_set():
            start = time.perf_counter()
            await anyio.sleep(HEARTBEAT)
            self.worst = max(self.worst, time.perf_counter() - start - HEARTBEAT)
