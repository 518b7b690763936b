"""The one-call layer: image producers (``_backup``), safe names (``_extract``),
throttling (``_sink_wrappers``) and restore-map input (``_restore_map``)."""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import blake3
import pytest

from vma_async import (
    CLUSTER_SIZE,
    DigestRecorder,
    FormatError,
    InvalidStreamError,
    Progress,
    RateLimiter,
    RestoreMapEntry,
    RestoreMapError,
    Sink,
    SourceError,
    StreamStatus,
    ThrottledSink,
    UnsafeNameError,
    VmaWriter,
    WriterStatus,
    backup_image,
    create_archive,
    extract_archive,
    open_image,
    read_restore_map,
)
from vma_async import _backup as backup_module
from vma_async._backup import _read_chunk
from vma_async._extract import _CreatedFiles, check_file_name
from vma_async._writer import PACK_GROUP, ClusterRead

UUID = uuid.UUID("0b5e55ed-0000-4000-8000-00000000cafe")

# --- hole detection ------------------------------------------------------------------


def _sparse_image(path: Path) -> bytes:
    """A 1 MiB file: data in cluster 0 (first block only), cluster 5 and the last
    half cluster; everything else is holes.  Returns the expected content."""
    size = 16 * CLUSTER_SIZE
    content = bytearray(size)
    content[0:4096] = b"\x11" * 4096
    content[5 * CLUSTER_SIZE : 6 * CLUSTER_SIZE] = os.urandom(CLUSTER_SIZE)
    content[size - CLUSTER_SIZE // 2 :] = b"\x22" * (CLUSTER_SIZE // 2)
    with open(path, "wb") as f:
        f.truncate(size)
        for start, end in (
            (0, 4096),
            (5 * CLUSTER_SIZE, 6 * CLUSTER_SIZE),
            (size - CLUSTER_SIZE // 2, size),
        ):
            f.seek(start)
            f.write(content[start:end])
    return bytes(content)


@pytest.mark.anyio
async def test_read_chunk_reads_data_and_reports_clusters_with_data(tmp_path: Path) -> None:
    path = tmp_path / "sparse.raw"
    expected = _sparse_image(path)
    image = await open_image(path)
    try:
        buf, has_data, read = _read_chunk(image.fd, 0, image.size, image.size)
    finally:
        image.close()
    assert bytes(buf) == expected
    assert read < 3 * CLUSTER_SIZE  # the holes were not read
    # tmpfs and ext4 report holes at page/block granularity: the data clusters
    # are exactly those written, the others are never read.
    assert [i for i, flag in enumerate(has_data) if flag] == [0, 5, 15]


@pytest.mark.anyio
async def test_read_chunk_past_the_file_end_is_zeros(tmp_path: Path) -> None:
    path = tmp_path / "odd.raw"
    path.write_bytes(b"\xff" * 1000)
    image = await open_image(path)
    try:
        buf, has_data, read = _read_chunk(image.fd, 0, 1024, image.size)
    finally:
        image.close()
    assert bytes(buf) == b"\xff" * 1000 + bytes(24)
    assert read == 1000
    assert has_data == [True]


@pytest.mark.anyio
async def test_read_chunk_at_an_offset(tmp_path: Path) -> None:
    path = tmp_path / "sparse.raw"
    expected = _sparse_image(path)
    image = await open_image(path)
    try:
        buf, has_data, _ = _read_chunk(image.fd, 4 * CLUSTER_SIZE, 4 * CLUSTER_SIZE, image.size)
    finally:
        image.close()
    assert bytes(buf) == expected[4 * CLUSTER_SIZE : 8 * CLUSTER_SIZE]
    assert has_data == [False, True, False, False]


@pytest.mark.anyio
@pytest.mark.parametrize("zero_holes", [True, False])
async def test_read_chunk_into_a_used_buffer_clears_what_it_did_not_read(
    tmp_path: Path, zero_holes: bool
) -> None:
    """The backup reuses its read buffers (issue 10): stale bytes must never
    show through a hole.  Every unread byte is cleared for the digest
    (``zero_holes``); otherwise at least those of the clusters with data,
    the only ones the writer looks at."""
    path = tmp_path / "sparse.raw"
    expected = _sparse_image(path)
    used = bytearray(b"\xee" * (len(expected) + CLUSTER_SIZE))
    image = await open_image(path)
    try:
        buf, has_data, _ = _read_chunk(
            image.fd, 0, image.size, image.size, used, zero_holes=zero_holes
        )
    finally:
        image.close()
    assert buf is used
    for index, flag in enumerate(has_data):
        cluster = slice(index * CLUSTER_SIZE, (index + 1) * CLUSTER_SIZE)
        if flag or zero_holes:
            assert bytes(buf[cluster]) == expected[cluster], index
    assert has_data.count(True) == 3


def _ring_image(path: Path) -> bytes:
    """Ten 4 MiB chunks and a short one: dense random chunks first, then
    sparse ones with one 4 KiB block of data in every seventh cluster, at
    varying places.  Returns the expected content."""
    chunk = 4 << 20
    size = 10 * chunk + 3 * 4096
    expected = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for n in range(5):
            data = os.urandom(chunk)
            expected[n * chunk : (n + 1) * chunk] = data
            f.seek(n * chunk)
            f.write(data)
        for n in range(5, 10):
            for cluster in range(n * 64, (n + 1) * 64, 7):
                at = cluster * CLUSTER_SIZE + (cluster % 16) * 4096
                expected[at : at + 4096] = b"\x5a" * 4096
                f.seek(at)
                f.write(b"\x5a" * 4096)
        f.seek(size - 4096)
        f.write(b"\x77" * 4096)
        expected[size - 4096 :] = b"\x77" * 4096
    return bytes(expected)


@pytest.mark.anyio
@pytest.mark.parametrize("with_digest", [False, True])
async def test_reused_read_buffers_never_leak_into_the_archive(
    tmp_path: Path, with_digest: bool
) -> None:
    """Many chunks through the reused read buffers (the 512 KiB group buffer
    without a digest, the ring of 4 MiB buffers with one): dense random
    chunks first, then sparse ones whose holes fall inside clusters with
    data, so a buffer that was not cleared would restore stale random bytes."""
    disk = tmp_path / "disk.raw"
    expected = _ring_image(disk)
    recorder = DigestRecorder() if with_digest else None
    await create_archive(tmp_path / "a.vma", [("drive-scsi0", disk)], digest=recorder)
    await extract_archive(tmp_path / "a.vma", tmp_path / "out")
    assert (tmp_path / "out" / "disk-drive-scsi0.raw").read_bytes() == expected
    if recorder is not None:
        [device] = recorder.devices.values()
        device.finish()
        assert device.sha256() == hashlib.sha256(expected).hexdigest()
        table = device.table()
        for index in range(0, len(expected) // CLUSTER_SIZE + 1):
            cluster = expected[index * CLUSTER_SIZE : (index + 1) * CLUSTER_SIZE]
            assert table[index * 16 : index * 16 + 16] == blake3.blake3(cluster).digest(16)


@pytest.mark.anyio
async def test_open_image_refuses_what_has_no_size(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(SourceError) as info:
        await open_image(fifo)
    assert str(info.value) == f"bdrv_open '{fifo}' failed - not a regular file or block device"
    with pytest.raises(SourceError) as info:
        await open_image(tmp_path / "missing")
    assert (
        str(info.value) == f"bdrv_open '{tmp_path / 'missing'}' failed - No such file or directory"
    )


# --- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "is not a file name"),
        (".", "is not a file name"),
        ("..", "is not a file name"),
        ("../evil", "contains '/'"),
        ("/etc/passwd", "contains '/'"),
        ("a\0b", "contains a NUL byte"),
        ("x" * 256, "is longer than 255 bytes"),
        ("é" * 128, "is longer than 255 bytes"),
    ],
)
def test_unsafe_names_are_refused(name: str, problem: str) -> None:
    with pytest.raises(UnsafeNameError) as info:
        check_file_name(name, "config")
    assert str(info.value) == f"refusing unsafe config name {name!r}: it {problem}"


@pytest.mark.parametrize("name", ["qemu-server.conf", "..conf", "x" * 255, "a b", "é" * 127])
def test_plain_names_pass(name: str) -> None:
    assert check_file_name(name, "config") == name


# --- throttling -----------------------------------------------------------------------


class RecordingSink(Sink):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        self.calls.append(("write", offset, len(data)))

    async def write_zeroes(self, offset: int, length: int) -> None:
        self.calls.append(("zeroes", offset, length))

    async def flush(self) -> None:
        self.calls.append(("flush", 0, 0))

    async def aclose(self) -> None:
        self.calls.append(("close", 0, 0))


@pytest.mark.anyio
async def test_throttled_sink_passes_everything_through_in_order() -> None:
    inner = RecordingSink()
    sink = ThrottledSink(inner, RateLimiter(10**12))
    await sink.write(0, b"x" * 10)
    await sink.write_zeroes(10, 4096)
    await sink.flush()
    await sink.aclose()
    assert inner.calls == [("write", 0, 10), ("zeroes", 10, 4096), ("flush", 0, 0), ("close", 0, 0)]


@pytest.mark.anyio
async def test_rate_limiter_waits_are_cancellable() -> None:
    limiter = RateLimiter(1)  # one byte a second: a 1000-byte write would take 1000 s
    with anyio.move_on_after(0.01) as scope:
        await limiter.acquire(1000)
    assert scope.cancelled_caught


def test_rate_limiter_refuses_a_zero_rate() -> None:
    with pytest.raises(ValueError, match="the rate must be positive"):
        RateLimiter(0)


# --- the restore map from a file or a FIFO ----------------------------------------------


@pytest.mark.anyio
async def test_read_restore_map_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "map"
    path.write_text("1:drive-scsi0=/dev/null\ndone\nignored\n")
    assert await read_restore_map(path) == {
        "drive-scsi0": RestoreMapEntry("drive-scsi0", "/dev/null", True)
    }


@pytest.mark.anyio
async def test_read_restore_map_from_a_fifo_kept_open_by_its_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "map.fifo"
    os.mkfifo(fifo)
    # The writer sends the map, then keeps the FIFO open until we have read it:
    # reading must stop at "done", not wait for end of file.
    script = (
        "import sys\n"
        f"f = open({str(fifo)!r}, 'w')\n"
        "f.write('0:a=/x\\n'); f.flush()\n"
        "f.write('throttling.bps=100:0:b=/y\\ndone\\n'); f.flush()\n"
        "sys.stdin.read()\n"
    )
    async with await anyio.open_process([sys.executable, "-c", script]) as writer:
        entries = await read_restore_map(fifo)
        assert writer.stdin is not None
        await writer.stdin.aclose()
    assert entries == {
        "a": RestoreMapEntry("a", "/x", False),
        "b": RestoreMapEntry("b", "/y", False, throttling_bps=100),
    }


@pytest.mark.anyio
async def test_read_restore_map_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RestoreMapError) as info:
        await read_restore_map(tmp_path / "nope")
    assert str(info.value) == f"unable to open fifo {tmp_path / 'nope'} - No such file or directory"


# --- producers and the one-call layer, in process ------------------------------------------


class RecordingWriter:
    """Just enough of VmaWriter for :func:`backup_image`: records what it is given."""

    def __init__(self, dev_id: int, size: int) -> None:
        self.size = size
        self.dev_id = dev_id
        self.writes: list[tuple[int, bytes | None]] = []
        self.closed = False
        self.waits = 0

    def status(self) -> WriterStatus:
        stream = StreamStatus(self.dev_id, "d", self.size, 0, 0, False)
        return WriterStatus(uuid.uuid4(), False, None, (stream,))

    async def write(self, dev_id: int, cluster_num: int, data: bytes | memoryview | None) -> int:
        assert dev_id == self.dev_id
        self.writes.append((cluster_num, None if data is None else bytes(data)))
        return CLUSTER_SIZE

    async def write_clusters(
        self,
        dev_id: int,
        first_cluster: int,
        data: bytes | bytearray,
        present: Sequence[bool] | None = None,
    ) -> int:
        """The batch call, recorded cluster by cluster."""
        count = len(present) if present is not None else -(-len(data) // CLUSTER_SIZE)
        for index in range(count):
            chunk = data[index * CLUSTER_SIZE : (index + 1) * CLUSTER_SIZE]
            stored = present is None or present[index]
            await self.write(dev_id, first_cluster + index, chunk if stored else None)
        return count * CLUSTER_SIZE

    async def write_clusters_from(
        self, dev_id: int, first_cluster: int, count: int, read: ClusterRead
    ) -> int:
        """The reading call, in groups as the writer asks, recorded cluster by cluster."""
        done = 0
        while done < count:
            n = min(PACK_GROUP, count - done)
            clusters = await anyio.to_thread.run_sync(read, first_cluster + done, n)
            if clusters is None:
                self.waits += 1
                return done
            data, present = clusters
            stored = list(present)[:n] if present is not None else [True] * n
            await self.write_clusters(dev_id, first_cluster + done, bytes(data), stored)
            done += n
        return done

    async def close_stream(self, dev_id: int) -> int:
        self.closed = True
        return 0


@pytest.mark.anyio
async def test_backup_image_passes_holes_as_no_data(tmp_path: Path) -> None:
    path = tmp_path / "sparse.raw"
    expected = _sparse_image(path)
    writer = RecordingWriter(3, len(expected) + 512)  # rounded up past the file
    await backup_image(writer, 3, path)  # type: ignore[arg-type]
    assert writer.closed
    assert [n for n, _ in writer.writes] == list(range(17))
    # cluster 16 lies past the end of the file: zeros, so no data either
    assert [n for n, data in writer.writes if data is not None] == [0, 5, 15]
    for n, data in writer.writes:
        if data is not None:
            assert data == expected[n * CLUSTER_SIZE : (n + 1) * CLUSTER_SIZE].ljust(
                len(data), b"\0"
            )


@pytest.mark.anyio
async def test_create_and_extract_round_trip_in_process(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    expected = _sparse_image(disk)
    state = tmp_path / "state.bin"
    state.write_bytes(os.urandom(100_000))
    status = await create_archive(
        tmp_path / "a.vma",
        [("drive-scsi0", disk), ("vmstate", state)],
        configs=[("/etc/pve/qemu-server/100.conf", b"cores: 2\n")],
    )
    assert [(s.name, s.size, s.transferred) for s in status.streams] == [
        ("drive-scsi0", len(expected), len(expected)),
        ("vmstate", 100_000, 2 * CLUSTER_SIZE),  # vmstate counts whole clusters
    ]
    announced: list[tuple[str, int]] = []
    result = await extract_archive(
        tmp_path / "a.vma", tmp_path / "out", announce=lambda p, s: announced.append((p, s))
    )
    assert announced == [(f"{tmp_path}/out/tmp-disk-drive-scsi0.raw", len(expected))]
    assert sorted(result.files) == ["100.conf", "disk-drive-scsi0.raw", "vmstate.bin"]
    assert (tmp_path / "out" / "disk-drive-scsi0.raw").read_bytes() == expected
    # as in the reference, vmstate is restored in whole clusters
    vmstate = state.read_bytes().ljust(2 * CLUSTER_SIZE, b"\0")
    assert (tmp_path / "out" / "vmstate.bin").read_bytes() == vmstate
    assert (tmp_path / "out" / "100.conf").read_bytes() == b"cores: 2\n"


@pytest.mark.anyio
async def test_create_archive_failure_removes_the_partial_archive(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(8 * CLUSTER_SIZE))

    def fail_midway(progress: Progress) -> None:
        if progress.done_bytes >= 2 * CLUSTER_SIZE:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        await create_archive(tmp_path / "a.vma", [("d", disk)], progress=fail_midway)
    assert os.listdir(tmp_path) == ["disk.raw"]


@pytest.mark.anyio
async def test_create_archive_opens_every_image_before_the_archive(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"x" * 512)
    with pytest.raises(SourceError) as info:
        await create_archive(tmp_path / "a.vma", [("a", disk), ("b", tmp_path / "missing")])
    assert (
        str(info.value) == f"bdrv_open '{tmp_path / 'missing'}' failed - No such file or directory"
    )
    assert not (tmp_path / "a.vma").exists()


@pytest.mark.anyio
async def test_extract_failure_removes_everything_it_created(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(4 * CLUSTER_SIZE))
    await create_archive(tmp_path / "a.vma", [("d", disk)], configs=[("c.conf", b"c")])
    data = (tmp_path / "a.vma").read_bytes()
    (tmp_path / "cut.vma").write_bytes(data[: len(data) - 4096])
    with pytest.raises(FormatError):
        await extract_archive(tmp_path / "cut.vma", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_created_files_never_follow_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (target / "tmp-disk-d.raw").symlink_to(victim)
    dir_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        files = _CreatedFiles(str(target), dir_fd)
        with pytest.raises(FileExistsError):
            files.create_blocking("tmp-disk-d.raw")
        fd = files.create_blocking("config")
        os.close(fd)
        (target / "disk-d.raw").symlink_to(victim)
        with pytest.raises(FileExistsError):
            files.rename_blocking("config", "disk-d.raw")  # never replaces what is there
        files.remove_all_blocking()  # the directory is not empty: it stays
    finally:
        os.close(dir_fd)
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in target.iterdir()) == ["disk-d.raw", "tmp-disk-d.raw"]


@pytest.mark.anyio
async def test_a_read_error_is_a_source_error_naming_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"x" * CLUSTER_SIZE)

    def failing_read(*args: object, **kwargs: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(backup_module, "_read_chunk", failing_read)
    writer = RecordingWriter(1, CLUSTER_SIZE)
    with pytest.raises(SourceError) as info:
        await backup_image(writer, 1, path)  # type: ignore[arg-type]
    assert str(info.value) == f"read error on '{path}' at offset 0 - Input/output error"
    assert not writer.closed


# --- regressions: issue 8 (unknown stream, progress convention, blocking calls) ------------------


@pytest.mark.anyio
async def test_backup_image_unknown_dev_id_is_the_librarys_error(tmp_path: Path) -> None:
    """Defect 5: it ended in ``RuntimeError: coroutine raised StopIteration``."""
    path = tmp_path / "disk.raw"
    path.write_bytes(b"x" * CLUSTER_SIZE)
    async with VmaWriter.open(tmp_path / "a.vma") as writer:
        dev_id = writer.register_stream("d", CLUSTER_SIZE)
        with pytest.raises(InvalidStreamError, match="^backup_image: no such stream 9$"):
            await backup_image(writer, 9, path)
        await backup_image(writer, dev_id, path)
    assert (tmp_path / "a.vma").stat().st_size > CLUSTER_SIZE


@pytest.mark.anyio
async def test_create_progress_once_per_chunk_never_per_cluster(tmp_path: Path) -> None:
    """One convention: a Progress at the start, per 4 MiB chunk, and at the end."""
    sizes = {"a": 100 * CLUSTER_SIZE + 4096, "b": 3 * CLUSTER_SIZE}
    devices = []
    for name, size in sizes.items():
        path = tmp_path / f"{name}.raw"
        path.write_bytes(os.urandom(size // 2) + bytes(size - size // 2))
        devices.append((name, path))
    seen: list[Progress] = []

    async def record(progress: Progress) -> None:  # an async callback is awaited
        seen.append(progress)

    status = await create_archive(tmp_path / "a.vma", devices, progress=record)
    chunks = 2 + 1  # a: 101 clusters in two 64-cluster chunks, b: one chunk
    assert len(seen) == 1 + chunks + 1
    assert {p.operation for p in seen} == {"create"}
    total = (101 + 3) * CLUSTER_SIZE
    assert [p.total_bytes for p in seen] == [total] * len(seen)
    assert seen[0].done_bytes == 0
    assert seen[0].read_bytes == 0
    last = seen[-1]
    assert last.done_bytes == total
    assert last.read_bytes == sum(sizes.values())  # written files: no holes to skip
    assert last.zero_bytes == sum(s.zero_bytes for s in status.streams)
    assert [(d.name, d.done_bytes, d.total_bytes) for d in last.devices] == [
        ("a", 101 * CLUSTER_SIZE, 101 * CLUSTER_SIZE),
        ("b", 3 * CLUSTER_SIZE, 3 * CLUSTER_SIZE),
    ]
    done = [p.done_bytes for p in seen]
    assert done == sorted(done)


@pytest.mark.anyio
async def test_backup_image_progress_without_a_callback_costs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``progress=None`` nothing is built: not per cluster, not per chunk."""
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(70 * CLUSTER_SIZE))
    built: list[object] = []
    real = backup_module.Progress

    def counting(*args: object, **kwargs: object) -> object:
        built.append(args)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(backup_module, "Progress", counting)
    await create_archive(tmp_path / "a.vma", [("d", path)])
    assert built == []
    seen: list[Progress] = []
    async with VmaWriter.open(tmp_path / "b.vma") as writer:
        dev_id = writer.register_stream("d", 70 * CLUSTER_SIZE)
        await backup_image(writer, dev_id, path, progress=seen.append)
    assert [p.operation for p in seen] == ["backup"] * 4  # start, 2 chunks, end
    assert [p.done_bytes // CLUSTER_SIZE for p in seen] == [0, 64, 70, 70]


@pytest.mark.anyio
async def test_extract_progress_says_extract(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(5 * CLUSTER_SIZE))
    await create_archive(tmp_path / "a.vma", [("d", disk)])
    seen: list[Progress] = []
    await extract_archive(tmp_path / "a.vma", tmp_path / "out", progress=seen.append)
    assert seen
    assert {p.operation for p in seen} == {"extract"}
    assert seen[-1].done_bytes == seen[-1].total_bytes == 5 * CLUSTER_SIZE
    assert (tmp_path / "out" / "disk-d.raw").read_bytes() == disk.read_bytes()


@pytest.mark.anyio
async def test_file_system_calls_run_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 8: open_image's open/fstat and extract's mkdir, creates, config
    writes, link and unlink ran on the event loop thread."""
    loop_thread = threading.get_ident()
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(3 * CLUSTER_SIZE))
    calls: list[tuple[str, str, bool]] = []

    def spy(name: str) -> None:
        real = getattr(os, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            what = os.fsdecode(args[0]) if args and isinstance(args[0], (str, Path)) else ""
            calls.append((name, what, threading.get_ident() == loop_thread))
            return real(*args, **kwargs)

        monkeypatch.setattr(os, name, wrapper)

    for name in ("open", "mkdir", "link", "unlink", "rmdir"):
        spy(name)
    await create_archive(tmp_path / "a.vma", [("d", disk)], configs=[("c.conf", b"c")])
    await extract_archive(tmp_path / "a.vma", tmp_path / "out")
    (tmp_path / "cut.vma").write_bytes((tmp_path / "a.vma").read_bytes()[:-4096])
    with pytest.raises(FormatError):
        await extract_archive(tmp_path / "cut.vma", tmp_path / "out2")
    monkeypatch.undo()
    ours = {str(disk), "c.conf", "tmp-disk-d.raw", "disk-d.raw", str(tmp_path / "out")}
    ours |= {str(tmp_path / "out2")}
    mine = [(name, what, on_loop) for name, what, on_loop in calls if what in ours]
    assert {name for name, _, _ in mine} == {"open", "mkdir", "link", "unlink", "rmdir"}
    assert [(name, what) for name, what, on_loop in mine if on_loop] == []
    assert (tmp_path / "out" / "disk-d.raw").read_bytes() == disk.read_bytes()
    assert not (tmp_path / "out2").exists()


@pytest.mark.anyio
async def test_a_dense_image_is_asked_where_its_data_is_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data map remembers the run SEEK_DATA/SEEK_HOLE found: a dense
    image of three chunks costs one pair of lseeks, not one per chunk (each
    is a system call after which the reading thread must win the GIL back),
    and the archive still holds every byte."""
    disk = tmp_path / "disk.raw"
    data = os.urandom(3 * (4 << 20) + 5 * 4096)
    disk.write_bytes(data)
    seeks: list[int] = []
    real_lseek = os.lseek

    def counting_lseek(fd: int, pos: int, how: int) -> int:
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            seeks.append(how)
        return real_lseek(fd, pos, how)

    monkeypatch.setattr(backup_module.os, "lseek", counting_lseek)
    await create_archive(tmp_path / "a.vma", [("drive-scsi0", disk)])
    assert seeks == [os.SEEK_DATA, os.SEEK_HOLE]
    monkeypatch.undo()
    await extract_archive(tmp_path / "a.vma", tmp_path / "out")
    assert (tmp_path / "out" / "disk-drive-scsi0.raw").read_bytes() == data


# --- raw images: read and packed while in the CPU's cache ------------------------------


def _uncached_image(path: Path, data: bytes) -> None:
    """Write ``data`` and drop it from the page cache (the premise is checked:
    a read that must not wait for the disk is refused)."""
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(BlockingIOError):
            os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
    finally:
        os.close(fd)


@pytest.mark.anyio
async def test_backup_image_waits_outside_the_writer_for_what_the_page_cache_lacks(
    tmp_path: Path,
) -> None:
    """Clusters the page cache does not hold are never read under the
    writer's lock: ``read`` says wait, the producer reads them outside it.
    Once the image is cached, nothing waits.  Either way every byte arrives."""
    path = tmp_path / "disk.raw"
    data = os.urandom(3 * 64 * CLUSTER_SIZE + 5000)
    _uncached_image(path, data)
    for expect_waits in (True, False):
        writer = RecordingWriter(1, len(data))
        await backup_image(writer, 1, path)  # type: ignore[arg-type]
        assert (writer.waits > 0) is expect_waits
        assert b"".join(d or b"" for _, d in writer.writes)[: len(data)] == data


@pytest.mark.anyio
async def test_backup_image_without_rwf_nowait_reads_every_group_outside_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that refuses ``RWF_NOWAIT`` (EOPNOTSUPP): every group of
    clusters is read by the producer, outside the lock, and packed after."""
    real = backup_module._read_chunk

    def refusing(*args: Any, flags: int = 0, **kwargs: Any) -> Any:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real(*args, **kwargs)

    monkeypatch.setattr(backup_module, "_read_chunk", refusing)
    path = tmp_path / "disk.raw"
    data = os.urandom(3 * 64 * CLUSTER_SIZE + 5000)
    path.write_bytes(data)
    writer = RecordingWriter(1, len(data))
    await backup_image(writer, 1, path)  # type: ignore[arg-type]
    assert writer.waits == 3 * 64 // PACK_GROUP + 1  # every group of every chunk
    assert b"".join(d or b"" for _, d in writer.writes)[: len(data)] == data


@pytest.mark.anyio
@pytest.mark.parametrize("cached", [True, False])
async def test_a_read_error_names_the_image_and_the_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: bool
) -> None:
    """Under the lock (a cached read) or outside it (a read that waits): the
    image's read error is a SourceError naming the file and the offset."""
    real = backup_module._read_chunk

    def failing(fd: int, offset: int, *args: Any, flags: int = 0, **kwargs: Any) -> Any:
        if offset >= 2 * PACK_GROUP * CLUSTER_SIZE:
            if flags and not cached:
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, offset, *args, flags=flags, **kwargs)

    monkeypatch.setattr(backup_module, "_read_chunk", failing)
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(64 * CLUSTER_SIZE))
    with pytest.raises(SourceError) as info:
        await create_archive(tmp_path / "a.vma", [("drive-scsi0", path)])
    offset = 2 * PACK_GROUP * CLUSTER_SIZE
    assert str(info.value) == f"read error on '{path}' at offset {offset} - Input/output error"
    assert not (tmp_path / "a.vma").exists()


@pytest.mark.anyio
async def test_both_read_paths_write_the_same_archive(tmp_path: Path) -> None:
    """A raw image goes through ``write_clusters_from`` (one reused 512 KiB
    buffer); with a digest, through the 4 MiB read-ahead ring.  The archives
    are identical, byte for byte, including a device end inside a block
    after dirty groups (the size rounded up to 512 as the command does)."""
    disk = tmp_path / "disk.raw"
    tail = os.urandom(1000)
    expected = _ring_image(disk) + tail
    disk.write_bytes(expected)
    archives = []
    for digest in (None, DigestRecorder()):
        path = tmp_path / f"{digest is None}.vma"
        await create_archive(
            path, [("drive-scsi0", disk)], uuid=UUID, ctime=1, digest=digest, size_multiple=512
        )
        archives.append(path.read_bytes())
    assert archives[0] == archives[1]
    await extract_archive(tmp_path / "True.vma", tmp_path / "out")
    restored = (tmp_path / "out" / "disk-drive-scsi0.raw").read_bytes()
    assert restored == expected + bytes(len(restored) - len(expected))
    assert len(restored) == -(-len(expected) // 512) * 512
