"""The sans-I/O extent parser, driven without an event loop.

Archives come from tests/vma_builder.py, an encoder independent of vma_async;
every error is made by corrupting a valid archive, and each test asserts the
exception class and the exact message.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

import pytest
import vma_builder as vb

from vma_async import (
    BadMagicError,
    BlockBeyondEndError,
    DuplicateClusterError,
    ExtentBlockCountError,
    ExtentChecksumError,
    ExtentMagicError,
    ExtentUuidError,
    FormatError,
    HeaderChecksumError,
    MissingClusterError,
    TruncatedArchiveError,
    UnknownDeviceError,
    VmstateOrderError,
)
from vma_async._parser import ArchiveParser, ParsedExtent, ReadSummary, SeenBitmap, mask_runs


def pattern(size: int, seed: int) -> bytes:
    """Random blocks mixed with zero blocks, so clusters get partial masks."""
    rng = random.Random(seed)
    blocks = []
    for _ in range((size + vb.BLOCK - 1) // vb.BLOCK):
        blocks.append(bytes(vb.BLOCK) if rng.random() < 0.3 else rng.randbytes(vb.BLOCK))
    return b"".join(blocks)[:size]


def parse(
    data: bytes, chunks: Sequence[int] | None = None
) -> tuple[list[ParsedExtent], ReadSummary]:
    """Feed ``data`` cut at ``chunks`` sizes (cycled), collect extents, end."""
    parser = ArchiveParser()
    extents: list[ParsedExtent] = []
    pos = 0
    sizes = list(chunks or [len(data) or 1])
    turn = 0
    while True:
        event = parser.next_event()
        if event is None:
            if pos >= len(data):
                return extents, parser.end_of_input()
            step = sizes[turn % len(sizes)]
            turn += 1
            parser.feed(data[pos : pos + step])
            pos += step
        elif isinstance(event, ParsedExtent):
            extents.append(event)


def images_from(extents: Sequence[ParsedExtent], sizes: dict[int, int]) -> dict[int, bytes]:
    images = {dev_id: bytearray(size) for dev_id, size in sizes.items()}
    for extent in extents:
        for dev_id, offset, data in extent.writes:
            images[dev_id][offset : offset + len(data)] = data
    return {k: bytes(v) for k, v in images.items()}


DISKS = [
    vb.Device("disk0", pattern(300_000, 1)),  # not a multiple of 4 KiB
    vb.Device("disk1", bytes(200_000)),  # zero-only
    vb.Device("disk2", pattern(4 * vb.CLUSTER, 2)),
]


@pytest.fixture(scope="module")
def archive() -> bytes:
    return vb.archive(DISKS, [("qemu-server.conf", b"memory: 512\n")])


@pytest.mark.parametrize("chunks", [None, [1], [511, 4097], [65536], [3_000_000]])
def test_restores_every_device_whatever_the_chunking(
    archive: bytes, chunks: list[int] | None
) -> None:
    data = archive if chunks != [1] else vb.archive(DISKS[:1], per_extent=3)
    disks = DISKS if chunks != [1] else DISKS[:1]
    extents, summary = parse(data, chunks)
    images = images_from(extents, {i + 1: len(d.data) for i, d in enumerate(disks)})
    for i, disk in enumerate(disks):
        assert images[i + 1] == disk.data
    assert summary.archive_bytes == len(data)


def test_single_device_extent_is_one_view_per_run() -> None:
    image = bytes(range(256)) * 256 * 58
    extents, _ = parse(vb.archive([vb.Device("disk0", image)], trailing_empty_extent=False))
    assert len(extents) == 1
    assert [(d, o, len(v)) for d, o, v in extents[0].writes] == [(1, 0, len(image))]


def test_statistics_match_the_reference_accounting() -> None:
    image = bytes(vb.BLOCK) + b"\x01" * vb.BLOCK + bytes(vb.CLUSTER - 2 * vb.BLOCK)
    image += bytes(vb.CLUSTER)  # a whole zero cluster
    _, summary = parse(vb.archive([vb.Device("disk0", image)]))
    assert summary.clusters_read == 2
    assert summary.bytes_read == 2 * vb.CLUSTER
    assert summary.sparse_bytes == 2 * vb.CLUSTER - vb.BLOCK
    assert summary.partial_zero_bytes == vb.CLUSTER - vb.BLOCK
    assert summary.devices[0].zero_bytes == summary.sparse_bytes


def test_zero_runs_are_clipped_at_the_device_end() -> None:
    extents, _ = parse(vb.archive([vb.Device("disk0", bytes(5000))]))
    assert extents[0].zeroes == ((1, 0, 5000),)
    assert extents[0].writes == ()


def test_empty_archive_with_no_devices() -> None:
    extents, summary = parse(vb.header({}) + vb.extent([]))
    assert len(extents) == 1
    assert summary.clusters_read == 0


def test_vmstate_in_order_and_unbounded() -> None:
    state = pattern(150_000, 3)
    data = vb.archive([vb.Device("disk0", pattern(70_000, 4)), vb.Device("vmstate", state)])
    extents, _ = parse(data)
    got = images_from(extents, {1: 70_000, 2: 3 * vb.CLUSTER})[2]
    assert got == state + bytes(3 * vb.CLUSTER - len(state))


def test_fifty_nine_clusters_in_one_extent_are_accepted() -> None:
    image = pattern(59 * vb.CLUSTER, 5)
    extents, _ = parse(vb.archive([vb.Device("disk0", image)], per_extent=59))
    assert images_from(extents, {1: len(image)})[1] == image


def test_mask_runs() -> None:
    assert mask_runs(0xFFFF) == ((0, 16, True),)
    assert mask_runs(0) == ((0, 16, False),)
    assert mask_runs(0b1001) == ((0, 1, True), (1, 2, False), (3, 1, True), (4, 12, False))


def test_seen_bitmap_is_lazy_and_finds_the_first_gap() -> None:
    bitmap = SeenBitmap(1 << 32)  # a 256 TiB claim costs nothing up front
    assert bitmap.first_missing() == 0
    small = SeenBitmap(5000)
    for cluster in range(5000):
        if cluster != 4321:
            assert small.test_and_set(cluster) is False
    assert small.test_and_set(7) is True
    assert small.first_missing() == 4321
    small.test_and_set(4321)
    assert small.first_missing() is None


# --- one test per error ------------------------------------------------------------------


def corrupt(archive: bytes, edit: object) -> bytes:
    data = bytearray(archive)
    assert callable(edit)
    edit(data)
    return bytes(data)


def first_extent(data: bytes) -> int:
    return vb.extent_offsets(data)[0]


def expect(data: bytes, error: type[FormatError], message: str) -> None:
    with pytest.raises(error) as info:
        parse(data)
    assert type(info.value) is error
    assert str(info.value) == message


def test_bad_magic() -> None:
    expect(b"XMA\0" + bytes(20000), BadMagicError, "not a vma file - wrong magic number")


def test_short_input_that_is_not_vma() -> None:
    expect(b"hello", BadMagicError, "not a vma file - wrong magic number")


def test_header_checksum(archive: bytes) -> None:
    data = corrupt(archive, lambda d: d.__setitem__(100, 1))
    expect(data, HeaderChecksumError, "wrong vma header checksum")


def test_extent_checksum(archive: bytes) -> None:
    off = first_extent(archive)
    data = corrupt(archive, lambda d: d.__setitem__(off + 100, d[off + 100] ^ 1))
    expect(data, ExtentChecksumError, "wrong vma extent header checksum")


def test_extent_uuid(archive: bytes) -> None:
    off = first_extent(archive)

    def edit(d: bytearray) -> None:
        d[off + 8] ^= 0xFF
        vb.resign_extent(d, off)

    expect(corrupt(archive, edit), ExtentUuidError, "wrong vma extent uuid")


@pytest.mark.parametrize(("at", "value"), [(0, b"VMAX"), (4, b"\0\1")])
def test_extent_magic_and_reserved(archive: bytes, at: int, value: bytes) -> None:
    off = first_extent(archive)

    def edit(d: bytearray) -> None:
        d[off + at : off + at + len(value)] = value
        vb.resign_extent(d, off)

    expect(corrupt(archive, edit), ExtentMagicError, "wrong vma extent header magic")


def test_too_many_blocks() -> None:
    data = bytearray(vb.archive([vb.Device("disk0", pattern(2 * vb.CLUSTER, 7))]))
    off = first_extent(bytes(data))
    struct.pack_into(">H", data, off + 6, 3)  # block_count smaller than the masks say
    vb.resign_extent(data, off)
    expect(bytes(data), ExtentBlockCountError, "short vma extent - too many blocks")


def test_missing_blocks() -> None:
    image = b"\x01" * vb.CLUSTER
    head = vb.header({1: ("disk0", len(image))})
    entry = vb.cluster_entry(1, 0, image, len(image))
    ext = vb.extent([entry], block_count=17) + bytes(vb.BLOCK)
    expect(head + ext, ExtentBlockCountError, "vma extent error - missing blocks")


def test_duplicate_cluster() -> None:
    image = pattern(2 * vb.CLUSTER, 8)
    entries = vb.entries_for({1: vb.Device("disk0", image)})
    data = vb.header({1: ("disk0", len(image))}) + vb.extent([*entries, entries[0]])
    expect(data, DuplicateClusterError, "found duplicated cluster 0 for stream disk0")


def test_block_beyond_device_end() -> None:
    head = vb.header({1: ("disk0", 5000)})
    # block 2 (bytes 8192..) starts past the 5000-byte device
    ext = vb.extent([vb.Entry(1, 0, 0b101, [b"\1" * vb.BLOCK, b"\2" * vb.BLOCK])])
    expect(head + ext, BlockBeyondEndError, "got wrong block address - write beyond end")


def test_cluster_past_device_end_is_a_clean_error() -> None:
    head = vb.header({1: ("disk0", vb.CLUSTER)})
    ext = vb.extent([vb.Entry(1, 0, 0), vb.Entry(1, 1_000_000, 0)])
    expect(
        head + ext,
        BlockBeyondEndError,
        "got wrong block address - cluster 1000000 is past the end of stream disk0 (1 clusters)",
    )


def test_unknown_dev_id_is_a_clean_error() -> None:
    head = vb.header({1: ("disk0", vb.CLUSTER)})
    ext = vb.extent([vb.Entry(1, 0, 0), vb.Entry(9, 0, 0)])
    expect(head + ext, UnknownDeviceError, "got wrong dev id 9 (not defined in the header)")


def test_skipped_device_gets_no_writes_and_no_cluster_checks() -> None:
    """A partial restore (issue 11): the skipped disk's data is read past,
    with no writes, zero runs, duplicate or missing-cluster check for it."""
    images = [d.data for d in DISKS]
    entries = vb.entries_for({i + 1: d for i, d in enumerate(DISKS)})
    disk1 = [e for e in entries if e.dev_id == 2]
    others = [e for e in entries if e.dev_id != 2]
    # disk1: cluster 0 twice, and cluster 1 never: both would be errors if walked
    broken = [*others, disk1[0], disk1[0], *disk1[2:]]
    head = vb.header({i + 1: (d.name, len(d.data)) for i, d in enumerate(DISKS)})
    data = head + b"".join(vb.pack(broken))
    parser = ArchiveParser()
    parser.feed(data)
    assert parser.next_event() is not None  # the header
    parser.skip_devices({2})
    extents: list[ParsedExtent] = []
    while (event := parser.next_event()) is not None:
        assert isinstance(event, ParsedExtent)
        extents.append(event)
    parser.end_of_input()
    assert all(dev_id != 2 for e in extents for dev_id, _, _ in [*e.writes, *e.zeroes])
    restored = images_from(extents, {1: len(images[0]), 3: len(images[2])})
    assert restored == {1: images[0], 3: images[2]}
    # walked without the skip, the same archive is refused
    with pytest.raises(DuplicateClusterError, match="found duplicated cluster 0 for stream disk1"):
        parse(data)


def test_vmstate_out_of_order() -> None:
    head = vb.header({1: ("vmstate", 3 * vb.CLUSTER)})
    ext = vb.extent([vb.Entry(1, 0, 0), vb.Entry(1, 2, 0)])
    expect(head + ext, VmstateOrderError, "found out of order vmstate data")


def test_missing_cluster_at_the_end() -> None:
    image = pattern(3 * vb.CLUSTER, 9)
    entries = vb.entries_for({1: vb.Device("disk0", image)})
    data = vb.header({1: ("disk0", len(image))}) + vb.extent([entries[0], entries[2]])
    expect(data, MissingClusterError, "detected missing cluster 1 for stream disk0")


def test_empty_header_only_archive_misses_clusters() -> None:
    expect(
        vb.header({1: ("disk0", 10)}),
        MissingClusterError,
        "detected missing cluster 0 for stream disk0",
    )


# --- truncation ---------------------------------------------------------------------------


def test_truncation_at_every_extent_boundary_is_reported() -> None:
    data = vb.archive(DISKS, per_extent=4, trailing_empty_extent=False)
    offsets = vb.extent_offsets(data)
    assert len(offsets) == 4
    for cut in offsets:
        with pytest.raises(MissingClusterError):
            parse(data[:cut])


def test_truncation_inside_the_header() -> None:
    data = vb.archive(DISKS)
    expect(data[:5000], TruncatedArchiveError, "can't read vma header - got EOF")
    expect(data[:12300], TruncatedArchiveError, "can't read vma header data - got EOF")


def test_truncation_inside_an_extent() -> None:
    data = vb.archive(DISKS, trailing_empty_extent=False)
    off = first_extent(data)
    expect(data[: off + 100], TruncatedArchiveError, "read short extent (100 bytes)")
    size = len(data) - off
    expect(
        data[: off + 600],
        TruncatedArchiveError,
        f"short vma extent (600 < {size})",
    )


def test_truncation_at_random_offsets_is_always_reported() -> None:
    data = vb.archive(DISKS, per_extent=5)
    rng = random.Random(42)
    for cut in sorted(rng.sample(range(len(data)), 200)):
        with pytest.raises((TruncatedArchiveError, MissingClusterError, BadMagicError)):
            parse(data[:cut], [rng.randint(1, 70000)])


def test_feed_after_end_is_refused(archive: bytes) -> None:
    parser = ArchiveParser()
    parser.feed(archive)
    while parser.next_event() is not None:
        pass
    parser.end_of_input()
    with pytest.raises(RuntimeError):
        parser.feed(b"x")


def test_skipping_data_gives_the_same_extents_and_checks() -> None:
    data = vb.archive(DISKS)
    parser = ArchiveParser(keep_data=False)
    pos = 0
    extents = []
    while True:
        event = parser.next_event()
        if isinstance(event, ParsedExtent):
            extents.append(event)
        elif event is None:
            if parser.bytes_to_skip:
                step = min(parser.bytes_to_skip, 10_000)
                parser.skip(step)
                pos += step
                continue
            if pos >= len(data):
                break
            wanted = parser.bytes_wanted
            parser.feed(data[pos : pos + wanted])
            pos += wanted
    summary = parser.end_of_input()
    assert summary.archive_bytes == len(data)
    assert [e.offset for e in extents] == vb.extent_offsets(data)
    assert all(e.writes == () for e in extents)
    with pytest.raises(ValueError, match="can skip at most 0 bytes, not 1"):
        parser.skip(1)
