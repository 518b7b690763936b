"""Decompression by content: every compression vzdump writes, from any source.

Goal: read ``.vma.zst`` (``zstd --threads=N``, frames with or without a
content size, concatenated frames), ``.vma.gz`` (``gzip --rsyncable``, pigz,
concatenated members), ``.vma.bz2`` (multi-stream, like ``bzcat``) and
``.vma.lzo`` from a file, a pipe, standard input or an anyio stream, with
bounded memory, cancellably, and with every error saying what went wrong.

Plan:

* zstd, gzip and bzip2 run in-process, in a worker thread, through pull
  readers asked for at most one read's worth of output at a time, so a
  decompression bomb cannot inflate more than that at once.  The compressed
  bytes come from :class:`_RawInput`: straight from a blocking source (a
  file), or through the event loop for a pipe or a stream, in the caller's
  cancel scope (a read stalled on a silent pipe is cancellable).
* lzop has no Python module: ``lzop -dc`` runs as a child process.  The
  reader's own read drives it (:class:`_ChildSource`): while the child's
  stdout has nothing, the read feeds the child's stdin from the inner source
  (one chunk at a time: bounded memory) and drains its stderr (bounded), so
  no task outlives a call.  The child is reaped on every exit path.

Worst cases: a cancelled read leaves an in-process decompressor in an unknown
state; the source then refuses further reads (closing it is always safe).  A
child that fails is reported with the last line of its own stderr.
"""

from __future__ import annotations

import bz2
import contextlib
import os
import signal
import subprocess
import zlib
from collections.abc import Callable
from typing import Final, Protocol

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from ._errors import SourceError
from ._sources import READ_SIZE, ArchiveSource, enlarge_pipe, read_ready

__all__ = ["BZIP2_MAGIC", "GZIP_MAGIC", "LZOP_MAGIC", "ZSTD_MAGIC", "decompressing"]

ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
ZSTD_SKIPPABLE_MAGIC: Final = b"\x2a\x4d\x18"
"""After a first byte 0x50-0x5F: a skippable frame (pzstd starts with one)."""
GZIP_MAGIC: Final = b"\x1f\x8b"
BZIP2_MAGIC: Final = b"BZh"
"""Followed by the block size, a digit 1-9."""
LZOP_MAGIC: Final = b"\x89LZO\x00\r\n\x1a\n"

_COMPRESSED_READ: Final = 1 << 20
"""Compressed bytes handed to a decompressor at once (and fed to a child)."""
_STDERR_KEEP: Final = 4096
"""Bytes of a child's stderr kept (the last ones) for its error message; the
rest is drained, so a chatty child never blocks on a full stderr pipe."""
_LZOP_OK: Final = (0, 2)
"""lzop exit statuses that mean the output is complete (2: a warning, such as
trailing garbage after the last member or a multipart archive)."""


async def decompressing(source: ArchiveSource, head: bytes) -> ArchiveSource:
    """``source`` wrapped in the decompressor its first bytes ``head`` call
    for, or ``source`` itself when they match no compressor's magic."""
    if head.startswith(ZSTD_MAGIC) or _is_skippable_frame(head):
        return _InProcessSource(source, "zstd")
    if head.startswith(GZIP_MAGIC):
        return _InProcessSource(source, "gzip")
    if head.startswith(BZIP2_MAGIC) and head[3:4].isdigit() and head[3:4] != b"0":
        return _InProcessSource(source, "bzip2")
    if head.startswith(LZOP_MAGIC):
        return await _ChildSource.start(source, ["lzop", "-dc"], "lzop", ok_status=_LZOP_OK)
    return source


def _is_skippable_frame(head: bytes) -> bool:
    return len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == ZSTD_SKIPPABLE_MAGIC


# --- in-process decompressors --------------------------------------------------------------------


class _RawInput:
    """The compressed bytes, as the file-like object a decompressor pulls from
    (in a worker thread).

    A blocking source is read right there; any other source's
    :meth:`ArchiveSource.read_blocking` runs its read on the event loop,
    inside the cancel scope of the task that started the thread (anyio's
    rule), so a read stalled on a silent pipe is cancelled with the caller.
    With ``frames``, the bytes are followed through zstd's frame structure,
    and an end of input inside a frame raises ``EOFError``.
    """

    def __init__(self, source: ArchiveSource, frames: _ZstdFrames | None = None) -> None:
        self.source = source
        self._frames = frames

    def read(self, size: int = -1) -> bytes:
        data = bytes(self.source.read_blocking(_COMPRESSED_READ if size < 0 else size))
        if self._frames is not None:
            if not data and not self._frames.complete:
                raise EOFError("unexpected end of data")
            self._frames.feed(data)
        return data

    def readable(self) -> bool:
        return True


class _ZstdFrames:
    """Follows zstd's frame structure over the compressed bytes (frame, block
    and skippable-frame headers only; the data is stepped over, never
    decoded), to tell input that ends between frames from input cut short
    inside one: zstandard's stream reader ends quietly in both cases.

    Cost: a few operations per block (at most 128 KiB of output each).  On
    anything it does not recognise it stops following, and leaves the error
    to the decompressor.
    """

    def __init__(self) -> None:
        self._want = 4  # bytes of the next header field to gather
        self._handler: Callable[[bytes], None] = self._on_magic
        self._field = bytearray()
        self._skip = 0  # bytes to step over before that field
        self._checksum = False
        self._lost = False

    @property
    def complete(self) -> bool:
        """True between frames (or once lost: then the decompressor judges)."""
        at_frame_start = self._handler == self._on_magic and not self._field and not self._skip
        return self._lost or at_frame_start

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end and not self._lost:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            take = min(self._want - len(self._field), end - pos)
            self._field += data[pos : pos + take]
            pos += take
            if len(self._field) == self._want:
                field = bytes(self._field)
                self._field.clear()
                self._handler(field)

    def _expect(self, want: int, handler: Callable[[bytes], None], skip: int = 0) -> None:
        self._want, self._handler, self._skip = want, handler, skip

    def _on_magic(self, field: bytes) -> None:
        if field == ZSTD_MAGIC:
            self._expect(1, self._on_descriptor)
        elif _is_skippable_frame(field):
            self._expect(4, self._on_skippable_size)
        else:
            self._lost = True

    def _on_skippable_size(self, field: bytes) -> None:
        self._expect(4, self._on_magic, skip=int.from_bytes(field, "little"))

    def _on_descriptor(self, field: bytes) -> None:
        descriptor = field[0]
        single_segment = descriptor >> 5 & 1
        self._checksum = bool(descriptor >> 2 & 1)
        content_size_bytes = (single_segment, 2, 4, 8)[descriptor >> 6]
        dictionary_id_bytes = (0, 1, 2, 4)[descriptor & 3]
        window_bytes = 1 - single_segment
        skip = window_bytes + dictionary_id_bytes + content_size_bytes
        self._expect(3, self._on_block, skip=skip)

    def _on_block(self, field: bytes) -> None:
        header = int.from_bytes(field, "little")
        last, kind, size = header & 1, header >> 1 & 3, header >> 3
        if kind == 3:  # reserved
            self._lost = True
            return
        payload = 1 if kind == 1 else size  # an RLE block stores one byte
        if last:
            self._expect(4, self._on_magic, skip=payload + (4 if self._checksum else 0))
        else:
            self._expect(3, self._on_block, skip=payload)


class _Member(Protocol):
    """One gzip member or bzip2 stream being decompressed (bz2's API)."""

    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    @property
    def needs_input(self) -> bool: ...
    def decompress(self, data: bytes, max_length: int) -> bytes: ...


class _GzipMember:
    """zlib's decompressor behind bz2's interface (``needs_input``, input kept inside)."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self._tail = b""
        self.needs_input = True

    @property
    def eof(self) -> bool:
        return self._z.eof

    @property
    def unused_data(self) -> bytes:
        return self._z.unused_data

    def decompress(self, data: bytes, max_length: int) -> bytes:
        out = self._z.decompress(self._tail + data if self._tail else data, max_length)
        self._tail = self._z.unconsumed_tail
        # a full output may leave more inside zlib: ask again before reading
        self.needs_input = not self._tail and len(out) < max_length
        return out


class _MemberReader:
    """Bounded pull decompression of concatenated members, as zcat and bzcat
    read them (pigz, ``cat a.gz b.gz``, pbzip2 and ``cat a.bz2 b.bz2`` write them)."""

    def __init__(self, raw: _RawInput, new_member: Callable[[], _Member]) -> None:
        self._raw = raw
        self._new_member = new_member
        self._member = new_member()
        self._input = b""

    def read(self, size: int) -> bytes:
        while True:
            if self._member.eof:
                self._input = self._member.unused_data or self._raw.read(_COMPRESSED_READ)
                if not self._input:
                    return b""  # a clean end between members
                self._member = self._new_member()
            if not self._input and self._member.needs_input:
                self._input = self._raw.read(_COMPRESSED_READ)
                if not self._input:
                    raise EOFError("unexpected end of data")
            out = self._member.decompress(self._input, size)
            self._input = b""
            if out:
                return out


class _Decompressor(Protocol):
    def read(self, size: int) -> bytes: ...


def _pull_reader(
    compression: str, raw: _RawInput
) -> tuple[_Decompressor, tuple[type[Exception], ...]]:
    """The pull decompressor for ``compression``, and the errors it raises."""
    if compression == "zstd":
        import zstandard  # imported only when a zstd archive is read

        reader = zstandard.ZstdDecompressor().stream_reader(
            raw,  # type: ignore[arg-type]  # any object with read() works
            read_size=_COMPRESSED_READ,
            read_across_frames=True,
        )
        return reader, (zstandard.ZstdError, EOFError)
    if compression == "gzip":
        return _MemberReader(raw, _GzipMember), (zlib.error, EOFError)
    return _MemberReader(raw, bz2.BZ2Decompressor), (OSError, EOFError, ValueError)


class _InProcessSource(ArchiveSource):
    """zstd, gzip or bzip2, decompressed in a worker thread in bounded pieces.

    A read cancelled or failed mid-decompression leaves the decompressor in
    an unknown state (the output it had made is gone): later reads refuse.
    """

    def __init__(self, inner: ArchiveSource, compression: str) -> None:
        self.compression = compression
        self.blocking = inner.blocking
        self._input = _RawInput(inner, _ZstdFrames() if compression == "zstd" else None)
        self._reader, self._errors = _pull_reader(compression, self._input)
        self._broken = False

    async def read(self, max_bytes: int) -> bytes:
        return await anyio.to_thread.run_sync(self.read_blocking, max_bytes)

    def read_blocking(self, max_bytes: int) -> bytes:
        if self._broken:
            raise SourceError(
                f"{self.compression} decompression failed - an earlier read was cancelled or failed"
            )
        self._broken = True
        try:
            data = self._reader.read(min(max_bytes, READ_SIZE))
        except self._errors as exc:
            raise SourceError(f"{self.compression} decompression failed - {exc}") from exc
        self._broken = False
        return data

    async def aclose(self) -> None:
        await self._input.source.aclose()


# --- a decompressor child process ----------------------------------------------------------------


class _ChildSource(ArchiveSource):
    """A decompressor child (``lzop -dc``) between the inner source and the reader.

    Each :meth:`read` takes what the child's stdout has; while it has
    nothing, the read feeds the child's stdin from the inner source (at most
    one chunk pending: bounded memory) and drains its stderr, keeping the
    last 4 KiB for the error message.  A chunk is never fetched from the
    inner source in a part of the read that our own cancellation can cut
    short, so no input is lost between reads.  At the end of the child's
    output the child is reaped and its exit status checked; :meth:`aclose`
    kills and reaps it on every other path (error, cancellation).
    """

    def __init__(
        self,
        inner: ArchiveSource,
        argv: list[str],
        compression: str,
        ok_status: tuple[int, ...],
        process: subprocess.Popen[bytes],
        fds: tuple[int, int, int, int],
    ) -> None:
        self.compression = compression
        self._inner = inner
        self._name = " ".join(argv)
        self._ok_status = ok_status
        self._process = process
        self._stdin, self._stdout, self._stderr, self._pidfd = fds
        self._pending = memoryview(b"")
        self._input_done = False
        self._stderr_kept = bytearray()
        self._output_ready = False
        self._fetching = False
        self._failure: str | None = None

    @classmethod
    async def start(
        cls, inner: ArchiveSource, argv: list[str], compression: str, ok_status: tuple[int, ...]
    ) -> _ChildSource:
        """Start ``argv`` with pipes for its stdin, stdout and stderr."""
        pipes: list[int] = []
        try:
            for _ in range(3):
                pipes.extend(os.pipe2(os.O_CLOEXEC))
        except OSError as exc:
            for fd in pipes:
                os.close(fd)
            raise SourceError(f"can't run {argv[0]} - {exc.strerror}") from exc
        stdin_r, stdin_w, stdout_r, stdout_w, stderr_r, stderr_w = pipes
        ours = (stdin_w, stdout_r, stderr_r)
        try:
            process = subprocess.Popen(  # noqa: ASYNC220 - fork+exec, no waiting
                argv, stdin=stdin_r, stdout=stdout_w, stderr=stderr_w, close_fds=True
            )
        except OSError as exc:
            for fd in ours:
                os.close(fd)
            raise SourceError(f"can't run {argv[0]} - {exc.strerror}") from exc
        finally:
            for fd in (stdin_r, stdout_w, stderr_w):
                os.close(fd)
        try:
            pidfd = os.pidfd_open(process.pid)
        except OSError as exc:
            process.kill()
            process.wait()  # killed: returns at once
            for fd in ours:
                os.close(fd)
            raise SourceError(f"can't watch {argv[0]} - {exc.strerror}") from exc
        for fd in ours:
            os.set_blocking(fd, False)
        enlarge_pipe(stdin_w)
        enlarge_pipe(stdout_r)
        return cls(inner, argv, compression, ok_status, process, (*ours, pidfd))

    async def read(self, max_bytes: int) -> bytes:
        if self._stdout < 0:
            raise SourceError("read failed - the source is closed")
        if self._failure is not None:
            raise SourceError(self._failure)
        data = await read_ready(self._stdout, min(max_bytes, READ_SIZE), self._pump)
        if not data:
            self._close_stdin()  # its output is complete: it needs no more input
            await self._check_exit()
        return data

    async def _pump(self) -> None:
        """Return once the child's stdout is readable; feed it and drain its
        stderr meanwhile."""
        self._output_ready = False
        fed = anyio.Event()
        feed_scope = anyio.CancelScope()
        drain_scope = anyio.CancelScope()
        feed_error: list[Exception] = []

        async def feed() -> None:
            try:
                with feed_scope:
                    await self._feed()
            except Exception as exc:  # re-raised below, outside the task group
                feed_error.append(exc)
            finally:
                fed.set()

        async def drain() -> None:
            with drain_scope:
                await self._drain_stderr()

        async with anyio.create_task_group() as tg:
            tg.start_soon(feed)
            tg.start_soon(drain)
            await anyio.wait_readable(self._stdout)
            self._output_ready = True
            if not self._fetching:  # a fetch in progress ends the feed once stored
                feed_scope.cancel()
            await fed.wait()
            drain_scope.cancel()
        if feed_error:
            raise feed_error[0]

    async def _feed(self) -> None:
        while not self._output_ready and not self._input_done:
            if not self._pending:
                self._fetching = True
                try:
                    chunk = await self._inner.read(_COMPRESSED_READ)
                finally:
                    self._fetching = False
                if not chunk:
                    self._close_stdin()  # the child sees the end of its input
                    return
                self._pending = memoryview(chunk).cast("B")
                continue
            try:
                count = os.write(self._stdin, self._pending)
            except BlockingIOError:
                await anyio.wait_writable(self._stdin)
                continue
            except BrokenPipeError:
                # it stopped reading (it failed): its exit status says why
                self._close_stdin()
                return
            except OSError as exc:
                raise SourceError(f"write to {self._name} failed - {exc.strerror}") from exc
            self._pending = self._pending[count:]

    def _close_stdin(self) -> None:
        self._input_done = True
        self._pending = memoryview(b"")
        fd, self._stdin = self._stdin, -1
        if fd >= 0:
            anyio.notify_closing(fd)
            os.close(fd)

    def _read_stderr(self) -> bool:
        """Take what the child's stderr has; False once it is at its end."""
        while True:
            try:
                data = os.read(self._stderr, 65536)
            except BlockingIOError:
                return True
            if not data:
                return False
            self._stderr_kept += data
            del self._stderr_kept[:-_STDERR_KEEP]  # the last lines say why it failed

    async def _drain_stderr(self) -> None:
        while self._stderr >= 0 and self._read_stderr():
            await anyio.wait_readable(self._stderr)

    async def _wait_exit(self) -> int:
        if self._process.returncode is None:
            await anyio.wait_readable(self._pidfd)
            self._process.wait()  # it has exited: returns at once
        return self._process.returncode

    async def _check_exit(self) -> None:
        """At the end of its output: reap the child (draining its stderr, on
        which it could otherwise block) and report a failure in its words."""
        if self._process.returncode is not None:
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._drain_stderr)
            status = await self._wait_exit()
            tg.cancel_scope.cancel()
        if status in self._ok_status:
            return
        with contextlib.suppress(OSError):
            self._read_stderr()  # it has exited: the rest of what it wrote
        lines = self._stderr_kept.decode(errors="replace").strip().splitlines()
        reason = lines[-1].strip() if lines else "no message"
        how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
        self._failure = f"{self.compression} decompression failed - {reason} ({how})"
        raise SourceError(self._failure)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._stdout < 0:
                return
            self._close_stdin()
            if self._process.returncode is None:
                self._process.send_signal(signal.SIGKILL)  # a no-op once it is reaped
                await self._wait_exit()
            fds = (self._stdout, self._stderr, self._pidfd)
            self._stdout = self._stderr = self._pidfd = -1
            for fd in fds:
                anyio.notify_closing(fd)
                os.close(fd)
            await self._inner.aclose()
