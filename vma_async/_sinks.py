"""Where restored devices go: the :class:`Sink` interface and the sinks we ship.

Goal: one explicit interface that :meth:`VmaReader.restore` calls directly,
so a new sink (NBD, object storage, a throttling wrapper) knows exactly what
it must and may provide.

Plan: a sink must implement ``write(offset, data)`` and ``aclose()``; the
reader also calls these hooks, whose defaults are right for a simple sink:

* ``prepare(device)``: once before any data, with the header's
  :class:`DeviceInfo`, so a sink can create or check its target with the
  device's real size and name (default: nothing);
* ``write_many(writes)``: a queue item's writes for the device at once (one
  extent's, or several small extents' up to about 1 MiB of data), so a file
  sink pays one worker-thread hop (about 0.2 ms) per item instead of one per
  run, and can merge runs that are contiguous on disk into one ``pwritev``
  (default: ``write`` each);
* ``write_zeroes(offset, length)``: a run the archive records as zero, only
  when the restore asks for zeroes, and always for vmstate (default: zero
  chunks of at most 1 MiB through ``write``);
* ``flush()``: after the last data (default: nothing);
* ``abort()``: the restore failed or was cancelled; a sink that created a
  file removes it, so nothing is left behind (default: ``aclose``).

Writes to regular files and block devices run in a worker thread; a
:class:`SequentialSink` on a pipe writes non-blocking and waits for the loop.
An fd handed to a sink is closed by it when it closes unless ``closefd=False``
(as ``open(fd)`` does); paths are always the sink's own.

Worst case: a sink that finds its target existing raises
:class:`SinkExistsError`, never overwrites it; every other failure is a
:class:`SinkError` naming the device.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import anyio
import anyio.to_thread

from ._errors import DeviceSizeError, SinkError, SinkExistsError
from ._fdio import (
    ZERO_CHUNK,
    Buffer,
    create_exclusive,
    pwrite_all,
    remove_created,
    write_all,
    write_all_nonblocking,
    write_zeroes,
    zero_view,
)
from ._format import DeviceInfo

__all__ = [
    "Buffer",
    "CallbackSink",
    "ExistingFileSink",
    "RawFileSink",
    "SequentialSink",
    "Sink",
    "SIZE_TOLERANCE",
]

SIZE_TOLERANCE: Final = 4 << 20
"""An existing target may be this much larger than the device (reference rule)."""


class Sink(ABC):
    """Where one device's restored bytes go (see the module docstring for
    what the reader calls, and when)."""

    @abstractmethod
    async def write(self, offset: int, data: Buffer) -> None:
        """Store ``data`` at device byte ``offset``; ``data`` stays valid as
        long as the sink holds it (the reader never reuses a buffer)."""

    @abstractmethod
    async def aclose(self) -> None:
        """The restore succeeded: release the target (idempotent)."""

    async def prepare(self, device: DeviceInfo) -> None:  # noqa: B027 - optional hook
        """Called once before any data, with the device this sink restores."""

    async def write_many(self, writes: Sequence[tuple[int, Buffer]]) -> None:
        """Several ``(offset, data)`` writes in device-offset order."""
        for offset, data in writes:
            await self.write(offset, data)

    async def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros."""
        end = offset + length
        while offset < end:
            step = min(ZERO_CHUNK, end - offset)
            await self.write(offset, zero_view(step))
            offset += step

    async def flush(self) -> None:  # noqa: B027 - optional hook
        """After the last write: make the data durable where that means something."""

    async def abort(self) -> None:
        """The restore failed: release the target and undo what the sink created."""
        await self.aclose()


# --- sinks on a file descriptor ------------------------------------------------------------------


class _FdSink(Sink):
    """Shared body of the sinks that write to one fd: ``target`` is a path or
    an fd (closed by :meth:`aclose` unless ``closefd=False``).  The target is
    opened on first use, or by ``prepare``, in a worker thread; a path a
    subclass creates is removed again by :meth:`abort`."""

    def __init__(
        self,
        target: str | os.PathLike[str] | int,
        *,
        name: str | None = None,
        closefd: bool = True,
    ) -> None:
        self._target = target
        self._fd = target if isinstance(target, int) else -1
        self._owns_fd = closefd or not isinstance(target, int)
        self._opened = False
        self._closed = False
        self._created = False
        if name is None:
            name = f"fd {target}" if isinstance(target, int) else os.fspath(target)
        self._name = name

    def _open_blocking(self) -> None:
        """Open (or check) the target: set ``_fd`` from a path, inspect an fd."""
        raise NotImplementedError

    def _create_blocking(self) -> None:
        """Create the target path (never an existing file), or keep the given fd."""
        if isinstance(self._target, int):
            return
        path = os.fspath(self._target)
        try:
            self._fd = create_exclusive(None, path)
        except FileExistsError as exc:
            raise SinkExistsError(f"can't create file {path} - file exists") from exc
        except OSError as exc:
            raise SinkError(f"can't create file {path} - {exc.strerror}") from exc
        self._created = True

    async def prepare(self, device: DeviceInfo) -> None:
        """Open (and check) the target before the first data, named after ``device``."""
        self._name = device.name
        await self._ensure_open()

    async def _ensure_open(self) -> int:
        if not self._opened:
            if self._closed:
                raise SinkError(f"restore target for {self._name} is closed")
            await anyio.to_thread.run_sync(self._open_blocking)
            self._opened = True
        return self._fd

    def _release(self) -> None:
        """Give the fd back (subclasses undo their fd changes first)."""
        fd, self._fd = self._fd, -1
        if fd >= 0 and self._owns_fd:
            os.close(fd)

    async def _fsync(self, fd: int, what: str) -> None:
        try:
            await anyio.to_thread.run_sync(os.fsync, fd)
        except OSError as exc:
            raise SinkError(f"{what} failed - {exc.strerror}") from exc

    async def aclose(self) -> None:
        self._closed = True
        self._release()

    async def abort(self) -> None:
        """Close, and remove the file if this sink created it."""
        await self.aclose()
        if self._created:
            self._created = False
            assert not isinstance(self._target, int)  # only a path is ever created
            remove_created(None, self._target)


WRITEBACK_WINDOW = 32 << 20
"""Bytes a syncing file sink writes before it starts their writeback."""


class _FileSink(_FdSink):
    """Shared body of the two random-access file sinks.

    ``flush`` makes the data durable with ``fsync`` (the reference's
    ``blk_flush``) unless ``sync=False`` (a scratch restore, or a caller that
    syncs the whole file system itself).

    Early writeback (issue 10).  With ``sync``, every :data:`WRITEBACK_WINDOW`
    bytes written the sink asks the kernel to start writing them out
    (``posix_fadvise(DONTNEED)``: writeback without waiting), and two windows
    later, when they are clean, drops them from the page cache (the same
    call again).  The final ``fsync`` would write the same bytes anyway, only
    all at the end, after the copying; and the copying itself was slow into
    ever new page-cache pages (on this VM, first-touched memory cost the
    most: a 2 GiB copy took 0.9 to 5.9 s of kernel time).  Overlapped, and
    recycling a few windows of pages, a 4 GiB ``vma extract`` went from
    2.8-3.4 s to 1.35-1.9 s here (the reference: 2.9-3.1 s), and a restore
    no longer pushes the host's page cache out.
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | int,
        size: int,
        *,
        name: str | None = None,
        sync: bool = True,
        closefd: bool = True,
    ) -> None:
        super().__init__(target, name=name, closefd=closefd)
        self.size = size
        self._sync = sync
        self._unflushed = 0
        self._dirty_low = -1
        self._dirty_high = -1
        self._in_writeback: deque[tuple[int, int]] = deque()

    def _fail(self, exc: OSError) -> SinkError:
        return SinkError(f"write to {self._name} failed - {exc.strerror}")

    def _write_many_blocking(self, fd: int, writes: Sequence[tuple[int, Buffer]]) -> None:
        try:
            index = 0
            while index < len(writes):
                offset, first = writes[index]
                group = [first]
                end = offset + len(first)
                index += 1
                while index < len(writes) and writes[index][0] == end:
                    group.append(writes[index][1])
                    end += len(writes[index][1])
                    index += 1
                pwrite_all(fd, offset, group)
                if self._sync:
                    self._written(fd, offset, end)
        except OSError as exc:
            raise self._fail(exc) from exc

    def _written(self, fd: int, start: int, end: int) -> None:
        """Start the writeback of what was written once a window is full."""
        if self._dirty_low < 0 or start < self._dirty_low:
            self._dirty_low = start
        self._dirty_high = max(self._dirty_high, end)
        self._unflushed += end - start
        if self._unflushed >= WRITEBACK_WINDOW:
            low, high = self._dirty_low, self._dirty_high
            self._unflushed, self._dirty_low, self._dirty_high = 0, -1, -1
            os.posix_fadvise(fd, low, high - low, os.POSIX_FADV_DONTNEED)  # start writing
            self._in_writeback.append((low, high))
            if len(self._in_writeback) > 2:  # written out by now: drop it from the cache
                low, high = self._in_writeback.popleft()
                os.posix_fadvise(fd, low, high - low, os.POSIX_FADV_DONTNEED)

    async def write(self, offset: int, data: Buffer) -> None:
        fd = await self._ensure_open()
        await anyio.to_thread.run_sync(self._write_many_blocking, fd, [(offset, data)])

    async def write_many(self, writes: Sequence[tuple[int, Buffer]]) -> None:
        fd = await self._ensure_open()
        await anyio.to_thread.run_sync(self._write_many_blocking, fd, writes)

    async def write_zeroes(self, offset: int, length: int) -> None:
        fd = await self._ensure_open()
        try:
            await anyio.to_thread.run_sync(write_zeroes, fd, offset, length)
        except OSError as exc:
            raise self._fail(exc) from exc

    async def flush(self) -> None:
        fd = await self._ensure_open()
        if self._sync:
            await self._fsync(fd, f"vma blk_flush {self._name}")


class RawFileSink(_FileSink):
    """A new sparse raw image of ``size`` bytes.

    A path is created exclusively (an existing file is never overwritten:
    :class:`SinkExistsError`); an fd is expected to be a new, empty file.
    The file is truncated to exactly ``size``, so blocks the archive records
    as zero stay holes unless the restore asks for ``write_zeroes``.
    :meth:`abort` removes a file this sink created.
    """

    def _open_blocking(self) -> None:
        self._create_blocking()
        try:
            os.ftruncate(self._fd, self.size)
        except OSError as exc:
            raise SinkError(f"can't set the size of {self._name} - {exc.strerror}") from exc
        except OverflowError as exc:  # a header may claim up to 2**64 - 1 bytes
            reason = os.strerror(errno.EFBIG)
            raise SinkError(f"can't set the size of {self._name} - {reason}") from exc


class ExistingFileSink(_FileSink):
    """An existing file or block device of at least ``size`` bytes, overwritten
    in place.

    As in the reference, it may be up to 4 MiB larger than the device (storage
    rounds sizes up) and never smaller: :class:`DeviceSizeError` otherwise.
    Ask the restore for ``write_zeroes`` unless the target is known to read
    back zeros.
    """

    def _open_blocking(self) -> None:
        if not isinstance(self._target, int):
            try:
                self._fd = os.open(self._target, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise SinkError(
                    f"can't open file {os.fspath(self._target)} - {exc.strerror}"
                ) from exc
        mode = os.fstat(self._fd).st_mode
        if stat.S_ISBLK(mode):
            actual = os.lseek(self._fd, 0, os.SEEK_END)
        elif stat.S_ISREG(mode):
            actual = os.fstat(self._fd).st_size
        else:
            raise SinkError(f"{self._name} is neither a regular file nor a block device")
        if not 0 <= actual - self.size <= SIZE_TOLERANCE:
            raise DeviceSizeError(
                f"vma_reader_register_bs for stream {self._name} failed - "
                f"unexpected size {actual} != {self.size}"
            )


class SequentialSink(_FdSink):
    """A forward-only target for the vmstate stream: a new file (created
    exclusively), or an fd (a pipe is written non-blocking, and its flags are
    restored on close).  Offsets must follow each other exactly; anything
    else is an error, since a stream cannot seek.
    """

    def __init__(self, target: str | os.PathLike[str] | int, *, closefd: bool = True) -> None:
        super().__init__(target, name="vmstate", closefd=closefd)
        self._is_pipe = False
        self._flags: int | None = None
        self._next = 0

    @property
    def bytes_written(self) -> int:
        return self._next

    async def prepare(self, device: DeviceInfo) -> None:
        await self._ensure_open()

    def _open_blocking(self) -> None:
        self._create_blocking()
        mode = os.fstat(self._fd).st_mode
        self._is_pipe = not (stat.S_ISREG(mode) or stat.S_ISBLK(mode))
        if self._is_pipe:
            self._flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, self._flags | os.O_NONBLOCK)

    async def _append(self, data: Buffer) -> None:
        fd = await self._ensure_open()
        view = memoryview(data).cast("B")
        try:
            if not self._is_pipe:
                await anyio.to_thread.run_sync(write_all, fd, view)
            else:
                await write_all_nonblocking(fd, view)
        except OSError as exc:
            raise SinkError(f"write vmstate failed - {exc.strerror}") from exc
        self._next += len(data)

    def _check_offset(self, offset: int) -> None:
        if offset != self._next:
            raise SinkError(
                f"write vmstate failed - offset {offset} is not the next one ({self._next})"
            )

    async def write(self, offset: int, data: Buffer) -> None:
        self._check_offset(offset)
        await self._append(data)

    async def write_zeroes(self, offset: int, length: int) -> None:
        self._check_offset(offset)
        while length:
            step = min(length, ZERO_CHUNK)
            await self._append(zero_view(step))
            length -= step

    async def flush(self) -> None:
        fd = await self._ensure_open()
        if not self._is_pipe:
            await self._fsync(fd, "write vmstate")

    def _release(self) -> None:
        flags, self._flags = self._flags, None
        try:
            if flags is not None and self._fd >= 0:
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags)
        finally:
            super()._release()


# --- callback sink ------------------------------------------------------------------------------


class CallbackSink(Sink):
    """Adapts ``async def write(offset, data)`` into a sink.

    Zero runs go to ``zeroes(offset, length)`` when given, else to ``write`` as
    zero bytes in pieces of at most 1 MiB.  ``data`` is a view valid for as
    long as the callback keeps it (the reader never reuses buffers).
    """

    def __init__(
        self,
        write: Callable[[int, memoryview], Awaitable[object]],
        *,
        zeroes: Callable[[int, int], Awaitable[object]] | None = None,
        flush: Callable[[], Awaitable[object]] | None = None,
        close: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._write = write
        self._zeroes = zeroes
        self._flush = flush
        self._close = close

    async def write(self, offset: int, data: Buffer) -> None:
        await self._write(offset, memoryview(data))

    async def write_zeroes(self, offset: int, length: int) -> None:
        if self._zeroes is not None:
            await self._zeroes(offset, length)
        else:
            await super().write_zeroes(offset, length)

    async def flush(self) -> None:
        if self._flush is not None:
            await self._flush()

    async def aclose(self) -> None:
        close, self._close = self._close, None
        if close is not None:
            await close()
