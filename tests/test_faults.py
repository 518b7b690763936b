"""Injected faults: the output fails while writing, the input or a sink while reading.

Writing (each through :class:`VmaWriter` under asyncio, uvloop and trio):

* disk full: a file on a 1 MiB tmpfs, an ``exec:`` pipeline into
  ``/dev/full``, an fd on ``/dev/full``;
* a compressor that exits non-zero, is killed mid-stream, closes its stdin
  and exits 0, or closes its stdin and keeps running.

Each must raise an error naming the cause, leave no file the writer created,
no fd, and reap the child (``waitpid`` finds nothing left to reap).

Reading:

* EOF in the middle of an extent, a source whose reads fail mid-stream, an
  unreadable source;
* a sink that raises, a sink whose disk fills (a 1 MiB tmpfs).

Each must raise a clear error and stop; files the restore created are
removed.  ``extract_archive`` removes its ``tmp-disk-NAME.raw`` files, its
config files and the target directory it created: a failed extract leaves
nothing, so no partial image is ever renamed to ``disk-NAME.raw`` (see
docs/hardening.md).

The tmpfs is mounted by the tests (they run as root, in CI too).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import uuid as uuid_mod
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from tests.harness import FdLeakCheck
from vma_async import (
    CLUSTER_SIZE,
    CallbackSink,
    CommandFailedError,
    CommandTarget,
    RawFileSink,
    Sink,
    SinkError,
    SourceError,
    Target,
    TargetError,
    TruncatedArchiveError,
    VmaReader,
    VmaWriter,
    extract_archive,
)

pytestmark = pytest.mark.anyio

CLUSTER = CLUSTER_SIZE
ARCHIVE_CLUSTERS = 48
"""3 MiB of random data: more than the tmpfs, the pipe buffers and a head -c."""


def assert_no_children() -> None:
    """Nothing left to reap: every child the writer started was waited for."""
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a disk that fills up."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def payload(seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(CLUSTER) for _ in range(ARCHIVE_CLUSTERS)]


async def write_archive(target: str | os.PathLike[str] | int | Target) -> None:
    """One disk of random clusters, through ``async with`` (abort on error)."""
    async with VmaWriter.open(target, uuid=uuid_mod.UUID(int=7), ctime=1) as writer:
        writer.add_config("qemu-server.conf", b"cores: 1\n")
        dev_id = writer.register_stream("drive-scsi0", ARCHIVE_CLUSTERS * CLUSTER)
        for cluster, data in enumerate(payload()):
            await writer.write(dev_id, cluster, data)
        await writer.close_stream(dev_id)


# --- output faults while writing ----------------------------------------------------------------


async def test_disk_full_file_target(small_fs: Path, fd_leaks: FdLeakCheck) -> None:
    fds = fd_leaks.snapshot()
    path = small_fs / "backup.vma"
    with pytest.raises(TargetError) as caught:
        await write_archive(path)
    assert type(caught.value) is TargetError
    assert str(caught.value) == "vma_queue_write: write error - No space left on device"
    assert os.listdir(small_fs) == []  # the partial archive is gone, its space free again
    assert os.statvfs(small_fs).f_bfree == os.statvfs(small_fs).f_blocks
    fd_leaks.assert_same(fds)


async def test_disk_full_fd_target(fd_leaks: FdLeakCheck) -> None:
    fds = fd_leaks.snapshot()
    fd = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
    with pytest.raises(TargetError) as caught:
        await write_archive(fd)  # an int fd: the writer's to close (closefd=True)
    assert str(caught.value) == "vma_queue_write: write error - No space left on device"
    fd_leaks.assert_same(fds)


COMMAND_FAULTS = [
    pytest.param(
        "cat > /dev/full",
        CommandFailedError,
        "command 'cat > /dev/full' exited with status 1",
        1,
        id="disk-full-pipeline",
    ),
    pytest.param(
        "cat | cat > /dev/full",
        CommandFailedError,
        "command 'cat | cat > /dev/full' exited with status 1",
        1,
        id="disk-full-two-stage-pipeline",
    ),
    pytest.param(
        "gzip -1 > /dev/null; exit 3",
        CommandFailedError,
        "command 'gzip -1 > /dev/null; exit 3' exited with status 3",
        3,
        id="compressor-exits-non-zero",
    ),
    pytest.param(
        "head -c 100000 > /dev/null; kill -KILL $$",
        CommandFailedError,
        "command 'head -c 100000 > /dev/null; kill -KILL $$' was killed by signal 9 (SIGKILL)",
        -9,
        id="compressor-killed-mid-stream",
    ),
    pytest.param(
        "zstd -q -c > /dev/full",
        CommandFailedError,
        "command 'zstd -q -c > /dev/full' exited with status 70",
        70,
        id="compressor-disk-full",
    ),
    pytest.param(
        "head -c 100000 > /dev/null",
        TargetError,
        "vma_queue_write: write error - command 'head -c 100000 > /dev/null' closed its input",
        0,
        id="closes-stdin-early-and-exits-0",
    ),
    pytest.param(
        "exec 0<&-; sleep 60",
        TargetError,
        "vma_queue_write: write error - command 'exec 0<&-; sleep 60' closed its input",
        -15,
        id="closes-stdin-and-keeps-running",
    ),
]


@pytest.mark.parametrize(("command", "error", "message", "status"), COMMAND_FAULTS)
async def test_exec_target_faults(
    command: str, error: type[Exception], message: str, status: int, fd_leaks: FdLeakCheck
) -> None:
    fds = fd_leaks.snapshot()
    # kill_after bounds how long a child that stopped reading may linger
    # before it is terminated; it is not a synchronisation.
    target = CommandTarget(command, kill_after=0.5)
    with pytest.raises(error) as caught:
        await write_archive(target)
    assert type(caught.value) is error
    assert str(caught.value) == message
    assert target.returncode == status  # reaped, and the status is the one reported
    assert target.pid is not None
    assert not os.path.exists(f"/proc/{target.pid}")  # noqa: ASYNC240 - procfs, no I/O
    assert_no_children()
    fd_leaks.assert_same(fds)


async def test_exec_child_killed_from_outside_before_any_data(fd_leaks: FdLeakCheck) -> None:
    fds = fd_leaks.snapshot()
    target = CommandTarget("cat > /dev/null")

    async def backup() -> None:
        async with VmaWriter.open(target) as writer:
            assert target.pid is not None
            os.kill(target.pid, 9)
            dev_id = writer.register_stream("d", ARCHIVE_CLUSTERS * CLUSTER)
            for cluster, data in enumerate(payload()):
                await writer.write(dev_id, cluster, data)
            await writer.close_stream(dev_id)

    with pytest.raises(CommandFailedError) as caught:
        await backup()
    assert str(caught.value) == "command 'cat > /dev/null' was killed by signal 9 (SIGKILL)"
    assert target.returncode == -9
    assert_no_children()
    fd_leaks.assert_same(fds)


# --- input faults while reading -----------------------------------------------------------------


@pytest.fixture
def archive_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Two disks and a config: 3 MiB + 192 KiB of random data."""
    path = tmp_path_factory.mktemp("archive") / "two.vma"

    async def make() -> None:
        async with VmaWriter.open(path, uuid=uuid_mod.UUID(int=9), ctime=1) as writer:
            writer.add_config("qemu-server.conf", b"cores: 1\n")
            big = writer.register_stream("big", ARCHIVE_CLUSTERS * CLUSTER)
            small = writer.register_stream("small", 3 * CLUSTER)
            for cluster, data in enumerate(payload(1)):
                await writer.write(big, cluster, data)
                if cluster < 3:
                    await writer.write(small, cluster, data)
            await writer.close_stream(small)
            await writer.close_stream(big)

    # Built on an event loop of its own, in a thread, so that an async test can use it.
    anyio.run(make)
    return path.read_bytes()


def extent_offsets(archive: bytes) -> list[int]:
    pos = int.from_bytes(archive[56:60], "big")
    offsets = []
    while pos < len(archive):
        offsets.append(pos)
        pos += 512 + 4096 * int.from_bytes(archive[pos + 6 : pos + 8], "big")
    return offsets


async def test_eof_mid_extent_extract_leaves_nothing(
    tmp_path: Path, archive_bytes: bytes, fd_leaks: FdLeakCheck
) -> None:
    fds = fd_leaks.snapshot()
    cut = extent_offsets(archive_bytes)[0] + 512 + 10 * 4096 + 100  # inside the first
    path = tmp_path / "cut.vma"
    path.write_bytes(archive_bytes[:cut])
    target = tmp_path / "out"
    first = extent_offsets(archive_bytes)[0]
    extent_size = 512 + 4096 * int.from_bytes(archive_bytes[first + 6 : first + 8], "big")
    with pytest.raises(TruncatedArchiveError) as caught:
        await extract_archive(path, target)
    assert str(caught.value) == f"short vma extent ({cut - first} < {extent_size})"
    assert sorted(os.listdir(tmp_path)) == ["cut.vma"]  # no out/, no tmp-disk-*.raw
    fd_leaks.assert_same(fds)


class FailingStream(anyio.abc.ByteReceiveStream):
    """Gives ``good`` bytes of the archive, then fails like a dropped connection."""

    def __init__(self, data: bytes, good: int) -> None:
        self._data = data[:good]

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        if not self._data:
            raise anyio.BrokenResourceError("connection reset by peer")
        chunk, self._data = self._data[:max_bytes], self._data[max_bytes:]
        return chunk

    async def aclose(self) -> None:
        pass


def file_sinks(directory: Path) -> dict[str | int, Sink]:
    return {name: RawFileSink(directory / f"{name}.raw", 0) for name in ("big", "small")}


async def test_source_fails_mid_stream(
    tmp_path: Path, archive_bytes: bytes, fd_leaks: FdLeakCheck
) -> None:
    fds = fd_leaks.snapshot()
    out = tmp_path / "out"
    out.mkdir()
    reader = await VmaReader.open(FailingStream(archive_bytes, len(archive_bytes) // 2))
    async with reader:
        with pytest.raises(SourceError) as caught:
            await reader.restore(file_sinks(out))
    assert str(caught.value) == (
        "read failed - the stream was closed by an error (connection reset by peer)"
    )
    assert os.listdir(out) == []
    fd_leaks.assert_same(fds)


async def test_unreadable_source(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as caught:
        await VmaReader.open(tmp_path)  # a directory: read() answers EISDIR
    assert str(caught.value) == "read failed - Is a directory"


class SinkExploded(Exception):
    pass


@pytest.mark.parametrize("raised", [SinkExploded("sink exploded"), SinkError("sink refused")])
async def test_a_sink_that_raises_stops_the_restore(
    tmp_path: Path, archive_bytes: bytes, raised: Exception, fd_leaks: FdLeakCheck
) -> None:
    fds = fd_leaks.snapshot()
    path = tmp_path / "a.vma"
    path.write_bytes(archive_bytes)
    out = tmp_path / "out"
    out.mkdir()
    writes = 0

    async def write(offset: int, data: memoryview) -> None:
        nonlocal writes
        writes += 1
        if writes == 2:
            raise raised

    sinks = file_sinks(out)
    sinks["big"] = CallbackSink(write)
    async with await VmaReader.open(path) as reader:
        with pytest.raises(type(raised)) as caught:
            await reader.restore(sinks)
    assert caught.value is raised  # the sink's own error, as it raised it
    assert writes == 2  # nothing was handed to the failed sink after its failure
    assert os.listdir(out) == []  # the other sink's file is removed
    fd_leaks.assert_same(fds)


async def test_a_sink_whose_disk_fills(
    small_fs: Path, archive_bytes: bytes, tmp_path: Path, fd_leaks: FdLeakCheck
) -> None:
    fds = fd_leaks.snapshot()
    path = tmp_path / "a.vma"
    path.write_bytes(archive_bytes)
    async with await VmaReader.open(path) as reader:
        with pytest.raises(SinkError) as caught:
            await reader.restore(file_sinks(small_fs))
    # Both sinks share the full disk: whichever hits it first is the one reported.
    assert re.fullmatch(r"write to (big|small) failed - No space left on device", str(caught.value))
    assert os.listdir(small_fs) == []
    fd_leaks.assert_same(fds)


async def test_extract_whose_disk_fills_leaves_nothing(
    small_fs: Path, archive_bytes: bytes, tmp_path: Path, fd_leaks: FdLeakCheck
) -> None:
    fds = fd_leaks.snapshot()
    path = tmp_path / "a.vma"
    path.write_bytes(archive_bytes)
    with pytest.raises(SinkError) as caught:
        await extract_archive(path, small_fs / "out")
    assert re.fullmatch(r"write to (big|small) failed - No space left on device", str(caught.value))
    assert os.listdir(small_fs) == []  # neither tmp-disk-*.raw nor disk-*.raw, nor out/
    assert os.statvfs(small_fs).f_bfree == os.statvfs(small_fs).f_blocks
    fd_leaks.assert_same(fds)
