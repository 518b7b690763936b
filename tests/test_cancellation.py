"""Cancellation at every await point of a small backup and a small restore.

The harness counts the library's await points: every call it makes to
``anyio.lowlevel.checkpoint``/``checkpoint_if_cancelled``,
``anyio.to_thread.run_sync``, ``anyio.wait_readable``/``wait_writable``,
``anyio.sleep`` and a memory object stream's ``send``/``receive`` goes
through a counting wrapper (monkeypatched for the test).  A run with no
cancellation gives the count N; then, for every k in 1..N, the same run is
repeated and the wrapper cancels the operation's scope at the k-th point,
right before the real await, so the cancellation is delivered exactly there
(unless that point is shielded, as an abort's clean-up is: then at the next
unshielded one).

After every run the invariants are checked: no fd, task or child process
left; the writer's file is either a complete, correct archive (the run was
not cancelled) or gone; an ``exec:`` command's output never verifies as
complete unless the cancellation came after the last byte was handed to the
command; a cancelled restore leaves no file behind, a finished one restores
exactly.

The number of points covered is printed (``pytest -s``) and checked.
"""

from __future__ import annotations

import os
import random
import uuid as uuid_mod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from tests.harness import FdLeakCheck
from vma_async import (
    CLUSTER_SIZE,
    CallbackSink,
    CommandTarget,
    Sink,
    VmaError,
    VmaReader,
    VmaWriter,
    WriterAbortedError,
    _backup,
    backup_image,
    extract_archive,
)

pytestmark = pytest.mark.anyio

CLUSTER = CLUSTER_SIZE
UUID = uuid_mod.UUID(int=0xCA4CE1)


@dataclass
class CancelCounter:
    """Counts await points; cancels ``scope`` at the ``cancel_at``-th (1-based)."""

    cancel_at: int = 0
    count: int = 0
    scope: anyio.CancelScope | None = None
    fired: bool = False
    marks: dict[str, int] = field(default_factory=dict)

    def arm(self, cancel_at: int, scope: anyio.CancelScope) -> None:
        self.cancel_at, self.count, self.scope, self.fired = cancel_at, 0, scope, False
        self.marks.clear()

    def hit(self) -> None:
        if self.scope is None:
            return
        self.count += 1
        if self.count == self.cancel_at:
            self.fired = True
            self.scope.cancel()


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> CancelCounter:
    counter = CancelCounter()
    real_if_cancelled = anyio.lowlevel.checkpoint_if_cancelled

    def counted(real: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            counter.hit()
            await real_if_cancelled()  # a cancellation just requested lands here
            return await real(*args, **kwargs)

        return wrapper

    for module, name in [
        (anyio.lowlevel, "checkpoint"),
        (anyio.lowlevel, "checkpoint_if_cancelled"),
        (anyio.to_thread, "run_sync"),
        (anyio, "wait_readable"),
        (anyio, "wait_writable"),
        (anyio, "sleep"),
        (MemoryObjectSendStream, "send"),
        (MemoryObjectReceiveStream, "receive"),
    ]:
        monkeypatch.setattr(module, name, counted(getattr(module, name)))
    return counter


def assert_no_children() -> None:
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


@dataclass
class Coverage:
    runs: int = 0
    covered: int = 0
    """Runs in which the cancellation was requested at the chosen point."""
    cancelled: int = 0
    """Runs the cancellation stopped (the others were in shielded clean-up or
    past their last unshielded await)."""
    spread: int = 0
    """Most minus fewest await points of the runs not cancelled: how much
    thread or pipe timing varies the count.  A run cancelled at a point
    beyond its own count is not covered; every point up to the fewest is."""


async def sweep(
    counter: CancelCounter,
    operation: Callable[[], Awaitable[None]],
    check: Callable[[bool], Awaitable[None]],
    fd_leaks: FdLeakCheck,
) -> Coverage:
    """Run ``operation`` once uncancelled to count its await points, then once
    per point with a cancellation there; ``check(cancelled)`` after each."""
    coverage = Coverage()
    tasks = len(anyio.get_running_tasks())
    k = most = 0
    fewest: int | None = None
    while True:
        fds = fd_leaks.snapshot()
        with anyio.CancelScope() as scope:
            counter.arm(k, scope)
            try:
                await operation()
            finally:
                counter.scope = None
        assert counter.fired or not scope.cancelled_caught
        await check(scope.cancelled_caught)
        fd_leaks.assert_same(fds, f"fd leaked when cancelled at point {k}")
        assert len(anyio.get_running_tasks()) == tasks, f"task leaked at point {k}"
        assert_no_children()
        if not counter.fired:  # a cancelled run's count includes its shielded clean-up
            most = max(most, counter.count)  # a pipe's timing may add or skip a wait
            fewest = counter.count if fewest is None else min(fewest, counter.count)
        if k > 0:
            coverage.runs += 1
            coverage.covered += counter.fired
            coverage.cancelled += scope.cancelled_caught
        if k >= most:
            break
        k += 1
    coverage.spread = most - (fewest if fewest is not None else most)
    return coverage


# --- the writer ------------------------------------------------------------------------------


def _sparse(clusters: int, seed: int) -> bytes:
    """Mostly zero, one random 4 KiB block per 8 clusters: cheap to write and
    compare, yet long enough to span three extents with the other disk."""
    rng = random.Random(seed)
    image = bytearray(clusters * CLUSTER)
    for cluster in range(0, clusters, 8):
        image[cluster * CLUSTER : cluster * CLUSTER + 4096] = rng.randbytes(4096)
    return bytes(image)


IMAGES = {
    "drive-scsi0": random.Random(1).randbytes(40 * CLUSTER + 5000),
    "drive-virtio1": _sparse(120, 2)[: -CLUSTER // 2],
}
CONFIGS = {"qemu-server.conf": b"cores: 1\n"}


async def produce(writer: VmaWriter) -> None:
    """Two producers, one per disk, interleaving."""
    for name, data in CONFIGS.items():
        writer.add_config(name, data)

    ids = {name: writer.register_stream(name, len(data)) for name, data in IMAGES.items()}

    async def one(name: str, data: bytes) -> None:
        dev_id = ids[name]
        for cluster in range(-(-len(data) // CLUSTER)):
            await writer.write(dev_id, cluster, data[cluster * CLUSTER : (cluster + 1) * CLUSTER])
        await writer.close_stream(dev_id)

    async with anyio.create_task_group() as tg:
        for name, data in IMAGES.items():
            tg.start_soon(one, name, data)


async def restored_or_error(path: Path) -> dict[str, bytes] | VmaError:
    """The archive's devices, or the error a full verify-and-restore raises."""
    got = {name: bytearray(len(data)) for name, data in IMAGES.items()}

    def sink(buffer: bytearray) -> Sink:
        async def write(offset: int, data: memoryview) -> None:
            buffer[offset : offset + len(data)] = data

        return CallbackSink(write)

    try:
        async with await VmaReader.open(path) as reader:
            await reader.restore({name: sink(buffer) for name, buffer in got.items()})
    except VmaError as exc:
        return exc
    return {name: bytes(buffer) for name, buffer in got.items()}


WRITER_STYLES = ["async-with", "awaited", "exec"]


@pytest.mark.parametrize("style", WRITER_STYLES)
async def test_cancel_the_writer_at_every_point(
    counter: CancelCounter, tmp_path: Path, style: str, fd_leaks: FdLeakCheck
) -> None:
    path = tmp_path / "backup.vma"
    whole_outputs: list[int] = []

    async def backup() -> None:
        if style == "async-with":
            async with VmaWriter.open(path, uuid=UUID, buffer_count=2) as writer:
                await produce(writer)
            return
        target: Path | CommandTarget = path
        if style == "exec":
            target = CommandTarget(f"cat > {path}", kill_after=2)
        writer = await VmaWriter.open(target, uuid=UUID, buffer_count=2)
        try:
            await produce(writer)
            await writer.aclose()
        except BaseException as exc:
            await writer.abort(exc)
            raise

    async def check(cancelled: bool) -> None:
        exists = await anyio.Path(path).exists()
        if not cancelled:
            assert await restored_or_error(path) == IMAGES
        elif style != "exec":
            assert not exists, f"a cancelled writer left its file ({counter.cancel_at})"
        elif exists:
            # The command's output is not ours to remove.  Bytes already handed
            # to it cannot be called back: cancelled after the last extent went
            # into the pipe, the output may be whole, and then it must be right.
            result = await restored_or_error(path)
            if not isinstance(result, VmaError):
                assert result == IMAGES
                whole_outputs.append(counter.cancel_at)
        if exists:
            await anyio.Path(path).unlink()

    coverage = await sweep(counter, backup, check, fd_leaks)
    if style != "exec":  # a pipe's timing makes the exec run's count vary
        # The output thread's timing may add or skip a wait for a completion
        # (a few per run, at most one per extent): only the points past a
        # run's own count can go uncovered.
        assert coverage.runs - coverage.covered <= coverage.spread <= 8
    print(f"\nwriter {style}: {coverage}, whole exec outputs at points {whole_outputs}")
    assert coverage.cancelled > 0


@pytest.mark.parametrize("page_cache", ["holds the images", "says wait"])
async def test_cancel_backup_image_at_every_point(
    counter: CancelCounter,
    tmp_path: Path,
    page_cache: str,
    fd_leaks: FdLeakCheck,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``create``'s producers: ``backup_image`` of two image files at once,
    reading and packing in worker threads under the writer's lock, or (when
    no read may be done there without waiting) reading every group outside
    it first."""
    if page_cache == "says wait":
        monkeypatch.setattr(_backup, "_RWF_NOWAIT", 0)
    paths = {}
    for name, data in IMAGES.items():
        paths[name] = tmp_path / f"{name}.raw"
        await anyio.Path(paths[name]).write_bytes(data)
    path = tmp_path / "backup.vma"

    async def backup() -> None:
        async with VmaWriter.open(path, uuid=UUID, buffer_count=2) as writer:
            for name, data in CONFIGS.items():
                writer.add_config(name, data)
            ids = {name: writer.register_stream(name, len(data)) for name, data in IMAGES.items()}
            async with anyio.create_task_group() as tg:
                for name, image in paths.items():
                    tg.start_soon(backup_image, writer, ids[name], image)

    async def check(cancelled: bool) -> None:
        exists = await anyio.Path(path).exists()
        if cancelled:
            assert not exists, f"a cancelled backup left its file ({counter.cancel_at})"
        else:
            assert await restored_or_error(path) == IMAGES
            await anyio.Path(path).unlink()

    coverage = await sweep(counter, backup, check, fd_leaks)
    assert coverage.runs - coverage.covered <= coverage.spread <= 8
    print(f"\nbackup_image, page cache {page_cache}: {coverage}")
    assert coverage.cancelled > 0


async def test_a_cancelled_write_is_fatal_only_through_the_context_manager(
    counter: CancelCounter, tmp_path: Path
) -> None:
    """A cancelled ``write`` on an awaited writer leaves it usable (the archive
    can go on); leaving ``async with`` by cancellation aborts for good."""
    path = tmp_path / "b.vma"
    writer = await VmaWriter.open(path)
    dev_id = writer.register_stream("d", CLUSTER)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await writer.write(dev_id, 0, b"x")
    await writer.write(dev_id, 0, b"x")
    await writer.close_stream(dev_id)
    await writer.aclose()
    assert await restored_or_error(path) != {}
    await anyio.Path(path).unlink()
    with anyio.CancelScope() as scope:
        async with VmaWriter.open(path) as writer:
            dev_id = writer.register_stream("d", CLUSTER)
            scope.cancel()
            await writer.write(dev_id, 0, b"x")
    assert not await anyio.Path(path).exists()
    assert isinstance(writer.status().error, WriterAbortedError)
    assert str(writer.status().error) == "vma archive aborted: cancelled"


# --- the reader ------------------------------------------------------------------------------


@pytest.fixture
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "source.vma"

    async def make() -> None:
        async with VmaWriter.open(path, uuid=UUID) as writer:
            await produce(writer)

    anyio.run(make)
    return path


class ChunkStream(anyio.abc.ByteReceiveStream):
    """A byte stream fed by another task through a memory object stream."""

    def __init__(self, chunks: MemoryObjectReceiveStream[bytes]) -> None:
        self._chunks = chunks
        self._leftover = b""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._leftover:
            self._leftover = await self._chunks.receive()
        chunk, self._leftover = self._leftover[:max_bytes], self._leftover[max_bytes:]
        return chunk

    async def aclose(self) -> None:
        await self._chunks.aclose()


READER_STYLES = ["extract", "restore-stream", "verify"]


@pytest.mark.parametrize("style", READER_STYLES)
async def test_cancel_the_reader_at_every_point(
    counter: CancelCounter, tmp_path: Path, archive: Path, style: str, fd_leaks: FdLeakCheck
) -> None:
    out = tmp_path / "out"
    data = await anyio.Path(archive).read_bytes()
    restored: dict[str, bytearray] = {}

    async def restore() -> None:
        if style == "extract":
            await extract_archive(archive, out)
            return
        if style == "verify":
            async with await VmaReader.open(archive) as reader:
                await reader.verify()
            return
        send, receive = anyio.create_memory_object_stream[bytes](1)

        async def feed() -> None:
            async with send:
                for start in range(0, len(data), 100_000):
                    await send.send(data[start : start + 100_000])

        restored.clear()
        restored.update({name: bytearray(len(d)) for name, d in IMAGES.items()})

        def sink(buffer: bytearray) -> Sink:
            async def write(offset: int, chunk: memoryview) -> None:
                buffer[offset : offset + len(chunk)] = chunk

            return CallbackSink(write)

        async with anyio.create_task_group() as tg:
            tg.start_soon(feed)
            async with await VmaReader.open(ChunkStream(receive)) as reader:
                await reader.restore({name: sink(b) for name, b in restored.items()})

    async def check(cancelled: bool) -> None:
        if style == "extract":
            if cancelled:
                left = sorted(os.listdir(out)) if await anyio.Path(out).exists() else None
                assert left is None, f"a cancelled extract left {left} ({counter.cancel_at})"
            else:
                for name, image in IMAGES.items():
                    assert await anyio.Path(out / f"disk-{name}.raw").read_bytes() == image
                for name in os.listdir(out):
                    await anyio.Path(out / name).unlink()
                await anyio.Path(out).rmdir()
        elif style == "restore-stream" and not cancelled:
            assert {k: bytes(v) for k, v in restored.items()} == IMAGES

    coverage = await sweep(counter, restore, check, fd_leaks)
    assert coverage.covered == coverage.runs
    print(f"\nreader {style}: {coverage}")
    assert coverage.cancelled > 0
