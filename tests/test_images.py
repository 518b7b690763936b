"""Image producers, safe names, throttling and restore-map input of ``_images``."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import anyio
import pytest

from vma_async import (
    FormatError,
    RestoreMapError,
    SourceError,
    StreamStatus,
    UnsafeNameError,
    WriterStatus,
)
from vma_async import _images as images_module
from vma_async._format import CLUSTER_SIZE
from vma_async._images import (
    RateLimiter,
    ThrottledSink,
    _CreatedFiles,
    _read_chunk,
    backup_image,
    check_file_name,
    create_archive,
    extract_archive,
    open_image,
    read_restore_map,
)
from vma_async._restore_map import RestoreMapEntry

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


def test_read_chunk_reads_data_and_reports_clusters_with_data(tmp_path: Path) -> None:
    path = tmp_path / "sparse.raw"
    expected = _sparse_image(path)
    image = open_image(path)
    try:
        buf, has_data = _read_chunk(image.fd, 0, image.size, image.size)
    finally:
        image.close()
    assert bytes(buf) == expected
    # tmpfs and ext4 report holes at page/block granularity: the data clusters
    # are exactly those written, the others are never read.
    assert [i for i, flag in enumerate(has_data) if flag] == [0, 5, 15]


def test_read_chunk_past_the_file_end_is_zeros(tmp_path: Path) -> None:
    path = tmp_path / "odd.raw"
    path.write_bytes(b"\xff" * 1000)
    image = open_image(path)
    try:
        buf, has_data = _read_chunk(image.fd, 0, 1024, image.size)
    finally:
        image.close()
    assert bytes(buf) == b"\xff" * 1000 + bytes(24)
    assert has_data == [True]


def test_read_chunk_at_an_offset(tmp_path: Path) -> None:
    path = tmp_path / "sparse.raw"
    expected = _sparse_image(path)
    image = open_image(path)
    try:
        buf, has_data = _read_chunk(image.fd, 4 * CLUSTER_SIZE, 4 * CLUSTER_SIZE, image.size)
    finally:
        image.close()
    assert bytes(buf) == expected[4 * CLUSTER_SIZE : 8 * CLUSTER_SIZE]
    assert has_data == [False, True, False, False]


def test_open_image_refuses_what_has_no_size(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(SourceError) as info:
        open_image(fifo)
    assert str(info.value) == f"bdrv_open '{fifo}' failed - not a regular file or block device"
    with pytest.raises(SourceError) as info:
        open_image(tmp_path / "missing")
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


class RecordingSink:
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

    def status(self) -> WriterStatus:
        stream = StreamStatus(self.dev_id, "d", self.size, 0, 0, False)
        return WriterStatus(uuid.uuid4(), False, None, (stream,))

    async def write(self, dev_id: int, cluster_num: int, data: bytes | memoryview | None) -> int:
        assert dev_id == self.dev_id
        self.writes.append((cluster_num, None if data is None else bytes(data)))
        return CLUSTER_SIZE

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

    def fail_midway(status: WriterStatus) -> None:
        if status.streams[0].transferred >= 2 * CLUSTER_SIZE:
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
        files = _CreatedFiles(dir_fd)
        with pytest.raises(FileExistsError):
            files.create("tmp-disk-d.raw")
        fd = files.create("config")
        os.close(fd)
        (target / "disk-d.raw").symlink_to(victim)
        with pytest.raises(FileExistsError):
            files.rename("config", "disk-d.raw")  # never replaces what is there
        files.remove_all()
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

    def failing_read(fd: int, offset: int, length: int, file_end: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(images_module, "_read_chunk", failing_read)
    writer = RecordingWriter(1, CLUSTER_SIZE)
    with pytest.raises(SourceError) as info:
        await backup_image(writer, 1, path)  # type: ignore[arg-type]
    assert str(info.value) == f"read error on '{path}' at offset 0 - Input/output error"
    assert not writer.closed
