"""Every compression vzdump writes, made by the real tools (zstd --threads,
gzip --rsyncable, pigz, bzip2, lzop) from a real archive (``vma create``),
read by content from a file, from "-" and from an anyio stream: restored
byte-exact, with no child process left and no fd leaked after success,
corruption, truncation and cancellation."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from test_sources import feed_pipe, leaves_nothing, stdin_as

from vma_async import CallbackSink, SourceError, VmaError, VmaReader
from vma_async._decompress import _ChildSource, _ZstdFrames
from vma_async._sources import ArchiveSource, open_source

pytestmark = pytest.mark.anyio

TOOLS = ("zstd", "pzstd", "gzip", "pigz", "bzip2", "lzop")


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing tools: {' '.join(missing)} (apt-get install -y pigz lzop bzip2 zstd)")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, bytes]:
    """A real archive made by ``vma create``: its path, bytes, and the disk image."""
    d = tmp_path_factory.mktemp("archive")
    image = os.urandom(384 << 10) + bytes(640 << 10) + os.urandom(586 * 512)
    (d / "disk.raw").write_bytes(image)
    (d / "qemu-server.conf").write_text("cores: 2\n")
    archive = d / "a.vma"
    vma = Path(sys.executable).parent / "vma"
    subprocess.run(
        [
            vma,
            "create",
            "--quiet",
            archive,
            "-c",
            d / "qemu-server.conf",
            f"disk0={d / 'disk.raw'}",
        ],
        check=True,
    )
    return archive, archive.read_bytes(), image


def run(argv: list[str], data: bytes) -> bytes:
    return subprocess.run(argv, input=data, capture_output=True, check=True).stdout


def two_halves(argv: list[str], data: bytes) -> bytes:
    """Two separately compressed halves, concatenated (``cat a b``)."""
    half = len(data) // 2
    return run(argv, data[:half]) + run(argv, data[half:])


# name -> (compression reported, how to make it from the archive bytes)
VARIANTS = {
    "zstd-threads": ("zstd", lambda a: run(["zstd", "-q", "--threads=2", "-c"], a)),
    "zstd-content-size": (
        "zstd",
        lambda a: run(["zstd", "-q", "--content-size", "--stream-size=" + str(len(a)), "-c"], a),
    ),
    "zstd-no-content-size": ("zstd", lambda a: run(["zstd", "-q", "--no-content-size", "-c"], a)),
    "zstd-frames": ("zstd", lambda a: two_halves(["zstd", "-q", "-c"], a)),
    "pzstd": ("zstd", lambda a: run(["pzstd", "-q", "-p", "2", "-c"], a)),  # skippable frames
    "gzip-rsyncable": ("gzip", lambda a: run(["gzip", "--rsyncable", "-c"], a)),
    "pigz": ("gzip", lambda a: run(["pigz", "-p", "2", "--rsyncable", "-c"], a)),
    "pigz-members": ("gzip", lambda a: two_halves(["pigz", "-p", "2", "-c"], a)),
    "bzip2": ("bzip2", lambda a: run(["bzip2", "-c"], a)),
    "bzip2-streams": ("bzip2", lambda a: two_halves(["bzip2", "-c"], a)),
    "lzop": ("lzop", lambda a: run(["lzop", "-c"], a)),
}
_made_cache: dict[str, bytes] = {}


def compressed(name: str, archive: bytes) -> bytes:
    if name not in _made_cache:
        _made_cache[name] = VARIANTS[name][1](archive)
    return _made_cache[name]


async def restore(source: object, size: int) -> tuple[bytes, str | None]:
    image = bytearray(size)

    async def put(offset: int, data: memoryview) -> None:
        image[offset : offset + len(data)] = data

    async with await VmaReader.open(source) as reader:  # type: ignore[arg-type]
        await reader.restore({"disk0": CallbackSink(put)})
        return bytes(image), reader.compression


@contextlib.contextmanager
def stdin_pipe(data: bytes) -> Iterator[None]:
    """Standard input (fd 0) is a pipe a thread fills."""
    read_fd, thread = feed_pipe(data)
    try:
        with stdin_as(read_fd):
            yield
    finally:
        thread.join()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("via", ["file", "stdin", "stream"])
async def test_restores_byte_exact(
    made: tuple[Path, bytes, bytes], tmp_path: Path, variant: str, via: str
) -> None:
    _, archive, image = made
    kind = VARIANTS[variant][0]
    path = tmp_path / f"a.vma.{variant}"
    path.write_bytes(compressed(variant, archive))
    if via == "stream":
        # (uvloop keeps a /dev/null fd of its own from its first child on)
        async with await anyio.open_process(["cat", str(path)]) as process:
            assert process.stdout is not None
            with leaves_nothing():
                got = await restore(process.stdout, len(image))
    else:
        with leaves_nothing():
            if via == "file":
                got = await restore(path, len(image))
            else:
                with stdin_pipe(path.read_bytes()):
                    got = await restore("-", len(image))
    assert got == (image, kind)


@pytest.mark.parametrize("variant", ["zstd-frames", "pigz-members", "bzip2-streams", "lzop"])
async def test_decompressed_bytes_are_the_archive(
    made: tuple[Path, bytes, bytes], variant: str
) -> None:
    _, archive, _ = made
    read_fd, thread = feed_pipe(compressed(variant, archive))
    try:
        source = await open_source(read_fd)
        out = bytearray()
        try:
            while data := await source.read(1 << 20):
                out += data
        finally:
            await source.aclose()
    finally:
        thread.join()
    assert bytes(out) == archive


# --- damaged input -----------------------------------------------------------------------------


def flip_middle_byte(data: bytes) -> bytes:
    """One flipped byte in the middle: disk data here, caught by the format's
    own check (zstd's and gzip's content checksums, lzop's block checksum)."""
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    return bytes(damaged)


@functools.cache
def bad_second_bzip2_stream(archive: bytes) -> bytes:
    """bzip2 hands out a block's output before its CRC is checked (as bzcat
    does), so damaged block data reaches the archive parser first; a damaged
    stream header is bzip2's own error."""
    half = len(archive) // 2
    second = run(["bzip2", "-c"], archive[half:])
    return run(["bzip2", "-c"], archive[:half]) + b"BZh0" + second[4:]


CORRUPT = {
    "zstd-threads": (flip_middle_byte, "^zstd decompression failed - "),
    "gzip-rsyncable": (flip_middle_byte, "^gzip decompression failed - "),
    "bzip2": (None, "^bzip2 decompression failed - Invalid data stream$"),
    "lzop": (
        flip_middle_byte,
        r"^lzop decompression failed - lzop: <stdin>: Checksum error \(exit status 1\)$",
    ),
}


@pytest.mark.parametrize("variant", sorted(CORRUPT))
@pytest.mark.parametrize("via", ["file", "pipe"])
async def test_corrupt_input_says_why(
    made: tuple[Path, bytes, bytes], tmp_path: Path, variant: str, via: str
) -> None:
    _, archive, image = made
    damage, message = CORRUPT[variant]
    data = (
        bad_second_bzip2_stream(archive) if damage is None else damage(compressed(variant, archive))
    )
    path = tmp_path / "bad"
    path.write_bytes(data)
    with leaves_nothing():
        if via == "file":
            with pytest.raises(SourceError, match=message):
                await restore(path, len(image))
        else:
            read_fd, thread = feed_pipe(data)
            try:
                with pytest.raises(SourceError, match=message):
                    await restore(read_fd, len(image))
            finally:
                thread.join()


TRUNCATED = {
    "zstd-threads": "^zstd decompression failed - unexpected end of data$",
    "pzstd": "^zstd decompression failed - unexpected end of data$",
    "gzip-rsyncable": "^gzip decompression failed - unexpected end of data$",
    "bzip2": "^bzip2 decompression failed - unexpected end of data$",
    "lzop": r"^lzop decompression failed - lzop: .* \(exit status 1\)$",
}


@pytest.mark.parametrize("variant", sorted(TRUNCATED))
async def test_truncated_input_says_so(
    made: tuple[Path, bytes, bytes], tmp_path: Path, variant: str
) -> None:
    _, archive, image = made
    path = tmp_path / "short"
    path.write_bytes(compressed(variant, archive)[:-3000])
    with leaves_nothing(), pytest.raises(SourceError, match=TRUNCATED[variant]):
        await restore(path, len(image))


def test_zstd_frames_are_followed_byte_by_byte(made: tuple[Path, bytes, bytes]) -> None:
    """The frame follower says "complete" exactly where a frame (or a
    skippable frame) ends, however the bytes are split."""
    _, archive, _ = made
    one, two = compressed("pzstd", archive), compressed("zstd-threads", archive)
    frames = _ZstdFrames()
    ends = []
    for pos, byte in enumerate(one + two, 1):
        frames.feed(bytes([byte]))
        if frames.complete:
            ends.append(pos)
    assert ends[-1] == len(one) + len(two)
    assert len(one) in ends
    assert len(one) - 1 not in ends  # not before its checksum's last byte
    assert ends[0] > 8  # not inside the first skippable frame's header


async def test_missing_decompressor_is_named(
    made: tuple[Path, bytes, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, archive, image = made
    path = tmp_path / "a.vma.lzo"
    path.write_bytes(compressed("lzop", archive))
    monkeypatch.setenv("PATH", str(tmp_path))
    with leaves_nothing(), pytest.raises(SourceError, match="^can't run lzop - No such file"):
        await restore(path, len(image))


class BytesSource(ArchiveSource):
    """Archive bytes from memory, in small reads (the required method only)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def read(self, max_bytes: int) -> bytes:
        await anyio.lowlevel.checkpoint()
        data, self._data = self._data[: min(max_bytes, 8192)], self._data[8192:]
        return data


async def test_a_chatty_failing_child_neither_blocks_nor_loses_its_reason() -> None:
    """A decompressor that writes far more than a pipe holds to stderr before
    it reads its input, then fails: it is fed and drained (no deadlock), its
    output passes byte-exact, and the error quotes its last stderr line."""
    data = os.urandom(3 << 20)
    script = (
        "head -c 2000000 /dev/zero | tr '\\0' x >&2; echo >&2; cat; echo 'disk on fire' >&2; exit 3"
    )
    out = bytearray()

    async def drain(source: ArchiveSource) -> None:
        while chunk := await source.read(1 << 20):
            out.extend(chunk)

    with leaves_nothing():
        source = await _ChildSource.start(BytesSource(data), ["sh", "-c", script], "test", (0,))
        try:
            reason = r"^test decompression failed - disk on fire \(exit status 3\)$"
            with pytest.raises(SourceError, match=reason):
                await drain(source)
            with pytest.raises(SourceError, match=reason):  # again, not a quiet end
                await source.read(1 << 20)
        finally:
            await source.aclose()
    assert bytes(out) == data


# --- cancellation ------------------------------------------------------------------------------


SILENT = ["zstd-threads", "gzip-rsyncable", "bzip2", "lzop"]


async def read_all(source: object) -> None:
    src = await open_source(source)  # type: ignore[arg-type]
    try:
        while await src.read(1 << 20):
            pass
    finally:
        await src.aclose()


@pytest.mark.parametrize("variant", SILENT)
@pytest.mark.parametrize("level", ["source", "reader"])
async def test_cancel_while_the_producer_is_silent(
    made: tuple[Path, bytes, bytes], variant: str, level: str
) -> None:
    """Half the compressed archive, then a producer that holds the pipe open
    and writes nothing: reading is cancellable at once, and leaves no child
    and no fd behind."""
    _, archive, image = made
    stall = threading.Event()
    read_fd, thread = feed_pipe(compressed(variant, archive), stall)
    try:
        with leaves_nothing():
            start = time.monotonic()
            with anyio.move_on_after(0.2) as scope:
                if level == "source":
                    await read_all(read_fd)
                else:
                    await restore(read_fd, len(image))
            elapsed = time.monotonic() - start
    finally:
        stall.set()
        thread.join()
    assert scope.cancelled_caught
    assert elapsed < 2.0


async def test_cancel_mid_restore_reaps_the_child(
    made: tuple[Path, bytes, bytes], tmp_path: Path
) -> None:
    _, archive, _ = made
    path = tmp_path / "a.vma.lzo"
    path.write_bytes(compressed("lzop", archive))
    writes = 0
    with leaves_nothing(), anyio.CancelScope() as scope:

        async def put(offset: int, data: memoryview) -> None:
            nonlocal writes
            writes += 1
            scope.cancel()

        async with await VmaReader.open(path) as reader:
            await reader.restore({"disk0": CallbackSink(put)})
    assert scope.cancelled_caught
    assert writes >= 1


async def test_read_after_a_cancelled_read_is_refused(made: tuple[Path, bytes, bytes]) -> None:
    """A source whose read was cancelled mid-decompression refuses to go on
    (its state is unknown) instead of returning wrong bytes."""
    _, archive, _ = made
    stall = threading.Event()
    read_fd, thread = feed_pipe(compressed("zstd-threads", archive), stall)
    try:
        source = await open_source(read_fd)
        try:
            with anyio.move_on_after(0.3):
                while await source.read(1 << 20):
                    pass
            with pytest.raises(VmaError, match="cancelled"):
                await source.read(1 << 20)
        finally:
            await source.aclose()
    finally:
        stall.set()
        thread.join()
