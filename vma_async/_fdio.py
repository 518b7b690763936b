"""Small blocking helpers on raw file descriptors, shared by sinks, targets and extract.

Goal: one copy of the few fd loops every output needs (write everything,
write at an offset, fill with zeros, create a file that must not exist and
undo that create), instead of one per module.

Plan: plain ``os`` calls, no asyncio: callers run them in a worker thread
(``anyio.to_thread.run_sync``) or on an fd they know never blocks.  Partial
writes are retried until everything is written; errors are the ``OSError``
the kernel gave, so each caller words its own library error.

Worst case: ``write_all`` on a non-blocking fd whose peer is slow raises
``BlockingIOError`` after writing part of the data; use it only on blocking
fds (regular files, block devices, blocking pipes).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from typing import Final

import anyio
import anyio.lowlevel

__all__ = [
    "Buffer",
    "CREATE_FLAGS",
    "ZERO_CHUNK",
    "create_exclusive",
    "open_for_reading",
    "pwrite_all",
    "remove_created",
    "write_all",
    "write_all_nonblocking",
    "write_zeroes",
    "zero_view",
]

Buffer = bytes | bytearray | memoryview
"""What the helpers accept as data (anything ``memoryview`` takes, typed simply)."""

ZERO_CHUNK: Final = 1 << 20
"""Zero fills go out in pieces of this size (one preallocated zero buffer)."""
_ZEROES: Final = bytes(ZERO_CHUNK)
_IOV_MAX: Final = 1024  # Linux's UIO_MAXIOV: pwritev refuses more buffers at once

CREATE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
"""``create_exclusive``'s flags: never an existing file, never through a symlink."""


def write_all(fd: int, data: Buffer) -> None:
    """``write`` all of ``data`` to a blocking ``fd``, retrying partial writes."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def pwrite_all(fd: int, offset: int, buffers: Sequence[Buffer]) -> None:
    """Write ``buffers`` back to back at ``offset`` (``pwritev``, at most
    ``IOV_MAX`` at a time), retrying partial writes; the file position is unchanged."""
    views = [memoryview(b).cast("B") for b in buffers]
    first = 0
    while first < len(views):
        batch = views[first : first + _IOV_MAX]
        written = os.pwritev(fd, batch, offset)
        offset += written
        while written and first < len(views):
            size = len(views[first])
            if written >= size:
                written -= size
                first += 1
            else:
                views[first] = views[first][written:]
                written = 0
        while first < len(views) and not len(views[first]):
            first += 1


def write_zeroes(fd: int, offset: int, length: int) -> None:
    """Write ``length`` zero bytes at ``offset`` (explicit zeros, not a hole:
    an existing target must read back zeros there)."""
    end = offset + length
    while offset < end:
        step = min(ZERO_CHUNK, end - offset)
        pwrite_all(fd, offset, [memoryview(_ZEROES)[:step]])
        offset += step


def zero_view(length: int) -> memoryview:
    """A read-only view of ``length`` (at most ``ZERO_CHUNK``) zero bytes."""
    return memoryview(_ZEROES)[:length]


def create_exclusive(
    dir_fd: int | None,
    name: str | os.PathLike[str],
    mode: int = 0o644,
) -> int:
    """Create ``name`` (relative to ``dir_fd`` when given) and return a
    write-only fd: ``O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC``, so an existing
    file (or a symlink planted in its place) is never opened.  Raises
    ``FileExistsError`` and the other ``OSError`` of ``open(2)``; undo with
    :func:`remove_created`."""
    return os.open(name, CREATE_FLAGS, mode, dir_fd=dir_fd)


def remove_created(dir_fd: int | None, name: str | os.PathLike[str]) -> None:
    """Undo :func:`create_exclusive`: unlink ``name``; already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def open_for_reading(path: str) -> tuple[int, int]:
    """Open ``path`` to read (blocking: run it in a worker thread); return
    the fd and its mode.

    ``O_NONBLOCK`` makes the open of a FIFO return at once, writer or not (an
    archive or a restore map that arrives through a FIFO); it is cleared
    again on regular files and block devices, which are read in threads.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, mode


async def write_all_nonblocking(fd: int, data: memoryview) -> None:
    """Write all of ``data`` to a non-blocking pipe, FIFO or socket, awaiting
    writability (on the event loop) when it is full; always a checkpoint."""
    waited = False
    while data:
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            waited = True
            await anyio.wait_writable(fd)
            continue
        data = data[written:]
    if not waited:
        await anyio.lowlevel.checkpoint()
