"""Where an archive comes from: a path, ``-`` (stdin), an fd, or an anyio byte
stream, decompressed on the fly when it starts with a zstd, gzip or lzop magic.

Every source hands out fresh buffers (a buffer is never reused after it was
returned), so the extent parser can give sinks views into them without copies.

* Regular files are read with ``os.pread`` in large pieces.  Their
  :meth:`ArchiveSource.read_blocking` is cheap in a worker thread, which lets
  the reader batch many reads into one thread hop (about 0.2 ms each here), and
  :meth:`ArchiveSource.pread` serves random access.
* Pipes, FIFOs and terminals are set non-blocking and waited on with
  ``anyio.wait_readable``; the original flags are restored on close, because
  ``O_NONBLOCK`` belongs to the open file description a parent shell shares.
* anyio streams are received from and gathered into large reads.
* zstd and gzip run in-process in a worker thread, through a bounded reader,
  so a decompression bomb cannot inflate more than the requested read size at
  once; lzop runs as a child process (``lzop -dc``) reading the file directly.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import subprocess
import zlib
from abc import ABC, abstractmethod
from typing import Final, Protocol

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread

from ._errors import SourceError

__all__ = ["CHUNK_SIZE", "ArchiveSource", "Chunk", "SourceLike", "open_source"]

READ_SIZE: Final = 4 << 20
"""Largest single read; the reader asks for about one extent (3.8 MiB)."""
_COMPRESSED_READ: Final = 1 << 20
CHUNK_SIZE: Final = 1 << 20
"""Read size of regular files, and the size of their recycled buffers."""
_POOL_BUFFERS: Final = 32
_SCRATCH_SIZE: Final = 128 << 10
_POOL_MIN_READ: Final = 256 << 10
_PIPE_SIZE: Final = 1 << 20

ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC: Final = b"\x1f\x8b"
LZOP_MAGIC: Final = b"\x89LZO\x00\r\n\x1a\n"
_MAGIC_PEEK: Final = len(LZOP_MAGIC)

SourceLike = str | os.PathLike[str] | int | anyio.abc.ByteReceiveStream
Chunk = bytes | bytearray | memoryview


class ArchiveSource(ABC):
    """A forward-only stream of archive bytes.

    ``read`` returns at most ``max_bytes`` and ``b""`` only at the end; every
    returned buffer is new and never touched again by the source.
    """

    compression: str | None = None
    """``"zstd"``, ``"gzip"``, ``"lzop"`` or None."""
    blocking: bool = False
    """True when :meth:`read_blocking` is cheap to call in a worker thread."""
    seekable: bool = False
    """True when :meth:`pread` serves random access to the archive bytes."""

    @abstractmethod
    async def read(self, max_bytes: int) -> bytes | bytearray | memoryview: ...

    def read_blocking(self, max_bytes: int) -> bytes | bytearray | memoryview:
        """Like :meth:`read`, from a worker thread started by anyio."""
        return anyio.from_thread.run(self.read, max_bytes)

    async def skip(self, max_bytes: int) -> int:
        """Read and drop up to ``max_bytes``; return how many (0 at the end)."""
        return len(await self.read(max_bytes))

    def skip_blocking(self, max_bytes: int) -> int:
        """Like :meth:`skip`, from a worker thread started by anyio."""
        return len(self.read_blocking(max_bytes))

    def pread(self, offset: int, size: int) -> bytes:
        """Read archive bytes at ``offset`` (blocking: call it in a worker thread)."""
        raise SourceError("random access needs an uncompressed archive in a regular file")

    def archive_size(self) -> int:
        """Bytes in a seekable archive (blocking)."""
        raise SourceError("random access needs an uncompressed archive in a regular file")

    async def aclose(self) -> None:  # noqa: B027 - most sources have nothing to release
        """Release the source; idempotent."""


# --- raw sources -------------------------------------------------------------------------------


class _FileSource(ArchiveSource):
    """A regular file (or block device), read with pread at our own position so
    that a caller's fd offset is neither used nor disturbed.

    Reads land in a pool of 1 MiB buffers that are recycled once nobody
    holds a view of them any more (a bytearray cannot be resized while
    exported, which is the test).  Fresh allocations of varying sizes cost
    page faults on every read here (measured: 4x slower than recycling).
    When the pool is exhausted (sinks holding many views), reads fall back to
    fresh buffers rather than wait.
    """

    blocking = True
    seekable = True

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pos = 0
        self._pool: list[bytearray] = []
        self._scratch: memoryview | None = None
        self._null_fd: int | None = None
        self._sendfile = True

    async def read(self, max_bytes: int) -> bytes | memoryview:
        return await anyio.to_thread.run_sync(self.read_blocking, max_bytes)

    def _free_buffer(self) -> bytearray | None:
        for buf in self._pool:
            try:
                buf.append(0)
            except BufferError:  # a view of it is still alive somewhere
                continue
            del buf[-1]
            return buf
        if len(self._pool) < _POOL_BUFFERS:
            buf = bytearray(CHUNK_SIZE + 1)
            del buf[-1]  # leaves headroom, so the append test never reallocates
            self._pool.append(buf)
            return buf
        return None

    def read_blocking(self, max_bytes: int) -> bytes | memoryview:
        size = min(max_bytes, CHUNK_SIZE)
        # A small read gets a buffer of its own size: a view of a few KiB
        # must not pin a whole 1 MiB pool buffer (sparse archives are mostly
        # small extents, and a sink may hold their views for a while).
        buf = self._free_buffer() if size >= _POOL_MIN_READ else None
        if buf is None:
            data: bytes | memoryview = self.pread(self._pos, size)
        else:
            try:
                count = os.preadv(self._fd, [memoryview(buf)[:size]], self._pos)
            except OSError as exc:
                raise SourceError(f"read failed - {exc.strerror}") from exc
            data = memoryview(buf)[:count]
        self._pos += len(data)
        return data

    def skip_blocking(self, max_bytes: int) -> int:
        """Have the kernel read the bytes and drop them: ``sendfile`` to
        /dev/null pulls every page through the page cache (so missing or
        unreadable data is reported exactly as by a read) without copying it
        into the process, which verify does not need.  Where sendfile is
        refused, read into one small scratch buffer that stays in the CPU cache.
        """
        if self._null_fd is None:
            self._null_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        if self._sendfile:
            try:
                count = os.sendfile(self._null_fd, self._fd, self._pos, max_bytes)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise SourceError(f"read failed - {exc.strerror}") from exc
                self._sendfile = False
            else:
                self._pos += count
                return count
        if self._scratch is None:
            self._scratch = memoryview(bytearray(_SCRATCH_SIZE))
        try:
            count = os.preadv(self._fd, [self._scratch[: min(max_bytes, _SCRATCH_SIZE)]], self._pos)
        except OSError as exc:
            raise SourceError(f"read failed - {exc.strerror}") from exc
        self._pos += count
        return count

    def pread(self, offset: int, size: int) -> bytes:
        try:
            return os.pread(self._fd, size, offset)
        except OSError as exc:
            raise SourceError(f"read failed - {exc.strerror}") from exc

    def archive_size(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_END)

    def child_stdin(self) -> int:
        """An fd positioned at our read position, for a child process to read."""
        os.lseek(self._fd, self._pos, os.SEEK_SET)
        return self._fd

    async def aclose(self) -> None:
        fd, self._fd = self._fd, -1
        null_fd, self._null_fd = self._null_fd, None
        if null_fd is not None:
            os.close(null_fd)
        if fd >= 0:
            os.close(fd)


class _PipeSource(ArchiveSource):
    """A pipe, FIFO, socket or terminal: non-blocking reads, readiness from the loop."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, self._flags | os.O_NONBLOCK)
        if hasattr(fcntl, "F_SETPIPE_SZ"):
            # fewer, larger reads; not every fd type or limit allows it
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)

    async def read(self, max_bytes: int) -> bytes:
        max_bytes = min(max_bytes, READ_SIZE)
        pieces: list[bytes] = []
        have = 0
        while have < max_bytes:
            try:
                data = os.read(self._fd, max_bytes - have)
            except BlockingIOError:
                if pieces:
                    break
                await anyio.wait_readable(self._fd)
                continue
            except OSError as exc:
                raise SourceError(f"read failed - {exc.strerror}") from exc
            if not data:
                break
            pieces.append(data)
            have += len(data)
        await anyio.lowlevel.checkpoint()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def aclose(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, self._flags)
            finally:
                os.close(fd)


class _StreamSource(ArchiveSource):
    """An anyio ByteReceiveStream; small receives are gathered into large reads."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream, owned: bool = False) -> None:
        self._stream = stream
        self._owned = owned
        self._leftover = b""
        self._eof = False

    async def read(self, max_bytes: int) -> bytes:
        max_bytes = min(max_bytes, READ_SIZE)
        pieces = [self._leftover] if self._leftover else []
        have = len(self._leftover)
        while have < max_bytes and not self._eof:
            try:
                data = await self._stream.receive(max_bytes - have)
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                self._eof = True
                break
            except anyio.BrokenResourceError as exc:
                raise SourceError(f"read failed - {exc}") from exc
            pieces.append(data)
            have += len(data)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._leftover = data[max_bytes:]
        return data[:max_bytes]

    async def aclose(self) -> None:
        if self._owned:
            await self._stream.aclose()


class _Pushback(ArchiveSource):
    """A source with its first bytes (read to sniff the magic) put back in front."""

    def __init__(self, inner: ArchiveSource, head: bytes) -> None:
        self._inner = inner
        self._head = head
        self.blocking = inner.blocking

    async def read(self, max_bytes: int) -> bytes | bytearray | memoryview:
        if self._head:
            head, self._head = self._head[:max_bytes], self._head[max_bytes:]
            return head
        return await self._inner.read(max_bytes)

    def read_blocking(self, max_bytes: int) -> bytes | bytearray | memoryview:
        if self._head:
            head, self._head = self._head[:max_bytes], self._head[max_bytes:]
            return head
        return self._inner.read_blocking(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


# --- decompression --------------------------------------------------------------------------------


class _RawReader:
    """A blocking file-like view of a source, for the decompressors' pull loops.

    Runs in a worker thread: a blocking source is read directly, any other is
    read on the event loop through ``anyio.from_thread``.
    """

    def __init__(self, source: ArchiveSource) -> None:
        self._source = source

    def read(self, size: int = -1) -> bytes:
        size = _COMPRESSED_READ if size < 0 else size
        return bytes(self._source.read_blocking(size))

    def readable(self) -> bool:
        return True


class _Decompressor(Protocol):
    def read(self, size: int) -> bytes: ...


class _GzipReader:
    """Bounded-output gzip stream reader that also follows concatenated members
    (pigz and ``cat a.gz b.gz`` produce them)."""

    def __init__(self, raw: _RawReader) -> None:
        self._raw = raw
        self._z = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self._input = b""
        self._done = False

    def read(self, size: int) -> bytes:
        while not self._done:
            if self._z.eof:
                # unused_data already holds any input not yet consumed
                self._input = self._z.unused_data
                self._z = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                if not self._input:
                    self._input = self._raw.read(_COMPRESSED_READ)
                    if not self._input:
                        self._done = True  # a clean end between members
                        break
            if not self._input:
                self._input = self._raw.read(_COMPRESSED_READ)
                if not self._input:
                    raise SourceError("gzip decompression failed - unexpected end of data")
            try:
                out = self._z.decompress(self._input, size)
            except zlib.error as exc:
                raise SourceError(f"gzip decompression failed - {exc}") from exc
            self._input = self._z.unused_data if self._z.eof else self._z.unconsumed_tail
            if out:
                return out
        return b""


class _DecompressingSource(ArchiveSource):
    """zstd or gzip, decompressed in a worker thread in bounded pieces."""

    blocking = True

    def __init__(self, inner: ArchiveSource, compression: str) -> None:
        self._inner = inner
        self.compression = compression
        raw = _RawReader(inner)
        self._reader: _Decompressor
        if compression == "zstd":
            import zstandard

            self._zstd_error: type[Exception] = zstandard.ZstdError
            self._reader = zstandard.ZstdDecompressor().stream_reader(
                raw,  # type: ignore[arg-type]  # any object with read() works
                read_size=_COMPRESSED_READ,
                read_across_frames=True,
            )
        else:
            self._zstd_error = zlib.error
            self._reader = _GzipReader(raw)

    async def read(self, max_bytes: int) -> bytes:
        return await anyio.to_thread.run_sync(self.read_blocking, max_bytes)

    def read_blocking(self, max_bytes: int) -> bytes:
        try:
            return self._reader.read(min(max_bytes, READ_SIZE))
        except self._zstd_error as exc:
            raise SourceError(f"{self.compression} decompression failed - {exc}") from exc

    async def aclose(self) -> None:
        await self._inner.aclose()


class _LzopSource(ArchiveSource):
    """``lzop -dc`` as a child process reading the archive file directly."""

    compression = "lzop"

    def __init__(self, inner: ArchiveSource, process: anyio.abc.Process) -> None:
        self._inner = inner
        self._process = process
        assert process.stdout is not None
        self._out = _StreamSource(process.stdout)

    async def read(self, max_bytes: int) -> bytes:
        data = await self._out.read(max_bytes)
        if not data:
            status = await self._process.wait()
            if status != 0:
                raise SourceError(f"lzop -dc failed with exit status {status}")
        return data

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._process.returncode is None:
                self._process.kill()
            await self._process.aclose()
            await self._inner.aclose()


async def _start_lzop(inner: ArchiveSource) -> ArchiveSource:
    if not isinstance(inner, _FileSource):
        raise SourceError("lzop-compressed archives can be read from files only")
    try:
        process = await anyio.open_process(
            ["lzop", "-dc"], stdin=inner.child_stdin(), stdout=subprocess.PIPE
        )
    except OSError as exc:
        raise SourceError(f"can't run lzop - {exc.strerror}") from exc
    return _LzopSource(inner, process)


# --- opening -------------------------------------------------------------------------------------


def _open_fd(fd: int) -> ArchiveSource:
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return _FileSource(fd)
    return _PipeSource(fd)


async def _sniff(source: ArchiveSource) -> tuple[ArchiveSource, bytes]:
    """Read the first bytes to recognise a compressor; put them back."""
    if source.seekable:  # a file or an s3:// object: peek without consuming
        return source, await anyio.to_thread.run_sync(source.pread, 0, _MAGIC_PEEK)
    head = b""
    while len(head) < _MAGIC_PEEK:
        data = bytes(await source.read(_MAGIC_PEEK - len(head)))
        if not data:
            break
        head += data
    return _Pushback(source, head), head


async def open_source(source: SourceLike | ArchiveSource) -> ArchiveSource:
    """Open ``source`` and wrap it in the decompressor its magic bytes call for.

    A path is opened read-only; ``"-"`` and an int fd are duplicated, so the
    caller's descriptor stays open and usable after the reader is closed.
    """
    if isinstance(source, ArchiveSource):
        raw = source
    elif isinstance(source, anyio.abc.ByteReceiveStream):
        raw = _StreamSource(source)
    elif isinstance(source, str) and source.startswith("s3://"):
        from ._s3 import S3Source  # needs the optional obstore package

        raw = await S3Source.open(source)
    elif isinstance(source, int) or source == "-":
        fd_in = 0 if source == "-" else source
        assert isinstance(fd_in, int)
        try:
            raw = _open_fd(os.dup(fd_in))
        except OSError as exc:
            raise SourceError(f"can't open file {source} - {exc.strerror}") from exc
    else:
        path = os.fspath(source)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"can't open file {path} - {exc.strerror}") from exc
        try:
            raw = _open_fd(fd)
        except BaseException:
            os.close(fd)
            raise
    try:
        sniffed, head = await _sniff(raw)
        if head.startswith(ZSTD_MAGIC):
            return _DecompressingSource(sniffed, "zstd")
        if head.startswith(GZIP_MAGIC):
            return _DecompressingSource(sniffed, "gzip")
        if head.startswith(LZOP_MAGIC):
            return await _start_lzop(raw)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await raw.aclose()
        raise
    return sniffed
