"""A thread of the writer's own that writes sealed extents to a blocking target.

Goal (issue 10): keep the disk busy.  A regular file cannot be polled, so its
writes are blocking system calls made off the event loop.  Made through
``anyio.to_thread`` one extent at a time, every write waited for the event
loop to come round before the next one was started; the loop is also where
the producers pack extents (about 2 ms of Python per extent), so the disk sat
idle for a third of a 4 GiB ``vma create`` (measured: 0.8 s of 2.4 s, gaps
of up to 2 ms after one in ten writes).

Plan: the writer submits each extent the moment it is sealed (in archive
order) to this thread's queue; the thread writes one after another without
the loop's help and reports each completion on a deque, waking the loop
through a pipe (backend-neutral: ``anyio.wait_readable``).  The loop side
collects completions whenever it wants buffers back; nothing else waits.

Failure and shutdown: the first write error ends the thread and is re-raised
to the collector.  :meth:`OutputThread.stop` (blocking: run it in a worker
thread) makes the thread skip whatever is still queued, waits for the write
in progress and closes the pipe: the target's fd may be closed only then.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import queue
import threading
from collections.abc import Callable

import anyio

__all__ = ["BlockingWrite", "OutputThread"]

BlockingWrite = Callable[[mmap.mmap, int, int], None]
"""Writes ``buffer[start:end]`` as :meth:`Target.write_aligned` does, blocking."""


class OutputThread:
    """Writes queued extents in order on a thread of its own (see the module)."""

    def __init__(self, write: BlockingWrite) -> None:
        self._write = write
        self._queue: queue.SimpleQueue[tuple[mmap.mmap, int, int] | None] = queue.SimpleQueue()
        self._completed: collections.deque[BaseException | None] = collections.deque()
        self._stopping = False
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="vma-output", daemon=True)
        self._thread.start()

    def submit(self, buffer: mmap.mmap, start: int, end: int) -> None:
        """Queue ``buffer[start:end]``; it must not change until collected."""
        self._queue.put((buffer, start, end))

    async def collect(self) -> int:
        """Wait until at least one queued write is done; return how many are
        (in submission order) since the last call.  Raises the write error
        once the thread has failed.  Cancellable: a cancelled call collects
        nothing, and the writes go on."""
        while True:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_read, 4096)
            if self._completed:
                done = 0
                while self._completed:
                    error = self._completed.popleft()
                    if error is not None:
                        raise error
                    done += 1
                return done
            await anyio.wait_readable(self._wake_read)

    def stop(self) -> None:
        """Skip what is still queued, wait for the write in progress, release
        the pipe.  Blocking; idempotent."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join()
        # Nobody waits on the pipe now: the writer stops the thread while it
        # holds the output lock, which a collector holds too.
        for fd in (self._wake_read, self._wake_write):
            if fd >= 0:
                os.close(fd)
        self._wake_read = self._wake_write = -1

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stopping:
                return
            try:
                self._write(*item)
            except BaseException as exc:  # handed to the collector
                self._completed.append(exc)
                self._wake()
                return
            self._completed.append(None)
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: the loop is woken already
            os.write(self._wake_write, b"\0")
