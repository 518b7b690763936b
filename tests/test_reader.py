"""VmaReader end to end under asyncio, uvloop and trio: restore, verify, the
extent stream, random access, backpressure, failures, and round trips with
archives from the independent test encoder, from VmaWriter, and as read by
dissect.archive."""

from __future__ import annotations

import io
import os
import random
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.abc
import pytest
import vma_builder as vb
from dissect.archive.vma import VMA

from vma_async import (
    CallbackSink,
    DeviceInfo,
    DuplicateClusterError,
    MissingClusterError,
    ParsedExtent,
    Progress,
    RawFileSink,
    SequentialSink,
    Sink,
    SourceError,
    TruncatedArchiveError,
    UnknownDeviceError,
    VmaReader,
)
from vma_async._sinks import Buffer
from vma_async._sources import ArchiveSource

pytestmark = pytest.mark.anyio


def pattern(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    blocks = [
        bytes(vb.BLOCK) if rng.random() < 0.3 else rng.randbytes(vb.BLOCK)
        for _ in range((size + vb.BLOCK - 1) // vb.BLOCK)
    ]
    return b"".join(blocks)[:size]


DISK0 = pattern(20 * vb.CLUSTER + 5000, 1)  # not a multiple of 4 KiB
DISK1 = bytes(300_000)  # zero-only
DISK2 = pattern(70 * vb.CLUSTER, 2)  # spans more than one extent
STATE = pattern(3 * vb.CLUSTER, 3)
CONFIGS = [("qemu-server.conf", b"memory: 512\n"), ("qemu-server.fw", b"[OPTIONS]\n")]
DEVICES = [
    vb.Device("disk0", DISK0),
    vb.Device("disk1", DISK1),
    vb.Device("disk2", DISK2),
    vb.Device("vmstate", STATE),
]


@pytest.fixture(scope="module")
def archive_bytes() -> bytes:
    return vb.archive(DEVICES, CONFIGS)


@pytest.fixture
def archive(tmp_path: Path, archive_bytes: bytes) -> Path:
    path = tmp_path / "a.vma"
    path.write_bytes(archive_bytes)
    return path


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def sinks_for(directory: Path) -> dict[str | int, Sink]:
    return {
        "disk0": RawFileSink(directory / "disk0.raw", len(DISK0)),
        2: RawFileSink(directory / "disk1.raw", len(DISK1)),
        "disk2": RawFileSink(directory / "disk2.raw", len(DISK2)),
        "vmstate": SequentialSink(directory / "vmstate.bin"),
    }


async def test_header(archive: Path) -> None:
    async with VmaReader.open(archive) as reader:
        header = reader.header
        assert header.uuid.bytes == vb.UUID
        assert header.ctime == 1_700_000_000
        assert header.configs == tuple(CONFIGS)
        assert [(d.dev_id, d.name, d.size, d.is_vmstate) for d in header.devices] == [
            (1, "disk0", len(DISK0), False),
            (2, "disk1", len(DISK1), False),
            (3, "disk2", len(DISK2), False),
            (4, "vmstate", len(STATE), True),
        ]


async def test_restore_equals_source_and_dissect(
    archive: Path, archive_bytes: bytes, tmp_path: Path
) -> None:
    seen: list[Progress] = []
    async with VmaReader.open(archive) as reader:
        summary = await reader.restore(sinks_for(tmp_path), progress=seen.append)
    dissect = {dev.name: dev.open().read() for dev in VMA(io.BytesIO(archive_bytes)).devices()}
    for name, image in [("disk0", DISK0), ("disk1", DISK1), ("disk2", DISK2)]:
        restored = (tmp_path / f"{name}.raw").read_bytes()
        assert restored == image
        assert restored == dissect[name]
    assert (tmp_path / "vmstate.bin").read_bytes() == STATE
    assert os.stat(tmp_path / "disk1.raw").st_blocks == 0  # holes stay holes
    assert summary.clusters_read == 21 + 5 + 70 + 3
    assert seen[-1].done_bytes == summary.bytes_read
    assert seen[-1].total_bytes == (21 + 5 + 70 + 3) * vb.CLUSTER
    assert seen[-1].zero_bytes == summary.sparse_bytes


async def test_restore_with_write_zeroes_fills_the_zero_blocks(
    archive: Path, tmp_path: Path
) -> None:
    written: dict[int, int] = {}

    async def zeroes(offset: int, length: int) -> None:
        written[offset] = length

    async def ignore(offset: int, data: memoryview) -> None:
        pass

    sinks = sinks_for(tmp_path)
    sinks[2] = CallbackSink(ignore, zeroes=zeroes)
    async with VmaReader.open(archive) as reader:
        await reader.restore(sinks, write_zeroes=True)
    assert sum(written.values()) == len(DISK1)


async def test_verify_summary(archive: Path) -> None:
    async with VmaReader.open(archive) as reader:
        summary = await reader.verify()
    disk1 = summary.devices[1]
    assert (disk1.name, disk1.clusters_read, disk1.zero_bytes) == ("disk1", 5, len(DISK1))
    assert summary.bytes_read == summary.clusters_read * vb.CLUSTER
    assert summary.sparse_bytes == sum(d.zero_bytes for d in summary.devices)


async def test_extents_stream(archive: Path, archive_bytes: bytes) -> None:
    async with VmaReader.open(archive) as reader:
        offsets = [extent.offset async for extent in reader.extents()]
        with pytest.raises(RuntimeError):
            await reader.verify()
    assert offsets == vb.extent_offsets(archive_bytes)


async def test_verify_reports_a_truncated_archive(tmp_path: Path, archive_bytes: bytes) -> None:
    path = tmp_path / "t.vma"
    path.write_bytes(archive_bytes[: vb.extent_offsets(archive_bytes)[1]])
    async with VmaReader.open(path) as reader:
        with pytest.raises(MissingClusterError) as info:
            await reader.verify()
    assert str(info.value) == "detected missing cluster 29 for stream disk2"


async def test_failed_restore_leaves_nothing_behind(tmp_path: Path, archive_bytes: bytes) -> None:
    path = tmp_path / "t.vma"
    path.write_bytes(archive_bytes[:-100_000])
    out = tmp_path / "out"
    out.mkdir()
    async with VmaReader.open(path) as reader:
        with pytest.raises(TruncatedArchiveError):
            await reader.restore(sinks_for(out))
    assert names(out) == []


async def test_restore_of_some_disks_skips_the_others(archive: Path, tmp_path: Path) -> None:
    """Issue 11: sinks for 1 of 3 disks (and no vmstate sink) restore that
    disk byte-exact; the others are read past, with no writes and no error."""
    seen: list[Progress] = []
    async with VmaReader.open(archive) as reader:
        summary = await reader.restore(
            {"disk2": RawFileSink(tmp_path / "disk2.raw", len(DISK2))}, progress=seen.append
        )
    assert names(tmp_path) == ["a.vma", "disk2.raw"]
    assert (tmp_path / "disk2.raw").read_bytes() == DISK2
    assert summary.clusters_read == 21 + 5 + 70 + 3  # everything was read past
    # progress counts the restored disk only, and ends at its size
    assert seen[-1].done_bytes == seen[-1].total_bytes == 70 * vb.CLUSTER
    assert [d.name for d in seen[-1].devices] == ["disk2"]


async def test_skipped_disk_gets_no_cluster_checks(tmp_path: Path) -> None:
    """A skipped disk's duplicate and missing clusters are not its restore's
    concern (the reference's skip=); the restored disk is still checked."""
    disks = {1: vb.Device("disk0", DISK0), 2: vb.Device("disk1", DISK2)}
    entries = vb.entries_for(disks)
    skipped = [e for e in entries if e.dev_id == 2]
    kept = [e for e in entries if e.dev_id == 1]
    head = vb.header({i: (d.name, len(d.data)) for i, d in disks.items()})
    path = tmp_path / "s.vma"
    path.write_bytes(head + b"".join(vb.pack([*kept, skipped[0], skipped[0], *skipped[5:]])))
    async with VmaReader.open(path) as reader:
        await reader.restore({"disk0": RawFileSink(tmp_path / "d0", len(DISK0))})
    assert (tmp_path / "d0").read_bytes() == DISK0
    async with VmaReader.open(path) as reader:
        with pytest.raises(
            DuplicateClusterError, match="found duplicated cluster 0 for stream disk1"
        ):
            await reader.restore({"disk1": RawFileSink(tmp_path / "d1", len(DISK2))})
    assert names(tmp_path) == ["d0", "s.vma"]


async def test_unknown_sink_key(archive: Path) -> None:
    async with VmaReader.open(archive) as reader:
        with pytest.raises(UnknownDeviceError) as info:
            await reader.restore({"nope": CallbackSink(lambda o, d: anyio.lowlevel.checkpoint())})
    assert str(info.value) == "no device 'nope' in the archive"


async def test_failing_sink_error_is_raised_as_is(archive: Path, tmp_path: Path) -> None:
    async def broken(offset: int, data: memoryview) -> None:
        raise OSError("disk on fire")

    sinks = sinks_for(tmp_path)
    sinks["disk2"] = CallbackSink(broken)
    async with VmaReader.open(archive) as reader:
        with pytest.raises(OSError, match="disk on fire"):
            await reader.restore(sinks)
    assert names(tmp_path) == ["a.vma"]


class CountingStream(anyio.abc.ByteReceiveStream):
    """Serves bytes in 64 KiB pieces and counts what it handed out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.sent = 0

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        if self.sent >= len(self.data):
            raise anyio.EndOfStream
        piece = self.data[self.sent : self.sent + min(max_bytes, 65536)]
        self.sent += len(piece)
        return piece

    async def aclose(self) -> None:
        pass


async def test_a_slow_sink_stops_the_reading() -> None:
    image = random.Random(4).randbytes(1000 * vb.CLUSTER)
    data = vb.archive([vb.Device("disk0", image)])
    stream = CountingStream(data)
    release = anyio.Event()
    restored = bytearray(len(image))

    async def slow(offset: int, piece: memoryview) -> None:
        await release.wait()
        restored[offset : offset + len(piece)] = piece

    async with VmaReader.open(stream) as reader, anyio.create_task_group() as tg:
        tg.start_soon(reader.restore, {"disk0": CallbackSink(slow)})
        await anyio.wait_all_tasks_blocked()
        # one extent in the sink, two queued, one being dispatched, one read ahead
        assert stream.sent <= 5 * 3_801_600
        assert stream.sent < len(data) // 2
        release.set()
    assert bytes(restored) == image


async def test_cancelled_restore_removes_its_files(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    started = anyio.Event()

    async def stall(offset: int, data: memoryview) -> None:
        started.set()
        await anyio.sleep_forever()

    sinks = sinks_for(out)
    sinks["disk2"] = CallbackSink(stall)
    async with VmaReader.open(archive) as reader, anyio.create_task_group() as tg:
        tg.start_soon(reader.restore, sinks)
        await started.wait()
        tg.cancel_scope.cancel()
    assert names(out) == []


# --- random access ---------------------------------------------------------------------------


async def test_open_device_reads_only_headers_and_asked_blocks(archive: Path) -> None:
    async with VmaReader.open(archive) as reader:
        source: ArchiveSource = reader._source
        sizes: list[int] = []
        real_pread = source.pread

        def counting(offset: int, size: int) -> bytes:
            sizes.append(size)
            return real_pread(offset, size)

        real_cached = source.pread_cached

        def counting_cached(offset: int, size: int) -> bytes | None:
            data = real_cached(offset, size)
            if data is not None:
                sizes.append(size)
            return data

        source.pread = counting  # type: ignore[method-assign]
        source.pread_cached = counting_cached  # type: ignore[method-assign]
        view = await reader.open_device("disk2")
        # headers only: 512 bytes after a big extent, one read-ahead after a small one
        assert max(sizes) <= 65536
        assert sum(sizes) < 4 * 65536
        assert view.size == len(DISK2)
        sizes.clear()
        got = await view.read(123_456, 1 << 20)
        assert got == DISK2[123_456 : 123_456 + (1 << 20)]
        assert sum(sizes) <= 1 << 20
        rng = random.Random(5)
        for _ in range(20):
            offset = rng.randrange(len(DISK2))
            size = rng.randrange(1, 300_000)
            assert await view.read(offset, size) == DISK2[offset : offset + size]
        tail = await (await reader.open_device(1)).read(len(DISK0) - 10, 100)
        assert tail == DISK0[-10:]
        assert await (await reader.open_device("disk1")).read(0, 300_000) == DISK1


@pytest.mark.parametrize("cache", ["page cache", "worker thread"])
async def test_random_reads_from_the_page_cache_or_a_thread(archive: Path, cache: str) -> None:
    """A read the page cache can answer is served on the event loop
    (``pread_cached``, RWF_NOWAIT); any other takes a worker thread.  Both
    give the same bytes, and a file source's cached read equals ``pread``."""
    async with VmaReader.open(archive) as reader:
        source: ArchiveSource = reader._source
        assert source.pread_cached(0, 4096) in (None, source.pread(0, 4096))
        threads: list[int] = []
        real_pread = source.pread

        def pread(offset: int, size: int) -> bytes:
            threads.append(size)
            return real_pread(offset, size)

        source.pread = pread  # type: ignore[method-assign]
        if cache == "worker thread":
            source.pread_cached = lambda offset, size: None  # type: ignore[method-assign]
        view = await reader.open_device("disk2")
        threads.clear()
        rng = random.Random(7)
        for _ in range(30):
            offset = rng.randrange(len(DISK2))
            size = rng.randrange(1, 2 << 20)  # past the 1 MiB the loop path takes
            assert await view.read(offset, size) == DISK2[offset : offset + size]
        if cache == "worker thread":
            assert threads  # every stored part was read in a thread
    assert ArchiveSource.pread_cached(source, 0, 1) is None  # the default: never without blocking


async def test_open_device_on_a_truncated_archive(tmp_path: Path, archive_bytes: bytes) -> None:
    path = tmp_path / "t.vma"
    path.write_bytes(archive_bytes[:-5000])
    async with VmaReader.open(path) as reader:
        with pytest.raises(TruncatedArchiveError):
            await reader.open_device("disk0")


async def test_open_device_finds_duplicates(tmp_path: Path) -> None:
    entries = vb.entries_for({1: vb.Device("disk0", DISK0)})
    path = tmp_path / "d.vma"
    path.write_bytes(vb.header({1: ("disk0", len(DISK0))}) + vb.extent([*entries[:3], entries[1]]))
    async with VmaReader.open(path) as reader:
        with pytest.raises(DuplicateClusterError) as info:
            await reader.open_device("disk0")
    assert str(info.value) == "found duplicated cluster 1 for stream disk0"


async def test_open_device_needs_a_seekable_source(archive_bytes: bytes) -> None:
    async with VmaReader.open(CountingStream(archive_bytes)) as reader:
        with pytest.raises(SourceError) as info:
            await reader.open_device("disk0")
    assert str(info.value) == "random access needs an uncompressed archive in a regular file"


# --- round trips with the writer ------------------------------------------------------------


async def test_round_trip_with_vma_writer(tmp_path: Path) -> None:
    from vma_async import VmaWriter

    images = {"disk0": DISK0, "disk2": DISK2, "vmstate": STATE}
    path = tmp_path / "w.vma"
    async with VmaWriter.open(path) as writer:
        writer.add_config("qemu-server.conf", b"memory: 512\n")
        ids = {name: writer.register_stream(name, len(data)) for name, data in images.items()}
        for name, data in images.items():
            for cluster in range((len(data) + vb.CLUSTER - 1) // vb.CLUSTER):
                chunk = data[cluster * vb.CLUSTER : (cluster + 1) * vb.CLUSTER]
                await writer.write(ids[name], cluster, chunk.ljust(vb.CLUSTER, b"\0"))
            await writer.close_stream(ids[name])
    out = tmp_path / "out"
    out.mkdir()
    async with VmaReader.open(path) as reader:
        assert reader.header.config("qemu-server.conf") == b"memory: 512\n"
        await reader.restore(
            {
                "disk0": RawFileSink(out / "d0", len(DISK0)),
                "disk2": RawFileSink(out / "d2", len(DISK2)),
                "vmstate": SequentialSink(out / "vm"),
            }
        )
    assert (out / "d0").read_bytes() == DISK0
    assert (out / "d2").read_bytes() == DISK2
    assert (out / "vm").read_bytes() == STATE  # whole clusters: STATE is 3 of them
    dissect = {d.name: d.open().read() for d in VMA(io.BytesIO(path.read_bytes())).devices()}
    assert dissect["disk0"] == DISK0


async def test_extent_events_carry_headers(archive: Path) -> None:
    async with VmaReader.open(archive) as reader:
        extents: list[ParsedExtent] = [e async for e in reader.extents()]
    assert extents[0].header.entries[0].dev_id == 1
    assert extents[-1].header.block_count == 0


async def test_verify_reports_a_truncated_extent(tmp_path: Path, archive_bytes: bytes) -> None:
    offsets = vb.extent_offsets(archive_bytes)
    cut = offsets[1] - 1000
    path = tmp_path / "t.vma"
    path.write_bytes(archive_bytes[:cut])
    async with VmaReader.open(path) as reader:
        with pytest.raises(TruncatedArchiveError) as info:
            await reader.verify()
    size = offsets[1] - offsets[0]
    assert str(info.value) == f"short vma extent ({size - 1000} < {size})"


# --- progress (issue 8 defect 6) ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["file", "stream"])
async def test_progress_once_per_batch_with_growing_totals(
    archive: Path, archive_bytes: bytes, tmp_path: Path, how: str
) -> None:
    """Restore and verify report once per batch (a file: up to 4 MiB; a
    stream: one extent), every report new and larger, the last one complete
    (before the fix: one call per extent, each with the whole batch's totals)."""
    extents = len(vb.extent_offsets(archive_bytes)) - 1  # the last one is empty
    total = (21 + 5 + 70 + 3) * vb.CLUSTER
    for operation in ("restore", "verify"):
        seen: list[Progress] = []
        source: Path | CountingStream = archive if how == "file" else CountingStream(archive_bytes)
        out = tmp_path / operation
        out.mkdir()
        async with VmaReader.open(source) as reader:
            if operation == "restore":
                await reader.restore(sinks_for(out), progress=seen.append)
            else:
                await reader.verify(progress=seen.append)
        done = [p.done_bytes for p in seen]
        reads = [p.read_bytes for p in seen]
        assert done == sorted(done), seen
        assert reads == sorted(set(reads)), seen  # no report repeats another
        assert len(set(done)) >= len(done) - 1  # only the end report may keep done
        # one per batch that walked clusters (the archive's last extent has
        # none), plus one at the end
        assert len(seen) <= (3 if how == "file" else extents + 1)
        assert (seen[-1].done_bytes, seen[-1].total_bytes) == (total, total)
        assert seen[-1].read_bytes == len(archive_bytes)
        assert {p.operation for p in seen} == {operation}


async def test_progress_may_be_async(archive: Path) -> None:
    seen: list[int] = []

    async def progress(p: Progress) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(p.done_bytes)

    async with VmaReader.open(archive) as reader:
        await reader.verify(progress=progress)
    assert seen == [(21 + 5 + 70 + 3) * vb.CLUSTER]


# --- a stream closed under the reader (issue 8 defect 4) ------------------------------------------


class ClosedUnderTheReader(ArchiveSource):
    """Serves the first ``good`` bytes, then fails as a closed (or broken)
    anyio stream does."""

    def __init__(self, data: bytes, good: int, error: type[Exception]) -> None:
        self.data = data[:good]
        self.error = error
        self.closed = False

    async def read(self, max_bytes: int) -> bytes:
        await anyio.lowlevel.checkpoint()
        if not self.data:
            raise self.error
        piece, self.data = self.data[:max_bytes], self.data[max_bytes:]
        return piece

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.parametrize("error", [anyio.ClosedResourceError, anyio.BrokenResourceError])
@pytest.mark.parametrize("operation", ["open", "verify", "restore"])
async def test_a_closed_stream_is_a_source_error_not_the_end(
    archive_bytes: bytes, tmp_path: Path, error: type[Exception], operation: str
) -> None:
    good = 100 if operation == "open" else vb.extent_offsets(archive_bytes)[1] + 7
    source = ClosedUnderTheReader(archive_bytes, good, error)

    async def run() -> None:
        async with VmaReader.open(source) as reader:
            if operation == "verify":
                await reader.verify()
            else:
                await reader.restore(sinks_for(tmp_path))

    with pytest.raises(SourceError, match="^read failed - the stream was closed (while|by)"):
        await run()
    assert source.closed
    assert names(tmp_path) == []


# --- one way to open and close --------------------------------------------------------------------


class CloseRecorder(ArchiveSource):
    """A source whose aclose needs the event loop (as a stream's does)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closed = False

    async def read(self, max_bytes: int) -> bytes:
        piece, self.data = self.data[:max_bytes], self.data[max_bytes:]
        return piece

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.closed = True


async def test_open_is_awaitable_and_a_context_manager(archive: Path) -> None:
    async with VmaReader.open(archive) as reader:
        assert reader.header.devices[0].name == "disk0"
    reader = await VmaReader.open(archive)
    try:
        assert (await reader.verify()).clusters_read == 21 + 5 + 70 + 3
    finally:
        await reader.aclose()
    async with await VmaReader.open(archive) as reader:  # the resource is one too
        assert reader.device("disk1").size == len(DISK1)
    opening = VmaReader.open(archive)
    async with opening:
        pass
    with pytest.raises(RuntimeError, match="already"):
        await opening


async def test_a_cancelled_aclose_still_closes_the_source(archive_bytes: bytes) -> None:
    source = CloseRecorder(archive_bytes)
    reader = await VmaReader.open(source)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await reader.aclose()
        raise AssertionError("a cancelled aclose lets the cancellation through")
    assert scope.cancelled_caught
    assert source.closed


# --- block_status and incomplete archives ---------------------------------------------------------


def expected_status(image: bytes, offset: int, length: int) -> list[tuple[int, int]]:
    """What block_status must say, computed block by block from the image and
    the writer's rule (a 4 KiB block of zeros is not stored)."""
    out: list[tuple[int, int]] = []
    end = min(offset + length, len(image))
    pos = offset
    while pos < end:
        block_end = min((pos // vb.BLOCK + 1) * vb.BLOCK, end)
        block = image[pos // vb.BLOCK * vb.BLOCK : (pos // vb.BLOCK + 1) * vb.BLOCK]
        flags = 1 if not any(block) else 0
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + block_end - pos, flags)
        else:
            out.append((block_end - pos, flags))
        pos = block_end
    return out


async def test_block_status_matches_the_image(archive: Path) -> None:
    async with VmaReader.open(archive) as reader:
        for name, image in [("disk0", DISK0), ("disk1", DISK1), ("disk2", DISK2)]:
            view = await reader.open_device(name)
            assert view.block_status(0, len(image)) == expected_status(image, 0, len(image))
            rng = random.Random(6)
            for _ in range(50):
                offset = rng.randrange(len(image))
                length = rng.randrange(1, 400_000)
                got = view.block_status(offset, length)
                assert got == expected_status(image, offset, length)
                assert sum(n for n, _ in got) == min(length, len(image) - offset)
        view = await reader.open_device("disk1")
        assert view.block_status(0, 1 << 40) == [(len(DISK1), 1)]  # clipped at the end
        assert view.block_status(len(DISK1), 10) == []


async def test_incomplete_archive_opens_without_require_complete(tmp_path: Path) -> None:
    image = pattern(6 * vb.CLUSTER, 7).replace(b"\0", b"\1")  # every block stored
    entries = vb.entries_for({1: vb.Device("disk0", image)})
    path = tmp_path / "i.vma"
    path.write_bytes(vb.header({1: ("disk0", len(image))}) + vb.extent([*entries[:2], entries[4]]))
    async with VmaReader.open(path) as reader:
        with pytest.raises(
            MissingClusterError, match="detected missing cluster 2 for stream disk0"
        ):
            await reader.open_device("disk0")
        view = await reader.open_device("disk0", require_complete=False)
        C = vb.CLUSTER
        assert view.block_status(0, 6 * C) == [(2 * C, 0), (2 * C, 2), (C, 0), (C, 2)]
        assert view.block_status(C + 5, C) == [(C - 5, 0), (5, 2)]
        assert await view.read(4 * C, C) == image[4 * C : 5 * C]
        assert await view.read(0, 2 * C) == image[: 2 * C]
        with pytest.raises(
            MissingClusterError, match="detected missing cluster 5 for stream disk0"
        ):
            await view.read(4 * C + 10, C)


async def test_open_closes_an_fd_unless_closefd_false(archive: Path) -> None:
    kept = os.open(archive, os.O_RDONLY)
    try:
        async with VmaReader.open(kept, closefd=False) as reader:
            await reader.verify()
        assert os.pread(kept, 4, 0) == b"VMA\0"  # still open, still the caller's
    finally:
        os.close(kept)
    taken = os.open(archive, os.O_RDONLY)
    reader = await VmaReader.open(taken)
    await reader.aclose()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(taken)


class HookRecorder(Sink):
    """Records which Sink hooks restore calls, and keeps the bytes."""

    def __init__(self, size: int) -> None:
        self.calls: list[str] = []
        self.image = bytearray(size)

    async def prepare(self, device: DeviceInfo) -> None:
        self.calls.append(f"prepare {device.name}")

    async def write(self, offset: int, data: Buffer) -> None:
        self.calls.append("write")
        self.image[offset : offset + len(data)] = data

    async def write_many(self, writes: Sequence[tuple[int, Buffer]]) -> None:
        self.calls.append("write_many")
        for offset, data in writes:
            self.image[offset : offset + len(data)] = data

    async def flush(self) -> None:
        self.calls.append("flush")

    async def aclose(self) -> None:
        self.calls.append("aclose")

    async def abort(self) -> None:
        self.calls.append("abort")


async def test_restore_calls_the_sink_hooks(archive: Path, archive_bytes: bytes) -> None:
    sink = HookRecorder(len(DISK2))
    async with VmaReader.open(archive) as reader:
        await reader.restore({"disk2": sink})
    assert bytes(sink.image) == DISK2
    assert sink.calls[0] == "prepare disk2"
    assert sink.calls[-2:] == ["flush", "aclose"]
    assert set(sink.calls[1:-2]) == {"write_many"}  # never a write per run
    broken = archive.with_name("cut.vma")
    broken.write_bytes(archive_bytes[:-100_000])
    sink = HookRecorder(len(DISK2))
    async with VmaReader.open(broken) as reader:
        with pytest.raises(TruncatedArchiveError):
            await reader.restore({"disk2": sink})
    assert sink.calls[0] == "prepare disk2"
    assert sink.calls[-1] == "abort"
    assert "aclose" not in sink.calls
