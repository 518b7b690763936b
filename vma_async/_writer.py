"""VmaWriter: many producer tasks, one extent assembler, a bounded pool of buffers.

Data flow.  Producers call :meth:`VmaWriter.write` concurrently.  Under one
lock (the reference's ``flush_lock`` CoMutex) a producer checks its cluster and
packs it into the *open* extent buffer (:class:`ExtentAssembler`).  A full
extent is *sealed* and appended to a FIFO of sealed buffers; the producer then
takes a free buffer from the pool for the next extent.  The output writes the
sealed buffers to the target in order and returns each to the pool.

Backpressure.  The pool is fixed (``buffer_count`` page-aligned mmaps of one
extent each, fit for ``O_DIRECT``): when no buffer is free, the producer that
needs one waits for the output, and every other producer waits behind it on
the lock.  Memory held is therefore bounded by the pool whatever the archive
size, and ``stats`` records the high-water mark and how often producers
waited, so tests can assert the bound from the writer's own counters.

Producers that read files use :meth:`VmaWriter.write_clusters_from`: the
packing then runs in a worker thread, under the same lock, right after each
512 KiB read (the bytes are still in that core's cache), and that thread
seals full extents and takes free buffers itself when an output thread
writes them; the pool's books are then shared with the event loop under a
small ``threading.RLock`` (``_books``).

Who writes the output.  *Whoever holds the output lock* drains the FIFO
(:meth:`VmaWriter._drain`).  Used as ``async with VmaWriter.open(t) as w``,
the writer enters its own task group in ``__aenter__`` and starts an output
task that drains as soon as a buffer is sealed, so packing the next extent
overlaps writing the last one even with a single producer; the task group is
exited in ``__aexit__``, in the same task and around the user's block, which
is what trio's cancel-scope rules require.  Used as ``w = await
VmaWriter.open(t)`` there is no task to own, so no background task: the
producer that seals an extent drains it after releasing the assembler lock
(the reference writes extents inline from the coroutine holding its mutex),
and a producer that finds the pool empty drains too.  Either way draining is
the same code, and the background task is only an early drainer.

Failure.  The first error is sticky (kept by the assembler) and aborts the
archive at once: a file the writer created is removed, an ``exec:`` child is
terminated and reaped, our fds are closed.  Errors from the output, a
cancelled ``write``, an invalid call, or an exception leaving the ``async
with`` block all take this path; every later call raises a fresh copy of the
sticky error, chained to it.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
import time
import uuid as uuid_mod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import anyio
import anyio.abc
import anyio.lowlevel

from ._assembler import (
    WRITER_EXTENT_SIZE,
    ClusterData,
    ExtentAssembler,
    StreamStatus,
    WriterStatus,
)
from ._compress import CompressingTarget
from ._errors import VmaError, WriterAbortedError
from ._format import CLUSTER_SIZE
from ._opening import AsyncResource, Opening
from ._output_thread import OutputThread
from ._targets import ALIGNMENT, Target, TargetLike, resolve_target

_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14

PACK_GROUP = 8
"""Clusters :meth:`VmaWriter.write_clusters_from` asks for at a time: 512 KiB,
small enough to stay in a core's cache between the read and the packing
(4 and 16 measured no better)."""

ClusterRead = Callable[[int, int], tuple[bytes | bytearray, Sequence[bool] | None] | None]
"""``read(cluster_num, n)`` for :meth:`VmaWriter.write_clusters_from`."""

DEFAULT_BUFFER_COUNT = 4
"""One extent being written, one being packed, two sealed in between: enough
to smooth the output's hiccups, ~15 MiB of memory."""

BUFFER_SIZE = (ALIGNMENT + WRITER_EXTENT_SIZE + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
"""An extent, placed at its offset in the archive modulo :data:`ALIGNMENT`
(see :meth:`Target.write_aligned`), and the room before it."""


@dataclass(slots=True)
class WriterStats:
    """Counters the writer keeps about its own buffering (for tests and tuning)."""

    buffer_count: int
    buffer_size: int
    buffered_bytes: int = 0
    """Bytes packed or sealed but not yet written to the target."""
    buffered_bytes_high_water: int = 0
    producer_waits: int = 0
    """Times a producer needed a buffer and had to wait for the output."""
    extents_written: int = 0
    bytes_written: int = 0

    @property
    def bound(self) -> int:
        """What the pool can hold: ``buffered_bytes`` never exceeds it."""
        return self.buffer_count * self.buffer_size


def _sticky_error(exc: BaseException) -> BaseException:
    """The error later calls raise: our own errors as they are, anything else
    (a producer's exception, a cancellation) as :class:`WriterAbortedError`."""
    if isinstance(exc, VmaError):
        return exc
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        error = WriterAbortedError("vma archive aborted: cancelled")
    else:
        error = WriterAbortedError(f"vma archive aborted: {exc!r}")
    error.__cause__ = exc
    return error


class VmaWriter(AsyncResource):
    """Writes one VMA archive; see the module docstring for the design.

    Create with :meth:`open`.  Methods may be called from any number of tasks
    of one event loop at once.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        # No public constructor: a writer made here would have a target
        # nobody opened (it failed later with "Bad file descriptor").
        raise TypeError(
            "VmaWriter has no public constructor: use `async with VmaWriter.open(target)"
            " as writer:` or `writer = await VmaWriter.open(target)`"
        )

    @classmethod
    def _create(
        cls,
        target: Target,
        *,
        uuid: uuid_mod.UUID | None,
        ctime: int | None,
        buffer_count: int,
    ) -> VmaWriter:
        writer = cls.__new__(cls)
        writer._setup(target, uuid=uuid, ctime=ctime, buffer_count=buffer_count)
        return writer

    def _setup(
        self,
        target: Target,
        *,
        uuid: uuid_mod.UUID | None,
        ctime: int | None,
        buffer_count: int,
    ) -> None:
        if buffer_count < 2:
            raise ValueError("a writer needs at least 2 buffers")
        self._target = target
        self._assembler = ExtentAssembler(uuid if uuid is not None else uuid_mod.uuid4())
        self._ctime = ctime
        self.stats = WriterStats(buffer_count, BUFFER_SIZE)
        self._free = [mmap.mmap(-1, BUFFER_SIZE) for _ in range(buffer_count)]
        self._sealed: deque[tuple[mmap.mmap, int, int]] = deque()  # buffer, start, length
        self._sealed_bytes = 0
        self._archive_bytes = 0
        """Bytes sealed so far: where the next buffer starts in the archive."""
        self._current: mmap.mmap | None = None
        self._current_start = 0
        self._lock = anyio.Lock(fast_acquire=True)
        self._output_lock = anyio.Lock(fast_acquire=True)
        self._drain_scope: anyio.CancelScope | None = None
        self._work = anyio.Event()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._output_scope = anyio.CancelScope()
        self._aborted: anyio.Event | None = None
        self._finished = False
        self._output_thread: OutputThread | None = None
        """For a blocking target: writes each extent once sealed (see _output_thread)."""
        self._books = threading.RLock()
        """Guards the pool's books (free buffers, the sealed FIFO, byte counts,
        the open extent's buffer) where ``write_clusters_from``'s worker thread
        rolls over to a new extent while the event loop collects written ones
        or aborts (see :meth:`_roll_over`)."""

    @classmethod
    def open(
        cls,
        target: TargetLike,
        *,
        uuid: uuid_mod.UUID | None = None,
        ctime: int | None = None,
        buffer_count: int = DEFAULT_BUFFER_COUNT,
        compress: str | None = None,
    ) -> Opening[VmaWriter]:
        """Open ``target`` for a new archive.

        ``async with VmaWriter.open(t) as w:`` also runs a background output
        task (packing overlaps writing), closes on a clean exit and aborts on
        an exception or cancellation.  ``w = await VmaWriter.open(t)`` returns
        an open writer that the caller finishes with :meth:`aclose` (or
        abandons with :meth:`abort`); its producers then write the output
        themselves.

        ``target``: a path (created with ``O_EXCL``; an existing FIFO is
        written instead), ``"exec:COMMAND"``, an int fd (closed by the writer
        unless wrapped as ``FdTarget(fd, closefd=False)``), or a
        :class:`Target`.  ``ctime`` defaults to the time the header is written.
        ``compress="zstd"`` or ``"gzip"`` compresses in-process on the way
        to any target (:class:`CompressingTarget`; for its level and threads,
        pass one as ``target``).
        """

        async def opener() -> VmaWriter:
            resolved = await resolve_target(target)
            if compress is not None:
                resolved = CompressingTarget(resolved, compress)
            writer = cls._create(resolved, uuid=uuid, ctime=ctime, buffer_count=buffer_count)
            await writer._open()
            return writer

        return Opening(opener)

    async def _open(self) -> None:
        try:
            await self._target.open()
            await anyio.to_thread.run_sync(self._prefault)
            blocking_write = self._target.blocking_writer()
            if blocking_write is not None:
                self._output_thread = OutputThread(blocking_write)
        except BaseException as exc:
            await self._fail(exc)
            raise

    def _prefault(self) -> None:
        """Fault the pool's pages in now, in a worker thread: touched for the
        first time while packing, they stalled the event loop ~10 ms per
        buffer (measured)."""
        for buffer in self._free:
            try:
                buffer.madvise(_MADV_POPULATE_WRITE)
            except (OSError, ValueError):
                for offset in range(0, len(buffer), mmap.PAGESIZE):
                    buffer[offset] = 0

    # --- registration (before the first write) ----------------------------------

    def add_config(self, name: str, data: bytes) -> None:
        """Add a config blob, stored under the basename of ``name``."""
        self._assembler.add_config(name, data)

    def register_stream(self, name: str, size: int) -> int:
        """Register a device of ``size`` bytes (> 0); return its dev_id (1..254).
        A stream named ``vmstate`` takes its clusters in order and is unbounded."""
        return self._assembler.register_stream(name, size)

    # --- data ---------------------------------------------------------------------

    async def write(self, dev_id: int, cluster_num: int, data: ClusterData | None = None) -> int:
        """Queue one 64 KiB cluster (``None``: all zero; shorter: zero-padded);
        return the bytes transferred.  Awaits when the output is behind.

        The data is copied before this returns.  Every call is a full
        checkpoint (trio's rule): it first lets other tasks run and takes a
        pending cancellation, before it has changed anything, so a producer
        writing in a loop cannot starve the others and a cancelled call has
        queued nothing.  A call that then finds room in the open extent and
        nobody holding the lock packs at once, without awaiting again; the
        others take the lock and may wait for a buffer.
        """
        await anyio.lowlevel.checkpoint()
        # ATOMIC: from the test of the lock below to the return of the fast
        # path there must be no await.  The lock is not taken there, so only
        # the absence of a suspension point keeps another producer (which
        # would take the lock and may seal or replace the open extent) out of
        # the middle of add_cluster.
        assembler = self._assembler
        if assembler.extent_open and not assembler.extent_full and not self._lock.locked():
            try:
                assembler.check_write(dev_id, cluster_num)
                transferred = assembler.add_cluster(dev_id, cluster_num, data)
            except BaseException as exc:
                await self._failed(exc)
                raise
            self._account()
            return transferred
        try:
            async with self._lock:
                self._assembler.check_write(dev_id, cluster_num)
                sealed = await self._make_room()
                # ATOMIC (under the lock): no await between the room made
                # above and the cluster packed here.
                transferred = self._assembler.add_cluster(dev_id, cluster_num, data)
                self._account()
            if sealed:
                await self._hand_off()
        except BaseException as exc:
            await self._failed(exc)
            raise
        return transferred

    async def write_clusters(
        self,
        dev_id: int,
        first_cluster: int,
        data: bytes | bytearray,
        present: Sequence[bool] | None = None,
    ) -> int:
        """Queue consecutive clusters from one buffer; return the bytes transferred.

        Cluster ``first_cluster + i`` is ``data[i * 65536 : (i + 1) * 65536]``
        (the last may be short: zero-padded), or all zero, never looked at,
        where ``present[i]`` is false (``present`` also sets the count then).
        The batch form of :meth:`write` for producers that read large chunks
        (``backup_image`` reads 4 MiB): one checkpoint per call and one lock
        per extent instead of per cluster, and the clusters are packed in
        place from ``data``: the user CPU of ``vma create`` of 1 GiB went from
        0.63 to 0.39 s (issue 10, see docs/writer.md).  The data is copied
        before this returns.  A call that fails or is cancelled part way may
        have queued the leading clusters: it is meant for producers whose
        failure ends the archive, as ``backup_image``'s does.
        """
        count = len(present) if present is not None else -(-len(data) // CLUSTER_SIZE)
        await anyio.lowlevel.checkpoint()
        transferred = 0
        index = 0
        try:
            while index < count:
                async with self._lock:
                    sealed = await self._make_room()
                    # ATOMIC (under the lock): no await between the room made
                    # above and the clusters packed here.
                    index, done = self._assembler.add_clusters(
                        dev_id, first_cluster, data, present, index, count
                    )
                    transferred += done
                    self._account()
                if sealed:
                    await self._hand_off()
        except BaseException as exc:
            await self._failed(exc)
            raise
        return transferred

    async def write_clusters_from(
        self, dev_id: int, first_cluster: int, count: int, read: ClusterRead
    ) -> int:
        """Queue up to ``count`` consecutive clusters that ``read`` supplies;
        return how many were queued.

        ``read(cluster_num, n)`` is blocking and runs in a worker thread while
        this call holds the assembler lock.  It returns clusters ``cluster_num``
        to ``cluster_num + n - 1`` as :meth:`write_clusters` takes them (the
        bytes, and which hold data, or None for all), or None when they are
        not at hand without waiting.  Then this call returns the count queued
        so far: the producer gets the next clusters ready *outside* the lock
        (so that no producer waits on another one's disk) and calls again.

        Why (issue 10, measured): ``read`` fills a small buffer (``backup_image``
        uses :data:`PACK_GROUP` clusters, 512 KiB) that is packed at once, on
        the same core, while the bytes are still in its cache.  Reading 4 MiB
        chunks in one thread and packing them in another sent every byte
        through main memory twice more, and the archive's ``O_DIRECT`` writes
        compete with those copies for memory bandwidth: a 4 GiB create went
        from 2.0-2.4 s to 1.5-1.9 s.  The lock is held for the whole call
        (other producers take turns between calls), and the worker rolls
        over to the next extent itself where it can (:meth:`_roll_over`).  A
        call that fails or is cancelled part way may have queued the leading
        clusters, as with :meth:`write_clusters`.
        """
        await anyio.lowlevel.checkpoint()
        done = 0
        try:
            while done < count:
                async with self._lock:
                    sealed = await self._make_room()
                    # ATOMIC (under the lock, in the worker thread): from the
                    # room made above to the clusters packed.
                    packed, waiting, rolled = await anyio.to_thread.run_sync(
                        self._read_and_pack, dev_id, first_cluster + done, count - done, read
                    )
                    done += packed
                    self._account()
                if rolled:
                    self._work.set()  # for the output task, which collects written buffers
                if sealed or rolled:
                    await self._hand_off()
                if waiting:
                    break
        except BaseException as exc:
            await self._failed(exc)
            raise
        return done

    def _read_and_pack(
        self, dev_id: int, first_cluster: int, count: int, read: ClusterRead
    ) -> tuple[int, bool, bool]:
        """In a worker thread, under the lock: read and pack groups of clusters
        until ``count`` are packed, ``read`` says wait, or the extent is full
        and cannot be rolled over here (:meth:`_roll_over`); return how many
        were packed, whether ``read`` said wait (only this can tell: once the
        lock is released another producer may seal a full extent) and
        whether an extent was sealed here."""
        assembler = self._assembler
        packed = 0
        rolled = False
        while packed < count:
            if assembler.extent_full:
                if not self._roll_over():
                    break
                rolled = True
            n = min(PACK_GROUP, count - packed, assembler.extent_room)
            clusters = read(first_cluster + packed, n)
            if clusters is None:
                return packed, True, rolled
            data, present = clusters
            assembler.add_clusters(dev_id, first_cluster + packed, data, present, 0, n)
            packed += n
        return packed, False, rolled

    async def close_stream(self, dev_id: int) -> int:
        """Mark a stream complete; return how many remain open.  Closing the
        last one writes out the final extent."""
        try:
            async with self._lock:
                remaining = self._assembler.close_stream(dev_id)
                if remaining == 0:
                    await self._seal_for_flush()
            if remaining == 0:
                await self._drain()
        except BaseException as exc:
            await self._failed(exc)
            raise
        return remaining

    async def flush(self) -> None:
        """Write the header (if not yet out) and the open extent, even empty,
        and wait until the target has them.  An archive with no streams is
        finished this way (``close`` also does it if nothing was written)."""
        try:
            async with self._lock:
                await self._seal_for_flush()
            await self._drain()
        except BaseException as exc:
            await self._failed(exc)
            raise

    async def aclose(self) -> None:
        """Finish the archive: the reference's final checks (no open stream,
        every disk complete), then close the target (an ``exec:`` command's
        exit status is checked).  On any failure the archive is aborted and
        the sticky error raised.

        As trio's ``AsyncResource.aclose``: a cancelled ``aclose`` still
        closes, ungracefully (it aborts: the archive is removed, never left
        looking complete).  Idempotent after success.
        """
        if self._finished:
            self._assembler.raise_if_failed()
            return
        try:
            self._assembler.raise_if_failed()
            async with self._lock:
                if not self._assembler.header_written:
                    await self._seal_for_flush()
                self._assembler.check_close()
            await self._drain()
            await self._stop_output_thread()
            await self._target.close()
        except BaseException as exc:
            await self._fail(exc)
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                await self._cancellation_first()
            raise
        self._finished = True
        self._release_buffers()

    async def abort(self, reason: BaseException | None = None) -> None:
        """Abandon the archive: remove a file we created, terminate and reap an
        ``exec:`` child, close our fds.  Idempotent; does nothing after a
        successful :meth:`aclose`; completes even when cancelled.

        This is what :meth:`aclose` does on failure; call it directly to give
        up on an archive that could still be finished (``reason`` becomes the
        sticky error later calls raise)."""
        if self._finished:
            return
        if reason is not None:
            self._assembler.fail(_sticky_error(reason))
        elif self._assembler.error is None:
            self._assembler.fail(WriterAbortedError("vma archive aborted"))
        with anyio.CancelScope(shield=True):
            if self._aborted is not None:
                await self._aborted.wait()
                return
            self._aborted = aborted = anyio.Event()
            try:
                if self._drain_scope is not None:
                    self._drain_scope.cancel()
                async with self._output_lock:
                    try:
                        await self._stop_output_thread()
                    finally:
                        await self._target.abort()
            finally:
                self._assembler.mark_closed()
                self._release_buffers()
                self._output_scope.cancel()
                aborted.set()

    def status(self) -> WriterStatus:
        """uuid, closed, the sticky error, and per-stream byte accounting."""
        return self._assembler.status()

    # --- the pool and the output ------------------------------------------------

    async def _fail(self, exc: BaseException) -> None:
        if self._finished:  # a complete archive stays complete
            return
        self._assembler.fail(_sticky_error(exc))
        await self.abort()

    async def _failed(self, exc: BaseException) -> None:
        """An exception left ``write``/``close_stream``/``flush``: abort, unless
        it is a cancellation that found the writer's state whole.

        Cancelled while waiting for a lock or a buffer, a call has changed
        nothing (or has queued its cluster completely), so the archive can go
        on; a cancellation in the middle of an output write is fatal, and
        ``_drain`` has already aborted for it.  Cancelling the whole
        ``async with`` block still aborts, in ``__aexit__``.
        """
        if not isinstance(exc, anyio.get_cancelled_exc_class()):
            await self._fail(exc)
            await self._cancellation_first()

    @staticmethod
    async def _cancellation_first() -> None:
        """A task that is being cancelled sees its cancellation, not the
        error the same cancellation caused elsewhere (the output task's abort
        made sticky while this task had not yet reached an await)."""
        await anyio.lowlevel.checkpoint_if_cancelled()

    def _account(self) -> None:
        with self._books:
            stats = self.stats
            stats.buffered_bytes = self._sealed_bytes + self._assembler.extent_bytes
            if stats.buffered_bytes > stats.buffered_bytes_high_water:
                stats.buffered_bytes_high_water = stats.buffered_bytes

    async def _take_buffer(self) -> mmap.mmap:
        """A free buffer; when the pool is empty, drain (or wait for whoever is)."""
        if not self._free:
            self.stats.producer_waits += 1
            while not self._free:
                await self._drain()
        return self._free.pop()

    def _enqueue(self, buffer: mmap.mmap, start: int, length: int, *, wake: bool = True) -> None:
        """Append a sealed buffer to the FIFO (and hand it to the output
        thread); ``wake`` the output task, except from a worker thread, where
        the producer's task does it on its return."""
        with self._books:
            self._sealed.append((buffer, start, length))
            self._sealed_bytes += length
            self._archive_bytes += length
            self._account()
            if self._output_thread is not None:
                self._output_thread.submit(buffer, start, start + length)
        if wake:
            self._work.set()

    async def _ensure_header(self) -> bool:
        """Put the header in the output FIFO if it is not out yet; True if so."""
        assembler = self._assembler
        if assembler.header_written:
            return False
        buffer = await self._take_buffer()  # first: a cancelled wait changes nothing
        ctime = self._ctime if self._ctime is not None else int(time.time())
        try:
            header = assembler.encode_header(ctime)
        except BaseException:
            self._free.append(buffer)
            raise
        buffer[: len(header)] = header
        self._enqueue(buffer, 0, len(header))
        return True

    async def _open_extent(self) -> None:
        if not self._assembler.extent_open:
            self._begin_extent(await self._take_buffer())

    def _begin_extent(self, buffer: mmap.mmap) -> None:
        self._current = buffer
        self._current_start = self._archive_bytes % ALIGNMENT
        self._assembler.begin_extent(memoryview(buffer)[self._current_start :])

    def _seal_current(self, *, wake: bool = True) -> None:
        length = self._assembler.seal_extent()
        buffer, self._current = self._current, None
        assert buffer is not None
        self._enqueue(buffer, self._current_start, length, wake=wake)

    def _roll_over(self) -> bool:
        """From ``write_clusters_from``'s worker thread, under the lock: seal
        the full extent and open the next one, if the output thread is there
        to write it and a buffer is free; False otherwise (the producer's task
        then does it on the event loop, waiting for a buffer if need be).

        Why (issue 10, measured): a trip back to the event loop per extent
        cost 0.2-0.3 ms, a sixth of a 4 GiB create.  Everything touched here
        is under ``_books``, which the event loop takes to collect written
        buffers and to release them on abort; an abort is seen here first."""
        with self._books:
            if self._output_thread is None or not self._free or self._assembler.error:
                return False
            self._seal_current(wake=False)
            self._begin_extent(self._free.pop())
            return True

    async def _make_room(self) -> bool:
        """Make the open extent ready for one more cluster (under the lock);
        True if something was sealed for the output.  An aborted writer has
        released its buffers: its sticky error comes first."""
        self._assembler.raise_if_failed()
        sealed = await self._ensure_header()
        if self._assembler.extent_full:
            self._seal_current()
            sealed = True
        await self._open_extent()
        return sealed

    async def _seal_for_flush(self) -> None:
        self._assembler.raise_if_failed()
        await self._ensure_header()
        await self._open_extent()
        self._seal_current()

    async def _hand_off(self) -> None:
        """After sealing: let the output task run, or be the output ourselves
        (the output thread, when there is one, has the extent already)."""
        if self._task_group is not None or self._output_thread is not None:
            # A scheduling point only: the cluster is queued, so this must
            # not raise a cancellation the caller would misread.
            await anyio.lowlevel.cancel_shielded_checkpoint()
        else:
            await self._drain()

    async def _drain(self) -> None:
        """Write every sealed buffer, oldest first, and return them to the pool.

        A buffer leaves the FIFO only once written, so an empty FIFO means
        nothing is in flight.  :meth:`abort` cancels a drain in progress
        through ``_drain_scope``, whichever task runs it.
        """
        writing = False
        try:
            async with self._output_lock:
                self._assembler.raise_if_failed()
                writing = True
                await self._write_sealed()
                writing = False
        except BaseException as exc:
            # The output holds part of an extent: nothing can follow.  (Only
            # collecting from the output thread is harmless to cancel.)
            if writing and not (
                self._output_thread is not None and isinstance(exc, anyio.get_cancelled_exc_class())
            ):
                await self._fail(exc)
            raise

    def _written(self) -> None:
        """The oldest sealed buffer is written: back to the pool."""
        with self._books:
            buffer, _, length = self._sealed.popleft()
            self._sealed_bytes -= length
            self._free.append(buffer)
            self.stats.extents_written += 1
            self.stats.bytes_written += length
            self._account()

    async def _write_sealed(self) -> None:
        """Write the FIFO out, or with an output thread (which has every sealed
        extent already) wait for it to, returning buffers as they are written."""
        output = self._output_thread
        with anyio.CancelScope() as scope:
            self._drain_scope = scope
            try:
                while self._sealed:
                    if output is not None:
                        for _ in range(await output.collect()):
                            self._written()
                    else:
                        buffer, start, length = self._sealed[0]
                        await self._target.write_aligned(buffer, start, start + length)
                        self._written()
            finally:
                self._drain_scope = None
        if scope.cancelled_caught:
            self._assembler.raise_if_failed()

    async def _run_output(self) -> None:
        """The background output task: drain whenever something is sealed.
        Failures are recorded (sticky) and abort the archive; producers see
        them at their next call."""
        with self._output_scope:
            while True:
                await self._work.wait()
                self._work = anyio.Event()
                try:
                    await self._drain()
                except Exception:
                    return  # _drain has made it sticky and aborted

    async def _stop_output_thread(self) -> None:
        """Stop the output thread (skipping what it has not started) before
        anything closes the target's fd under it."""
        with self._books:
            output, self._output_thread = self._output_thread, None
        if output is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(output.stop)

    def _release_buffers(self) -> None:
        with self._books:
            buffers = [*self._free, *(b for b, _, _ in self._sealed)]
            if self._current is not None:
                buffers.append(self._current)
            self._free, self._current = [], None
            self._sealed.clear()
            self._sealed_bytes = 0
        for buffer in buffers:
            with contextlib.suppress(BufferError):
                buffer.close()

    # --- async with ----------------------------------------------------------------

    async def __aenter__(self) -> VmaWriter:
        """Start the background output task (in this task's task group, so
        that it is left in the same task, as trio requires)."""
        try:
            task_group = anyio.create_task_group()
            await task_group.__aenter__()
        except BaseException as exc:
            await self._fail(exc)
            raise
        self._task_group = task_group
        task_group.start_soon(self._run_output)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close on a clean exit; abort on an exception or cancellation."""
        task_group = self._task_group
        try:
            if exc is None:
                await self.aclose()
            else:
                await self._fail(exc)
        finally:
            self._output_scope.cancel()
            if task_group is not None:
                self._task_group = None
                await task_group.__aexit__(None, None, None)


__all__ = ["ClusterRead", "StreamStatus", "VmaWriter", "WriterStats", "WriterStatus"]
