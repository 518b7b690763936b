"""Disk images into archives: the one-call backup layer above the writer.

Goal: back up raw image files and block devices as fast as the writer takes
them, without ever blocking the event loop and without reading holes.

Plan: :func:`open_image` opens an image (in a worker thread) and learns its
size.  :func:`backup_image` feeds one registered stream.  A raw image is
read 512 KiB at a time and packed in the same worker thread, while the bytes
are in that core's cache (:meth:`VmaWriter.write_clusters_from`); only what
the page cache holds is read under the writer's lock, the rest is waited
for outside it.  An image read through qemu-nbd, or one being digested, is
read in 4 MiB chunks one chunk ahead of the writer.  Either way the kernel
says where the data is (``SEEK_DATA``/``SEEK_HOLE``, or qemu-nbd's block
status) and a hole is never read (a cluster wholly in a hole goes to the
writer as "no data").
:func:`create_archive` opens every image *before* the archive exists (a
missing image leaves nothing behind), registers the streams, then runs one
producer per device in a task group (or one after another, for a
reproducible archive).  Progress (:class:`~vma_async.Progress`) is built
once per chunk, never per cluster, and not at all without a callback.

Worst case: a file system that cannot answer ``SEEK_DATA`` is read whole; a
failure or cancellation anywhere aborts the writer, which removes the
partial archive.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import time
import uuid as uuid_mod
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from ._assembler import WriterStatus
from ._errors import DuplicateDeviceNameError, InvalidStreamError, SourceError
from ._format import CLUSTER_SIZE
from ._opening import unwrap_group
from ._progress import DeviceProgress, Progress, ProgressCallback, report_progress
from ._qemu import QemuImage, probe_file_format
from ._writer import PACK_GROUP, VmaWriter

if TYPE_CHECKING:  # the digest code (and the reader it uses) only with --digest
    from ._digest import DeviceDigest, DigestRecorder

__all__ = [
    "READ_CHUNK",
    "Image",
    "StrPath",
    "backup_image",
    "create_archive",
    "open_any_image",
    "open_image",
]

READ_CHUNK = 64 * CLUSTER_SIZE
"""4 MiB: large enough that a worker-thread hop costs nothing per byte."""

StrPath = str | os.PathLike[str]


# --- images ---------------------------------------------------------------------


@dataclass(slots=True)
class Image:
    """An open image file or block device, and its (virtual) size in bytes.

    ``qemu`` is set for a container format (qcow2, vmdk, vdi, ...): the
    virtual disk is read through qemu-nbd, and ``fd`` is the container file.
    """

    path: str
    fd: int
    size: int
    qemu: QemuImage | None = None
    data_map: _DataMap | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def aclose(self) -> None:
        """Close the file and stop qemu-nbd if there is one (read-only: it has
        nothing to finish, so it is stopped at once, even when cancelled)."""
        qemu, self.qemu = self.qemu, None
        try:
            if qemu is not None:
                await qemu.abort()
        finally:
            self.close()

    def _data_runs(self) -> _DataMap:
        """Where the raw file holds data (made on first use, then remembered)."""
        if self.data_map is None:
            self.data_map = _DataMap(self.fd)
        return self.data_map

    def _read_error(self, offset: int, exc: OSError) -> SourceError:
        """The error for a failed read at ``offset``, naming the image."""
        return SourceError(f"read error on '{self.path}' at offset {offset} - {exc.strerror}")

    async def read_chunk(
        self,
        offset: int,
        length: int,
        file_end: int,
        buf: bytearray | None = None,
        *,
        zero_holes: bool = True,
    ) -> _Chunk:
        """One chunk, which of its clusters hold data, and how many bytes were
        read; holes are never read (``SEEK_DATA`` on a raw file, block status
        through qemu-nbd).  A raw file is read into ``buf`` when given (see
        :func:`_read_chunk`); qemu-nbd's replies come in buffers of their own."""
        if self.qemu is not None:
            return await self.qemu.read_chunk(offset, length)
        return await anyio.to_thread.run_sync(
            functools.partial(
                _read_chunk,
                self.fd,
                offset,
                length,
                file_end,
                buf,
                zero_holes=zero_holes,
                data_map=self._data_runs(),
            )
        )


async def open_image(path: StrPath) -> Image:
    """Open a raw image file or block device for reading and learn its size.

    Only regular files and block devices have a size to record in the header;
    anything else is refused before an archive is created.  The ``open`` and
    ``fstat`` run in a worker thread (a hung network file system must not
    stall the event loop); the caller closes the image.
    """
    return await anyio.to_thread.run_sync(_open_image_blocking, os.fspath(path))


def _open_image_blocking(name: str) -> Image:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(f"bdrv_open '{name}' failed - {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            return Image(name, fd, info.st_size)
        if stat.S_ISBLK(info.st_mode):
            return Image(name, fd, os.lseek(fd, 0, os.SEEK_END))
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    raise SourceError(f"bdrv_open '{name}' failed - not a regular file or block device")


async def open_any_image(path: StrPath, fmt: str | None = None) -> Image:
    """Open an image to back up: raw files and block devices directly, any
    other QEMU format through ``qemu-nbd -r`` (see ``_qemu``), so that a qcow2
    is stored as its virtual disk, never as the container file.

    ``fmt`` None probes the first bytes, as the reference's block layer does
    for a path given without ``format=``; ``"raw"`` never probes.
    """
    image = await open_image(path)
    try:
        if fmt is None:
            fmt = await anyio.to_thread.run_sync(probe_file_format, image.fd)
        if fmt is not None and fmt != "raw":
            image.qemu = await QemuImage.open(image.path, fmt)
            image.size = image.qemu.size
    except BaseException:
        with anyio.CancelScope(shield=True):
            await image.aclose()
        raise
    return image


class _DataMap:
    """Where an image holds data, by ``SEEK_DATA``/``SEEK_HOLE``, remembering
    the last run found: a dense image is one run, so after the first chunk
    no chunk needs an ``lseek`` (each one is a system call after which the
    reading thread must win the GIL back from the packing: issue 10)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._run = (0, 0)  # [data, hole): known data

    def ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ranges of [start, end) that hold data.  A file system (or
        device) that cannot answer is treated as all data."""
        ranges: list[tuple[int, int]] = []
        pos = start
        while pos < end:
            data, hole = self._run
            if not data <= pos < hole:
                try:
                    data = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # only a hole from here to the end
                        break
                    if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                        ranges.append((pos, end))
                        break
                    raise
                if data >= end:
                    break
                hole = os.lseek(self._fd, data, os.SEEK_HOLE)
                self._run = (data, hole)
            else:
                data = pos
            ranges.append((data, min(hole, end)))
            pos = min(hole, end)
        return ranges


_Chunk = tuple[bytearray, list[bool], int]
"""The bytes, which clusters hold data, how many bytes were read."""

_ZEROS = memoryview(bytes(READ_CHUNK))
"""Zeros to clear the unread parts of a reused chunk buffer with (never
touched, so its pages are the kernel's shared zero page)."""


def _read_chunk(
    fd: int,
    offset: int,
    length: int,
    file_end: int,
    buf: bytearray | None = None,
    *,
    zero_holes: bool = True,
    data_map: _DataMap | None = None,
    flags: int = 0,
) -> _Chunk:
    """Read the data (not the holes) of one chunk; say which clusters hold any.

    Runs in a worker thread.  Bytes past ``file_end`` (the device size rounded
    up past the file) and bytes in holes read as zero.  ``buf`` (at least
    ``length`` bytes) is a buffer to reuse: the unread parts of the clusters
    that hold data are cleared, and with ``zero_holes`` every unread byte
    (the digest hashes whole chunks).  Without it a fresh buffer is made.
    ``flags`` go to ``preadv``: with ``os.RWF_NOWAIT`` a read that would
    wait for the disk raises :class:`BlockingIOError`.

    Why reuse (issue 10, measured with ``perf``): a fresh 4 MiB bytearray per
    chunk cost a page fault and a page clear per 4 KiB, and glibc handed the
    pages back with ``madvise`` after every chunk: a third of a 4 GiB
    create's CPU time, all of it in the kernel.
    """
    if buf is None:
        buf = bytearray(length)
        zero_holes = False  # already zero
    view = memoryview(buf)
    has_data = [False] * ((length + CLUSTER_SIZE - 1) // CLUSTER_SIZE)
    read = 0
    done = 0  # the chunk's bytes before this are read or cleared
    gaps: list[tuple[int, int]] = []
    data_map = data_map if data_map is not None else _DataMap(fd)
    for data_start, data_end in data_map.ranges(offset, min(offset + length, file_end)):
        pos = data_start
        while pos < data_end:
            got = os.preadv(fd, [view[pos - offset : data_end - offset]], pos, flags)
            if got == 0:  # the file shrank under us: the rest reads as zeros
                break
            pos += got
        read += pos - data_start
        if pos > data_start:
            first = (data_start - offset) // CLUSTER_SIZE
            last = (pos - offset - 1) // CLUSTER_SIZE
            for index in range(first, last + 1):
                has_data[index] = True
        gaps.append((done, data_start - offset))
        done = pos - offset
    gaps.append((done, length))
    for start, end in gaps:
        _clear(view, start, end, has_data, zero_holes)
    return buf, has_data, read


def _clear(view: memoryview, start: int, end: int, has_data: list[bool], everything: bool) -> None:
    """Zero ``view[start:end]``, or only its parts in clusters that hold data
    (the writer never looks at the others)."""
    if start >= end:
        return
    if everything:
        view[start:end] = _ZEROS[: end - start]
        return
    first = start // CLUSTER_SIZE
    if has_data[first]:
        head_end = min(end, (first + 1) * CLUSTER_SIZE)
        view[start:head_end] = _ZEROS[: head_end - start]
    last = (end - 1) // CLUSTER_SIZE
    if last != first and has_data[last]:
        tail_start = last * CLUSTER_SIZE
        view[tail_start:end] = _ZEROS[: end - tail_start]


PACK_STEP = 4 * READ_CHUNK
"""Clusters per ``write_clusters_from`` call of a backup nobody watches
(16 MiB): each call is a trip to the event loop and back, about 0.25 ms
(measured, issue 10); 4 MiB steps made a 4 GiB create 0.1-0.25 s slower,
64 MiB steps no faster.  The writer's lock is held for one call at most,
so devices still take turns."""

_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
"""Linux 4.14+ (0 elsewhere: then :class:`_CachedClusters` waits for every group)."""

PREFETCH = 8 << 20
"""How far ahead :class:`_CachedClusters` asks the kernel to read once the
page cache runs dry: a disk keeps reading while the clusters it has
delivered are packed."""


class _CachedClusters:
    """One raw image's clusters for :meth:`VmaWriter.write_clusters_from`.

    :meth:`at_hand` runs under the writer's lock (in its worker thread) and
    reads with ``RWF_NOWAIT``: only what the page cache holds, None for
    anything that would wait for the disk.  :meth:`wait_for` runs outside the
    lock, in a worker thread of its own: it asks the kernel to read
    :data:`PREFETCH` ahead, reads the clusters (blocking) and keeps them for
    the next :meth:`at_hand`.  So one disk that is slow, or a hung file
    system, never holds up the other devices' producers.  Without
    ``RWF_NOWAIT`` (a file system that refuses it) every group is read by
    :meth:`wait_for`.  One buffer of :data:`PACK_GROUP` clusters serves both:
    the writer packs a group before anything asks for the next.
    """

    def __init__(self, image: Image, size: int, file_end: int) -> None:
        self._image = image
        self._size = size
        self._file_end = file_end
        self._buf = bytearray(PACK_GROUP * CLUSTER_SIZE)
        self._data_map = image._data_runs()
        self._nowait = _RWF_NOWAIT
        self._ready: tuple[int, _Chunk] | None = None
        self._prefetched = 0
        self._read_bytes = 0

    def at_hand(self, cluster_num: int, count: int) -> tuple[bytearray, list[bool]] | None:
        """Clusters ``cluster_num`` .. ``+ count - 1`` if no disk has to be
        waited for, else None."""
        ready, self._ready = self._ready, None
        if ready is not None and ready[0] == cluster_num:
            return ready[1][0], ready[1][1]
        if not self._nowait:
            return None
        try:
            buf, has_data, read = self._read(cluster_num, count, self._nowait)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise self._image._read_error(cluster_num * CLUSTER_SIZE, exc) from exc
            self._nowait = 0
            return None
        self._read_bytes += read
        return buf, has_data

    def wait_for(self, cluster_num: int, count: int) -> None:
        """Read the next group from ``cluster_num`` (``count`` clusters are
        left in this call), waiting for the disk; start the read-ahead."""
        offset = cluster_num * CLUSTER_SIZE
        if self._prefetched < offset + PREFETCH // 2:
            start, end = max(offset, self._prefetched), min(offset + PREFETCH, self._file_end)
            if start < end:
                with contextlib.suppress(OSError):  # advice only
                    os.posix_fadvise(self._image.fd, start, end - start, os.POSIX_FADV_WILLNEED)
            self._prefetched = offset + PREFETCH
        try:
            chunk = self._read(cluster_num, min(count, PACK_GROUP), 0)
        except OSError as exc:
            raise self._image._read_error(cluster_num * CLUSTER_SIZE, exc) from exc
        self._read_bytes += chunk[2]
        self._ready = (cluster_num, chunk)

    def take_read_bytes(self) -> int:
        """Bytes read (not holes) since the last call, for progress."""
        read, self._read_bytes = self._read_bytes, 0
        return read

    def _read(self, cluster_num: int, count: int, flags: int) -> _Chunk:
        offset = cluster_num * CLUSTER_SIZE
        length = min(count * CLUSTER_SIZE, self._size - offset)
        return _read_chunk(
            self._image.fd,
            offset,
            length,
            self._file_end,
            self._buf,
            zero_holes=False,
            data_map=self._data_map,
            flags=flags,
        )


# --- progress -------------------------------------------------------------------


class _BackupProgress:
    """Counts what the producers of one operation walked and read, and builds
    a :class:`Progress` per chunk (the writer's per-stream zero counts are
    read then, not per cluster).  Only made when there is a callback."""

    def __init__(
        self, operation: str, callback: ProgressCallback, writer: VmaWriter, dev_ids: Sequence[int]
    ) -> None:
        self._operation = operation
        self._callback = callback
        self._writer = writer
        streams = {s.dev_id: s for s in writer.status().streams}
        self._dev_ids = list(dev_ids)
        self._names = {d: streams[d].name for d in self._dev_ids}
        self._totals = {d: -(-streams[d].size // CLUSTER_SIZE) * CLUSTER_SIZE for d in dev_ids}
        self._done = dict.fromkeys(self._dev_ids, 0)
        self._read = 0
        self._started = time.monotonic()

    def walked(self, dev_id: int, clusters: int, read_bytes: int) -> None:
        self._done[dev_id] += clusters * CLUSTER_SIZE
        self._read += read_bytes

    async def report(self) -> None:
        streams = {s.dev_id: s for s in self._writer.status().streams}
        await report_progress(
            self._callback,
            Progress(
                operation=self._operation,
                done_bytes=sum(self._done.values()),
                total_bytes=sum(self._totals.values()),
                read_bytes=self._read,
                zero_bytes=sum(streams[d].zero_bytes for d in self._dev_ids),
                elapsed=time.monotonic() - self._started,
                devices=tuple(
                    DeviceProgress(self._names[d], self._done[d], self._totals[d])
                    for d in self._dev_ids
                ),
            ),
        )


# --- one stream -----------------------------------------------------------------


async def backup_image(
    writer: VmaWriter,
    dev_id: int,
    image: Image | StrPath,
    *,
    progress: ProgressCallback | None = None,
    digest: DeviceDigest | None = None,
) -> None:
    """Write a whole image into the registered stream ``dev_id``, then close it.

    The stream's registered size decides how much is written: bytes past the
    end of the file (a size rounded up to 512) are zeros.  Clusters wholly in
    holes go to the writer as ``None`` and are never read.  Reading overlaps
    the writer's output (see the module docstring for how).
    ``progress`` gets a :class:`~vma_async.Progress` (operation ``"backup"``)
    at the start, after every 4 MiB chunk and at the end.  ``digest``
    (``--digest``) is fed each chunk in a worker thread, beside the packing.
    An image given by path is opened and closed here.
    """
    if not any(s.dev_id == dev_id for s in writer.status().streams):
        raise InvalidStreamError(f"backup_image: no such stream {dev_id}")
    tracker = None
    if progress is not None:
        tracker = _BackupProgress("backup", progress, writer, [dev_id])
        await tracker.report()
    await _backup_stream(writer, dev_id, image, tracker, digest)
    if tracker is not None:
        await tracker.report()


async def _backup_stream(
    writer: VmaWriter,
    dev_id: int,
    image: Image | StrPath,
    tracker: _BackupProgress | None,
    digest: DeviceDigest | None,
) -> None:
    opened = image if isinstance(image, Image) else await open_any_image(image)
    try:
        size = next(s.size for s in writer.status().streams if s.dev_id == dev_id)
        file_end = min(opened.size, size)
        if opened.qemu is None and digest is None:
            await _pack_image(writer, dev_id, opened, size, file_end, tracker)
        else:
            await _read_ahead_and_pack(writer, dev_id, opened, size, file_end, tracker, digest)
        await writer.close_stream(dev_id)
    except BaseExceptionGroup as group:
        raise unwrap_group(group) from None
    finally:
        if opened is not image:
            with anyio.CancelScope(shield=True):
                await opened.aclose()


async def _pack_image(
    writer: VmaWriter,
    dev_id: int,
    image: Image,
    size: int,
    file_end: int,
    tracker: _BackupProgress | None,
) -> None:
    """A raw image without a digest: read and packed in one worker thread,
    512 KiB at a time, while the bytes are in the CPU's cache (see
    :meth:`VmaWriter.write_clusters_from`).  Only what the page cache holds
    is read under the writer's lock; the rest is waited for outside it.
    One call per 4 MiB when progress is reported, else per :data:`PACK_STEP`."""
    clusters = _CachedClusters(image, size, file_end)
    step = READ_CHUNK if tracker is not None else PACK_STEP
    for offset in range(0, size, step):
        first = offset // CLUSTER_SIZE
        count = -(-min(step, size - offset) // CLUSTER_SIZE)
        done = 0
        while done < count:
            done += await writer.write_clusters_from(
                dev_id, first + done, count - done, clusters.at_hand
            )
            if done < count:
                await anyio.to_thread.run_sync(clusters.wait_for, first + done, count - done)
        if tracker is not None:
            tracker.walked(dev_id, count, clusters.take_read_bytes())
            await tracker.report()


async def _read_ahead_and_pack(
    writer: VmaWriter,
    dev_id: int,
    opened: Image,
    size: int,
    file_end: int,
    tracker: _BackupProgress | None,
    digest: DeviceDigest | None,
) -> None:
    """An image read through qemu-nbd, or one with a digest (which hashes
    whole 4 MiB chunks): read one chunk ahead of the packing."""
    # A raw image's ring of reusable read buffers (see _read_chunk): one
    # being read, one queued, one being packed and one that the digest may
    # still be hashing.  A buffer comes back after the packing, with what
    # the digest still has to finish on it before the next read.  (Never
    # more buffers than whole chunks: a small disk needs none, its one short
    # chunk is read into a buffer of its own size.  qemu-nbd's replies come
    # in buffers of their own.)
    depth = min(4, size // READ_CHUNK) if opened.qemu is None else 0
    free_send, free_receive = anyio.create_memory_object_stream[
        tuple[bytearray, tuple[Future[None], ...]]
    ](depth)
    for _ in range(depth):
        free_send.send_nowait((bytearray(READ_CHUNK), ()))
    send, receive = anyio.create_memory_object_stream[
        tuple[int, _Chunk, bytearray | None, tuple[Future[None], ...]]
    ](1)

    async def read_ahead() -> None:
        async with send:
            for offset in range(0, size, READ_CHUNK):
                length = min(READ_CHUNK, size - offset)
                ring_buf: bytearray | None = None
                if length == READ_CHUNK and depth:
                    ring_buf, pending = await free_receive.receive()
                    if digest is not None and pending:
                        await anyio.to_thread.run_sync(digest.wait, pending)
                try:
                    chunk = await opened.read_chunk(
                        offset, length, file_end, ring_buf, zero_holes=digest is not None
                    )
                except OSError as exc:
                    raise opened._read_error(offset, exc) from exc
                pending = ()
                if digest is not None:
                    pending = await anyio.to_thread.run_sync(
                        digest.update, offset, chunk[0], chunk[1]
                    )
                await send.send((offset, chunk, ring_buf, pending))

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_ahead)
        async with receive:
            async for offset, (buf, has_data, read), ring_buf, pending in receive:
                # One call per chunk: the writer pads a short last cluster,
                # elides zero blocks and skips clusters without data.
                await writer.write_clusters(dev_id, offset // CLUSTER_SIZE, buf, has_data)
                if ring_buf is not None:
                    free_send.send_nowait((ring_buf, pending))
                if tracker is not None:
                    tracker.walked(dev_id, len(has_data), read)
                    await tracker.report()


# --- a whole archive --------------------------------------------------------------


async def create_archive(
    target: StrPath | int,
    devices: Iterable[tuple[str, StrPath] | tuple[str, StrPath, str | None]],
    *,
    configs: Iterable[tuple[str, bytes]] = (),
    progress: ProgressCallback | None = None,
    size_multiple: int = 1,
    uuid: uuid_mod.UUID | None = None,
    ctime: int | None = None,
    reproducible: bool = False,
    digest: DigestRecorder | None = None,
    compress: str | None = None,
) -> WriterStatus:
    """Back up ``devices`` (``(name, path)`` pairs) into a new archive at ``target``.

    A device may be ``(name, path, format)``: ``"raw"`` reads the file
    directly, qcow2, vmdk, vdi, vhdx, qed or vpc through qemu-nbd; without a
    format (or ``None``) the image's first bytes decide (see
    :func:`open_any_image`).

    Every image is opened first, so a missing one fails before the archive
    exists.  ``size_multiple`` rounds each recorded size up (the reference's
    block layer uses 512-byte sectors; the ``vma`` command passes 512 so that
    the reference restores every byte).  ``progress`` gets a
    :class:`~vma_async.Progress` (operation ``"create"``, one entry per
    device) before any data, after every 4 MiB chunk of any device, and at
    the end.  On any failure, or cancellation, the writer is aborted (the
    partial archive is removed) and the error propagates.  Returns the final
    status: per-stream sizes and zero bytes.

    ``reproducible``: devices one after another, clusters ascending, so the
    same input gives a byte-identical archive (one that deduplicates well);
    ``uuid`` then defaults to one derived from the device names and sizes,
    ``ctime`` to the newest modification time of the images.  ``digest``
    collects the ``.digest`` sidecar's hashes (see ``_digest``).  ``compress``
    (``"zstd"`` or ``"gzip"``) compresses in-process, see ``VmaWriter.open``.
    Two devices with one name are refused (no restore could tell them apart).
    """
    images: list[tuple[str, Image]] = []
    try:
        for name, path, *image_format in devices:
            # Checked here too (the writer refuses it as well) so that it fails
            # before any image, qemu-nbd or the archive is opened.
            if any(name == known for known, _ in images):
                raise DuplicateDeviceNameError(f"device name '{name}' given twice")
            images.append((name, await open_any_image(path, *image_format)))
        if reproducible:
            uuid, ctime = await anyio.to_thread.run_sync(
                _reproducible_identity, images, size_multiple, uuid, ctime
            )
        async with VmaWriter.open(target, uuid=uuid, ctime=ctime, compress=compress) as writer:
            for config_name, data in configs:
                writer.add_config(config_name, data)
            registered = [
                (writer.register_stream(name, _round_up(image.size, size_multiple)), image)
                for name, image in images
            ]
            tracker = None
            if progress is not None:
                tracker = _BackupProgress("create", progress, writer, [d for d, _ in registered])
                await tracker.report()  # the reference's "progress 0%" before any data
            digests = [
                digest.device(name, _round_up(image.size, size_multiple))
                if digest is not None
                else None
                for name, image in images
            ]
            if registered and reproducible:
                for (dev_id, image), device_digest in zip(registered, digests, strict=True):
                    await _backup_stream(writer, dev_id, image, tracker, device_digest)
            elif registered:
                async with anyio.create_task_group() as tg:
                    for (dev_id, image), device_digest in zip(registered, digests, strict=True):
                        tg.start_soon(_backup_stream, writer, dev_id, image, tracker, device_digest)
            else:
                await writer.flush()
            if tracker is not None:
                await tracker.report()
        return writer.status()
    except BaseExceptionGroup as group:
        raise unwrap_group(group) from None
    finally:
        with anyio.CancelScope(shield=True):
            for _, image in images:
                await image.aclose()


_REPRODUCIBLE_NAMESPACE = uuid_mod.UUID("5d1f4c52-7a3e-4d55-9a57-0d6c1b8e2f10")


def _reproducible_identity(
    images: Sequence[tuple[str, Image]],
    size_multiple: int,
    uuid: uuid_mod.UUID | None,
    ctime: int | None,
) -> tuple[uuid_mod.UUID, int]:
    """The uuid and ctime of a reproducible archive, unless given: a uuid
    named by the device layout (stable across backups of one VM, so extent
    headers match too) and the images' newest modification time.  Runs in a
    worker thread (an ``fstat`` per image)."""
    if uuid is None:
        layout = "\n".join(
            f"{name}={_round_up(image.size, size_multiple)}" for name, image in images
        )
        uuid = uuid_mod.uuid5(_REPRODUCIBLE_NAMESPACE, layout)
    if ctime is None:
        ctime = max((int(os.fstat(image.fd).st_mtime) for _, image in images), default=0)
    return uuid, ctime


def _round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple
