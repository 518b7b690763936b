"""Archive sources: path, "-", fd (closefd), pipe, FIFO, anyio stream; the
ArchiveSource interface; streams closed under the reader.  Compression has
its own file (test_compression.py)."""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.abc
import pytest
import vma_builder as vb

from tests.harness import FdLeakCheck
from vma_async import BadMagicError, CallbackSink, SourceError, VmaReader, _sources
from vma_async._sources import ArchiveSource, open_source

pytestmark = pytest.mark.anyio

IMAGE = os.urandom(9 * vb.CLUSTER) + bytes(3 * vb.CLUSTER) + os.urandom(1000)
ARCHIVE = vb.archive([vb.Device("disk0", IMAGE)], [("qemu-server.conf", b"cores: 2\n")])


# --- helpers shared with test_compression.py -----------------------------------------------------


def children() -> set[int]:
    """Our live (or unreaped) child processes."""
    pids: set[int] = set()
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with open(path) as f:
            pids.update(int(pid) for pid in f.read().split())
    return pids


@contextlib.contextmanager
def leaves_nothing() -> Iterator[None]:
    """No fd and no child process outlives the block."""
    fds, kids = FdLeakCheck.snapshot(), children()
    yield
    leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in FdLeakCheck.snapshot() - fds}
    assert not leaked
    assert children() - kids == set()


def feed_pipe(data: bytes, stall: threading.Event | None = None) -> tuple[int, threading.Thread]:
    """A pipe a thread fills (a producer outside the event loop).  With
    ``stall``: only the first half, then the write end stays open (a silent
    producer) until the event is set."""
    read_fd, write_fd = os.pipe()

    def produce() -> None:
        with os.fdopen(write_fd, "wb") as out, contextlib.suppress(BrokenPipeError):
            if stall is None:
                out.write(data)
            else:
                out.write(data[: len(data) // 2])
                out.flush()
                stall.wait(3.0)  # (bounded: code that cannot be cancelled fails, not hangs)

    thread = threading.Thread(target=produce)
    thread.start()
    return read_fd, thread


@contextlib.contextmanager
def stdin_as(fd: int) -> Iterator[None]:
    """Standard input (fd 0) is ``fd`` (which this closes) for the block."""
    saved = os.dup(0)
    os.dup2(fd, 0)
    os.close(fd)
    try:
        yield
    finally:
        os.dup2(saved, 0)
        os.close(saved)


# --- the tests -----------------------------------------------------------------------------------


async def restore_image(source: object) -> bytes:
    image = bytearray(len(IMAGE))

    async def put(offset: int, data: memoryview) -> None:
        image[offset : offset + len(data)] = data

    async with await VmaReader.open(source) as reader:  # type: ignore[arg-type]
        await reader.restore({"disk0": CallbackSink(put)})
    return bytes(image)


async def read_all(source: ArchiveSource) -> bytes:
    out = bytearray()
    while data := await source.read(1 << 20):
        out += data
    return bytes(out)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "a.vma"
    p.write_bytes(ARCHIVE)
    return p


async def test_path(path: Path) -> None:
    with leaves_nothing():
        assert await restore_image(path) == IMAGE
        assert await restore_image(str(path)) == IMAGE


async def test_path_is_opened_in_a_worker_thread(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing opens or stats a path on the event loop's thread."""
    loop_thread = threading.get_ident()
    calls: list[int] = []
    real_open, real_fstat = os.open, os.fstat

    def open_(*args: object, **kwargs: object) -> int:
        calls.append(threading.get_ident())
        return real_open(*args, **kwargs)  # type: ignore[arg-type]

    def fstat(fd: int) -> os.stat_result:
        calls.append(threading.get_ident())
        return real_fstat(fd)

    monkeypatch.setattr(_sources.os, "open", open_)
    monkeypatch.setattr(_sources.os, "fstat", fstat)
    source = await open_source(path)
    await source.aclose()
    monkeypatch.undo()
    assert calls
    assert loop_thread not in calls


# --- closefd -----------------------------------------------------------------------------------


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def test_fd_is_closed_by_default(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    source = await open_source(fd)
    assert await read_all(source) == ARCHIVE
    await source.aclose()
    assert not is_open(fd)


async def test_fd_with_closefd_false_stays_open_at_its_offset(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 7, os.SEEK_SET)
        source = await open_source(fd, closefd=False)
        assert await read_all(source) == ARCHIVE
        assert source.archive_size() == len(ARCHIVE)
        await source.aclose()
        assert is_open(fd)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 7  # never used nor moved
    finally:
        os.close(fd)


async def test_pipe_fd_closefd_false_is_left_open_with_its_flags() -> None:
    read_fd, thread = feed_pipe(ARCHIVE)
    try:
        source = await open_source(read_fd, closefd=False)
        assert await read_all(source) == ARCHIVE
        await source.aclose()
        assert is_open(read_fd)
        assert os.get_blocking(read_fd)  # blocking mode restored
    finally:
        os.close(read_fd)
        thread.join()


async def test_pipe_fd_is_closed_by_default() -> None:
    read_fd, thread = feed_pipe(ARCHIVE)
    try:
        assert await restore_image(read_fd) == IMAGE
        assert not is_open(read_fd)
    finally:
        thread.join()


@pytest.mark.parametrize("closefd", [True, False])
async def test_a_cancelled_open_honours_closefd(closefd: bool) -> None:
    """Cancelled while it waits for the first bytes, the open closes the fd
    it was given only when it owns it, and puts the flags back otherwise."""
    read_fd, write_fd = os.pipe()
    try:
        with anyio.move_on_after(0.1) as scope:
            await open_source(read_fd, closefd=closefd)
        assert scope.cancelled_caught
        assert is_open(read_fd) is not closefd
        if not closefd:
            assert os.get_blocking(read_fd)
    finally:
        os.close(write_fd)
        if not closefd:
            os.close(read_fd)


@pytest.fixture
def stdin_from(path: Path) -> Iterator[None]:
    with stdin_as(os.open(path, os.O_RDONLY)):
        yield


@pytest.mark.usefixtures("stdin_from")
async def test_dash_reads_standard_input_and_leaves_it_open() -> None:
    assert await restore_image("-") == IMAGE
    assert is_open(0)


async def test_process_stdout_stream(path: Path) -> None:
    async with await anyio.open_process(["cat", str(path)]) as process:
        assert process.stdout is not None
        assert await restore_image(process.stdout) == IMAGE


# --- FIFOs: opened without blocking the loop ---------------------------------------------------


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    p = tmp_path / "archive.fifo"
    os.mkfifo(p)
    return p


@contextlib.contextmanager
def rescue_writer(fifo: Path, after: float) -> Iterator[threading.Event]:
    """If the code under test blocks in open() (the old defect), a writer
    comes after ``after`` seconds and unblocks it, so the test fails
    instead of hanging.  Set the event to call it off."""
    done = threading.Event()

    def rescue() -> None:
        if not done.wait(after):
            os.close(os.open(fifo, os.O_RDWR))  # O_RDWR never blocks on a FIFO

    thread = threading.Thread(target=rescue)
    thread.start()
    try:
        yield done
    finally:
        done.set()
        thread.join()


async def test_fifo_with_a_late_writer_leaves_the_loop_free(fifo: Path) -> None:
    """The loop keeps ticking while the FIFO has no writer; the writer comes
    once the heartbeat has ticked, and the archive is read byte-exact."""
    heartbeat_seen = threading.Event()
    writer_came_on_heartbeat: list[bool] = []

    def late_writer() -> None:
        writer_came_on_heartbeat.append(heartbeat_seen.wait(3.0))
        with open(fifo, "wb") as out:  # blocks until the reader has it open: it has
            out.write(ARCHIVE)

    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            if ticks == 10:
                heartbeat_seen.set()
            await anyio.sleep(0.005)

    writer = threading.Thread(target=late_writer)
    writer.start()
    try:
        with leaves_nothing():
            async with anyio.create_task_group() as tg:
                tg.start_soon(heartbeat)
                image = await restore_image(fifo)
                tg.cancel_scope.cancel()
    finally:
        heartbeat_seen.set()
        writer.join()
    assert writer_came_on_heartbeat == [True]  # the loop ran while nobody wrote
    assert image == IMAGE


async def test_fifo_open_without_writer_is_cancellable(fifo: Path) -> None:
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0.01)

    with rescue_writer(fifo, after=3.0), leaves_nothing():
        start = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            with anyio.move_on_after(0.3) as scope:
                await VmaReader.open(fifo)
            tg.cancel_scope.cancel()
        elapsed = time.monotonic() - start
    assert scope.cancelled_caught
    assert elapsed < 2.0
    assert ticks >= 5  # (about 30 on an idle machine; 0 when the open blocks the loop)


async def test_fifo_whose_writer_leaves_without_writing_is_empty(fifo: Path) -> None:
    """A writer that came and went is a real end of input (here: an empty archive)."""
    writer = threading.Thread(target=lambda: os.close(os.open(fifo, os.O_WRONLY)))
    writer.start()  # its open blocks until the reader has the FIFO open
    try:
        source = await open_source(fifo)
        try:
            assert await source.read(100) == b""
        finally:
            await source.aclose()
    finally:
        writer.join()


# --- streams closed under the reader -----------------------------------------------------------


class ClosableStream(anyio.abc.ByteReceiveStream):
    """A byte stream over an anyio memory object stream (closable from outside)."""

    def __init__(self) -> None:
        self.send, self._receive = anyio.create_memory_object_stream[bytes](10)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self._receive.receive()

    async def aclose(self) -> None:
        await self._receive.aclose()


async def test_stream_closed_under_the_reader_is_a_source_error() -> None:
    stream = ClosableStream()
    await stream.send.send(ARCHIVE[:4096])
    source = await open_source(stream)
    try:
        got = b""
        while len(got) < 4096:
            got += await source.read(4096 - len(got))
        assert got == ARCHIVE[:4096]
        await stream.aclose()  # closed while the archive is being read
        with pytest.raises(SourceError, match="^read failed - the stream was closed while"):
            await source.read(4096)
    finally:
        await source.aclose()
        stream.send.close()


async def test_stream_broken_under_the_reader_is_a_source_error() -> None:
    """A TCP connection reset by its peer: BrokenResourceError, not the end."""
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with await anyio.connect_tcp("127.0.0.1", port) as client:
            server = await listener.listeners[0].accept()  # type: ignore[attr-defined]
            raw = server.extra(anyio.abc.SocketAttribute.raw_socket)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            await server.send(ARCHIVE[:1000])
            await server.aclose()  # linger 0: a reset
            source = await open_source(client)
            try:
                with pytest.raises(SourceError, match="^read failed - the stream was closed by"):
                    await read_all(source)
            finally:
                await source.aclose()


# --- the interface ------------------------------------------------------------------------------


class MinimalSource(ArchiveSource):
    """Only the one required method: the defaults must carry a whole restore."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def read(self, max_bytes: int) -> bytes:
        await anyio.lowlevel.checkpoint()
        data, self._data = self._data[:max_bytes], self._data[max_bytes:]
        return data


async def test_a_source_with_only_read_restores() -> None:
    assert await restore_image(MinimalSource(ARCHIVE)) == IMAGE


async def test_defaults_refuse_random_access() -> None:
    source = MinimalSource(ARCHIVE)
    assert not source.seekable
    assert not source.blocking
    assert source.compression is None
    with pytest.raises(SourceError, match="^random access needs an uncompressed archive"):
        source.pread(0, 10)
    assert await source.skip(100) == 100
    await source.aclose()


# --- errors -------------------------------------------------------------------------------------


async def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as info:
        await VmaReader.open(tmp_path / "nope.vma")
    assert str(info.value) == f"can't open file {tmp_path / 'nope.vma'} - No such file or directory"


async def test_bad_fd() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(SourceError, match=f"^can't open file {fd} - Bad file descriptor$"):
        await open_source(fd)


async def test_not_an_archive(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"just some text\n" * 2000)
    with pytest.raises(BadMagicError) as info:
        await VmaReader.open(p)
    assert str(info.value) == "not a vma file - wrong magic number"
