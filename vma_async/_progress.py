"""One progress convention for every long operation of the library.

Goal: ``create_archive``, ``backup_image``, ``VmaReader.restore``/``verify``
and ``extract_archive`` all report progress the same way, so a caller (the
``vma`` command line, a web UI) writes one callback for all of them.

Plan: an operation builds a :class:`Progress` value (frozen, so a callback
may keep it) at most once per batch or extent batch, never per cluster, and
once more at the end; it hands it to the ``progress=`` callback through
:func:`report_progress`, which awaits the callback's result when that is
awaitable (so a callback may be ``async def`` and apply back-pressure).
With ``progress=None`` nothing is computed per cluster.

Worst case: a slow callback slows the operation it reports on, by design:
that is the back-pressure an async callback asks for.  The counters are
device bytes walked (``clusters walked * 65536``, as the reference ``vma``
counts), so ``done_bytes // CLUSTER_SIZE`` gives the reference's cluster
numbers for its ``-v`` lines.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DeviceProgress", "Progress", "ProgressCallback", "report_progress"]


@dataclass(frozen=True, slots=True)
class DeviceProgress:
    """Progress on one device of a multi-device operation."""

    name: str
    done_bytes: int  # device bytes walked so far
    total_bytes: int


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot of one operation's progress, handed to a ``progress=`` callback."""

    operation: str  # "create" | "backup" | "restore" | "verify" | "extract"
    done_bytes: int  # device bytes walked so far: clusters walked * 65536 (as the reference counts)
    total_bytes: int  # device bytes walked in all: sum of cluster_count * 65536 of walked devices
    read_bytes: int  # bytes actually read from the source/image so far (ETA on sparse disks)
    zero_bytes: int  # device bytes found to be zero so far
    elapsed: float  # seconds since the operation started
    devices: tuple[DeviceProgress, ...] = ()


ProgressCallback = Callable[[Progress], object]
"""A ``progress=`` callback; it may return an awaitable, which is awaited."""


async def report_progress(callback: ProgressCallback, progress: Progress) -> None:
    """Call ``callback(progress)`` and await its result if it is awaitable.

    The one place that knows a callback may be ``async``: every operation
    reports through here rather than testing for an awaitable itself.
    """
    result = callback(progress)
    if inspect.isawaitable(result):
        await result
