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
* Each cluster costs a few dictionary lookups; a full cluster (mask 0xFFFF) is
  one run, and a partial mask is split into runs of stored and zero blocks
  through a cache of mask decompositions, never block by block.  Consecutive
  runs of one device that are contiguous both on the device and in the data
  are merged, so the writes of a single-device extent are one big view.

Worst cases (hostile input is a design input):

* The header's device sizes are not trusted for allocation.  The "seen"
  bitmap that catches duplicate and missing clusters is paged: 256-byte pages
  (2048 clusters, 128 MiB of device each) are allocated when a cluster in them
  first arrives.  A legitimate archive costs one bit per cluster plus a small
  page overhead (a 16 TiB disk: about 40 MiB); a hostile one can make each
  8.7-byte blockinfo entry allocate one page, i.e. about 40 bytes of memory
  per byte of input, and never more than 512 MiB per device (cluster numbers
  are 32 bits).  A dense bitmap sized from the header would instead let a
  512-byte archive claiming a 16 EiB disk allocate gigabytes up front.
* Buffered input never exceeds one extent (3.8 MiB) plus what the caller fed
  beyond :attr:`bytes_wanted`.

Deliberate differences from the reference reader:

* A dev_id the header does not define, and a cluster number past the
  device's last cluster, are errors (the reference asserts, or accepts a
  zero cluster past the end silently when it falls in its bitmap's slack).
* The missing-cluster check runs for every disk, for verify as well.
* Device ends are byte-exact: a stored block is rejected when it starts at or
  past the device's end and writes are clipped at the device's size, where the
  reference works in 512-byte sectors and drops a partial last sector.  The two
  agree for every size that is a multiple of 512 (all the reference writes).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Final

from ._errors import (
    BadMagicError,
    BlockBeyondEndError,
    DuplicateClusterError,
    ExtentBlockCountError,
    MissingClusterError,
    TruncatedArchiveError,
    UnknownDeviceError,
    VmstateOrderError,
)
from ._format import (
    BLOCK_SIZE,
    BLOCKS_PER_CLUSTER,
    CLUSTER_SIZE,
    EXTENT_HEADER_SIZE,
    FULL_MASK,
    HEADER_FIXED_SIZE,
    VMA_MAGIC,
    ArchiveHeader,
    DeviceInfo,
    ExtentHeader,
    decode_extent_blockinfo,
    decode_header,
    extent_header_from_blockinfo,
    header_size_from_prefix,
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


# --- mask decomposition ----------------------------------------------------------------

_MASK_RUNS: dict[int, tuple[tuple[int, int, bool], ...]] = {}


def mask_runs(mask: int) -> tuple[tuple[int, int, bool], ...]:
    """Split a 16-bit block mask into ``(first_block, block_count, stored)`` runs.

    Cached: real archives use few distinct masks, and the cache is bounded by
    the 65536 possible ones.
    """
    runs = _MASK_RUNS.get(mask)
    if runs is None:
        found: list[tuple[int, int, bool]] = []
        block = 0
        while block < BLOCKS_PER_CLUSTER:
            stored = bool(mask >> block & 1)
            end = block + 1
            while end < BLOCKS_PER_CLUSTER and bool(mask >> end & 1) == stored:
                end += 1
            found.append((block, end - block, stored))
            block = end
        runs = _MASK_RUNS[mask] = tuple(found)
    return runs


# --- the seen-clusters bitmap --------------------------------------------------------------

_PAGE_BYTES: Final = 256
_PAGE_CLUSTERS: Final = _PAGE_BYTES * 8
_PAGE_SHIFT: Final = 11
_BYTE_MASK: Final = _PAGE_BYTES - 1
assert 1 << _PAGE_SHIFT == _PAGE_CLUSTERS
_FULL_PAGE: Final = b"\xff" * _PAGE_BYTES


class SeenBitmap:
    """One bit per cluster of a device, allocated in pages on first touch.

    See the module docstring for why it is paged rather than dense.
    """

    __slots__ = ("_cluster_count", "pages")

    def __init__(self, cluster_count: int) -> None:
        self._cluster_count = cluster_count
        self.pages: dict[int, bytearray] = {}
        """Page index (cluster >> 11) -> 256 bytes; the parser's hot loop
        reads and sets bits here directly."""

    def test_and_set(self, cluster_num: int) -> bool:
        """Mark ``cluster_num`` seen; return whether it was seen before."""
        page_index, bit = divmod(cluster_num, _PAGE_CLUSTERS)
        page = self.pages.get(page_index)
        if page is None:
            page = self.pages[page_index] = bytearray(_PAGE_BYTES)
        byte_index = bit >> 3
        flag = 1 << (bit & 7)
        if page[byte_index] & flag:
            return True
        page[byte_index] |= flag
        return False

    def first_missing(self) -> int | None:
        """The lowest cluster never seen, or None when all are; O(pages)."""
        page_count = (self._cluster_count + _PAGE_CLUSTERS - 1) // _PAGE_CLUSTERS
        for page_index in range(page_count):
            first = page_index * _PAGE_CLUSTERS
            page = self.pages.get(page_index)
            if page is None:
                return first
            if page == _FULL_PAGE:
                continue
            for byte_index, value in enumerate(page):
                if value != 0xFF:
                    for bit in range(8):
                        if not value >> bit & 1:
                            cluster = first + byte_index * 8 + bit
                            return cluster if cluster < self._cluster_count else None
        return None


# --- results ---------------------------------------------------------------------------------


@dataclass(slots=True)
class DeviceReadStats:
    """What one device contributed, in the reference's ``-v`` terms."""

    dev_id: int
    name: str
    size: int
    clusters_read: int = 0
    zero_bytes: int = 0
    """Bytes of the device the archive records as zero (whole or partial clusters)."""
    partial_zero_bytes: int = 0
    """Zero bytes inside clusters that also hold data: the 4 KiB elision's gain."""


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


class _DeviceState:
    __slots__ = ("bitmap", "info", "is_vmstate", "limit", "next_vmstate", "stats")

    def __init__(self, info: DeviceInfo, is_vmstate: bool) -> None:
        self.info = info
        self.is_vmstate = is_vmstate
        # vmstate's size is not a bound on its data (the reference uses INT64_MAX).
        self.limit = (1 << 63) if is_vmstate else info.size
        self.bitmap = None if is_vmstate else SeenBitmap(info.cluster_count)
        self.next_vmstate = 0
        self.stats = DeviceReadStats(info.dev_id, info.name, info.size)


class ArchiveParser:
    """Feed archive bytes, take events: the :class:`ArchiveHeader` first, then
    :class:`ParsedExtent` objects; call :meth:`end_of_input` at EOF.

    ``restore_targets``, once set, lists the dev_ids a restore has somewhere to
    put: data for any other disk is an error, as in the reference's restore
    (vmstate data with nowhere to go is dropped, as the reference does without
    ``-r``/vmstate file).  Left as None, every device is walked (verify).
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
        self._devices: dict[int, _DeviceState] = {}
        self._extent: tuple[int, tuple[int, ...]] | None = None
        """The current extent's data size and used blockinfo words."""
        self._uuid_bytes = b""
        self._extent_offset = 0
        self._extent_count = 0
        self._clusters_read = 0
        self.restore_targets: Collection[int] | None = None

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
            raise TruncatedArchiveError(f"read short extent ({self._buffered} bytes)")
        if state == _READ_EXTENT_DATA:
            assert self._extent is not None
            have = EXTENT_HEADER_SIZE + self._skipped + self._buffered
            size = EXTENT_HEADER_SIZE + self._extent[0]
            raise TruncatedArchiveError(f"short vma extent ({have} < {size})")
        for device in self._devices.values():
            if device.bitmap is None:
                continue
            missing = device.bitmap.first_missing()
            if missing is not None:
                raise MissingClusterError(
                    f"detected missing cluster {missing} for stream {device.info.name}"
                )
        return self.summary()

    def summary(self) -> ReadSummary:
        stats = tuple(
            DeviceReadStats(
                s.dev_id, s.name, s.size, s.clusters_read, s.zero_bytes, s.partial_zero_bytes
            )
            for s in (d.stats for d in self._devices.values())
        )
        return ReadSummary(
            clusters_read=self._clusters_read,
            bytes_read=self._clusters_read * CLUSTER_SIZE,
            sparse_bytes=sum(s.zero_bytes for s in stats),
            partial_zero_bytes=sum(s.partial_zero_bytes for s in stats),
            archive_bytes=self._offset,
            extents=self._extent_count,
            devices=stats,
        )

    @property
    def clusters_read(self) -> int:
        return self._clusters_read

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
        for info in header.devices:
            is_vmstate = vmstate is not None and info.dev_id == vmstate.dev_id
            self._devices[info.dev_id] = _DeviceState(info, is_vmstate)
        self._state = _READ_EXTENT_HEADER
        return header

    # -- extents ---------------------------------------------------------------------------------

    def _device_for(self, dev_id: int) -> _DeviceState:
        device = self._devices.get(dev_id)
        if device is None:
            raise UnknownDeviceError(f"got wrong dev id {dev_id} (not defined in the header)")
        targets = self.restore_targets
        if targets is not None and not device.is_vmstate and dev_id not in targets:
            raise UnknownDeviceError(
                f"got wrong dev id {dev_id} (no restore target for stream {device.info.name})"
            )
        return device

    def _parse_extent(self, data_size: int, blockinfo: tuple[int, ...]) -> ParsedExtent:
        """Walk the blockinfo entries in the reference's order, with its checks."""
        # [dev_id, device offset, data position, length], merged while contiguous
        runs: list[list[int]] = []
        zeroes: list[list[int]] = []
        pos = 0
        # The loop runs once per cluster, so the device state is looked up only
        # when the dev_id changes and the bitmap and run merging are inlined.
        current = -1
        device: _DeviceState | None = None
        pages: dict[int, bytearray] | None = None
        limit = cluster_count = 0
        for word in blockinfo:
            dev_id = (word >> 32) & 0xFF
            cluster_num = word & 0xFFFFFFFF
            mask = word >> 48
            if dev_id != current:
                device = self._device_for(dev_id)
                current = dev_id
                pages = device.bitmap.pages if device.bitmap is not None else None
                # vmstate's size is no bound: it is restored in whole clusters,
                # zero blocks included (a stream has no holes).
                limit = device.limit
                cluster_count = device.info.cluster_count
            assert device is not None
            if pages is not None:
                if cluster_num >= cluster_count:
                    raise BlockBeyondEndError(
                        f"got wrong block address - cluster {cluster_num} is past the end "
                        f"of stream {device.info.name} ({cluster_count} clusters)"
                    )
                page = pages.get(cluster_num >> _PAGE_SHIFT)
                if page is None:
                    page = pages[cluster_num >> _PAGE_SHIFT] = bytearray(_PAGE_BYTES)
                byte_index = (cluster_num >> 3) & _BYTE_MASK
                flag = 1 << (cluster_num & 7)
                if page[byte_index] & flag:
                    raise DuplicateClusterError(
                        f"found duplicated cluster {cluster_num} for stream {device.info.name}"
                    )
                page[byte_index] |= flag
            else:
                if cluster_num != device.next_vmstate:
                    raise VmstateOrderError("found out of order vmstate data")
                device.next_vmstate = cluster_num + 1
            stats = device.stats
            stats.clusters_read += 1
            base = cluster_num * CLUSTER_SIZE
            if mask == FULL_MASK:
                if pos + CLUSTER_SIZE > data_size:
                    raise ExtentBlockCountError("short vma extent - too many blocks")
                length = CLUSTER_SIZE if base + CLUSTER_SIZE <= limit else limit - base
                if runs:
                    last = runs[-1]
                    if last[0] == dev_id and last[1] + last[3] == base and last[2] + last[3] == pos:
                        last[3] += length
                        pos += CLUSTER_SIZE
                        continue
                runs.append([dev_id, base, pos, length])
                pos += CLUSTER_SIZE
                continue
            if mask == 0:  # a whole zero cluster: the other common case
                if base < limit:
                    zero_length = CLUSTER_SIZE if base + CLUSTER_SIZE <= limit else limit - base
                    stats.zero_bytes += zero_length
                    if zeroes:
                        last = zeroes[-1]
                        if last[0] == dev_id and last[1] + last[2] == base:
                            last[2] += zero_length
                            continue
                    zeroes.append([dev_id, base, zero_length])
                continue
            for first_block, block_count, stored in mask_runs(mask):
                start = base + first_block * BLOCK_SIZE
                length = block_count * BLOCK_SIZE
                if stored:
                    last_start = start + length - BLOCK_SIZE
                    if pos + length > data_size or last_start >= limit:
                        _raise_first_block_error(pos, data_size, start, limit, block_count)
                    _add_run(runs, dev_id, start, pos, min(length, limit - start))
                    pos += length
                elif start < limit:
                    zero_length = min(length, limit - start)
                    stats.zero_bytes += zero_length
                    if mask:
                        stats.partial_zero_bytes += zero_length
                    _add_zero(zeroes, dev_id, start, zero_length)
        self._clusters_read += len(blockinfo)
        if pos != data_size:
            raise ExtentBlockCountError("vma extent error - missing blocks")

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
            zeroes=tuple((d, o, n) for d, o, n in zeroes),
        )

    def _slice_runs(self, runs: list[list[int]], data_size: int) -> tuple[Write, ...]:
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


def _add_run(runs: list[list[int]], dev_id: int, dev_off: int, pos: int, length: int) -> None:
    if runs:
        last = runs[-1]
        if last[0] == dev_id and last[1] + last[3] == dev_off and last[2] + last[3] == pos:
            last[3] += length
            return
    runs.append([dev_id, dev_off, pos, length])


def _add_zero(zeroes: list[list[int]], dev_id: int, dev_off: int, length: int) -> None:
    if zeroes:
        last = zeroes[-1]
        if last[0] == dev_id and last[1] + last[2] == dev_off:
            last[2] += length
            return
    zeroes.append([dev_id, dev_off, length])


def _raise_first_block_error(
    pos: int, data_size: int, start: int, limit: int, block_count: int
) -> None:
    """Report the first failing block of a stored run the way the reference
    walks it: block by block, the data check before the address check."""
    for block in range(block_count):
        if pos + (block + 1) * BLOCK_SIZE > data_size:
            raise ExtentBlockCountError("short vma extent - too many blocks")
        if start + block * BLOCK_SIZE >= limit:
            raise BlockBeyondEndError("got wrong block address - write beyond end")
    raise AssertionError("no failing block")  # pragma: no cover
