"""``VmaReader``: the archive header, restore to sinks, verify, the raw extent
stream, and random access into one device of a seekable archive.

Data flow of a restore: source -> :class:`ArchiveParser` (in batches of up
to 4 MiB; for a regular file the reads and the parsing of a whole batch run in
one worker-thread hop, about 0.2 ms each) -> one bounded memory object stream
per device (``max_buffer_size`` 2 extents) -> one task per sink.  A slow sink
fills its stream, the reader blocks on ``send`` and stops reading:
backpressure without timers.  A read buffer is recycled only once no view of
it is alive (see ``_sources``), so a sink can hold a view as long as it needs;
memory is bounded by the batch plus the extents queued per sink.

(A read-ahead task overlapping reads with parsing was tried and measured
slower: the two threads mostly traded the GIL.)

Verify skims: it needs no data, so a regular file's data is read by the kernel
and dropped (``sendfile`` to /dev/null) and one hop covers up to 64 MiB.

Random access (:meth:`VmaReader.open_device`) reads only the 512-byte extent
headers to build an index (``pread``, seeking over the data), then serves
``read(offset, size)`` from the blocks it needs.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from array import array
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._errors import (
    BlockBeyondEndError,
    DuplicateClusterError,
    ExtentBlockCountError,
    MissingClusterError,
    SourceError,
    TruncatedArchiveError,
    UnknownDeviceError,
)
from ._format import (
    BLOCK_SIZE,
    CLUSTER_SIZE,
    EXTENT_HEADER_SIZE,
    ArchiveHeader,
    DeviceInfo,
    decode_extent_blockinfo,
)
from ._parser import ArchiveParser, DeviceReadStats, ParsedExtent, ReadSummary, mask_runs
from ._sinks import Sink
from ._sources import ArchiveSource, SourceLike, open_source

__all__ = ["DeviceReadStats", "DeviceView", "ReadProgress", "ReadSummary", "VmaReader"]

_BATCH_BYTES: Final = 4 << 20
_SKIM_BATCH_BYTES: Final = 64 << 20
"""Verify keeps no data, so one worker-thread hop may cover more archive."""
_BATCH_EXTENTS: Final = 256
_SINK_QUEUE: Final = 2
_SINK_ITEM_BYTES: Final = 1 << 20
"""Data a sink queue item gathers from small extents before it is sent."""
_INDEX_BATCH: Final = 4096
_INDEX_PAGE: Final = 4096


@dataclass(frozen=True, slots=True)
class ReadProgress:
    """Progress of a restore or verify, after each extent.

    ``cluster_total`` counts whole clusters of the devices walked, as the
    reference's percentage does, so ``clusters_read`` may pass it by one
    partial cluster per device.
    """

    clusters_read: int
    cluster_total: int
    bytes_read: int
    sparse_bytes: int
    elapsed: float


ProgressCallback = Callable[[ReadProgress], object]
_DeviceBatch = tuple[list[tuple[int, memoryview]], list[tuple[int, int]]]
_Receiver = MemoryObjectReceiveStream[_DeviceBatch]


def _unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error a caller should see from a failed task group: the first that
    is not a cancellation (a failing sink cancels the reading, not vice versa)."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    cancelled = anyio.get_cancelled_exc_class()
    for leaf in leaves:
        if not isinstance(leaf, cancelled):
            return leaf
    return leaves[0] if leaves else group


class VmaReader:
    """An open archive: the header is read and checked; the extent stream can
    be walked once (by :meth:`restore`, :meth:`verify` or :meth:`extents`),
    and :meth:`open_device` serves random reads of a seekable archive at any
    time.
    """

    def __init__(self, source: ArchiveSource, parser: ArchiveParser, header: ArchiveHeader) -> None:
        self._source = source
        self._parser = parser
        self._header = header
        self._walked = False
        self._index: dict[int, _DeviceIndex] | None = None
        self._index_lock = anyio.Lock()

    @classmethod
    async def open(cls, source: SourceLike | ArchiveSource) -> VmaReader:
        """Open ``source`` (path, ``"-"``, fd, anyio byte stream) and read its header."""
        src = await open_source(source)
        try:
            parser = ArchiveParser()
            while True:
                event = parser.next_event()
                if isinstance(event, ArchiveHeader):
                    return cls(src, parser, event)
                data = await src.read(parser.bytes_wanted)
                if not data:
                    parser.end_of_input()
                parser.feed(data)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await src.aclose()
            raise

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._source.aclose()

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
        batch: list[ParsedExtent] = []
        limit = _BATCH_BYTES if parser.keep_data else _SKIM_BATCH_BYTES
        size = 0
        while size < limit and len(batch) < _BATCH_EXTENTS:
            event = parser.next_event()
            if event is None:
                to_skip = parser.bytes_to_skip
                if to_skip:
                    while to_skip:
                        skipped = source.skip_blocking(to_skip)
                        if not skipped:
                            return batch, parser.end_of_input()
                        parser.skip(skipped)
                        to_skip -= skipped
                    continue
                data = source.read_blocking(parser.bytes_wanted)
                if not data:
                    return batch, parser.end_of_input()
                parser.feed(data)
            elif isinstance(event, ParsedExtent):
                batch.append(event)
                size += event.data_size
        return batch, None

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
            if self._source.blocking:
                batch, summary = await anyio.to_thread.run_sync(self._pull_batch)
            else:
                batch, summary = await self._pull_batch_async()
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

    def _progress_total(self, dev_ids: Sequence[int]) -> int:
        return sum(d.size // CLUSTER_SIZE for d in self._header.devices if d.dev_id in dev_ids)

    async def _report(self, progress: ProgressCallback | None, total: int, started: float) -> None:
        if progress is None:
            return
        summary = self._parser.summary()
        result = progress(
            ReadProgress(
                clusters_read=summary.clusters_read,
                cluster_total=total,
                bytes_read=summary.bytes_read,
                sparse_bytes=summary.sparse_bytes,
                elapsed=time.monotonic() - started,
            )
        )
        if inspect.isawaitable(result):
            await result

    async def verify(self, progress: ProgressCallback | None = None) -> ReadSummary:
        """Walk the whole archive with every check and no target, including the
        missing-cluster check the reference's verify skips."""
        self._claim_stream()
        self._parser.keep_data = False
        started = time.monotonic()
        total = self._progress_total([d.dev_id for d in self._header.devices])

        # One worker-thread hop reads and parses up to 64 MiB of a regular
        # file in sequence: a read-ahead task would only fight this thread for
        # the GIL, since skimming keeps no data (measured: 2x slower).
        async with contextlib.aclosing(self._batches()) as batches:
            async for _, summary in batches:
                await self._report(progress, total, started)
                if summary is not None:
                    return summary
        raise AssertionError("unreachable")  # pragma: no cover

    # -- restore --------------------------------------------------------------------------------

    async def restore(
        self,
        sinks: Mapping[str | int, Sink],
        *,
        write_zeroes: bool = False,
        progress: ProgressCallback | None = None,
    ) -> ReadSummary:
        """Stream every device into its sink; close the sinks when done.

        ``sinks`` maps device name or dev_id to a sink.  Every disk with data
        needs one (as in the reference); vmstate data with no sink is checked
        and dropped.  Zero runs reach a disk's sink only with
        ``write_zeroes`` (a new sparse file reads back zeros anyway) and a
        vmstate sink always, since a stream has no holes.  On failure every
        sink is aborted (a created file is removed) and the error is raised.
        """
        self._claim_stream()
        by_id: dict[int, Sink] = {}
        for key, sink in sinks.items():
            dev = self.device(key)
            if dev.dev_id in by_id:
                raise ValueError(f"two sinks for device {dev.name}")
            by_id[dev.dev_id] = sink
        self._parser.restore_targets = frozenset(by_id)
        vmstate = self._header.vmstate
        vmstate_id = vmstate.dev_id if vmstate is not None else -1
        prepared: list[Sink] = []
        try:
            for dev_id, sink in by_id.items():
                prepare = getattr(sink, "prepare", None)
                prepared.append(sink)
                if prepare is not None:
                    await prepare(self._header.device(dev_id))
            summary = await self._run_restore(by_id, write_zeroes, vmstate_id, progress)
            for sink in by_id.values():
                await sink.aclose()
        except BaseException:
            with anyio.CancelScope(shield=True):
                for sink in prepared:
                    abort = getattr(sink, "abort", None)
                    with contextlib.suppress(Exception):  # the first error is the one to report
                        await (abort() if abort is not None else sink.aclose())
            raise
        return summary

    async def _run_restore(
        self,
        by_id: Mapping[int, Sink],
        write_zeroes: bool,
        vmstate_id: int,
        progress: ProgressCallback | None,
    ) -> ReadSummary:
        started = time.monotonic()
        total = self._progress_total(list(by_id))
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
                    async for batch, summary in batches:  # noqa: B007 - used below
                        await _dispatch(batch, senders, write_zeroes, vmstate_id)
                        for _ in batch:
                            await self._report(progress, total, started)
        except BaseExceptionGroup as group:
            if failures:
                raise failures[0] from None
            raise _unwrap_group(group) from None
        assert summary is not None
        return summary

    # -- random access ---------------------------------------------------------------------------

    async def open_device(self, key: str | int) -> DeviceView:
        """A read-only view of one device, for a seekable uncompressed archive.

        The first call indexes every extent header (reading 512 bytes per
        extent and seeking over the data); the index keeps 8 bytes per
        cluster present in the archive.
        """
        dev = self.device(key)
        if not self._source.seekable:
            raise SourceError("random access needs an uncompressed archive in a regular file")
        async with self._index_lock:
            if self._index is None:
                self._index = await self._build_index()
        return DeviceView(self._source, dev, self._index[dev.dev_id])

    async def _build_index(self) -> dict[int, _DeviceIndex]:
        header = self._header
        vmstate = header.vmstate
        index = {
            d.dev_id: _DeviceIndex(d, vmstate is not None and d.dev_id == vmstate.dev_id)
            for d in header.devices
        }
        offset = header.header_size
        done = False
        while not done:
            offset, done = await anyio.to_thread.run_sync(
                _index_extents, self._source, header, index, offset
            )
        for device_index in index.values():
            device_index.check_complete()
        return index


# --- restore plumbing ----------------------------------------------------------------------------


class _ClosingAll:
    """Close every send stream on the way out, so the sink tasks finish."""

    def __init__(self, streams: Any) -> None:
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
    write_many = getattr(sink, "write_many", None)
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
                if write_many is not None:
                    await write_many(writes)
                else:
                    for offset, data in writes:
                        await sink.write(offset, data)
            for offset, length in zeroes:
                await sink.write_zeroes(offset, length)
    await sink.flush()


# --- random access ------------------------------------------------------------------------------

_PRESENT: Final = 1 << 16
_OFFSET_SHIFT: Final = 17


class _DeviceIndex:
    """Where each cluster's stored blocks sit in the archive: one 64-bit word
    per cluster (archive offset << 17 | present << 16 | mask), in pages of
    4096 clusters allocated on first use."""

    __slots__ = ("device", "is_vmstate", "pages")

    def __init__(self, device: DeviceInfo, is_vmstate: bool) -> None:
        self.device = device
        self.is_vmstate = is_vmstate
        self.pages: dict[int, array[int]] = {}

    def add(self, cluster_num: int, data_offset: int, mask: int) -> None:
        page_index, slot = divmod(cluster_num, _INDEX_PAGE)
        page = self.pages.get(page_index)
        if page is None:
            page = self.pages[page_index] = array("Q", bytes(8 * _INDEX_PAGE))
        if page[slot]:
            raise DuplicateClusterError(
                f"found duplicated cluster {cluster_num} for stream {self.device.name}"
            )
        page[slot] = data_offset << _OFFSET_SHIFT | _PRESENT | mask

    def get(self, cluster_num: int) -> int:
        page = self.pages.get(cluster_num // _INDEX_PAGE)
        return page[cluster_num % _INDEX_PAGE] if page is not None else 0

    def check_complete(self) -> None:
        if self.is_vmstate:
            return
        for cluster_num in range(self.device.cluster_count):
            if cluster_num % _INDEX_PAGE == 0 and cluster_num // _INDEX_PAGE not in self.pages:
                break
            if not self.get(cluster_num):
                break
        else:
            return
        raise MissingClusterError(
            f"detected missing cluster {cluster_num} for stream {self.device.name}"
        )


def _index_extents(
    source: ArchiveSource, header: ArchiveHeader, index: dict[int, _DeviceIndex], offset: int
) -> tuple[int, bool]:
    """Index up to a batch of extents starting at ``offset``, blocking."""
    archive_size = source.archive_size()
    uuid_bytes = header.uuid.bytes
    for _ in range(_INDEX_BATCH):
        if offset >= archive_size:
            return offset, True
        if archive_size - offset < EXTENT_HEADER_SIZE:
            raise TruncatedArchiveError(f"read short extent ({archive_size - offset} bytes)")
        block_count, blockinfo = decode_extent_blockinfo(
            source.pread(offset, EXTENT_HEADER_SIZE), uuid_bytes
        )
        extent_size = EXTENT_HEADER_SIZE + block_count * BLOCK_SIZE
        end = offset + extent_size
        if end > archive_size:
            raise TruncatedArchiveError(
                f"short vma extent ({archive_size - offset} < {extent_size})"
            )
        data_offset = offset + EXTENT_HEADER_SIZE
        stored = 0
        for word in blockinfo:
            dev_id = (word >> 32) & 0xFF
            cluster_num = word & 0xFFFFFFFF
            mask = word >> 48
            device_index = index.get(dev_id)
            if device_index is None:
                raise UnknownDeviceError(f"got wrong dev id {dev_id} (not defined in the header)")
            cluster_count = device_index.device.cluster_count
            if not device_index.is_vmstate and cluster_num >= cluster_count:
                raise BlockBeyondEndError(
                    f"got wrong block address - cluster {cluster_num} is past the end "
                    f"of stream {device_index.device.name} "
                    f"({cluster_count} clusters)"
                )
            device_index.add(cluster_num, data_offset + stored * BLOCK_SIZE, mask)
            stored += mask.bit_count()
        if stored > block_count:
            raise ExtentBlockCountError("short vma extent - too many blocks")
        if stored < block_count:
            raise ExtentBlockCountError("vma extent error - missing blocks")
        offset = end
    return offset, False


class DeviceView:
    """Read-only random access to one device of a seekable archive."""

    def __init__(self, source: ArchiveSource, device: DeviceInfo, index: _DeviceIndex) -> None:
        self._source = source
        self._device = device
        self._index = index

    @property
    def size(self) -> int:
        return self._device.size

    @property
    def name(self) -> str:
        return self._device.name

    def _plan(self, offset: int, size: int) -> list[tuple[int, int, int]]:
        """``(archive offset, length, result offset)`` reads, merged when adjacent."""
        reads: list[tuple[int, int, int]] = []
        end = offset + size
        first = offset // CLUSTER_SIZE
        last = math.ceil(end / CLUSTER_SIZE)
        for cluster_num in range(first, last):
            word = self._index.get(cluster_num)
            if not word:
                raise MissingClusterError(
                    f"detected missing cluster {cluster_num} for stream {self._device.name}"
                )
            mask = word & 0xFFFF
            data_offset = word >> _OFFSET_SHIFT
            base = cluster_num * CLUSTER_SIZE
            stored_before = 0
            for first_block, block_count, is_stored in mask_runs(mask):
                if not is_stored:
                    continue
                run_start = base + first_block * BLOCK_SIZE
                run_end = run_start + block_count * BLOCK_SIZE
                lo, hi = max(run_start, offset), min(run_end, end)
                if lo < hi:
                    archive_offset = data_offset + stored_before * BLOCK_SIZE + (lo - run_start)
                    if (
                        reads
                        and reads[-1][0] + reads[-1][1] == archive_offset
                        and (reads[-1][2] + reads[-1][1] == lo - offset)
                    ):
                        prev = reads.pop()
                        reads.append((prev[0], prev[1] + hi - lo, prev[2]))
                    else:
                        reads.append((archive_offset, hi - lo, lo - offset))
                stored_before += block_count
        return reads

    async def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (fewer at the device's end); reads only
        the stored blocks that overlap the range."""
        if offset < 0 or size < 0:
            raise ValueError("offset and size must not be negative")
        size = max(0, min(size, self._device.size - offset))
        if not size:
            return b""
        reads = self._plan(offset, size)
        result = bytearray(size)
        source = self._source

        def fetch() -> None:
            for archive_offset, length, at in reads:
                data = source.pread(archive_offset, length)
                if len(data) != length:
                    raise TruncatedArchiveError("short vma extent (archive ends inside a block)")
                result[at : at + length] = data

        await anyio.to_thread.run_sync(fetch)
        return bytes(result)
