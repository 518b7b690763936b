"""VmaReader end to end under asyncio, uvloop and trio: restore, verify, the
extent stream, random access, backpressure, failures, and round trips with
archives from the independent test encoder, from VmaWriter, and as read by
dissect.archive."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import vma_builder as vb
from dissect.archive.vma import VMA

from vma_async import (
    CallbackSink,
    DuplicateClusterError,
    MissingClusterError,
    ParsedExtent,
    RawFileSink,
    ReadProgress,
    SequentialSink,
    SourceError,
    TruncatedArchiveError,
    UnknownDeviceError,
    VmaReader,
)
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


def sinks_for(directory: Path) -> dict[str | int, Any]:
    return {
        "disk0": RawFileSink(directory / "disk0.raw", len(DISK0)),
        2: RawFileSink(directory / "disk1.raw", len(DISK1)),
        "disk2": RawFileSink(directory / "disk2.raw", len(DISK2)),
        "vmstate": SequentialSink(directory / "vmstate.bin"),
    }


async def test_header(archive: Path) -> None:
    async with await VmaReader.open(archive) as reader:
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
    seen: list[ReadProgress] = []
    async with await VmaReader.open(archive) as reader:
        summary = await reader.restore(sinks_for(tmp_path), progress=seen.append)
    dissect = {dev.name: dev.open().read() for dev in VMA(io.BytesIO(archive_bytes)).devices()}
    for name, image in [("disk0", DISK0), ("disk1", DISK1), ("disk2", DISK2)]:
        restored = (tmp_path / f"{name}.raw").read_bytes()
        assert restored == image
        assert restored == dissect[name]
    assert (tmp_path / "vmstate.bin").read_bytes() == STATE
    assert os.stat(tmp_path / "disk1.raw").st_blocks == 0  # holes stay holes
    assert summary.clusters_read == 21 + 5 + 70 + 3
    assert seen[-1].clusters_read == summary.clusters_read
    assert seen[-1].cluster_total == 20 + 4 + 70 + 3


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
    async with await VmaReader.open(archive) as reader:
        await reader.restore(sinks, write_zeroes=True)
    assert sum(written.values()) == len(DISK1)


async def test_verify_summary(archive: Path) -> None:
    async with await VmaReader.open(archive) as reader:
        summary = await reader.verify()
    disk1 = summary.devices[1]
    assert (disk1.name, disk1.clusters_read, disk1.zero_bytes) == ("disk1", 5, len(DISK1))
    assert summary.bytes_read == summary.clusters_read * vb.CLUSTER
    assert summary.sparse_bytes == sum(d.zero_bytes for d in summary.devices)


async def test_extents_stream(archive: Path, archive_bytes: bytes) -> None:
    async with await VmaReader.open(archive) as reader:
        offsets = [extent.offset async for extent in reader.extents()]
        with pytest.raises(RuntimeError):
            await reader.verify()
    assert offsets == vb.extent_offsets(archive_bytes)


async def test_verify_reports_a_truncated_archive(tmp_path: Path, archive_bytes: bytes) -> None:
    path = tmp_path / "t.vma"
    path.write_bytes(archive_bytes[: vb.extent_offsets(archive_bytes)[1]])
    async with await VmaReader.open(path) as reader:
        with pytest.raises(MissingClusterError) as info:
            await reader.verify()
    assert str(info.value) == "detected missing cluster 29 for stream disk2"


async def test_failed_restore_leaves_nothing_behind(tmp_path: Path, archive_bytes: bytes) -> None:
    path = tmp_path / "t.vma"
    path.write_bytes(archive_bytes[:-100_000])
    out = tmp_path / "out"
    out.mkdir()
    async with await VmaReader.open(path) as reader:
        with pytest.raises(TruncatedArchiveError):
            await reader.restore(sinks_for(out))
    assert names(out) == []


async def test_device_without_sink_is_refused(archive: Path, tmp_path: Path) -> None:
    sinks = sinks_for(tmp_path)
    del sinks[2]
    async with await VmaReader.open(archive) as reader:
        with pytest.raises(UnknownDeviceError) as info:
            await reader.restore(sinks)
    assert str(info.value) == "got wrong dev id 2 (no restore target for stream disk1)"
    assert names(tmp_path) == ["a.vma"]


async def test_unknown_sink_key(archive: Path) -> None:
    async with await VmaReader.open(archive) as reader:
        with pytest.raises(UnknownDeviceError) as info:
            await reader.restore({"nope": CallbackSink(lambda o, d: anyio.lowlevel.checkpoint())})
    assert str(info.value) == "no device 'nope' in the archive"


async def test_failing_sink_error_is_raised_as_is(archive: Path, tmp_path: Path) -> None:
    async def broken(offset: int, data: memoryview) -> None:
        raise OSError("disk on fire")

    sinks = sinks_for(tmp_path)
    sinks["disk2"] = CallbackSink(broken)
    async with await VmaReader.open(archive) as reader:
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

    async with await VmaReader.open(stream) as reader, anyio.create_task_group() as tg:
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
    async with await VmaReader.open(archive) as reader, anyio.create_task_group() as tg:
        tg.start_soon(reader.restore, sinks)
        await started.wait()
        tg.cancel_scope.cancel()
    assert names(out) == []


# --- random access ---------------------------------------------------------------------------


async def test_open_device_reads_only_headers_and_asked_blocks(archive: Path) -> None:
    async with await VmaReader.open(archive) as reader:
        source: ArchiveSource = reader._source
        sizes: list[int] = []
        real_pread = source.pread

        def counting(offset: int, size: int) -> bytes:
            sizes.append(size)
            return real_pread(offset, size)

        source.pread = counting  # type: ignore[method-assign]
        view = await reader.open_device("disk2")
        assert set(sizes) == {512}
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


async def test_open_device_on_a_truncated_archive(tmp_path: Path, archive_bytes: bytes) -> None:
    path = tmp_path / "t.vma"
    path.write_bytes(archive_bytes[:-5000])
    async with await VmaReader.open(path) as reader:
        with pytest.raises(TruncatedArchiveError):
            await reader.open_device("disk0")


async def test_open_device_finds_duplicates(tmp_path: Path) -> None:
    entries = vb.entries_for({1: vb.Device("disk0", DISK0)})
    path = tmp_path / "d.vma"
    path.write_bytes(vb.header({1: ("disk0", len(DISK0))}) + vb.extent([*entries[:3], entries[1]]))
    async with await VmaReader.open(path) as reader:
        with pytest.raises(DuplicateClusterError) as info:
            await reader.open_device("disk0")
    assert str(info.value) == "found duplicated cluster 1 for stream disk0"


async def test_open_device_needs_a_seekable_source(archive_bytes: bytes) -> None:
    async with await VmaReader.open(CountingStream(archive_bytes)) as reader:
        with pytest.raises(SourceError) as info:
            await reader.open_device("disk0")
    assert str(info.value) == "random access needs an uncompressed archive in a regular file"


# --- round trips with the writer ------------------------------------------------------------


async def test_round_trip_with_vma_writer(tmp_path: Path) -> None:
    from vma_async import VmaWriter  # type: ignore[attr-defined]

    images = {"disk0": DISK0, "disk2": DISK2, "vmstate": STATE}
    path = tmp_path / "w.vma"
    writer = await VmaWriter.open(path)
    try:
        writer.add_config("qemu-server.conf", b"memory: 512\n")
        ids = {name: writer.register_stream(name, len(data)) for name, data in images.items()}
        for name, data in images.items():
            for cluster in range((len(data) + vb.CLUSTER - 1) // vb.CLUSTER):
                chunk = data[cluster * vb.CLUSTER : (cluster + 1) * vb.CLUSTER]
                await writer.write(ids[name], cluster, chunk.ljust(vb.CLUSTER, b"\0"))
            await writer.close_stream(ids[name])
        await writer.close()
    except BaseException:
        await writer.abort()
        raise
    out = tmp_path / "out"
    out.mkdir()
    async with await VmaReader.open(path) as reader:
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
    async with await VmaReader.open(archive) as reader:
        extents: list[ParsedExtent] = [e async for e in reader.extents()]
    assert extents[0].header.entries[0].dev_id == 1
    assert extents[-1].header.block_count == 0


async def test_verify_reports_a_truncated_extent(tmp_path: Path, archive_bytes: bytes) -> None:
    offsets = vb.extent_offsets(archive_bytes)
    cut = offsets[1] - 1000
    path = tmp_path / "t.vma"
    path.write_bytes(archive_bytes[:cut])
    async with await VmaReader.open(path) as reader:
        with pytest.raises(TruncatedArchiveError) as info:
            await reader.verify()
    size = offsets[1] - offsets[0]
    assert str(info.value) == f"short vma extent ({size - 1000} < {size})"
