"""An archive in a regular file, read with blocking calls and no event loop.

Goal: one implementation of reading an archive file (the pooled ``pread``,
the ``sendfile`` skim, random access) that serves both the async reader, in
worker threads (``_sources._FileSource`` wraps it), and the ``vma`` command's
start-up-bound paths, which run before any event loop exists (issue 10:
``verify`` of a 4 GiB archive took 0.21 s, 0.05 s of it importing and
starting asyncio and anyio).  Nothing here imports anyio.

* :class:`FileReader`: reads at its own position with ``pread`` (a caller's
  fd offset is neither used nor disturbed) into recycled buffers.
* :func:`pull_batch`: drives an :class:`ArchiveParser` from blocking read and
  skip calls for up to one batch of extents; the async reader runs it in a
  worker thread, :func:`verify_file` in a loop of its own.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ._errors import SourceError
from ._parser import ArchiveParser, ParsedExtent, ReadSummary

if TYPE_CHECKING:  # _fdio imports anyio, which the loop-free paths must not
    from ._fdio import Buffer

__all__ = ["CHUNK_SIZE", "FileReader", "pull_batch", "verify_file"]

CHUNK_SIZE: Final = 1 << 20
"""Read size of regular files, and the size of their recycled buffers."""
_POOL_BUFFERS: Final = 32
_SCRATCH_SIZE: Final = 128 << 10
_POOL_MIN_READ: Final = 256 << 10

_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
"""Linux 4.14+: a read that must not wait for the disk (0 elsewhere: then
``pread_cached`` simply reads, so it is only used where the flag exists)."""


class FileReader:
    """A regular file (or block device) holding archive bytes, read blocking.

    Reads land in a pool of 1 MiB buffers that are recycled once nobody
    holds a view of them any more (a bytearray cannot be resized while
    exported, which is the test).  Fresh allocations of varying sizes cost
    page faults on every read here (measured: 4x slower than recycling).
    When the pool is exhausted (sinks holding many views), reads fall back to
    fresh buffers rather than wait.
    """

    def __init__(self, fd: int, *, closefd: bool = True) -> None:
        self.fd = fd
        self._closefd = closefd
        self._pos = 0
        self._pool: list[bytearray] = []
        self._scratch: memoryview | None = None
        self._null_fd: int | None = None
        self._sendfile = True

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

    def read(self, max_bytes: int) -> bytes | memoryview:
        """The next 1 to ``max_bytes`` bytes (at most 1 MiB), ``b""`` at the end."""
        size = min(max_bytes, CHUNK_SIZE)
        # A small read gets a buffer of its own size: a view of a few KiB
        # must not pin a whole 1 MiB pool buffer (sparse archives are mostly
        # small extents, and a sink may hold their views for a while).
        buf = self._free_buffer() if size >= _POOL_MIN_READ else None
        if buf is None:
            data: bytes | memoryview = self.pread(self._pos, size)
        else:
            try:
                count = os.preadv(self.fd, [memoryview(buf)[:size]], self._pos)
            except OSError as exc:
                raise SourceError(f"read failed - {exc.strerror}") from exc
            data = memoryview(buf)[:count]
        self._pos += len(data)
        return data

    def skip(self, max_bytes: int) -> int:
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
                count = os.sendfile(self._null_fd, self.fd, self._pos, max_bytes)
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
            count = os.preadv(self.fd, [self._scratch[: min(max_bytes, _SCRATCH_SIZE)]], self._pos)
        except OSError as exc:
            raise SourceError(f"read failed - {exc.strerror}") from exc
        self._pos += count
        return count

    def pread(self, offset: int, size: int) -> bytes:
        try:
            return os.pread(self.fd, size, offset)
        except OSError as exc:
            raise SourceError(f"read failed - {exc.strerror}") from exc

    def pread_cached(self, offset: int, size: int) -> bytes | None:
        """``pread`` if the page cache holds every byte, else None."""
        # RWF_NOWAIT: the kernel copies what the page cache holds and answers
        # EAGAIN rather than wait for the disk.  A short or refused read,
        # a kernel or file system without the flag: the caller's thread path.
        if not _RWF_NOWAIT:
            return None
        buffer = bytearray(size)
        try:
            got = os.preadv(self.fd, [buffer], offset, _RWF_NOWAIT)
        except OSError:
            return None
        return bytes(buffer) if got == size else None

    def archive_size(self) -> int:
        st = os.fstat(self.fd)
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        # a block device: its size is where SEEK_END lands; put the shared offset back
        here = os.lseek(self.fd, 0, os.SEEK_CUR)
        try:
            return os.lseek(self.fd, 0, os.SEEK_END)
        finally:
            os.lseek(self.fd, here, os.SEEK_SET)

    def close(self) -> None:
        """Close what we opened (and the file, if ours); idempotent."""
        fd, self.fd = self.fd, -1
        null_fd, self._null_fd = self._null_fd, None
        if null_fd is not None:
            os.close(null_fd)
        if fd >= 0 and self._closefd:
            os.close(fd)


def pull_batch(
    parser: ArchiveParser,
    read: Callable[[int], Buffer],
    skip: Callable[[int], int],
    limit: int,
    max_extents: int,
) -> tuple[list[ParsedExtent], ReadSummary | None]:
    """Read and parse until ``limit`` bytes of extent data or ``max_extents``
    extents are parsed, or the archive ends (then with its summary).

    Blocking.  ``read`` and ``skip`` are a source's blocking calls; the data
    a skimming parser (``keep_data=False``) does not want is skipped.
    """
    batch: list[ParsedExtent] = []
    size = 0
    while size < limit and len(batch) < max_extents:
        event = parser.next_event()
        if event is None:
            to_skip = parser.bytes_to_skip
            if to_skip:
                while to_skip:
                    skipped = skip(to_skip)
                    if not skipped:
                        return batch, parser.end_of_input()
                    parser.skip(skipped)
                    to_skip -= skipped
                continue
            data = read(parser.bytes_wanted)
            if not data:
                return batch, parser.end_of_input()
            parser.feed(data)
        elif isinstance(event, ParsedExtent):
            batch.append(event)
            size += event.data_size
    return batch, None


def verify_file(fd: int) -> ReadSummary:
    """``VmaReader.verify`` of an uncompressed archive in a regular file, with
    blocking calls only (the same parser, so the same checks and errors).
    The caller has checked the magic and owns ``fd``."""
    reader = FileReader(fd, closefd=False)
    parser = ArchiveParser(keep_data=False)
    try:
        while True:
            _, summary = pull_batch(parser, reader.read, reader.skip, 1 << 62, 1 << 62)
            if summary is not None:
                return summary
    finally:
        reader.close()
