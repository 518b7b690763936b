"""VmaWriter end to end, under asyncio, uvloop and trio (see conftest.py).

Every archive is read back by dissect.archive (an independent reader) and its
structure checked extent by extent; device bytes and configs must be equal.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import threading
import traceback
import uuid as uuid_mod
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest
import zstandard

from tests.harness import FdLeakCheck, produce
from tests.helpers_dissect import check_structure, chunks, read_with_dissect
from tests.writer_model import ReferenceWriterModel
from vma_async import (
    BLOCK_SIZE,
    CLUSTER_SIZE,
    ClusterRangeError,
    CommandFailedError,
    CommandTarget,
    FdTarget,
    InvalidStreamError,
    NewFileTarget,
    OpenStreamError,
    SourceError,
    TargetError,
    TargetExistsError,
    VmaWriter,
    WriterAbortedError,
)
from vma_async._assembler import WRITER_EXTENT_SIZE
from vma_async._writer import PACK_GROUP, ClusterRead

pytestmark = pytest.mark.anyio

CLUSTER = CLUSTER_SIZE
BLOCK = BLOCK_SIZE
UUID = uuid_mod.UUID("c0ffee00-1234-5678-9abc-def012345678")
CTIME = 1_234_567_890
CONFIGS = {"qemu-server.conf": b"memory: 2048\ncores: 2\n", "qemu-server.fw": b"[OPTIONS]\n"}


def make_image(size: int, kind: str, rng: random.Random) -> bytes:
    if kind == "zero":
        return bytes(size)
    if kind == "random":
        return rng.randbytes(size)
    blocks = (size + BLOCK - 1) // BLOCK
    mixed = b"".join(
        bytes(BLOCK) if rng.random() < 0.5 else rng.randbytes(BLOCK) for _ in range(blocks)
    )
    return mixed[:size]


def assert_archive(archive: bytes, images: dict[str, bytes], configs: dict[str, bytes]) -> None:
    check_structure(archive)
    got_configs, devices = read_with_dissect(archive)
    assert got_configs == configs
    assert devices.keys() == images.keys()
    for name, data in images.items():
        assert devices[name] == data, name


SIZES = [1, 4095, 4096, 4097, 65535, 65536, 65537, 3 * CLUSTER + 5 * BLOCK, 5 * CLUSTER - 1]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["zero", "random", "mixed"])
async def test_one_device(tmp_path: Path, size: int, kind: str) -> None:
    images = {"drive-scsi0": make_image(size, kind, random.Random(size))}
    path = tmp_path / "one.vma"
    async with VmaWriter.open(path) as writer:
        await produce(writer, images, producers=1)
    assert_archive(path.read_bytes(), images, {})


async def test_three_devices_with_configs_and_vmstate(tmp_path: Path) -> None:
    rng = random.Random(3)
    images = {
        "drive-virtio0": make_image(7 * CLUSTER + 3, "mixed", rng),
        "drive-scsi1": make_image(1, "random", rng),
        "drive-efidisk0": make_image(2 * CLUSTER, "zero", rng),
        "vmstate": make_image(3 * CLUSTER + 17, "random", rng),
    }
    path = tmp_path / "three.vma"
    async with VmaWriter.open(path, uuid=UUID) as writer:
        for name, data in CONFIGS.items():
            writer.add_config(f"/etc/pve/qemu-server/{name}", data)
        await produce(writer, images)
    assert_archive(path.read_bytes(), images, CONFIGS)
    status = writer.status()
    assert status.uuid == UUID
    assert status.closed
    assert status.error is None
    assert [(s.name, s.transferred, s.finished) for s in status.streams] == [
        ("drive-virtio0", 7 * CLUSTER + 3, True),
        ("drive-scsi1", 1, True),
        ("drive-efidisk0", 2 * CLUSTER, True),
        ("vmstate", 4 * CLUSTER, True),
    ]
    assert status.streams[2].zero_bytes == 2 * CLUSTER
    assert status.streams[1].zero_bytes == 15 * BLOCK


async def test_twenty_devices_four_producers_shuffled(tmp_path: Path) -> None:
    rng = random.Random(20)
    kinds = ["zero", "random", "mixed"]
    images = {
        f"disk{i}": make_image(
            rng.choice([*SIZES, rng.randrange(1, 6 * CLUSTER)]), kinds[i % 3], rng
        )
        for i in range(20)
    }
    path = tmp_path / "twenty.vma"
    async with VmaWriter.open(path, buffer_count=2) as writer:
        writer.add_config("qemu-server.conf", CONFIGS["qemu-server.conf"])
        await produce(writer, images, producers=4, seed=7)
    assert_archive(path.read_bytes(), images, {"qemu-server.conf": CONFIGS["qemu-server.conf"]})
    assert writer.stats.buffered_bytes_high_water <= writer.stats.bound


async def test_awaited_open_drains_inline(tmp_path: Path) -> None:
    rng = random.Random(5)
    images = {f"d{i}": make_image(40 * CLUSTER + i, "mixed", rng) for i in range(3)}
    path = tmp_path / "inline.vma"
    writer = await VmaWriter.open(path, buffer_count=2)
    await produce(writer, images, producers=4)
    await writer.aclose()
    assert_archive(path.read_bytes(), images, {})
    assert writer.stats.extents_written == 4  # header, 58 + 58 + 4 clusters
    assert writer.stats.buffered_bytes == 0


async def test_bytes_identical_to_the_reference_model(tmp_path: Path) -> None:
    rng = random.Random(11)
    images = {
        "a": make_image(130 * CLUSTER + 5, "mixed", rng),
        "b": make_image(3000, "random", rng),
    }
    model = ReferenceWriterModel(UUID.bytes, CTIME)
    path = tmp_path / "model.vma"
    async with VmaWriter.open(path, uuid=UUID, ctime=CTIME) as writer:
        for name, data in CONFIGS.items():
            writer.add_config(name, data)
            model.add_config(name, data)
        for name, data in images.items():
            assert writer.register_stream(name, len(data)) == model.register_stream(name, len(data))
        for dev_id, data in enumerate(images.values(), 1):
            for c, chunk in enumerate(chunks(data)):
                await writer.write(dev_id, c, chunk)
                model.write(dev_id, c, chunk)
        for dev_id in (1, 2):
            model.close_stream(dev_id, await writer.close_stream(dev_id))
    assert path.read_bytes() == bytes(model.out)


async def test_archive_without_streams(tmp_path: Path) -> None:
    flushed, closed_only = tmp_path / "flushed.vma", tmp_path / "closed.vma"
    async with VmaWriter.open(flushed, uuid=UUID, ctime=CTIME) as writer:
        writer.add_config("qemu-server.conf", b"x")
        await writer.flush()
    async with VmaWriter.open(closed_only, uuid=UUID, ctime=CTIME) as writer:
        writer.add_config("qemu-server.conf", b"x")
    model = ReferenceWriterModel(UUID.bytes, CTIME)
    model.add_config("qemu-server.conf", b"x")
    model.flush()
    assert flushed.read_bytes() == closed_only.read_bytes() == bytes(model.out)
    assert read_with_dissect(flushed.read_bytes()) == ({"qemu-server.conf": b"x"}, {})


# --- targets other than a new file -------------------------------------------------


async def test_exec_into_zstd(tmp_path: Path, fd_leaks: FdLeakCheck) -> None:
    rng = random.Random(8)
    images = {
        "d0": make_image(20 * CLUSTER + 9, "mixed", rng),
        "d1": make_image(CLUSTER, "random", rng),
    }
    out = tmp_path / "backup.vma.zst"
    fds = fd_leaks.snapshot()
    async with VmaWriter.open(f"exec:zstd -q -o {out}") as writer:
        writer.add_config("qemu-server.conf", b"cfg")
        await produce(writer, images)
    fd_leaks.assert_same(fds)
    archive = zstandard.ZstdDecompressor().stream_reader(out.read_bytes()).read()
    assert_archive(archive, images, {"qemu-server.conf": b"cfg"})


async def test_fifo_read_by_another_process(tmp_path: Path) -> None:
    fifo, out = tmp_path / "fifo", tmp_path / "out.vma"
    os.mkfifo(fifo)
    images = {"d": make_image(50 * CLUSTER + 1, "mixed", random.Random(9))}
    with out.open("wb") as sink:
        cat = await anyio.open_process(["cat", str(fifo)], stdout=sink)
    async with cat:
        async with VmaWriter.open(fifo) as writer:
            await produce(writer, images)
        with anyio.fail_after(10):
            assert await cat.wait() == 0
    assert_archive(out.read_bytes(), images, {})


async def test_slow_pipe_backpressure_bounds_memory() -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    images = {f"d{i}": make_image(60 * CLUSTER, "random", random.Random(i)) for i in range(3)}
    received = bytearray()

    async with (
        anyio.create_task_group() as tg,
        VmaWriter.open(FdTarget(write_end), buffer_count=2) as writer,
    ):

        async def slow_reader() -> None:
            # Start reading only once a producer has been made to wait.
            with anyio.fail_after(30):
                while writer.stats.producer_waits == 0:
                    await anyio.lowlevel.checkpoint()
            while True:
                await anyio.wait_readable(read_end)
                try:
                    chunk = os.read(read_end, 4096)
                except BlockingIOError:
                    continue
                if not chunk:
                    return
                received.extend(chunk)

        tg.start_soon(slow_reader)
        await produce(writer, images, producers=4)
    # FdTarget closed write_end (closefd=True), so slow_reader saw EOF
    os.close(read_end)

    stats = writer.stats
    assert stats.producer_waits > 0
    assert stats.buffered_bytes_high_water <= stats.bound == 2 * stats.buffer_size
    assert stats.buffered_bytes_high_water > WRITER_EXTENT_SIZE  # the whole pool was in use
    assert stats.bytes_written == len(received)
    assert_archive(bytes(received), images, {})


# --- failures ------------------------------------------------------------------------

last_writer: list[VmaWriter] = []


async def write_archive(target: str | int, clusters: int) -> None:
    """One random disk of ``clusters`` clusters, written and closed."""
    async with VmaWriter.open(target) as writer:
        last_writer[:] = [writer]
        writer.register_stream("d", clusters * CLUSTER)
        for c in range(clusters):
            await writer.write(1, c, os.urandom(CLUSTER))
        await writer.close_stream(1)


async def test_existing_target_is_never_overwritten(tmp_path: Path, fd_leaks: FdLeakCheck) -> None:
    path = tmp_path / "exists.vma"
    path.write_bytes(b"precious")
    fds = fd_leaks.snapshot()
    with pytest.raises(TargetExistsError, match=f"^can't open file {path} - File exists$"):
        await VmaWriter.open(path)
    assert path.read_bytes() == b"precious"
    fd_leaks.assert_same(fds)


async def test_invalid_call_aborts_and_sticks(tmp_path: Path, fd_leaks: FdLeakCheck) -> None:
    path = tmp_path / "bad.vma"
    fds = fd_leaks.snapshot()
    writer = await VmaWriter.open(path)
    writer.register_stream("d", CLUSTER)
    await writer.write(1, 0, None)
    with pytest.raises(InvalidStreamError, match="^vma_writer_write: no such stream 2$"):
        await writer.write(2, 0, None)
    assert not path.exists()
    fd_leaks.assert_same(fds)
    error = writer.status().error
    assert isinstance(error, InvalidStreamError)
    for call in (writer.write(1, 0, None), writer.close_stream(1), writer.flush(), writer.aclose()):
        with pytest.raises(InvalidStreamError, match="no such stream 2$") as info:
            await call
        assert info.value.__cause__ is error  # a fresh error, chained to the sticky one


async def test_close_with_open_stream_removes_the_file(
    tmp_path: Path, fd_leaks: FdLeakCheck
) -> None:
    path = tmp_path / "open.vma"
    fds = fd_leaks.snapshot()

    async def leave_b_open() -> None:
        async with VmaWriter.open(path) as writer:
            writer.register_stream("a", CLUSTER)
            writer.register_stream("b", CLUSTER)
            await writer.write(1, 0, b"x")
            await writer.close_stream(1)

    with pytest.raises(OpenStreamError, match="^vma_writer_close: detected open stream 'b'$"):
        await leave_b_open()
    assert not path.exists()
    fd_leaks.assert_same(fds)


async def test_producer_that_raises_aborts(tmp_path: Path, fd_leaks: FdLeakCheck) -> None:
    path = tmp_path / "raises.vma"
    fds = fd_leaks.snapshot()

    async def failing_producer(writer: VmaWriter, dev_id: int) -> None:
        for c in range(30):
            await writer.write(dev_id, c, os.urandom(CLUSTER))
        raise ValueError("disk read failed")

    async def good_producer(writer: VmaWriter, dev_id: int) -> None:
        for c in range(100):
            await writer.write(dev_id, c, os.urandom(CLUSTER))

    with pytest.RaisesGroup(ValueError):
        async with VmaWriter.open(path) as writer:
            bad, good = (
                writer.register_stream("bad", 100 * CLUSTER),
                writer.register_stream("ok", 100 * CLUSTER),
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(failing_producer, writer, bad)
                tg.start_soon(good_producer, writer, good)
    assert not path.exists()
    fd_leaks.assert_same(fds)
    error = writer.status().error
    assert isinstance(error, WriterAbortedError)
    # The producer's failure is the reason, unless the other producer was
    # cancelled in the middle of an output write first (then that is).
    cause = error.__cause__
    if isinstance(cause, anyio.get_cancelled_exc_class()):
        assert str(error) == "vma archive aborted: cancelled"
    else:
        assert str(error) == f"vma archive aborted: {cause!r}"
        assert pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="^disk read failed$")).matches(
            cause
        )
    with pytest.raises(WriterAbortedError):
        await writer.write(good, 99, None)


@pytest.mark.parametrize("target_kind", ["file", "exec"])
async def test_cancellation_in_the_middle(
    tmp_path: Path, target_kind: str, fd_leaks: FdLeakCheck
) -> None:
    path = tmp_path / "cancelled.vma"
    target = CommandTarget(f"cat > {tmp_path / 'piped'}") if target_kind == "exec" else path
    fds = fd_leaks.snapshot()
    with anyio.CancelScope() as scope:
        async with VmaWriter.open(target) as writer:
            dev_id = writer.register_stream("d", 500 * CLUSTER)
            for c in range(500):
                await writer.write(dev_id, c, os.urandom(CLUSTER))
                if c == 150:
                    scope.cancel()
    assert scope.cancelled_caught
    assert not path.exists()
    fd_leaks.assert_same(fds)
    assert isinstance(writer.status().error, WriterAbortedError)
    assert str(writer.status().error) == "vma archive aborted: cancelled"
    if isinstance(target, CommandTarget):
        assert target.returncode == -15  # SIGTERM, and reaped
        assert not await anyio.Path(f"/proc/{target.pid}").exists()


async def test_failing_command_at_close(tmp_path: Path, fd_leaks: FdLeakCheck) -> None:
    fds = fd_leaks.snapshot()
    command = "cat > /dev/null; exit 3"
    writer = await VmaWriter.open(f"exec:{command}")
    writer.register_stream("d", CLUSTER)
    await writer.write(1, 0, b"data")
    await writer.close_stream(1)
    with pytest.raises(CommandFailedError, match=f"^command '{command}' exited with status 3$"):
        await writer.aclose()
    assert isinstance(writer.status().error, CommandFailedError)
    fd_leaks.assert_same(fds)


async def test_command_that_exits_early(fd_leaks: FdLeakCheck) -> None:
    fds = fd_leaks.snapshot()
    with pytest.raises(CommandFailedError, match="^command 'exit 4' exited with status 4$"):
        await write_archive("exec:exit 4", 200)
    fd_leaks.assert_same(fds)


async def test_output_error_is_sticky() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    with pytest.raises(TargetError, match="^vma_queue_write: write error - Broken pipe$"):
        await write_archive(write_end, 100)
    with pytest.raises(TargetError, match="^vma_queue_write: write error - Broken pipe$"):
        await last_writer[0].write(1, 0, None)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(write_end)  # an int fd is the writer's to close (closefd=True)


async def test_sticky_error_is_raised_fresh_each_time(tmp_path: Path) -> None:
    """Defect 3: every later call raises a new error chained to the first;
    re-raising the first object grew its traceback by some frames per call."""
    writer = await VmaWriter.open(tmp_path / "a.vma")
    dev_id = writer.register_stream("d", CLUSTER)
    with pytest.raises(ClusterRangeError) as first:
        await writer.write(dev_id, 5, None)
    assert writer.status().error is first.value
    first_frames = len(traceback.extract_tb(first.value.__traceback__))
    raised: list[BaseException] = []
    for _ in range(5):
        with pytest.raises(ClusterRangeError, match=re.escape(str(first.value))) as later:
            await writer.write(dev_id, 0, None)
        raised.append(later.value)
        assert later.value is not first.value
        assert later.value.__cause__ is first.value
    assert len(traceback.extract_tb(first.value.__traceback__)) == first_frames
    frames = {len(traceback.extract_tb(e.__traceback__)) for e in raised}
    assert len(frames) == 1  # each fresh error has the same, short traceback
    with pytest.raises(ClusterRangeError):
        await writer.aclose()
    assert not (tmp_path / "a.vma").exists()


async def test_error_after_close_inside_the_block_keeps_the_archive(tmp_path: Path) -> None:
    path = tmp_path / "kept.vma"
    images = {"d": make_image(3 * CLUSTER, "random", random.Random(4))}
    opened: list[VmaWriter] = []

    async def close_then_fail() -> None:
        async with VmaWriter.open(path) as writer:
            opened.append(writer)
            await produce(writer, images)
            await writer.aclose()
            raise KeyError("after the archive was complete")

    with pytest.raises(KeyError):
        await close_then_fail()
    assert opened[0].status().error is None
    assert_archive(path.read_bytes(), images, {})


# --- regressions: issue 8 (open/close shape, checkpoints, blocking calls) ---------------------


async def test_public_constructor_is_not_a_trap(tmp_path: Path) -> None:
    """``VmaWriter(target)`` made a writer whose target nobody opened; it failed
    later with "Bad file descriptor".  Now it fails at once, saying what to use."""
    path = tmp_path / "trap.vma"
    with pytest.raises(TypeError, match=r"no public constructor: use `async with VmaWriter\.open"):
        VmaWriter(NewFileTarget(path))
    assert not path.exists()


@pytest.mark.parametrize("style", ["await-aclose", "async-with", "await-then-async-with"])
async def test_one_way_to_open_and_close(tmp_path: Path, style: str) -> None:
    path = tmp_path / "a.vma"
    images = {"d": make_image(70 * CLUSTER, "mixed", random.Random(1))}
    if style == "async-with":
        async with VmaWriter.open(path) as writer:
            await produce(writer, images, producers=2)
    elif style == "await-then-async-with":
        writer = await VmaWriter.open(path)
        async with writer:
            await produce(writer, images, producers=2)
    else:
        writer = await VmaWriter.open(path)
        await produce(writer, images, producers=2)
        await writer.aclose()
        await writer.aclose()  # idempotent after success
    assert_archive(path.read_bytes(), images, {})


async def test_cancelled_aclose_still_closes_ungracefully(
    tmp_path: Path, fd_leaks: FdLeakCheck
) -> None:
    """trio's AsyncResource rule: a cancelled aclose aborts (no file that
    looks complete, no fd), and later calls say the archive was aborted."""
    path = tmp_path / "c.vma"
    fds = fd_leaks.snapshot()
    writer = await VmaWriter.open(path)
    dev_id = writer.register_stream("d", 3 * CLUSTER)
    for cluster in range(3):
        await writer.write(dev_id, cluster, b"x" * CLUSTER)
    await writer.close_stream(dev_id)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await writer.aclose()
    assert scope.cancelled_caught
    assert not path.exists()
    fd_leaks.assert_same(fds)
    with pytest.raises(WriterAbortedError, match="^vma archive aborted: cancelled$"):
        await writer.aclose()


async def test_write_is_a_schedule_point_every_call(tmp_path: Path) -> None:
    """Defect 9: a producer writing in a loop (fast path: room in the open
    extent, lock free) let other tasks run only every 16th call."""
    writer = await VmaWriter.open(tmp_path / "s.vma")
    dev_id = writer.register_stream("d", 64 * CLUSTER)
    written = 0
    seen: list[int] = []
    done = False

    async def observer() -> None:
        while not done:
            seen.append(written)
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(observer)
        await anyio.lowlevel.checkpoint()  # let the observer start
        for cluster in range(64):
            await writer.write(dev_id, cluster, b"\x01" * CLUSTER)
            written += 1
        done = True
    await writer.close_stream(dev_id)
    await writer.aclose()
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert max(gaps) <= 2, f"the writing task ran {max(gaps)} writes without yielding"


async def test_write_is_a_cancel_point_before_it_queues(tmp_path: Path) -> None:
    """A write cancelled at its checkpoint has queued nothing: the archive goes on."""
    path = tmp_path / "k.vma"
    images = {"d": b"\x02" * (2 * CLUSTER)}
    writer = await VmaWriter.open(path)
    dev_id = writer.register_stream("d", 2 * CLUSTER)
    await writer.write(dev_id, 0, images["d"][:CLUSTER])
    with anyio.CancelScope() as scope:
        scope.cancel()
        await writer.write(dev_id, 1, images["d"][CLUSTER:])
    assert scope.cancelled_caught
    assert writer.status().streams[0].transferred == CLUSTER
    await writer.write(dev_id, 1, images["d"][CLUSTER:])
    await writer.close_stream(dev_id)
    await writer.aclose()
    assert_archive(path.read_bytes(), images, {})


async def test_open_stats_the_path_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 8: telling a FIFO from a new path took an os.stat on the loop
    (a hung NFS mount would stall every task)."""
    loop_thread = threading.get_ident()
    threads: list[int] = []
    real_stat = os.stat

    def recording_stat(*args: Any, **kwargs: Any) -> os.stat_result:
        threads.append(threading.get_ident())
        return real_stat(*args, **kwargs)

    monkeypatch.setattr(os, "stat", recording_stat)
    writer = await VmaWriter.open(tmp_path / "t.vma")
    monkeypatch.undo()
    await writer.aclose()
    assert threads, "os.stat was not called at all"
    assert loop_thread not in threads


# --- the output thread (issue 10) ------------------------------------------------------------


class _RecordingFileTarget(NewFileTarget):
    """A new file whose blocking writes note the thread they ran on, and can
    be held (``hold`` clear) to keep extents queued behind one in progress."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.threads: set[str] = set()
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()

    def _write_blocking(self, buffer: Any, start: int, end: int) -> None:
        self.threads.add(threading.current_thread().name)
        self.started.set()
        self.hold.wait()
        super()._write_blocking(buffer, start, end)


def _output_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vma-output"]


@pytest.mark.parametrize("with_task", [True, False], ids=["async-with", "awaited"])
async def test_a_file_is_written_by_the_output_thread_byte_for_byte(
    tmp_path: Path, fd_leaks: FdLeakCheck, with_task: bool
) -> None:
    """Extents of a regular file go through the writer's own thread, whether
    or not the writer has a background task, and the archive is the same
    bytes as one written through a pipe (the event-loop path)."""
    fds = fd_leaks.snapshot()
    rng = random.Random(5)
    images = {
        "drive-scsi0": make_image(300 * CLUSTER + 512, "mixed", rng),
        "drive-scsi1": make_image(130 * CLUSTER, "random", rng),
    }
    target = _RecordingFileTarget(tmp_path / "file.vma")
    if with_task:
        async with VmaWriter.open(target, uuid=UUID, ctime=CTIME) as writer:
            await produce(writer, images, producers=1)
    else:
        writer = await VmaWriter.open(target, uuid=UUID, ctime=CTIME)
        await produce(writer, images, producers=1)
        await writer.aclose()
    assert target.threads == {"vma-output"}
    assert writer.stats.extents_written > 5
    assert _output_threads() == []

    read_end, write_end = os.pipe()
    received = bytearray()

    async def drain() -> None:
        while chunk := await anyio.to_thread.run_sync(os.read, read_end, 1 << 20):
            received.extend(chunk)

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain)
        async with VmaWriter.open(write_end, uuid=UUID, ctime=CTIME) as piped:
            await produce(piped, images, producers=1)
    os.close(read_end)
    file_bytes = (tmp_path / "file.vma").read_bytes()
    assert file_bytes == bytes(received)
    assert_archive(file_bytes, images, {})
    fd_leaks.assert_same(fds)


async def test_cancelled_with_writes_queued_stops_the_output_thread(
    tmp_path: Path, fd_leaks: FdLeakCheck
) -> None:
    """Cancelled while the thread is in one write with more queued behind
    it: the abort waits for that write, skips the rest, removes the partial
    archive, and leaves no thread and no fd (its wake-up pipe included)."""
    fds = fd_leaks.snapshot()
    target = _RecordingFileTarget(tmp_path / "a.vma")
    target.hold.clear()
    images = {"drive-scsi0": make_image(400 * CLUSTER, "random", random.Random(1))}
    with anyio.CancelScope() as scope:
        async with (
            VmaWriter.open(target, uuid=UUID, ctime=CTIME) as writer,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(produce, writer, images)
            await anyio.to_thread.run_sync(target.started.wait)
            while writer.stats.producer_waits == 0:  # the pool is full: extents queued
                await anyio.lowlevel.checkpoint()
            scope.cancel()
            target.hold.set()
    assert scope.cancelled_caught
    assert writer.stats.extents_written == 0  # nothing was collected as written
    assert not (tmp_path / "a.vma").exists()
    assert _output_threads() == []
    assert isinstance(writer.status().error, WriterAbortedError)
    fd_leaks.assert_same(fds)


async def test_a_write_error_in_the_output_thread_aborts_with_the_targets_message(
    tmp_path: Path, fd_leaks: FdLeakCheck
) -> None:
    fds = fd_leaks.snapshot()

    class FailingTarget(NewFileTarget):
        writes = 0

        def _write_file(self, data: memoryview) -> None:
            raise OSError(5, "Input/output error")

        def _write_direct(self, buffer: Any, head: int, end: int) -> None:
            FailingTarget.writes += 1
            if FailingTarget.writes == 3:
                raise OSError(5, "Input/output error")
            super()._write_direct(buffer, head, end)

    data = make_image(400 * CLUSTER, "random", random.Random(2))

    async def back_up() -> None:
        async with VmaWriter.open(FailingTarget(tmp_path / "a.vma"), uuid=UUID) as writer:
            dev_id = writer.register_stream("drive-scsi0", len(data))
            await writer.write_clusters(dev_id, 0, data)
            await writer.close_stream(dev_id)

    with pytest.raises(TargetError, match=r"^vma_queue_write: write error - Input/output error$"):
        await back_up()
    assert not (tmp_path / "a.vma").exists()
    assert _output_threads() == []
    fd_leaks.assert_same(fds)


# --- write_clusters_from: reading and packing in one worker thread --------------------------


async def test_write_clusters_from_writes_what_write_clusters_writes(tmp_path: Path) -> None:
    """Two disks, interleaving: one through ``write_clusters``, one through
    ``write_clusters_from`` whose ``read`` says "wait" now and then; the
    other way round gives the same archive, byte for byte, and dissect
    restores both.  ``read`` runs in a worker thread, under the lock, and
    is asked for at most PACK_GROUP clusters, never more than the extent takes."""
    rng = random.Random(7)
    images = {
        "drive-scsi0": make_image(150 * CLUSTER + 3000, "mixed", rng),
        "drive-scsi1": make_image(90 * CLUSTER, "random", rng),
    }
    asks: list[tuple[int, bool, bool]] = []

    def reader(writer: VmaWriter, data: bytes) -> ClusterRead:
        calls = itertools.count()

        def read(cluster_num: int, n: int) -> tuple[bytes, None] | None:
            asks.append(
                (n, threading.current_thread() is threading.main_thread(), writer._lock.locked())
            )
            if next(calls) % 3 == 2:
                return None  # not at hand: the producer calls again
            return data[cluster_num * CLUSTER : (cluster_num + n) * CLUSTER], None

        return read

    async def back_up(path: Path, from_reader: str) -> bytes:
        async with VmaWriter.open(path, uuid=UUID, ctime=CTIME) as writer:
            ids = {name: writer.register_stream(name, len(data)) for name, data in images.items()}

            async def one(name: str, data: bytes) -> None:
                count = -(-len(data) // CLUSTER)
                for first in range(0, count, 20):
                    n = min(20, count - first)
                    if name == from_reader:
                        read = reader(writer, data)
                        done = 0
                        while done < n:
                            done += await writer.write_clusters_from(
                                ids[name], first + done, n - done, read
                            )
                    else:
                        chunk = data[first * CLUSTER : (first + n) * CLUSTER]
                        await writer.write_clusters(ids[name], first, chunk)
                await writer.close_stream(ids[name])

            async with anyio.create_task_group() as tg:
                for name, data in images.items():
                    tg.start_soon(one, name, data)
        return await anyio.Path(path).read_bytes()

    first = await back_up(tmp_path / "a.vma", "drive-scsi0")
    second = await back_up(tmp_path / "b.vma", "drive-scsi1")
    assert_archive(first, images, {})
    assert_archive(second, images, {})
    assert asks
    assert all(1 <= n <= PACK_GROUP for n, _, _ in asks)
    assert not any(in_main for _, in_main, _ in asks)
    assert all(locked for _, _, locked in asks)


@pytest.mark.parametrize("target", ["file", "exec"])
async def test_write_clusters_from_queues_everything_when_read_never_waits(
    tmp_path: Path, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two producers taking turns on the lock: a call whose ``read`` never
    says wait queues all its clusters, whatever the other producer did to
    the open extent in between (a full extent sealed by the other producer
    once looked like a wait).  Into a file (written by the output thread) the
    worker thread rolls over to the next extent itself; into a command it
    never does (sealed extents there are written by the event loop)."""
    rng = random.Random(10)
    images = {f"drive-scsi{n}": make_image(300 * CLUSTER, "random", rng) for n in range(2)}
    returned: list[tuple[int, int]] = []
    rolls: list[bool] = []
    real_roll_over = VmaWriter._roll_over

    def counting_roll_over(self: VmaWriter) -> bool:
        rolls.append(real_roll_over(self))
        return rolls[-1]

    monkeypatch.setattr(VmaWriter, "_roll_over", counting_roll_over)
    path = tmp_path / "a.vma"
    out = str(path) if target == "file" else f"exec:cat > {path}"
    async with VmaWriter.open(out, uuid=UUID, ctime=CTIME) as writer:
        ids = {name: writer.register_stream(name, len(data)) for name, data in images.items()}

        async def one(name: str, data: bytes) -> None:
            def read(cluster_num: int, n: int) -> tuple[bytes, None]:
                return data[cluster_num * CLUSTER : (cluster_num + n) * CLUSTER], None

            for first in range(0, 300, 150):  # more than an extent per call
                queued = await writer.write_clusters_from(ids[name], first, 150, read)
                returned.append((queued, 150))
            await writer.close_stream(ids[name])

        async with anyio.create_task_group() as tg:
            for name, data in images.items():
                tg.start_soon(one, name, data)
    assert returned == [(150, 150)] * 4
    assert_archive(await anyio.Path(path).read_bytes(), images, {})
    assert any(rolls) is (target == "file")


async def test_an_abort_while_write_clusters_from_reads_stops_it(
    tmp_path: Path, fd_leaks: FdLeakCheck
) -> None:
    """The archive is aborted (from the event loop) while the worker thread
    is in ``read``: the call raises the sticky error, the file is removed,
    and no thread or fd is left."""
    fds = fd_leaks.snapshot()
    data = make_image(200 * CLUSTER, "random", random.Random(11))

    async def back_up() -> None:
        async with VmaWriter.open(tmp_path / "a.vma", uuid=UUID) as writer:
            dev_id = writer.register_stream("drive-scsi0", len(data))

            def read(cluster_num: int, n: int) -> tuple[bytes, None]:
                if cluster_num >= 100:
                    anyio.from_thread.run(writer.abort)
                return data[cluster_num * CLUSTER : (cluster_num + n) * CLUSTER], None

            await writer.write_clusters_from(dev_id, 0, 200, read)

    with pytest.raises(WriterAbortedError, match=r"^vma archive aborted$"):
        await back_up()
    assert not (tmp_path / "a.vma").exists()
    assert _output_threads() == []
    fd_leaks.assert_same(fds)


async def test_write_clusters_from_returns_how_many_were_queued(tmp_path: Path) -> None:
    data = make_image(30 * CLUSTER, "random", random.Random(8))
    answers = iter([True, True, False])

    def read(cluster_num: int, n: int) -> tuple[bytes, list[bool]] | None:
        if not next(answers, True):
            return None
        return data[cluster_num * CLUSTER : (cluster_num + n) * CLUSTER], [True] * n

    async with VmaWriter.open(tmp_path / "a.vma", uuid=UUID, ctime=CTIME) as writer:
        dev_id = writer.register_stream("drive-scsi0", len(data))
        assert await writer.write_clusters_from(dev_id, 0, 30, read) == 2 * PACK_GROUP
        assert (
            await writer.write_clusters_from(dev_id, 2 * PACK_GROUP, 30 - 2 * PACK_GROUP, read)
            == 30 - 2 * PACK_GROUP
        )
        await writer.close_stream(dev_id)
    assert_archive((tmp_path / "a.vma").read_bytes(), {"drive-scsi0": data}, {})


async def test_write_clusters_from_fails_with_the_readers_error(tmp_path: Path) -> None:
    """An error raised by ``read`` in the worker thread aborts the archive
    and reaches the producer as it was raised."""

    def read(cluster_num: int, n: int) -> tuple[bytes, None] | None:
        raise SourceError(f"read error at cluster {cluster_num}")

    async def back_up() -> VmaWriter:
        async with VmaWriter.open(tmp_path / "a.vma", uuid=UUID) as writer:
            dev_id = writer.register_stream("drive-scsi0", 10 * CLUSTER)
            await writer.write_clusters_from(dev_id, 0, 10, read)
        return writer

    with pytest.raises(SourceError, match=r"^read error at cluster 0$"):
        await back_up()
    assert not (tmp_path / "a.vma").exists()


async def test_a_write_after_an_abort_raises_the_sticky_error_even_with_a_full_extent(
    tmp_path: Path,
) -> None:
    """An extent holds 58 clusters and is sealed only when a 59th comes: an
    abort in between released its buffer, and the next write must say the
    archive was aborted (it once failed an internal assertion)."""
    writer = await VmaWriter.open(tmp_path / "a.vma", uuid=UUID)
    dev_id = writer.register_stream("drive-scsi0", 100 * CLUSTER)
    await writer.write_clusters(dev_id, 0, make_image(58 * CLUSTER, "random", random.Random(9)))
    await writer.abort()
    for write in (
        writer.write_clusters(dev_id, 58, bytes(CLUSTER)),
        writer.write(dev_id, 58, bytes(CLUSTER)),
        writer.write_clusters_from(dev_id, 58, 1, lambda c, n: (bytes(CLUSTER), None)),
    ):
        with pytest.raises(WriterAbortedError, match=r"^vma archive aborted$"):
            await write
    assert not (tmp_path / "a.vma").exists()
