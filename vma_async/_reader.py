"""``VmaReader``: the archive header, restore to sinks, verify, the raw extent
stream, and random access into one device of a seekable archive.

Data flow of a restore: source -> :class:`ArchiveParser` (in batches of up
to 4 MiB; for a regular file the reads and the parsing of a whole batch run in
one worker-thread hop, about 0.2 ms each) -> one bounded memory object stream
per device (``max_buffer_size`` 2 extents) -> one task per sink.  A slow sink
fills its stream, the reader blocks on ``send`` and stops reading:
backpressure without timers.  A read buffer is recycled only once no view of
it is alive (see ``_sources``), so a sink can hold a view as long as it needs;
memory is bounded by the batch plus the extents queued per sink.  Devices
without a sink are skipped: their data is read past (a stream cannot seek),
with no writes and no duplicate or missing-cluster check for them.

(A read-ahead task overlapping reads with parsing was tried and measured
slower: the two threads mostly traded the GIL.)

Verify skims: it needs no data, so a regular file's data is read by the kernel
and dropped (``sendfile`` to /dev/null) and one hop covers up to 64 MiB.

Random access (:meth:`VmaReader.open_device`) reads only the extent headers
(``pread``, seeking over the data; consecutive small extents come from one
read), runs the same extent walker as the parser over them, and keeps each
device's stored and zero runs sorted by device offset; ``read`` and
``block_status`` bisect them.

Worst case: an archive stream closed under the reader (``ClosedResourceError``
or ``BrokenResourceError`` from the source) is a :class:`SourceError`, never
taken for the end of the archive.
"""

from __future__ import annotations

import contextlib
import functools
import time
from array import array
from bisect import bisect_right
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from typing import Final

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._errors import SourceError, TruncatedArchiveError, UnknownDeviceError
from ._fdio import ZERO_CHUNK, zero_view
from ._file_reader import pull_batch
from ._format import (
    BLOCK_SIZE,
    CLUSTER_SIZE,
    EXTENT_HEADER_SIZE,
    ArchiveHeader,
    DeviceInfo,
    decode_extent_blockinfo,
)
from ._opening import AsyncResource, Opening, unwrap_group
from ._parser import ArchiveParser, DeviceReadStats, ParsedExtent, ReadSummary
from ._progress import DeviceProgress, Progress, ProgressCallback, report_progress
from ._sinks import Sink
from ._sources import ArchiveSource, SourceLike, open_source, stream_closed_error
from ._walker import (
    ExtentWalker,
    missing_cluster_error,
    short_extent_error,
    short_extent_header_error,
)

__all__ = [
    "DeviceReadStats",
    "DeviceView",
    "ReadSummary",
    "SinkMap",
    "VmaReader",
]

_BATCH_BYTES: Final = 4 << 20
_SKIM_BATCH_BYTES: Final = 64 << 20
"""Verify keeps no data, so one worker-thread hop may cover more archive."""
_BATCH_EXTENTS: Final = 256
_SINK_QUEUE: Final = 2
_SINK_ITEM_BYTES: Final = 1 << 20
"""Data a sink queue item gathers from small extents before it is sent."""
_INDEX_BATCH: Final = 4096
"""Extent headers indexed per worker-thread hop."""
_INDEX_READ: Final = 64 << 10
"""After a small extent the index reads this much at once: the next headers are near."""

SinkMap = Mapping[str, Sink] | Mapping[int, Sink] | Mapping[str | int, Sink]
"""What :meth:`VmaReader.restore` takes: sinks keyed by device name or dev_id.

A union rather than ``Mapping[str | int, Sink]``, whose key type is invariant:
a plain ``dict[str, RawFileSink]`` is a ``Mapping[str, Sink]`` but not a
``Mapping[str | int, Sink]``."""

_DeviceBatch = tuple[list[tuple[int, memoryview]], list[tuple[int, int]]]
_Receiver = MemoryObjectReceiveStream[_DeviceBatch]


_STREAM_GONE: Final = (anyio.ClosedResourceError, anyio.BrokenResourceError)
"""What a source's stream raises when it was closed or broke under the reader:
reported as a :class:`SourceError` (an :class:`ArchiveSource` written by an
application may let these through), never taken for the archive's end."""


class VmaReader(AsyncResource):
    """An open archive: the header is read and checked; the extent stream can
    be walked once (by :meth:`restore`, :meth:`verify` or :meth:`extents`),
    and :meth:`open_device` serves random reads of a seekable archive at any
    time.

    Open it with :meth:`open` (``async with VmaReader.open(p) as reader:``, or
    ``reader = await VmaReader.open(p)`` and later ``await reader.aclose()``).
    """

    def __init__(self, source: ArchiveSource, parser: ArchiveParser, header: ArchiveHeader) -> None:
        """Wrap an already parsed header; :meth:`open` is the way to get one."""
        self._source = source
        self._parser = parser
        self._header = header
        self._walked = False
        self._index: _ArchiveIndex | None = None
        self._index_lock = anyio.Lock()

    @classmethod
    def open(
        cls, source: SourceLike | ArchiveSource, *, closefd: bool = True
    ) -> Opening[VmaReader]:
        """Open ``source`` (path, ``"-"``, fd, anyio byte stream, or an
        :class:`ArchiveSource`) and read its header: await it, or use it as
        ``async with``.  An int fd is closed with the reader unless
        ``closefd=False`` (see ``open_source`` for the other kinds)."""
        return Opening(lambda: cls._open(source, closefd))

    @classmethod
    async def _open(cls, source: SourceLike | ArchiveSource, closefd: bool) -> VmaReader:
        src = await open_source(source, closefd=closefd)
        try:
            parser = ArchiveParser()
            while True:
                event = parser.next_event()
                if isinstance(event, ArchiveHeader):
                    return cls(src, parser, event)
                try:
                    data = await src.read(parser.bytes_wanted)
                except _STREAM_GONE as exc:
                    raise stream_closed_error(exc) from exc
                if not data:
                    parser.end_of_input()
                parser.feed(data)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await src.aclose()
            raise

    async def aclose(self) -> None:
        """Close the source.  Cancelled, it still closes it (trio's
        ``AsyncResource`` rule) and then lets the cancellation through."""
        with anyio.CancelScope(shield=True):
            await self._source.aclose()
        await anyio.lowlevel.checkpoint_if_cancelled()

    @property
    def header(self) -> ArchiveHeader:
        return self._header

    @property
    def compression(self) -> str | None:
        return self._source.compression

    def device(self, key: str | int) -> DeviceInfo:
        """The device named ``key`` or with dev_id ``key``."""
        for dev in self._header.devices:
            if dev.dev_id == key or dev.name == key:
                return dev
        raise UnknownDeviceError(f"no device {key!r} in the archive")

    # -- the extent stream ---------------------------------------------------------------------

    def _claim_stream(self) -> None:
        if self._walked:
            raise RuntimeError("the archive's extent stream was already read; open it again")
        self._walked = True

    def _pull_batch(self) -> tuple[list[ParsedExtent], ReadSummary | None]:
        """Read and parse up to one batch, blocking: runs in a worker thread."""
        parser, source = self._parser, self._source
        limit = _BATCH_BYTES if parser.keep_data else _SKIM_BATCH_BYTES
        return pull_batch(parser, source.read_blocking, source.skip_blocking, limit, _BATCH_EXTENTS)

    async def _pull_batch_async(self) -> tuple[list[ParsedExtent], ReadSummary | None]:
        """The same for sources that are read through the event loop: one extent."""
        parser, source = self._parser, self._source
        while True:
            event = parser.next_event()
            if event is None:
                to_skip = parser.bytes_to_skip
                if to_skip:
                    skipped = await source.skip(to_skip)
                    if not skipped:
                        return [], parser.end_of_input()
                    parser.skip(skipped)
                    continue
                data = await source.read(parser.bytes_wanted)
                if not data:
                    return [], parser.end_of_input()
                parser.feed(data)
            elif isinstance(event, ParsedExtent):
                return [event], None

    async def _batches(
        self,
    ) -> AsyncGenerator[tuple[list[ParsedExtent], ReadSummary | None], None]:
        while True:
            try:
                if self._source.blocking:
                    batch, summary = await anyio.to_thread.run_sync(self._pull_batch)
                else:
                    batch, summary = await self._pull_batch_async()
            except _STREAM_GONE as exc:
                raise stream_closed_error(exc) from exc
            yield batch, summary
            if summary is not None:
                return

    async def extents(self) -> AsyncIterator[ParsedExtent]:
        """Every extent, checked, in archive order; the end-of-archive checks
        (missing clusters) run after the last one."""
        self._claim_stream()
        async with contextlib.aclosing(self._batches()) as batches:
            async for batch, _ in batches:
                for extent in batch:
                    yield extent

    async def verify(self, progress: ProgressCallback | None = None) -> ReadSummary:
        """Walk the whole archive with every check and no target, including the
        missing-cluster check the reference's verify skips.

        ``progress`` is called once per batch of extents (a regular file: up
        to 64 MiB of archive; a pipe or stream: one extent) with growing totals.
        """
        self._claim_stream()
        self._parser.keep_data = False
        reporter = _Reporter("verify", self._parser, self._header.devices, progress)

        # One worker-thread hop reads and parses up to 64 MiB of a regular
        # file in sequence: a read-ahead task would only fight this thread for
        # the GIL, since skimming keeps no data (measured: 2x slower).
        async with contextlib.aclosing(self._batches()) as batches:
            async for _, summary in batches:
                await reporter.batch_done(summary is not None)
                if summary is not None:
                    return summary
        raise AssertionError("unreachable")  # pragma: no cover

    # -- restore --------------------------------------------------------------------------------

    async def restore(
        self,
        sinks: SinkMap,
        *,
        write_zeroes: bool = False,
        progress: ProgressCallback | None = None,
    ) -> ReadSummary:
        """Stream each device that has a sink into it; close the sinks when done.

        ``sinks`` maps device name or dev_id to a :class:`Sink`.  A device
        without one is skipped: its data is read past, with no writes and no
        duplicate or missing-cluster check for it (the reference's ``skip=``;
        an application that wants every disk restored checks its own map).
        Zero runs reach a disk's sink only with ``write_zeroes`` (a new sparse
        file reads back zeros anyway) and a vmstate sink always, since a
        stream has no holes.  ``progress`` is called once per batch of
        extents with growing totals over the restored devices.  On failure
        or cancellation every sink is aborted (a created file is removed) and
        the error is raised.
        """
        self._claim_stream()
        try:
            by_id = self._sinks_by_id(sinks)
            self._parser.skip_devices(
                [d.dev_id for d in self._header.devices if d.dev_id not in by_id]
            )
            vmstate = self._header.vmstate
            vmstate_id = vmstate.dev_id if vmstate is not None else -1
            for dev_id, sink in by_id.items():
                await sink.prepare(self.device(dev_id))
            summary = await self._run_restore(by_id, write_zeroes, vmstate_id, progress)
            for sink in by_id.values():
                await sink.aclose()
        except BaseException:
            with anyio.CancelScope(shield=True):
                for sink in sinks.values():
                    with contextlib.suppress(Exception):  # the first error is the one to report
                        await sink.abort()
            raise
        return summary

    def _sinks_by_id(self, sinks: SinkMap) -> dict[int, Sink]:
        by_id: dict[int, Sink] = {}
        for key, sink in sinks.items():
            dev = self.device(key)
            if dev.dev_id in by_id:
                raise ValueError(f"two sinks for device {dev.name}")
            by_id[dev.dev_id] = sink
        return by_id

    async def _run_restore(
        self,
        by_id: Mapping[int, Sink],
        write_zeroes: bool,
        vmstate_id: int,
        progress: ProgressCallback | None,
    ) -> ReadSummary:
        walked = [d for d in self._header.devices if d.dev_id in by_id]
        reporter = _Reporter("restore", self._parser, walked, progress)
        senders: dict[int, MemoryObjectSendStream[_DeviceBatch]] = {}
        summary: ReadSummary | None = None
        # Sinks fail in their own tasks, and one still inside a worker thread
        # cannot be cancelled; when several fail, the first to fail is reported.
        failures: list[Exception] = []

        async def drain(sink: Sink, receive: _Receiver, sequential: bool) -> None:
            try:
                await _drain_to_sink(sink, receive, sequential)
            except Exception as exc:
                failures.append(exc)
                raise

        try:
            async with anyio.create_task_group() as tg:
                for dev_id, sink in by_id.items():
                    send, receive = anyio.create_memory_object_stream[_DeviceBatch](_SINK_QUEUE)
                    senders[dev_id] = send
                    tg.start_soon(drain, sink, receive, dev_id == vmstate_id)

                async with (
                    _ClosingAll(senders.values()),
                    contextlib.aclosing(self._batches()) as batches,
                ):
                    async for batch, summary in batches:
                        await _dispatch(batch, senders, write_zeroes, vmstate_id)
                        await reporter.batch_done(summary is not None)
        except BaseExceptionGroup as group:
            if failures:
                raise failures[0] from None
            raise unwrap_group(group) from None
        assert summary is not None
        return summary

    # -- random access ---------------------------------------------------------------------------

    async def open_device(self, key: str | int, *, require_complete: bool = True) -> DeviceView:
        """A read-only view of one device, for a seekable uncompressed archive.

        The first call indexes every extent header with the same checks as
        :meth:`verify` (reading the headers and seeking over the data); the
        index keeps each device's stored and zero runs.  With
        ``require_complete`` (the default) a device missing a cluster is
        refused with :class:`MissingClusterError`; without it, only a read
        that touches a missing cluster fails, and :meth:`DeviceView.block_status`
        reports the hole.
        """
        dev = self.device(key)
        if not self._source.seekable:
            raise SourceError("random access needs an uncompressed archive in a regular file")
        async with self._index_lock:
            if self._index is None:
                self._index = await self._build_index()
        if require_complete:
            self._index.walker.check_complete([dev.dev_id])
        return DeviceView(self._source, dev, self._index.devices[dev.dev_id])

    async def _build_index(self) -> _ArchiveIndex:
        index = _ArchiveIndex(self._header)
        done = False
        while not done:
            done = await anyio.to_thread.run_sync(index.index_batch, self._source)
        index.finish()
        return index


# --- progress ------------------------------------------------------------------------------------


class _Reporter:
    """Builds one :class:`Progress` per batch from the walker's counters: no
    work per cluster, and nothing at all without a callback."""

    __slots__ = (
        "_callback",
        "_devices",
        "_done",
        "_operation",
        "_parser",
        "_read",
        "_started",
    )

    def __init__(
        self,
        operation: str,
        parser: ArchiveParser,
        devices: Iterable[DeviceInfo],
        callback: ProgressCallback | None,
    ) -> None:
        self._operation = operation
        self._parser = parser
        self._devices = {d.dev_id: d.cluster_count * CLUSTER_SIZE for d in devices}
        self._callback = callback
        self._done = -1
        self._read = -1
        self._started = time.monotonic()

    async def batch_done(self, last: bool) -> None:
        """Report after a batch that walked clusters of the reported devices
        (an empty batch, or one of skipped disks only, would repeat the last
        report), and at the end if the archive was read further since."""
        if self._callback is None:
            return
        done = zero = 0
        devices: list[DeviceProgress] = []
        for stats in self._parser.device_stats():
            total = self._devices.get(stats.dev_id)
            if total is None:
                continue
            walked = stats.clusters_read * CLUSTER_SIZE
            done += walked
            zero += stats.zero_bytes
            devices.append(DeviceProgress(stats.name, walked, total))
        read = self._parser.offset
        if done == self._done and not (last and read != self._read):
            return
        self._done, self._read = done, read
        await report_progress(
            self._callback,
            Progress(
                operation=self._operation,
                done_bytes=done,
                total_bytes=sum(self._devices.values()),
                read_bytes=read,
                zero_bytes=zero,
                elapsed=time.monotonic() - self._started,
                devices=tuple(devices),
            ),
        )


# --- restore plumbing ----------------------------------------------------------------------------


class _ClosingAll:
    """Close every send stream on the way out, so the sink tasks finish."""

    def __init__(self, streams: Iterable[MemoryObjectSendStream[_DeviceBatch]]) -> None:
        self._streams = list(streams)

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        for stream in self._streams:
            await stream.aclose()


async def _dispatch(
    batch: Sequence[ParsedExtent],
    senders: Mapping[int, MemoryObjectSendStream[_DeviceBatch]],
    write_zeroes: bool,
    vmstate_id: int,
) -> None:
    """Hand each sink the batch's writes for it in items of about
    :data:`_SINK_ITEM_BYTES`: the consecutive small extents of a sparse
    archive share one item (one worker-thread hop) instead of one each,
    while an item never holds much more than one full extent of data."""
    per_device: dict[int, _DeviceBatch] = {}
    pending_bytes: dict[int, int] = {}
    for extent in batch:
        for dev_id, offset, data in extent.writes:
            if dev_id in senders:
                per_device.setdefault(dev_id, ([], []))[0].append((offset, data))
                pending_bytes[dev_id] = pending_bytes.get(dev_id, 0) + len(data)
        for dev_id, offset, length in extent.zeroes:
            if dev_id in senders and (write_zeroes or dev_id == vmstate_id):
                per_device.setdefault(dev_id, ([], []))[1].append((offset, length))
        for dev_id, pending in list(pending_bytes.items()):
            if pending >= _SINK_ITEM_BYTES:
                del pending_bytes[dev_id]
                await senders[dev_id].send(per_device.pop(dev_id))
    for dev_id, item in per_device.items():
        await senders[dev_id].send(item)


async def _drain_to_sink(
    sink: Sink, receive: MemoryObjectReceiveStream[_DeviceBatch], sequential: bool
) -> None:
    async with receive:
        async for writes, zeroes in receive:
            if sequential:
                ops: list[tuple[int, memoryview | int]] = [*writes, *zeroes]
                ops.sort(key=lambda op: op[0])
                for offset, what in ops:
                    if isinstance(what, int):
                        await sink.write_zeroes(offset, what)
                    else:
                        await sink.write(offset, what)
                continue
            if writes:
                await sink.write_many(writes)
            for offset, length in zeroes:
                await sink.write_zeroes(offset, length)
    await sink.flush()


# --- random access ------------------------------------------------------------------------------

_ZERO_RUN: Final = 0
"""``_DeviceRuns.where`` of a zero run (no data is ever stored at archive offset 0)."""

ZERO: Final = 1
"""``block_status`` flag: the range reads as zeros (a zero cluster or 4 KiB block)."""
MISSING: Final = 2
"""``block_status`` flag: the archive lacks the cluster (an incomplete archive)."""


def _append_run(runs: list[tuple[int, int, int]], start: int, length: int, where: int) -> None:
    """Append a ``(start, length, where)`` run, merged into the last one when it
    continues it on the device and, for data, in the archive too."""
    if runs:
        last_start, last_length, last_where = runs[-1]
        if last_start + last_length == start and (
            (where == last_where == _ZERO_RUN)
            or (where and last_where and last_where + last_length == where)
        ):
            runs[-1] = (last_start, last_length + length, last_where)
            return
    runs.append((start, length, where))


class _DeviceRuns:
    """One device's runs, sorted by device offset: ``starts[i]``, ``lengths[i]``
    and ``where[i]`` (the archive offset of the data, or 0 for zeros).  Runs
    never overlap (the walker refuses duplicate clusters); gaps are clusters
    the archive lacks."""

    __slots__ = ("lengths", "pending", "starts", "where")

    def __init__(self) -> None:
        self.pending: list[tuple[int, int, int]] = []
        self.starts: array[int] = array("Q")
        self.lengths: array[int] = array("Q")
        self.where: array[int] = array("Q")

    def add(self, start: int, length: int, where: int) -> None:
        _append_run(self.pending, start, length, where)

    def finish(self) -> None:
        """Sort (producers interleave clusters), merge neighbours, pack into arrays."""
        runs, self.pending = sorted(self.pending), []
        merged: list[tuple[int, int, int]] = []
        for start, length, where in runs:
            _append_run(merged, start, length, where)
        self.starts = array("Q", [r[0] for r in merged])
        self.lengths = array("Q", [r[1] for r in merged])
        self.where = array("Q", [r[2] for r in merged])

    def pieces(self, offset: int, end: int) -> list[tuple[int, int, int]]:
        """``(device offset, length, where)`` covering ``[offset, end)`` in order,
        ``where`` -1 for a gap (missing clusters)."""
        starts, lengths, where = self.starts, self.lengths, self.where
        count = len(starts)
        i = max(bisect_right(starts, offset) - 1, 0)
        out: list[tuple[int, int, int]] = []
        pos = offset
        while pos < end:
            while i < count and starts[i] + lengths[i] <= pos:
                i += 1
            if i >= count or starts[i] > pos:
                stop = min(end, starts[i]) if i < count else end
                out.append((pos, stop - pos, -1))
                pos = stop
                continue
            stop = min(end, starts[i] + lengths[i])
            data = where[i]
            out.append((pos, stop - pos, data + (pos - starts[i]) if data else _ZERO_RUN))
            pos = stop
        return out


class _ArchiveIndex:
    """The open_device index: the extent walker over every extent header,
    and each device's runs with their archive offsets."""

    def __init__(self, header: ArchiveHeader) -> None:
        vmstate = header.vmstate
        self.walker = ExtentWalker(header.devices, vmstate.dev_id if vmstate else None)
        self.devices = {d.dev_id: _DeviceRuns() for d in header.devices}
        self._uuid = header.uuid.bytes
        self._offset = header.header_size
        self._buffer = b""
        self._buffer_offset = 0
        self._small = True  # the last extent was small: read ahead for the next header

    def _extent_header(self, source: ArchiveSource, archive_size: int) -> bytes:
        offset = self._offset
        inside = offset - self._buffer_offset
        if inside >= 0 and inside + EXTENT_HEADER_SIZE <= len(self._buffer):
            return self._buffer[inside : inside + EXTENT_HEADER_SIZE]
        size = _INDEX_READ if self._small else EXTENT_HEADER_SIZE
        self._buffer = source.pread(offset, min(size, archive_size - offset))
        self._buffer_offset = offset
        return self._buffer[:EXTENT_HEADER_SIZE]

    def index_batch(self, source: ArchiveSource) -> bool:
        """Index up to a batch of extents, blocking (a worker thread); True at the end."""
        archive_size = source.archive_size()
        walk = self.walker.walk
        devices = self.devices
        for _ in range(_INDEX_BATCH):
            offset = self._offset
            if offset >= archive_size:
                return True
            if archive_size - offset < EXTENT_HEADER_SIZE:
                raise short_extent_header_error(archive_size - offset)
            raw = self._extent_header(source, archive_size)
            block_count, blockinfo = decode_extent_blockinfo(raw, self._uuid)
            data_size = block_count * BLOCK_SIZE
            end = offset + EXTENT_HEADER_SIZE + data_size
            if end > archive_size:
                raise short_extent_error(archive_size - offset, EXTENT_HEADER_SIZE + data_size)
            runs, zeroes = walk(data_size, blockinfo)
            data_offset = offset + EXTENT_HEADER_SIZE
            for dev_id, dev_off, pos, length in runs:
                devices[dev_id].add(dev_off, length, data_offset + pos)
            for dev_id, dev_off, length in zeroes:
                devices[dev_id].add(dev_off, length, _ZERO_RUN)
            self._small = data_size < _INDEX_READ
            self._offset = end
        return False

    def finish(self) -> None:
        self._buffer = b""
        for runs in self.devices.values():
            runs.finish()


class DeviceView:
    """Read-only random access to one device of a seekable archive, from
    :meth:`VmaReader.open_device`."""

    def __init__(self, source: ArchiveSource, device: DeviceInfo, runs: _DeviceRuns) -> None:
        self._source = source
        self._device = device
        self._runs = runs

    @property
    def size(self) -> int:
        return self._device.size

    @property
    def name(self) -> str:
        return self._device.name

    def _clip(self, offset: int, size: int) -> int:
        if offset < 0 or size < 0:
            raise ValueError("offset and size must not be negative")
        return max(0, min(size, self._device.size - offset))

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``(length, flags)`` runs covering ``[offset, offset + length)``
        clipped at the device size, adjacent runs of equal flags merged:
        flags 1 reads as zero (a zero cluster or 4 KiB block), 0 is data, 2 is
        missing from the archive.  No I/O: the index answers."""
        length = self._clip(offset, length)
        out: list[tuple[int, int]] = []
        for _, size, where in self._runs.pieces(offset, offset + length):
            flags = MISSING if where < 0 else ZERO if where == _ZERO_RUN else 0
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + size, flags)
            else:
                out.append((size, flags))
        return out

    def _plan(self, offset: int, size: int) -> list[tuple[int, int]]:
        """``(archive offset, length)`` segments of the result in order, zeros
        as archive offset -1; data segments adjacent in the archive merged."""
        plan: list[tuple[int, int]] = []
        for start, length, where in self._runs.pieces(offset, offset + size):
            if where < 0:
                raise missing_cluster_error(start // CLUSTER_SIZE, self._device.name)
            where = -1 if where == _ZERO_RUN else where
            if plan:
                last_where, last_length = plan[-1]
                if (where < 0 and last_where < 0) or (
                    where >= 0 and last_where >= 0 and last_where + last_length == where
                ):
                    plan[-1] = (last_where, last_length + length)
                    continue
            plan.append((where, length))
        return plan

    async def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (fewer at the device's end); reads only
        the stored blocks that overlap the range.  A missing cluster (an
        incomplete archive opened with ``require_complete=False``) raises
        :class:`MissingClusterError`.

        The result is built with one allocation (a join of the reads and
        shared zero views, in the worker thread); an all-zero range needs no
        I/O and returns a cached zero object (bytes are immutable)."""
        size = self._clip(offset, size)
        if not size:
            return b""
        plan = self._plan(offset, size)
        if len(plan) == 1 and plan[0][0] < 0:
            return _zero_bytes(size)
        source = self._source
        if size <= _CACHED_READ_MAX:
            cached = _read_cached(source, plan)
            if cached is not None:
                await anyio.lowlevel.checkpoint()  # still a checkpoint, as the thread hop was
                return cached

        def fetch() -> bytes:
            parts: list[bytes | memoryview] = []
            for where, length in plan:
                if where < 0:
                    while length:
                        step = min(length, ZERO_CHUNK)
                        parts.append(zero_view(step))
                        length -= step
                    continue
                data = source.pread(where, length)
                if len(data) != length:
                    raise TruncatedArchiveError("short vma extent (archive ends inside a block)")
                parts.append(data)
            only = parts[0]
            return only if len(parts) == 1 and isinstance(only, bytes) else b"".join(parts)

        return await anyio.to_thread.run_sync(fetch)


_CACHED_READ_MAX: Final = 1 << 20
"""Largest random read tried on the event loop from the page cache (a
memcpy of at most 1 MiB, tens of microseconds); larger ones always hop."""


def _read_cached(source: ArchiveSource, plan: list[tuple[int, int]]) -> bytes | None:
    """The planned read, if every stored part is in the page cache; else None
    (then the caller reads in a worker thread, which may wait for the disk)."""
    parts: list[bytes | memoryview] = []
    for where, length in plan:
        if where < 0:
            parts.append(zero_view(length))
            continue
        data = source.pread_cached(where, length)
        if data is None:
            return None
        parts.append(data)
    only = parts[0]
    return only if len(parts) == 1 and isinstance(only, bytes) else b"".join(parts)


@functools.lru_cache(maxsize=4)
def _cached_zeros(size: int) -> bytes:
    return bytes(size)


def _zero_bytes(size: int) -> bytes:
    """``size`` zero bytes; the few sizes a client asks for again and again
    (an NBD client's 1 MiB reads) are shared objects, up to 4 MiB each."""
    return _cached_zeros(size) if size <= 4 * ZERO_CHUNK else bytes(size)
