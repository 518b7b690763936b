"""The shipped sinks, on their own: sparse raw files, existing targets and their
size tolerance, the sequential vmstate sink, and the callback adapter."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from vma_async import (
    CallbackSink,
    DeviceInfo,
    DeviceSizeError,
    ExistingFileSink,
    RawFileSink,
    SequentialSink,
    Sink,
    SinkError,
    SinkExistsError,
)
from vma_async._sinks import Buffer

pytestmark = pytest.mark.anyio
MIB = 1 << 20


async def test_raw_file_is_sparse_and_exactly_sized(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    sink = RawFileSink(path, 10 * MIB + 123)
    await sink.prepare(DeviceInfo(1, "disk0", 10 * MIB + 123))
    await sink.write_many([(4096, b"a" * 4096), (8192, memoryview(b"b" * 4096)), (MIB, b"c")])
    await sink.write(5 * MIB, b"d" * 10)
    await sink.flush()
    await sink.aclose()
    data = path.read_bytes()
    assert len(data) == 10 * MIB + 123
    assert data[4096:12288] == b"a" * 4096 + b"b" * 4096
    assert data[MIB : MIB + 1] == b"c"
    assert data[5 * MIB : 5 * MIB + 10] == b"d" * 10
    assert data.count(0) == len(data) - 8192 - 11
    assert os.stat(path).st_blocks * 512 < MIB  # holes stay holes


async def test_raw_file_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"precious")
    sink = RawFileSink(path, 100)
    # issue 8 defect 7: a sink's error, so "except SinkError" catches it
    with pytest.raises(SinkError, match="file exists") as info:
        await sink.write(0, b"x")
    assert type(info.value) is SinkExistsError
    assert str(info.value) == f"can't create file {path} - file exists"
    await sink.abort()
    assert path.read_bytes() == b"precious"


async def test_raw_file_abort_removes_what_it_created(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    sink = RawFileSink(path, 100)
    await sink.write(0, b"x")
    await sink.abort()
    assert not path.exists()


async def test_raw_file_write_zeroes(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    sink = RawFileSink(path, 3 * MIB)
    await sink.write_zeroes(0, 3 * MIB)
    await sink.aclose()
    assert path.read_bytes() == bytes(3 * MIB)
    assert os.stat(path).st_blocks * 512 >= 3 * MIB


async def test_raw_file_takes_over_an_fd(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "disk.raw", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    sink = RawFileSink(fd, 8192)
    await sink.write(4096, b"z" * 4096)
    await sink.aclose()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
    assert (tmp_path / "disk.raw").read_bytes() == bytes(4096) + b"z" * 4096


@pytest.mark.parametrize("extra", [0, 4 * MIB])
async def test_existing_file_within_tolerance(tmp_path: Path, extra: int) -> None:
    path = tmp_path / "target"
    path.write_bytes(b"\xff" * (MIB + extra))
    sink = ExistingFileSink(path, MIB)
    await sink.prepare(DeviceInfo(1, "disk0", MIB))
    await sink.write_zeroes(0, 4096)
    await sink.write(4096, b"q")
    await sink.aclose()
    data = path.read_bytes()
    assert data[:4097] == bytes(4096) + b"q"
    assert len(data) == MIB + extra


@pytest.mark.parametrize("actual", [MIB - 1, MIB + 4 * MIB + 1])
async def test_existing_file_size_mismatch(tmp_path: Path, actual: int) -> None:
    path = tmp_path / "target"
    path.write_bytes(b"")
    os.truncate(path, actual)
    sink = ExistingFileSink(path, MIB)
    with pytest.raises(DeviceSizeError) as info:
        await sink.prepare(DeviceInfo(1, "disk0", MIB))
    assert str(info.value) == (
        f"vma_reader_register_bs for stream disk0 failed - unexpected size {actual} != {MIB}"
    )
    await sink.aclose()


async def test_existing_file_must_exist(tmp_path: Path) -> None:
    sink = ExistingFileSink(tmp_path / "none", MIB)
    with pytest.raises(SinkError) as info:
        await sink.write(0, b"x")
    assert str(info.value) == f"can't open file {tmp_path / 'none'} - No such file or directory"


async def test_sequential_sink_in_order(tmp_path: Path) -> None:
    path = tmp_path / "vmstate.bin"
    sink = SequentialSink(path)
    await sink.write(0, b"abc")
    await sink.write_zeroes(3, 2)
    await sink.write(5, b"z")
    with pytest.raises(SinkError) as info:
        await sink.write(100, b"late")
    assert str(info.value) == "write vmstate failed - offset 100 is not the next one (6)"
    await sink.flush()
    await sink.aclose()
    assert path.read_bytes() == b"abc\0\0z"


async def test_sequential_sink_to_a_pipe() -> None:
    read_fd, write_fd = os.pipe()
    sink = SequentialSink(write_fd)
    await sink.write(0, b"x" * 1000)
    await sink.flush()
    await sink.aclose()
    assert os.read(read_fd, 2000) == b"x" * 1000
    assert os.read(read_fd, 10) == b""  # the sink closed the write end it took over
    os.close(read_fd)


async def test_sequential_sink_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "vmstate.bin"
    path.write_bytes(b"old")
    sink = SequentialSink(path)
    with pytest.raises(SinkExistsError, match=r"can't create file .*vmstate.bin - file exists"):
        await sink.write(0, b"new")
    await sink.abort()
    assert path.read_bytes() == b"old"


async def test_callback_sink() -> None:
    calls: list[tuple[str, int, int]] = []

    async def write(offset: int, data: memoryview) -> None:
        calls.append(("w", offset, len(data)))

    async def flush() -> None:
        calls.append(("f", 0, 0))

    sink = CallbackSink(write, flush=flush)
    await sink.write(10, b"abc")
    await sink.write_zeroes(0, 3 * MIB + 5)
    await sink.flush()
    await sink.aclose()
    assert calls == [
        ("w", 10, 3),
        ("w", 0, MIB),
        ("w", MIB, MIB),
        ("w", 2 * MIB, MIB),
        ("w", 3 * MIB, 5),
        ("f", 0, 0),
    ]


async def test_fd_sinks_close_the_fd_unless_closefd_false(tmp_path: Path) -> None:
    """One fd rule for sinks, sources and targets: closefd=True (the default)
    closes a passed fd with the sink, closefd=False leaves it to the caller."""
    kept = os.open(tmp_path / "kept.raw", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    taken = os.open(tmp_path / "taken.raw", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    read_fd, write_fd = os.pipe()
    try:
        for fd, closefd in ((kept, False), (taken, True)):
            sink = RawFileSink(fd, 8192, closefd=closefd)
            await sink.write(4096, b"data")
            await sink.aclose()
        vmstate = SequentialSink(write_fd, closefd=False)
        await vmstate.write(0, b"state")
        await vmstate.aclose()
        assert os.pread(kept, 4, 4096) == b"data"  # still open, still ours
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(taken)
        os.write(write_fd, b"!")  # the pipe's write end is still open
        assert os.read(read_fd, 10) == b"state!"
    finally:
        os.close(kept)
        os.close(read_fd)
        os.close(write_fd)
    assert (tmp_path / "taken.raw").read_bytes() == bytes(4096) + b"data" + bytes(4092)


class _Recorder(Sink):
    """A minimal sink: only the two abstract methods."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.closed = 0

    async def write(self, offset: int, data: Buffer) -> None:
        self.writes.append((offset, bytes(data)))

    async def aclose(self) -> None:
        self.closed += 1


async def test_sink_interface_default_hooks() -> None:
    sink = _Recorder()
    await sink.prepare(DeviceInfo(1, "disk0", MIB))
    await sink.write_many([(0, b"a"), (5, memoryview(b"bc"))])
    await sink.write_zeroes(10, MIB + 3)
    await sink.flush()
    await sink.abort()  # the default abort closes
    assert sink.writes == [(0, b"a"), (5, b"bc"), (10, bytes(MIB)), (10 + MIB, bytes(3))]
    assert sink.closed == 1
    with pytest.raises(TypeError, match="abstract"):
        Sink()  # type: ignore[abstract]


# --- early writeback (issue 10) ------------------------------------------------------------------


@pytest.mark.parametrize("sync", [True, False])
async def test_file_sinks_start_writeback_per_window_and_drop_clean_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: bool
) -> None:
    """A syncing sink asks for writeback once a window of bytes is written
    and, two windows later, drops that range (clean by then) from the page
    cache; the bytes are all there afterwards.  Without sync it leaves the
    page cache alone."""
    import vma_async._sinks as sinks_module

    calls: list[tuple[int, int]] = []
    real_fadvise = os.posix_fadvise

    def recording_fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_DONTNEED
        calls.append((offset, length))
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(sinks_module, "WRITEBACK_WINDOW", 1 << 20)
    monkeypatch.setattr(sinks_module.os, "posix_fadvise", recording_fadvise)
    piece = 256 << 10
    size = 12 * (1 << 20)
    expected = bytearray(size)
    sink = RawFileSink(tmp_path / "disk.raw", size, sync=sync)
    for n in range(0, size // piece, 2):  # every other 256 KiB: holes between
        data = bytes([n % 251 + 1]) * piece
        expected[n * piece : (n + 1) * piece] = data
        await sink.write_many([(n * piece, data)])
    await sink.flush()
    await sink.aclose()
    assert (tmp_path / "disk.raw").read_bytes() == expected
    if not sync:
        assert calls == []
        return
    window = 2 << 20  # 1 MiB of data is written over 2 MiB of the disk
    starts = [(n * window, window - piece) for n in range(size // window)]
    drops = starts[:-2]
    assert calls == [
        c for pair in itertools.zip_longest(starts, [None, None, *drops]) for c in pair if c
    ]
