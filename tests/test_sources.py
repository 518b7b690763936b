"""Archive sources: path, "-", fd, pipe, anyio stream, and the compressors
recognised by magic (zstd, gzip including concatenated members, lzop)."""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import vma_builder as vb
import zstandard

from vma_async import BadMagicError, CallbackSink, SourceError, VmaReader
from vma_async._sources import open_source

pytestmark = pytest.mark.anyio

IMAGE = os.urandom(9 * vb.CLUSTER) + bytes(3 * vb.CLUSTER) + os.urandom(1000)
ARCHIVE = vb.archive([vb.Device("disk0", IMAGE)], [("qemu-server.conf", b"cores: 2\n")])


async def restore_image(source: object) -> bytes:
    image = bytearray(len(IMAGE))

    async def put(offset: int, data: memoryview) -> None:
        image[offset : offset + len(data)] = data

    async with await VmaReader.open(source) as reader:  # type: ignore[arg-type]
        await reader.restore({"disk0": CallbackSink(put)})
    return bytes(image)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "a.vma"
    p.write_bytes(ARCHIVE)
    return p


async def test_path(path: Path) -> None:
    assert await restore_image(path) == IMAGE
    assert await restore_image(str(path)) == IMAGE


async def test_fd_is_duplicated_and_left_open(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        assert await restore_image(fd) == IMAGE
        assert os.fstat(fd)  # still open
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # and its offset untouched
    finally:
        os.close(fd)


@pytest.fixture
def stdin_from(path: Path) -> Iterator[None]:
    saved = os.dup(0)
    fd = os.open(path, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    try:
        yield
    finally:
        os.dup2(saved, 0)
        os.close(saved)


@pytest.mark.usefixtures("stdin_from")
async def test_dash_reads_standard_input() -> None:
    assert await restore_image("-") == IMAGE


def feed_pipe(data: bytes) -> tuple[int, threading.Thread]:
    """A pipe whose far end a thread fills (a producer outside the event loop)."""
    read_fd, write_fd = os.pipe()

    def produce() -> None:
        with os.fdopen(write_fd, "wb") as out, contextlib.suppress(BrokenPipeError):
            out.write(data)

    thread = threading.Thread(target=produce)
    thread.start()
    return read_fd, thread


async def test_pipe_is_read_non_blocking_and_its_flags_restored() -> None:
    read_fd, thread = feed_pipe(ARCHIVE)
    try:
        assert await restore_image(read_fd) == IMAGE
        assert os.get_blocking(read_fd)  # blocking mode restored
    finally:
        os.close(read_fd)
        thread.join()


async def test_process_stdout_stream(path: Path) -> None:
    async with await anyio.open_process(["cat", str(path)]) as process:
        assert process.stdout is not None
        assert await restore_image(process.stdout) == IMAGE


def compressed(kind: str) -> bytes:
    if kind == "zstd":
        half = len(ARCHIVE) // 2  # two frames, as concatenated files have
        c = zstandard.ZstdCompressor()
        return c.compress(ARCHIVE[:half]) + c.compress(ARCHIVE[half:])
    if kind == "gzip":
        half = len(ARCHIVE) // 3  # two members, as pigz may write
        return gzip.compress(ARCHIVE[:half]) + gzip.compress(ARCHIVE[half:])
    return subprocess.run(["lzop", "-c"], input=ARCHIVE, capture_output=True, check=True).stdout


@pytest.mark.parametrize("kind", ["zstd", "gzip", "lzop"])
async def test_compressed_files(tmp_path: Path, kind: str) -> None:
    if kind == "lzop" and shutil.which("lzop") is None:
        pytest.fail("lzop is not installed (apt-get install lzop)")
    p = tmp_path / f"a.vma.{kind}"
    p.write_bytes(compressed(kind))
    assert await restore_image(p) == IMAGE
    source = await open_source(p)
    try:
        assert source.compression == kind
    finally:
        await source.aclose()


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
async def test_compressed_pipe(kind: str) -> None:
    read_fd, thread = feed_pipe(compressed(kind))
    try:
        assert await restore_image(read_fd) == IMAGE
    finally:
        os.close(read_fd)
        thread.join()


async def test_lzop_needs_a_file() -> None:
    read_fd, thread = feed_pipe(compressed("lzop"))
    try:
        with pytest.raises(SourceError) as info:
            await VmaReader.open(read_fd)
        assert str(info.value) == "lzop-compressed archives can be read from files only"
    finally:
        os.close(read_fd)
        thread.join()


async def test_corrupt_gzip(tmp_path: Path) -> None:
    data = bytearray(compressed("gzip"))
    data[len(data) // 2] ^= 0xFF
    p = tmp_path / "bad.vma.gz"
    p.write_bytes(bytes(data))
    with pytest.raises(SourceError, match="^gzip decompression failed - "):
        await restore_image(p)


async def test_truncated_gzip(tmp_path: Path) -> None:
    p = tmp_path / "short.vma.gz"
    p.write_bytes(gzip.compress(ARCHIVE)[:-2000])
    with pytest.raises(SourceError) as info:
        await restore_image(p)
    assert str(info.value) == "gzip decompression failed - unexpected end of data"


async def test_corrupt_zstd(tmp_path: Path) -> None:
    first_frame = len(zstandard.ZstdCompressor().compress(ARCHIVE[: len(ARCHIVE) // 2]))
    data = bytearray(compressed("zstd"))
    data[first_frame : first_frame + 4] = b"JUNK"  # the second frame's magic
    p = tmp_path / "bad.vma.zst"
    p.write_bytes(bytes(data))
    with pytest.raises(SourceError, match="^zstd decompression failed - "):
        await restore_image(p)


async def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as info:
        await VmaReader.open(tmp_path / "nope.vma")
    assert str(info.value) == f"can't open file {tmp_path / 'nope.vma'} - No such file or directory"


async def test_not_an_archive(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"just some text\n" * 2000)
    with pytest.raises(BadMagicError) as info:
        await VmaReader.open(p)
    assert str(info.value) == "not a vma file - wrong magic number"
