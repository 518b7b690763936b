"""The extent walker, sans-I/O: an extent's blockinfo words in, checked runs out.

Goal: one place that knows what an extent's blockinfo table means for the
devices of an archive, and every check the reference reader (``vma-reader.c``)
makes on it, so that streaming restore and verify (:class:`ArchiveParser`)
and the random-access index (``VmaReader.open_device``) cannot disagree.
Each error message of those checks is written once, here.

Plan:

* :func:`~vma_async._format.split_blockinfo` (beside ``make_blockinfo``, the
  one place that knows the word's layout) cuts a whole extent's words into
  ``(dev_id, cluster_num, mask)`` in one comprehension, so the walk itself
  only unpacks tuples.
* :meth:`ExtentWalker.walk` takes one extent (its data size and its used
  blockinfo words, as :func:`~vma_async._format.decode_extent_blockinfo`
  returns them) and, in the reference's order, checks each entry: a dev_id the
  header defines, a cluster inside the device, a cluster not seen before
  (a paged bitmap), vmstate clusters in order, no stored block at or past the
  device's end, and block counts that match the extent's data.  It returns
  the extent's stored runs ``[dev_id, device offset, data position, length]``
  and zero runs ``[dev_id, device offset, length]``, clipped at device ends
  and merged while contiguous: the parser cuts its writes from the first, the
  index records both.
* :meth:`ExtentWalker.check_complete` is the missing-cluster check, run
  after the last extent.
* A device can be *skipped* (a partial restore): its clusters are still
  range-checked and its data still counted, but it gets no duplicate or
  missing-cluster check (the reference's ``skip=``).

Each cluster costs a few local-variable operations: a full cluster (mask
0xFFFF) is one run, a zero cluster one zero run, and a partial mask is split
through a cache of mask decompositions (:func:`mask_runs`), never block by
block.

Worst cases (hostile input is a design input):

* Device sizes in the header are not trusted for allocation: the "seen"
  bitmap is paged (256-byte pages, 2048 clusters, 128 MiB of device each,
  allocated when a cluster in them first arrives).  A legitimate archive
  costs one bit per cluster plus a small page overhead (a 16 TiB disk: about
  40 MiB); a hostile one can make each 8.7-byte blockinfo entry allocate one
  page, about 40 bytes of memory per byte of input, and never more than
  512 MiB per device (cluster numbers are 32 bits).
* Run lists are per extent: at most 16 stored and 16 zero runs per entry.

Deliberate differences from the reference (see also ``docs/reader.md``): a
dev_id the header does not define and a cluster past the device's last one
are errors (the reference asserts, or accepts a zero cluster in its
bitmap's slack); the missing-cluster check runs for every walked disk, for
verify too; device ends are byte-exact (a stored block starting at or past
the end is an error, a block across it is clipped), where the reference
counts 512-byte sectors: the two agree for sizes that are multiples of 512.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from ._errors import (
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
    FULL_MASK,
    DeviceInfo,
    cluster_sequence,
    split_blockinfo,
)

__all__ = [
    "DeviceReadStats",
    "ExtentWalker",
    "SeenBitmap",
    "mask_runs",
    "missing_cluster_error",
    "short_extent_error",
    "short_extent_header_error",
]

Run = list[int]
"""``[dev_id, device offset, data position in the extent, length]`` (mutable while merging)."""
ZeroRun = list[int]
"""``[dev_id, device offset, length]`` of bytes the archive records as zero."""


# --- errors worded once ------------------------------------------------------------------------


def missing_cluster_error(cluster_num: int, name: str) -> MissingClusterError:
    """The reference's words for a cluster the archive never stores."""
    return MissingClusterError(f"detected missing cluster {cluster_num} for stream {name}")


def short_extent_header_error(have: int) -> TruncatedArchiveError:
    """The input ended inside an extent header (``have`` bytes of it)."""
    return TruncatedArchiveError(f"read short extent ({have} bytes)")


def short_extent_error(have: int, size: int) -> TruncatedArchiveError:
    """The input ended inside an extent's data: ``have`` of ``size`` bytes."""
    return TruncatedArchiveError(f"short vma extent ({have} < {size})")


def _too_many_blocks() -> ExtentBlockCountError:
    return ExtentBlockCountError("short vma extent - too many blocks")


def _beyond_end() -> BlockBeyondEndError:
    return BlockBeyondEndError("got wrong block address - write beyond end")


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
        """Page index (cluster >> 11) -> 256 bytes; the walker's hot loop
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

    def claim_range(self, first: int, end: int) -> bool:
        """Mark clusters ``first`` to ``end - 1`` seen, if none was seen before
        (then return True); otherwise change nothing and return False.  Works
        on whole pages as integers: a few operations per 2048 clusters."""
        spans: list[tuple[int, int]] = []
        cluster = first
        while cluster < end:
            page_index = cluster >> _PAGE_SHIFT
            page_first = page_index << _PAGE_SHIFT
            stop = min(end, page_first + _PAGE_CLUSTERS)
            bits = ((1 << (stop - cluster)) - 1) << (cluster - page_first)
            page = self.pages.get(page_index)
            if page is not None and int.from_bytes(page, "little") & bits:
                return False
            spans.append((page_index, bits))
            cluster = stop
        for page_index, bits in spans:
            page = self.pages.get(page_index)
            if page is None:
                page = self.pages[page_index] = bytearray(_PAGE_BYTES)
            value = int.from_bytes(page, "little") | bits
            page[:] = value.to_bytes(_PAGE_BYTES, "little")
        return True

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


# --- per-device state --------------------------------------------------------------------------


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


class _DeviceWalk:
    __slots__ = ("bitmap", "info", "is_vmstate", "limit", "next_vmstate", "stats")

    def __init__(self, info: DeviceInfo, is_vmstate: bool) -> None:
        self.info = info
        self.is_vmstate = is_vmstate
        # vmstate's size is not a bound on its data (the reference uses INT64_MAX):
        # it is restored in whole clusters, zero blocks included (a stream has no holes).
        self.limit = (1 << 63) if is_vmstate else info.size
        self.bitmap: SeenBitmap | None = None if is_vmstate else SeenBitmap(info.cluster_count)
        """None: no duplicate or missing-cluster check (vmstate, a skipped disk)."""
        self.next_vmstate = 0
        self.stats = DeviceReadStats(info.dev_id, info.name, info.size)


# --- the walker ----------------------------------------------------------------------------------


class ExtentWalker:
    """Checks extents against the header's device table and turns each into
    runs; keeps the per-device state (seen clusters, vmstate position,
    statistics) from one extent to the next."""

    __slots__ = ("_devices", "clusters_walked")

    def __init__(self, devices: Iterable[DeviceInfo], vmstate_id: int | None) -> None:
        self._devices = {d.dev_id: _DeviceWalk(d, d.dev_id == vmstate_id) for d in devices}
        self.clusters_walked = 0
        """Blockinfo entries walked so far, skipped devices included."""

    def skip(self, dev_ids: Collection[int]) -> None:
        """Walk the devices ``dev_ids`` without the duplicate and missing-cluster
        checks from now on (a partial restore reads their data past; call it
        before the first extent); vmstate stays checked for order, as it is
        never written out of order."""
        for dev_id, device in self._devices.items():
            if dev_id in dev_ids and not device.is_vmstate:
                device.bitmap = None

    def stats(self) -> tuple[DeviceReadStats, ...]:
        """The live per-device statistics, in header order."""
        return tuple(d.stats for d in self._devices.values())

    def walk(self, data_size: int, blockinfo: Sequence[int]) -> tuple[list[Run], list[ZeroRun]]:
        """Check one extent's entries in the reference's order and return its
        stored runs and zero runs (see the module docstring)."""
        sequence = cluster_sequence(blockinfo)
        if sequence is not None:
            walked = self._walk_sequence(data_size, *sequence)
            if walked is not None:
                return walked
        return self._walk_entries(data_size, blockinfo)

    def _walk_sequence(
        self, data_size: int, dev_id: int, first: int, masks: list[int]
    ) -> tuple[list[Run], list[ZeroRun]] | None:
        """The fast path for consecutive clusters of one device, whole stored
        or whole zero, inside the device: every check at once (C-speed counts
        and bitmap words), and nothing changed unless all pass.  None sends
        the extent to :meth:`_walk_entries`, which finds and words the first
        error the way the reference does."""
        device = self._devices.get(dev_id)
        count = len(masks)
        if device is None or (first + count) * CLUSTER_SIZE > device.limit:
            return None
        full = masks.count(FULL_MASK)
        zero = masks.count(0)
        if full + zero != count or full * CLUSTER_SIZE != data_size:
            return None
        bitmap = device.bitmap
        if device.is_vmstate:
            if device.next_vmstate != first:
                return None
            device.next_vmstate = first + count
        elif bitmap is not None and not bitmap.claim_range(first, first + count):
            return None
        stats = device.stats
        stats.clusters_read += count
        stats.zero_bytes += zero * CLUSTER_SIZE
        self.clusters_walked += count
        base = first * CLUSTER_SIZE
        if zero == count:
            return [], [[dev_id, base, count * CLUSTER_SIZE]]
        if full == count:
            return [[dev_id, base, 0, data_size]], []
        # Mixed: a run per group of stored clusters, zero runs in the gaps.
        runs: list[Run] = []
        zeroes: list[ZeroRun] = []
        pos = 0
        done = 0  # clusters of the extent covered so far
        for index in [i for i, mask in enumerate(masks) if mask]:
            if index > done:
                zeroes.append([dev_id, base + done * CLUSTER_SIZE, (index - done) * CLUSTER_SIZE])
            _add_run(runs, dev_id, base + index * CLUSTER_SIZE, pos, CLUSTER_SIZE)
            pos += CLUSTER_SIZE
            done = index + 1
        if done < count:
            zeroes.append([dev_id, base + done * CLUSTER_SIZE, (count - done) * CLUSTER_SIZE])
        return runs, zeroes

    def _walk_entries(
        self, data_size: int, blockinfo: Sequence[int]
    ) -> tuple[list[Run], list[ZeroRun]]:
        """The general walk, entry by entry in the reference's order."""
        runs: list[Run] = []
        zeroes: list[ZeroRun] = []
        pos = 0
        # The loop runs once per cluster: the device state is looked up only
        # when the dev_id changes, and the bitmap check is inlined.
        current = -1
        device: _DeviceWalk | None = None
        pages: dict[int, bytearray] | None = None
        is_vmstate = False
        limit = cluster_count = 0
        entries = split_blockinfo(blockinfo)
        for dev_id, cluster_num, mask in entries:
            if dev_id != current:
                device = self._devices.get(dev_id)
                if device is None:
                    raise UnknownDeviceError(
                        f"got wrong dev id {dev_id} (not defined in the header)"
                    )
                current = dev_id
                bitmap = device.bitmap
                pages = bitmap.pages if bitmap is not None else None
                is_vmstate = device.is_vmstate
                limit = device.limit
                cluster_count = device.info.cluster_count
            assert device is not None
            if is_vmstate:
                if cluster_num != device.next_vmstate:
                    raise VmstateOrderError("found out of order vmstate data")
                device.next_vmstate = cluster_num + 1
            else:
                if cluster_num >= cluster_count:
                    raise BlockBeyondEndError(
                        f"got wrong block address - cluster {cluster_num} is past the end "
                        f"of stream {device.info.name} ({cluster_count} clusters)"
                    )
                if pages is not None:
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
            stats = device.stats
            stats.clusters_read += 1
            base = cluster_num * CLUSTER_SIZE
            end = base + CLUSTER_SIZE
            if mask == FULL_MASK and end <= limit:  # a whole stored cluster
                if pos + CLUSTER_SIZE > data_size:
                    raise _too_many_blocks()
                _add_run(runs, dev_id, base, pos, CLUSTER_SIZE)
                pos += CLUSTER_SIZE
                continue
            if mask == 0:  # a whole zero cluster: the other common case
                zero_length = CLUSTER_SIZE if end <= limit else limit - base
                stats.zero_bytes += zero_length
                _add_zero(zeroes, dev_id, base, zero_length)
                continue
            for first_block, block_count, stored in mask_runs(mask):
                start = base + first_block * BLOCK_SIZE
                length = block_count * BLOCK_SIZE
                if stored:
                    if pos + length > data_size or start + length - BLOCK_SIZE >= limit:
                        _raise_first_block_error(pos, data_size, start, limit, block_count)
                    _add_run(runs, dev_id, start, pos, min(length, limit - start))
                    pos += length
                elif start < limit:
                    zero_length = min(length, limit - start)
                    stats.zero_bytes += zero_length
                    if mask:
                        stats.partial_zero_bytes += zero_length
                    _add_zero(zeroes, dev_id, start, zero_length)
        self.clusters_walked += len(entries)
        if pos != data_size:
            raise ExtentBlockCountError("vma extent error - missing blocks")
        return runs, zeroes

    def check_complete(self, dev_ids: Collection[int] | None = None) -> None:
        """The end-of-archive check: every cluster of every walked disk (or of
        the disks ``dev_ids``) was seen; :class:`MissingClusterError` names
        the first one missing.  vmstate and skipped disks are not checked."""
        for dev_id, device in self._devices.items():
            if device.bitmap is None or (dev_ids is not None and dev_id not in dev_ids):
                continue
            missing = device.bitmap.first_missing()
            if missing is not None:
                raise missing_cluster_error(missing, device.info.name)


def _add_run(runs: list[Run], dev_id: int, dev_off: int, pos: int, length: int) -> None:
    if runs:
        last = runs[-1]
        if last[0] == dev_id and last[1] + last[3] == dev_off and last[2] + last[3] == pos:
            last[3] += length
            return
    runs.append([dev_id, dev_off, pos, length])


def _add_zero(zeroes: list[ZeroRun], dev_id: int, dev_off: int, length: int) -> None:
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
            raise _too_many_blocks()
        if start + block * BLOCK_SIZE >= limit:
            raise _beyond_end()
    raise AssertionError("no failing block")  # pragma: no cover
