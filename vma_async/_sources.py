"""Where an archive comes from: a path, ``-`` (stdin), an fd, or an anyio byte
stream; and :class:`ArchiveSource`, the interface the reader codes against.

Goal: hand the reader archive bytes in large fresh buffers, from anything a
user can name, without ever blocking the event loop or stalling on a peer
that is late.  Plan:

* :func:`open_source` opens a path in a worker thread (``O_NONBLOCK``, so a
  FIFO opens at once even with no writer yet), picks the raw source by file
  type, sniffs the first bytes and lets :mod:`._decompress` wrap the source
  in the decompressor its magic calls for (never by file name).
* Regular files and block devices are read with ``pread`` in large pieces;
  their :meth:`ArchiveSource.read_blocking` is cheap in a worker thread, which
  lets the reader batch many reads into one thread hop (about 0.2 ms each),
  and :meth:`ArchiveSource.pread` serves random access.
* Pipes, FIFOs, sockets and terminals are read non-blocking and waited on
  with ``anyio.wait_readable``; the original flags are restored on close,
  because ``O_NONBLOCK`` belongs to the open file description a parent shell
  shares.  A FIFO's first read waits for readiness: a FIFO with no writer yet
  reads as end of file, and is not the end of the archive.
* anyio streams are received from and gathered into large reads.

Every source hands out fresh buffers (a buffer is never reused while a view
of it is alive), so the extent parser can give sinks views without copies.

Worst cases: a writer that never comes (the open waits, cancellably, with the
loop free); a stream closed under the reader (a :class:`SourceError` that says
so, never a silent end of the archive that would surface as a missing
cluster).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Final, Self

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from ._errors import SourceError
from ._fdio import open_for_reading
from ._file_reader import CHUNK_SIZE, FileReader

__all__ = ["CHUNK_SIZE", "ArchiveSource", "Chunk", "SourceLike", "open_source"]

READ_SIZE: Final = 4 << 20
"""Largest single read; the reader asks for about one extent (3.8 MiB)."""
PIPE_SIZE: Final = 1 << 20
"""Pipe capacity asked for (``F_SETPIPE_SZ``): fewer, larger reads."""
MAGIC_PEEK: Final = 9
"""Bytes sniffed to recognise a compressor (the longest magic, lzop's)."""

SourceLike = str | os.PathLike[str] | int | anyio.abc.ByteReceiveStream
Chunk = bytes | bytearray | memoryview


class ArchiveSource(ABC):
    """A forward-only stream of archive bytes: what the reader reads from.

    Required: :meth:`read`.  Everything else has a default that suits a
    source which can only be read forward through the event loop (an object
    store download, a socket); override :meth:`aclose` when the source holds
    something, and the blocking and random-access methods only when the
    source can do better (then set :attr:`blocking` / :attr:`seekable`).

    One task reads at a time.  Every buffer :meth:`read` returns is the
    caller's: the source never writes into it again (the parser hands views
    of it to sinks, which may keep them).
    """

    compression: str | None = None
    """``"zstd"``, ``"gzip"``, ``"bzip2"``, ``"lzop"``, or None for raw
    archive bytes.  Informational (``vma`` prints it); set by the
    decompressing wrappers."""

    blocking: bool = False
    """True when :meth:`read_blocking` and :meth:`skip_blocking` are cheap to
    call in a worker thread (a regular file).  The reader then batches many
    reads and the parsing between them into one thread hop; otherwise it
    awaits :meth:`read` on the event loop."""

    seekable: bool = False
    """True when :meth:`pread` and :meth:`archive_size` work: an uncompressed
    archive in a regular file or block device.  Random access
    (``VmaReader.open_device``) needs it."""

    @abstractmethod
    async def read(self, max_bytes: int) -> Chunk:
        """Return the next 1 to ``max_bytes`` bytes, or ``b""`` at the end.

        Why: the parser asks for what it needs next (a header, about one
        extent); returning less is fine, the parser asks again.  The end is
        reported only once the input really ended: a failure, or a stream
        closed under the reader, raises :class:`SourceError` instead.
        Cancellation: a read that raises a cancellation should not have
        consumed input (our own sources guarantee it; a source that cannot is
        still safe to close).
        """

    def read_blocking(self, max_bytes: int) -> Chunk:
        """Like :meth:`read`, called from a worker thread started by anyio.

        Used only when :attr:`blocking` is True.  The default runs
        :meth:`read` on the event loop, which is correct but gains nothing.
        """
        return anyio.from_thread.run(self.read, max_bytes)

    async def skip(self, max_bytes: int) -> int:
        """Consume and drop up to ``max_bytes``; return how many (0 at the end).

        Why: verify needs no data, and a source may drop bytes more cheaply
        than it can deliver them.  The default reads and discards.
        """
        return len(await self.read(max_bytes))

    def skip_blocking(self, max_bytes: int) -> int:
        """Like :meth:`skip`, from a worker thread (only when :attr:`blocking`)."""
        return len(self.read_blocking(max_bytes))

    def pread(self, offset: int, size: int) -> bytes:
        """Return archive bytes at ``offset`` without moving the read position.

        Blocking: called in a worker thread, only when :attr:`seekable`.
        Random access reads extent headers and cluster data with it.  The
        default refuses.
        """
        raise SourceError("random access needs an uncompressed archive in a regular file")

    def pread_cached(self, offset: int, size: int) -> bytes | None:
        """The same bytes as :meth:`pread` if they can be had without
        blocking (for a file: all of them in the page cache), else None.

        Called on the event loop by random access: a cached read then costs
        a memcpy instead of a worker-thread hop (the hop was most of an NBD
        read's time).  The default says "not without blocking".
        """
        return None

    def archive_size(self) -> int:
        """The archive's size in bytes (blocking; only when :attr:`seekable`)."""
        raise SourceError("random access needs an uncompressed archive in a regular file")

    async def aclose(self) -> None:  # noqa: B027 - a source may hold nothing
        """Release what the source holds (fds it owns, child processes); idempotent.

        Called exactly once by the reader, also after errors and
        cancellation (inside a shielded scope): it must not wait for a peer.
        The default has nothing to release.
        """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()


def stream_closed_error(exc: anyio.ClosedResourceError | anyio.BrokenResourceError) -> SourceError:
    """The error for a stream closed under the reader: never the archive's end,
    which would surface later as a misleading missing cluster."""
    if isinstance(exc, anyio.ClosedResourceError):
        return SourceError("read failed - the stream was closed while the archive was read")
    detail = f" ({exc})" if str(exc) else ""
    return SourceError(f"read failed - the stream was closed by an error{detail}")


# --- raw sources -------------------------------------------------------------------------------


class _FileSource(ArchiveSource):
    """A regular file (or block device): :class:`FileReader`'s blocking reads,
    in worker threads (see ``_file_reader``)."""

    blocking = True
    seekable = True

    def __init__(self, fd: int, *, closefd: bool = True) -> None:
        self._reader = FileReader(fd, closefd=closefd)

    async def read(self, max_bytes: int) -> bytes | memoryview:
        return await anyio.to_thread.run_sync(self._reader.read, max_bytes)

    def read_blocking(self, max_bytes: int) -> bytes | memoryview:
        return self._reader.read(max_bytes)

    def skip_blocking(self, max_bytes: int) -> int:
        return self._reader.skip(max_bytes)

    def pread(self, offset: int, size: int) -> bytes:
        return self._reader.pread(offset, size)

    def pread_cached(self, offset: int, size: int) -> bytes | None:
        return self._reader.pread_cached(offset, size)

    def archive_size(self) -> int:
        return self._reader.archive_size()

    async def aclose(self) -> None:
        self._reader.close()


async def read_ready(fd: int, max_bytes: int, wait: Callable[[], Awaitable[None]]) -> bytes:
    """Up to ``max_bytes`` of what the non-blocking ``fd`` has; ``await wait()``
    only while nothing has come yet.  A checkpoint that consumes nothing when
    cancelled (trio's rule: a cancelled operation did not happen)."""
    await anyio.lowlevel.checkpoint_if_cancelled()
    pieces: list[bytes] = []
    have = 0
    while have < max_bytes:
        try:
            data = os.read(fd, max_bytes - have)
        except BlockingIOError:
            if pieces:
                break
            try:
                await wait()
            except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
                raise stream_closed_error(exc) from exc
            continue
        except OSError as exc:
            raise SourceError(f"read failed - {exc.strerror}") from exc
        if not data:
            break
        pieces.append(data)
        have += len(data)
    await anyio.lowlevel.cancel_shielded_checkpoint()
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def enlarge_pipe(fd: int) -> None:
    """Ask for a larger pipe buffer; not every fd type or limit allows it."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


class _PipeSource(ArchiveSource):
    """A pipe, FIFO, socket or terminal: non-blocking reads, readiness from the loop.

    A FIFO opened non-blocking before any writer has it open reads as end of
    file at once, so the first read of a FIFO waits for readiness instead:
    the kernel reports a FIFO readable only once a writer has written, or
    has come and gone (then the end of file is real).
    """

    def __init__(self, fd: int, *, closefd: bool = True, is_fifo: bool = False) -> None:
        self._fd = fd
        self._closefd = closefd
        self._await_writer = is_fifo
        self._flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, self._flags | os.O_NONBLOCK)
        enlarge_pipe(fd)

    async def _wait(self) -> None:
        await anyio.wait_readable(self._fd)

    async def read(self, max_bytes: int) -> bytes:
        if self._fd < 0:
            raise SourceError("read failed - the source is closed")
        if self._await_writer:
            try:
                await anyio.wait_readable(self._fd)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
                raise stream_closed_error(exc) from exc
            self._await_writer = False
        return await read_ready(self._fd, min(max_bytes, READ_SIZE), self._wait)

    async def aclose(self) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        anyio.notify_closing(fd)
        with contextlib.suppress(OSError):  # the flags of an fd already gone stay gone
            fcntl.fcntl(fd, fcntl.F_SETFL, self._flags)
        if self._closefd:
            os.close(fd)


class _StreamSource(ArchiveSource):
    """An anyio ByteReceiveStream (not ours to close); small receives are
    gathered into large reads.  Received pieces are kept on the object until
    returned, so a cancelled read loses nothing."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self._stream = stream
        self._pieces: list[bytes] = []
        self._have = 0
        self._eof = False

    async def read(self, max_bytes: int) -> bytes:
        max_bytes = min(max_bytes, READ_SIZE)
        while self._have < max_bytes and not self._eof:
            try:
                data = await self._stream.receive(max_bytes - self._have)
            except anyio.EndOfStream:
                self._eof = True
                break
            except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
                raise stream_closed_error(exc) from exc
            self._pieces.append(data)
            self._have += len(data)
        data = b"".join(self._pieces) if len(self._pieces) != 1 else self._pieces[0]
        rest = data[max_bytes:]
        self._pieces = [rest] if rest else []
        self._have = len(rest)
        return data[:max_bytes]

    async def aclose(self) -> None:
        self._pieces = []


class _Pushback(ArchiveSource):
    """A source with its first bytes (read to sniff the magic) put back in front."""

    def __init__(self, inner: ArchiveSource, head: bytes) -> None:
        self._inner = inner
        self._head = head
        self.blocking = inner.blocking

    def _take_head(self, max_bytes: int) -> bytes:
        head, self._head = self._head[:max_bytes], self._head[max_bytes:]
        return head

    async def read(self, max_bytes: int) -> Chunk:
        if self._head:
            await anyio.lowlevel.checkpoint()
            return self._take_head(max_bytes)
        return await self._inner.read(max_bytes)

    def read_blocking(self, max_bytes: int) -> Chunk:
        if self._head:
            return self._take_head(max_bytes)
        return self._inner.read_blocking(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


# --- opening -------------------------------------------------------------------------------------


def _source_for_fd(fd: int, mode: int, *, closefd: bool) -> ArchiveSource:
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return _FileSource(fd, closefd=closefd)
    return _PipeSource(fd, closefd=closefd, is_fifo=stat.S_ISFIFO(mode))


async def _open_raw(source: SourceLike | ArchiveSource, closefd: bool) -> ArchiveSource:
    if isinstance(source, ArchiveSource):
        return source
    if isinstance(source, anyio.abc.ByteReceiveStream):
        return _StreamSource(source)
    if isinstance(source, str) and source.startswith("s3://"):
        from ._s3 import S3Source  # needs the optional obstore package

        return await S3Source.open(source)
    if isinstance(source, int) or source == "-":
        # "-" is standard input, which stays open whatever closefd says
        given, closefd = (0, False) if source == "-" else (int(source), closefd)
        try:
            mode = (await anyio.to_thread.run_sync(os.fstat, given)).st_mode
            return _source_for_fd(given, mode, closefd=closefd)
        except OSError as exc:
            raise SourceError(f"can't open file {source} - {exc.strerror}") from exc
    path = os.fspath(source)
    try:
        fd, mode = await anyio.to_thread.run_sync(open_for_reading, path)
    except OSError as exc:
        raise SourceError(f"can't open file {path} - {exc.strerror}") from exc
    try:
        return _source_for_fd(fd, mode, closefd=True)
    except BaseException:
        os.close(fd)
        raise


async def _sniff(source: ArchiveSource) -> tuple[ArchiveSource, bytes]:
    """Read the first bytes to recognise a compressor; put them back."""
    if source.seekable:  # a file or an s3:// object: peek without consuming
        return source, await anyio.to_thread.run_sync(source.pread, 0, MAGIC_PEEK)
    head = b""
    while len(head) < MAGIC_PEEK:
        data = bytes(await source.read(MAGIC_PEEK - len(head)))
        if not data:
            break
        head += data
    return _Pushback(source, head), head


async def open_source(source: SourceLike | ArchiveSource, *, closefd: bool = True) -> ArchiveSource:
    """Open ``source`` and wrap it in the decompressor its first bytes call for.

    ``source`` is a path (opened here, closed by ``aclose``), ``"-"``
    (standard input, never closed), an int fd (closed by ``aclose`` unless
    ``closefd=False``; its offset is never moved: regular files are read with
    ``pread``), an anyio byte stream (received from, never closed: it is the
    caller's), or an :class:`ArchiveSource` (closed by ``aclose``).
    On any failure, including cancellation, what was opened here is closed
    again (an int fd too, when ``closefd`` is True).
    """
    from ._decompress import decompressing  # here: _decompress builds on this module

    raw = await _open_raw(source, closefd)
    try:
        sniffed, head = await _sniff(raw)
        return await decompressing(sniffed, head)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await raw.aclose()
        raise
