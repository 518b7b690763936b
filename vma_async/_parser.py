"""Extent parsing, sans-I/O: archive bytes in, the header and parsed extents out.

Goal: turn a VMA byte stream, cut into chunks of any size, into the archive
header followed by one :class:`ParsedExtent` per extent, each carrying the
device writes and zero runs it stands for, with every check of the reference
reader (``vma-reader.c``) and the ones it leaves to ``assert``.

Plan:

* :meth:`ArchiveParser.feed` keeps references to the chunks it is given (no
  copy); the 512-byte extent headers are the only bytes ever copied.  Data
  handed out are memoryviews into the caller's chunks, so a chunk must not be
  changed after it is fed: an I/O layer that reads into fresh buffers gets
  zero-copy restores for free, and a sink may hold a view as long as it likes.
* :attr:`ArchiveParser.bytes_wanted` tells the I/O layer how much to read next:
  the rest of the current extent plus the next extent header.  A source that
  honours it hands over one extent's data in one chunk, so every write is a
  single view.
* The checks and the meaning of each blockinfo entry are the extent
  walker's (:mod:`vma_async._walker`, shared with the random-access index):
  it returns an extent's stored and zero runs, merged while contiguous, and
  the parser cuts the writes out of the data it holds, so the writes of a
  single-device extent are one big view.

Worst case: buffered input never exceeds one extent (3.8 MiB) plus what
the caller fed beyond :attr:`bytes_wanted`; the walker's own bounds (the
paged seen-bitmap) are in its module docstring, as are the deliberate
differences from the reference reader.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Final

from ._errors import BadMagicError, TruncatedArchiveError
from ._format import (
    BLOCK_SIZE,
    CLUSTER_SIZE,
    EXTENT_HEADER_SIZE,
    HEADER_FIXED_SIZE,
    VMA_MAGIC,
    ArchiveHeader,
    ExtentHeader,
    decode_extent_blockinfo,
    decode_header,
    extent_header_from_blockinfo,
    header_size_from_prefix,
)
from ._walker import (
    DeviceReadStats,
    ExtentWalker,
    Run,
    SeenBitmap,
    mask_runs,
    short_extent_error,
    short_extent_header_error,
)

__all__ = [
    "ArchiveParser",
    "DeviceReadStats",
    "ParsedExtent",
    "ReadSummary",
    "SeenBitmap",
    "mask_runs",
]

Write = tuple[int, int, memoryview]
"""``(dev_id, device byte offset, stored bytes)``."""
ZeroRun = tuple[int, int, int]
"""``(dev_id, device byte offset, length)`` of bytes the archive says are zero."""


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadSummary:
    """Totals of a restore or verify, enough for the reference's ``-v`` lines.

    ``bytes_read`` counts whole clusters (clusters_read * 65536) as the
    reference does, ``sparse_bytes`` the zero bytes among them.
    """

    clusters_read: int
    bytes_read: int
    sparse_bytes: int
    partial_zero_bytes: int
    archive_bytes: int
    extents: int
    devices: tuple[DeviceReadStats, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class ParsedExtent:
    """One extent, checked, with what it means for each device.

    ``writes`` and ``zeroes`` are in archive order, clipped at device ends and
    merged where contiguous; ``writes`` views point into the chunks that were
    fed, so they stay valid as long as anyone holds them.
    """

    offset: int
    """Archive byte offset of the extent header."""
    block_count: int
    blockinfo: tuple[int, ...]
    """The used blockinfo words, as :func:`decode_extent_blockinfo` returns them."""
    writes: tuple[Write, ...]
    zeroes: tuple[ZeroRun, ...]

    @property
    def data_size(self) -> int:
        """Bytes of block data after the extent's 512-byte header."""
        return self.block_count * BLOCK_SIZE

    @property
    def header(self) -> ExtentHeader:
        """The decoded header, built on demand: the parser itself needs only
        the words, and one object per cluster was its main cost."""
        return extent_header_from_blockinfo(self.block_count, self.blockinfo)


# --- the parser ---------------------------------------------------------------------------------

_READ_HEADER: Final = 0
_READ_EXTENT_HEADER: Final = 1
_READ_EXTENT_DATA: Final = 2
_DONE: Final = 3


class ArchiveParser:
    """Feed archive bytes, take events: the :class:`ArchiveHeader` first, then
    :class:`ParsedExtent` objects; call :meth:`end_of_input` at EOF.

    :meth:`skip_devices` names devices a partial restore leaves alone: their
    extents are still walked and checked, but they get no writes, zero runs,
    duplicate or missing-cluster checks.  By default every device is walked.
    """

    def __init__(self, *, keep_data: bool = True) -> None:
        self.keep_data = keep_data
        """False: extents come without writes (verify), and data may be skipped."""
        self._skipped = 0  # data bytes of the current extent consumed by skip()
        self._chunks: deque[memoryview] = deque()
        self._buffered = 0
        self._offset = 0  # archive offset of the first buffered byte
        self._state = _READ_HEADER
        self._header: ArchiveHeader | None = None
        self._header_size = HEADER_FIXED_SIZE
        self._walker: ExtentWalker | None = None
        self._skip: Collection[int] = ()
        self._extent: tuple[int, tuple[int, ...]] | None = None
        """The current extent's data size and used blockinfo words."""
        self._uuid_bytes = b""
        self._extent_offset = 0
        self._extent_count = 0

    # -- input ------------------------------------------------------------------------------

    @property
    def header(self) -> ArchiveHeader | None:
        return self._header

    @property
    def bytes_wanted(self) -> int:
        """Bytes that complete the next event (and the extent header after it).

        A hint for the I/O layer's read size; feeding more or less is fine.
        """
        if self._state == _READ_HEADER:
            return max(self._header_size - self._buffered, 1)
        if self._state == _READ_EXTENT_HEADER:
            return max(EXTENT_HEADER_SIZE - self._buffered, 1)
        if self._state == _READ_EXTENT_DATA:
            assert self._extent is not None
            missing = self._extent[0] - self._skipped - self._buffered
            return max(missing, 0) + EXTENT_HEADER_SIZE
        return 0

    @property
    def bytes_to_skip(self) -> int:
        """Data bytes the I/O layer may read itself, without feeding them, and
        report with :meth:`skip`: only with ``keep_data=False`` (verify reads
        the data, to prove it is there and readable, but needs none of it)."""
        if self.keep_data or self._state != _READ_EXTENT_DATA:
            return 0
        assert self._extent is not None
        return max(self._extent[0] - self._skipped - self._buffered, 0)

    def skip(self, count: int) -> None:
        """Account for ``count`` data bytes read elsewhere (see :attr:`bytes_to_skip`)."""
        if not 0 <= count <= self.bytes_to_skip:
            raise ValueError(f"can skip at most {self.bytes_to_skip} bytes, not {count}")
        self._skipped += count
        self._offset += count

    @property
    def offset(self) -> int:
        """Archive bytes consumed by events so far."""
        return self._offset

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add input; the parser keeps a view of ``data``, which must not change."""
        if self._state == _DONE:
            raise RuntimeError("feed() after end_of_input()")
        if data:
            view = data if isinstance(data, memoryview) else memoryview(data)
            self._chunks.append(view.cast("B") if view.format != "B" else view)
            self._buffered += len(view)

    # -- events -----------------------------------------------------------------------------

    def next_event(self) -> ArchiveHeader | ParsedExtent | None:
        """The next complete event, or None when more input is needed."""
        if self._state == _READ_HEADER:
            return self._try_header()
        if self._state == _READ_EXTENT_HEADER:
            if self._buffered < EXTENT_HEADER_SIZE:
                return None
            self._extent_offset = self._offset
            raw = self._take_bytes(EXTENT_HEADER_SIZE)
            block_count, blockinfo = decode_extent_blockinfo(raw, self._uuid_bytes)
            self._extent = (block_count * BLOCK_SIZE, blockinfo)
            self._state = _READ_EXTENT_DATA
        if self._state == _READ_EXTENT_DATA:
            assert self._extent is not None
            if self._skipped + self._buffered < self._extent[0]:
                return None
            extent = self._parse_extent(*self._extent)
            self._extent = None
            self._skipped = 0
            self._state = _READ_EXTENT_HEADER
            return extent
        return None

    def end_of_input(self) -> ReadSummary:
        """Declare EOF: report a truncated header or extent, then missing clusters.

        Call only once :meth:`next_event` returned None.  Returns the totals.
        """
        state, self._state = self._state, _DONE
        if state == _READ_HEADER:
            prefix = self._peek(4)
            if len(prefix) == 4 and prefix != VMA_MAGIC:
                raise BadMagicError("not a vma file - wrong magic number")
            what = "header" if self._buffered < HEADER_FIXED_SIZE else "header data"
            raise TruncatedArchiveError(f"can't read vma {what} - got EOF")
        if state == _READ_EXTENT_HEADER and self._buffered:
            raise short_extent_header_error(self._buffered)
        if state == _READ_EXTENT_DATA:
            assert self._extent is not None
            have = EXTENT_HEADER_SIZE + self._skipped + self._buffered
            size = EXTENT_HEADER_SIZE + self._extent[0]
            raise short_extent_error(have, size)
        if self._walker is not None:
            self._walker.check_complete()
        return self.summary()

    def summary(self) -> ReadSummary:
        stats = tuple(
            DeviceReadStats(
                s.dev_id, s.name, s.size, s.clusters_read, s.zero_bytes, s.partial_zero_bytes
            )
            for s in self.device_stats()
        )
        return ReadSummary(
            clusters_read=self.clusters_read,
            bytes_read=self.clusters_read * CLUSTER_SIZE,
            sparse_bytes=sum(s.zero_bytes for s in stats),
            partial_zero_bytes=sum(s.partial_zero_bytes for s in stats),
            archive_bytes=self._offset,
            extents=self._extent_count,
            devices=stats,
        )

    @property
    def clusters_read(self) -> int:
        """Blockinfo entries walked so far (every device, skipped ones included)."""
        return self._walker.clusters_walked if self._walker is not None else 0

    def device_stats(self) -> tuple[DeviceReadStats, ...]:
        """The live per-device counters (not copies: read them, do not keep them)."""
        return self._walker.stats() if self._walker is not None else ()

    def skip_devices(self, dev_ids: Collection[int]) -> None:
        """Walk these devices without writes or duplicate and missing-cluster
        checks: a partial restore reads their data past (the reference's
        ``skip=``).  Call before the first extent; vmstate stays order-checked."""
        self._skip = frozenset(dev_ids)
        if self._walker is not None:
            self._walker.skip(self._skip)

    # -- buffer helpers ------------------------------------------------------------------------

    def _peek(self, size: int) -> bytes:
        out = bytearray()
        for chunk in self._chunks:
            out += chunk[: size - len(out)]
            if len(out) >= size:
                break
        return bytes(out)

    def _take_bytes(self, size: int) -> bytes:
        """Consume ``size`` buffered bytes as one bytes object (headers only)."""
        first = self._chunks[0]
        if len(first) >= size:
            out = bytes(first[:size])
        else:
            out = b"".join(bytes(view) for view in self._take_views(size))
            return out
        self._consume(size)
        return out

    def _take_views(self, size: int) -> list[memoryview]:
        """Consume ``size`` buffered bytes as views into the fed chunks."""
        views: list[memoryview] = []
        need = size
        while need:
            chunk = self._chunks[0]
            if len(chunk) <= need:
                views.append(chunk)
                self._chunks.popleft()
                need -= len(chunk)
            else:
                views.append(chunk[:need])
                self._chunks[0] = chunk[need:]
                need = 0
        self._buffered -= size
        self._offset += size
        return views

    def _consume(self, size: int) -> None:
        need = size
        while need:
            chunk = self._chunks[0]
            if len(chunk) <= need:
                self._chunks.popleft()
                need -= len(chunk)
            else:
                self._chunks[0] = chunk[need:]
                need = 0
        self._buffered -= size
        self._offset += size

    # -- header -----------------------------------------------------------------------------------

    def _try_header(self) -> ArchiveHeader | None:
        if self._buffered < HEADER_FIXED_SIZE:
            return None
        if self._header_size == HEADER_FIXED_SIZE:
            self._header_size = header_size_from_prefix(self._peek(HEADER_FIXED_SIZE))
        if self._buffered < self._header_size:
            return None
        header = decode_header(self._take_bytes(self._header_size))
        self._header = header
        self._uuid_bytes = header.uuid.bytes
        vmstate = header.vmstate
        self._walker = ExtentWalker(header.devices, vmstate.dev_id if vmstate else None)
        self._walker.skip(self._skip)
        self._state = _READ_EXTENT_HEADER
        return header

    # -- extents ---------------------------------------------------------------------------------

    def _parse_extent(self, data_size: int, blockinfo: tuple[int, ...]) -> ParsedExtent:
        """Check the extent with the walker, then cut its writes out of the data."""
        assert self._walker is not None
        runs, zeroes = self._walker.walk(data_size, blockinfo)
        if self._skip:
            skip = self._skip
            runs = [run for run in runs if run[0] not in skip]
            zeroes = [run for run in zeroes if run[0] not in skip]
        if self.keep_data:
            writes = self._slice_runs(runs, data_size)
        else:
            self._consume(data_size - self._skipped)
            writes = ()
        self._extent_count += 1
        return ParsedExtent(
            offset=self._extent_offset,
            block_count=data_size // BLOCK_SIZE,
            blockinfo=blockinfo,
            writes=writes,
            zeroes=tuple([(d, o, n) for d, o, n in zeroes]),
        )

    def _slice_runs(self, runs: list[Run], data_size: int) -> tuple[Write, ...]:
        """Consume the extent's data and cut the runs out of it, splitting a run
        only where the fed chunks themselves were split."""
        views = self._take_views(data_size)
        if len(views) == 1:
            data = views[0]
            return tuple((dev_id, dev_off, data[pos : pos + n]) for dev_id, dev_off, pos, n in runs)
        starts = []
        total = 0
        for view in views:
            starts.append(total)
            total += len(view)
        writes: list[Write] = []
        index = 0
        for dev_id, dev_off, pos, length in runs:
            while starts[index] + len(views[index]) <= pos:
                index += 1
            cursor_index = index
            done = 0
            while done < length:
                view = views[cursor_index]
                inner = pos + done - starts[cursor_index]
                take = min(length - done, len(view) - inner)
                writes.append((dev_id, dev_off + done, view[inner : inner + take]))
                done += take
                cursor_index += 1
        return tuple(writes)
