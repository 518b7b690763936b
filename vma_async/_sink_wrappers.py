"""Sinks around sinks: throttling and zero handling for restore-map targets.

Goal: a restore map may cap a throttle group's write rate
(``throttling.bps``) and say that a target already reads back zeros
(``0:``); both are properties of where the bytes go, not of the reader, so
they wrap the device's sink and the reader sees an ordinary
:class:`~vma_async.Sink`.

Plan: :class:`SinkWrapper` forwards every hook of the :class:`Sink`
interface (``prepare``, ``write``, ``write_many``, ``write_zeroes``,
``flush``, ``aclose``, ``abort``) to the wrapped sink, so a wrapped sink keeps
its early size check, its batched writes and its clean-up;
:class:`ThrottledSink` books each write on a shared :class:`RateLimiter`
first, and ``ZeroesSkipped`` drops zero writes.

Worst case: a throttled restore takes as long as its rate says (by design);
the limiter sleeps, it never spins, and every wait is cancellable.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import anyio.lowlevel

from ._format import DeviceInfo
from ._sinks import Buffer, Sink

__all__ = ["RateLimiter", "SinkWrapper", "ThrottledSink", "ZeroesSkipped"]


class RateLimiter:
    """A write-rate limit in bytes per second, shared by every sink that holds it.

    GCRA form of a token bucket: each request books its transfer time on a
    shared virtual clock and sleeps until its slot, so concurrent writers of
    one throttle group share the rate in arrival order and nobody spins.  A
    burst of ``burst`` seconds' worth of bytes may go through at once, which
    is what lets the first cluster start without waiting.
    """

    def __init__(self, bytes_per_second: int, burst: float = 0.05) -> None:
        if bytes_per_second <= 0:
            raise ValueError("the rate must be positive")
        self.bytes_per_second = bytes_per_second
        self._burst = burst
        self._booked_until = float("-inf")

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be written (a checkpoint: cancellable)."""
        now = anyio.current_time()
        self._booked_until = max(self._booked_until, now) + nbytes / self.bytes_per_second
        delay = self._booked_until - now - self._burst
        if delay > 0:
            await anyio.sleep(delay)
        else:
            await anyio.lowlevel.checkpoint()


class SinkWrapper(Sink):
    """A sink that forwards every call to ``inner``; subclasses override some."""

    def __init__(self, inner: Sink) -> None:
        self._inner = inner

    async def prepare(self, device: DeviceInfo) -> None:
        await self._inner.prepare(device)

    async def write(self, offset: int, data: Buffer) -> None:
        await self._inner.write(offset, data)

    async def write_many(self, writes: Sequence[tuple[int, Buffer]]) -> None:
        await self._inner.write_many(writes)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._inner.write_zeroes(offset, length)

    async def flush(self) -> None:
        await self._inner.flush()

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def abort(self) -> None:
        await self._inner.abort()


class ThrottledSink(SinkWrapper):
    """A sink whose writes (and written zeros) pass through a :class:`RateLimiter`."""

    def __init__(self, inner: Sink, limiter: RateLimiter) -> None:
        super().__init__(inner)
        self._limiter = limiter

    async def write(self, offset: int, data: Buffer) -> None:
        await self._limiter.acquire(memoryview(data).nbytes)
        await super().write(offset, data)

    async def write_many(self, writes: Sequence[tuple[int, Buffer]]) -> None:
        await self._limiter.acquire(sum(memoryview(data).nbytes for _, data in writes))
        await super().write_many(writes)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._limiter.acquire(length)
        await super().write_zeroes(offset, length)


class ZeroesSkipped(SinkWrapper):
    """A target that already reads back zeros (``0:`` in a map): zero blocks
    are not written, as in the reference, while other devices may want them."""

    async def write_zeroes(self, offset: int, length: int) -> None:
        await anyio.lowlevel.checkpoint()
