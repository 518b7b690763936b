"""Disk images in and out of archives: the one-call layer above the writer and reader.

Backing up: :func:`backup_image` feeds one registered stream from a raw image
file or block device.  It reads in 4 MiB chunks in a worker thread (so the
event loop never blocks on a disk), asks the kernel where the data is with
``SEEK_DATA``/``SEEK_HOLE`` and never reads a hole: a cluster that lies wholly
in a hole is passed to the writer as "no data".  :func:`create_archive` opens
every image *before* the archive exists (a missing image leaves nothing
behind), registers the streams, then runs one producer per device in a task
group; any failure or cancellation aborts the writer, which removes the
partial archive.

Restoring: :func:`extract_archive` lays an archive out the reference tool's
way (``disk-NAME.raw`` via ``tmp-disk-NAME.raw``, ``vmstate.bin``, one file per
config) or, given a restore map, into existing targets.  Names come from the
archive and are hostile until checked: every file is created through a file
descriptor of the new target directory with ``O_CREAT | O_EXCL | O_NOFOLLOW``,
so neither a planted symlink nor a crafted name (``..``, ``/``, NUL, over 255
bytes) can make it write outside the directory or over anything.  On failure
every file it created is removed again, and the directory with them.

Throttling (``throttling.bps`` in a restore map) is a GCRA token bucket shared
by the devices of one throttle group, wrapped around their sinks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid as uuid_mod
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import anyio
import anyio.lowlevel
import anyio.to_thread

from ._assembler import WriterStatus
from ._digest import DeviceDigest, DigestRecorder
from ._errors import (
    DuplicateDeviceNameError,
    RestoreMapError,
    SourceError,
    UnknownDeviceError,
    UnsafeNameError,
    VmaError,
)
from ._format import CLUSTER_SIZE, ArchiveHeader, DeviceInfo
from ._nbd_sink import NbdSink
from ._parser import ReadSummary
from ._qemu import QemuImage, check_format, probe_file_format
from ._reader import ReadProgress, VmaReader, _unwrap_group
from ._restore_map import RestoreMapEntry, map_is_complete, parse_restore_map
from ._sinks import Buffer, ExistingFileSink, RawFileSink, SequentialSink, Sink
from ._writer import VmaWriter

__all__ = [
    "ExtractResult",
    "RateLimiter",
    "ThrottledSink",
    "backup_image",
    "check_file_name",
    "create_archive",
    "extract_archive",
    "open_image",
    "read_restore_map",
]

READ_CHUNK = 64 * CLUSTER_SIZE
"""4 MiB: large enough that a worker-thread hop costs nothing per byte."""
MAX_NAME_BYTES = 255
"""NAME_MAX on Linux file systems."""

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

    async def read_chunk(
        self, offset: int, length: int, file_end: int
    ) -> tuple[bytearray, list[bool]]:
        """One chunk and which of its clusters hold data; holes are never
        read (``SEEK_DATA`` on a raw file, block status through qemu-nbd)."""
        if self.qemu is not None:
            return await self.qemu.read_chunk(offset, length)
        return await anyio.to_thread.run_sync(_read_chunk, self.fd, offset, length, file_end)


def open_image(path: StrPath) -> Image:
    """Open a raw image file or block device for reading and learn its size.

    Only regular files and block devices have a size to record in the header;
    anything else is refused before an archive is created.
    """
    name = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(f"bdrv_open '{name}' failed - {exc.strerror}") from exc
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return Image(name, fd, os.fstat(fd).st_size)
    if stat.S_ISBLK(mode):
        return Image(name, fd, os.lseek(fd, 0, os.SEEK_END))
    os.close(fd)
    raise SourceError(f"bdrv_open '{name}' failed - not a regular file or block device")


async def open_any_image(path: StrPath, fmt: str | None = None) -> Image:
    """Open an image to back up: raw files and block devices directly, any
    other QEMU format through ``qemu-nbd -r`` (see ``_qemu``), so that a qcow2
    is stored as its virtual disk, never as the container file.

    ``fmt`` None probes the first bytes, as the reference's block layer does
    for a path given without ``format=``; ``"raw"`` never probes.
    """
    image = open_image(path)
    try:
        if fmt is None:
            fmt = await anyio.to_thread.run_sync(probe_file_format, image.fd)
        if fmt is not None and fmt != "raw":
            image.qemu = await QemuImage.open(image.path, fmt)
            image.size = image.qemu.size
    except BaseException:
        image.close()
        raise
    return image


def _data_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The ranges of [start, end) that hold data, by SEEK_DATA/SEEK_HOLE.

    A file system (or device) that cannot answer is treated as all data.
    """
    ranges: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here to the end of the file
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                ranges.append((pos, end))
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        ranges.append((data, hole))
        pos = hole
    return ranges


def _read_chunk(fd: int, offset: int, length: int, file_end: int) -> tuple[bytearray, list[bool]]:
    """Read the data (not the holes) of one chunk; say which clusters hold any.

    Runs in a worker thread.  Bytes past ``file_end`` (the device size rounded
    up past the file) and bytes in holes stay zero in the returned buffer.
    """
    buf = bytearray(length)
    view = memoryview(buf)
    has_data = [False] * ((length + CLUSTER_SIZE - 1) // CLUSTER_SIZE)
    for data_start, data_end in _data_ranges(fd, offset, min(offset + length, file_end)):
        pos = data_start
        while pos < data_end:
            got = os.preadv(fd, [view[pos - offset : data_end - offset]], pos)
            if got == 0:  # the file shrank under us: the rest reads as zeros
                break
            pos += got
        first = (data_start - offset) // CLUSTER_SIZE
        last = (pos - offset - 1) // CLUSTER_SIZE
        for index in range(first, last + 1):
            has_data[index] = True
    return buf, has_data


async def backup_image(
    writer: VmaWriter,
    dev_id: int,
    image: Image | StrPath,
    progress: Callable[[], None] | None = None,
    *,
    digest: DeviceDigest | None = None,
) -> None:
    """Write a whole image into the registered stream ``dev_id``, then close it.

    The stream's registered size decides how much is written: bytes past the
    end of the file (a size rounded up to 512) are zeros.  Clusters wholly in
    holes go to the writer as ``None`` and are never read.  ``progress`` is
    called after every cluster.  The image is read one chunk ahead of the
    writer, so disk and writer work overlap.  ``digest`` (``--digest``) is fed
    each chunk in a worker thread, beside the packing.
    """
    own = not isinstance(image, Image)
    opened = await open_any_image(image) if not isinstance(image, Image) else image
    try:
        size = next(s.size for s in writer.status().streams if s.dev_id == dev_id)
        file_end = min(opened.size, size)
        send, receive = anyio.create_memory_object_stream[tuple[int, bytearray, list[bool]]](1)

        async def read_ahead() -> None:
            async with send:
                for offset in range(0, size, READ_CHUNK):
                    length = min(READ_CHUNK, size - offset)
                    try:
                        chunk = await opened.read_chunk(offset, length, file_end)
                    except OSError as exc:
                        raise SourceError(
                            f"read error on '{opened.path}' at offset {offset} - {exc.strerror}"
                        ) from exc
                    if digest is not None:
                        await anyio.to_thread.run_sync(digest.update, offset, *chunk)
                    await send.send((offset, *chunk))

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_ahead)
            async with receive:
                async for offset, buf, has_data in receive:
                    view = memoryview(buf)
                    first_cluster = offset // CLUSTER_SIZE
                    for index, data in enumerate(has_data):
                        # The writer pads a short last cluster and elides zero blocks.
                        cluster = view[index * CLUSTER_SIZE : (index + 1) * CLUSTER_SIZE]
                        await writer.write(dev_id, first_cluster + index, cluster if data else None)
                        if progress is not None:
                            progress()
        await writer.close_stream(dev_id)
    except BaseExceptionGroup as group:
        raise _unwrap_group(group) from None
    finally:
        if own:
            await opened.aclose()


async def create_archive(
    target: StrPath | int,
    devices: Iterable[tuple[str, StrPath] | tuple[str, StrPath, str | None]],
    *,
    configs: Iterable[tuple[str, bytes]] = (),
    progress: Callable[[WriterStatus], None] | None = None,
    size_multiple: int = 1,
    uuid: uuid_mod.UUID | None = None,
    ctime: int | None = None,
    reproducible: bool = False,
    digest: DigestRecorder | None = None,
) -> WriterStatus:
    """Back up ``devices`` (``(name, path)`` pairs) into a new archive at ``target``.

    A device may be ``(name, path, format)``: ``"raw"`` reads the file
    directly, qcow2, vmdk, vdi, vhdx, qed or vpc through qemu-nbd; without a
    format (or ``None``) the image's first bytes decide (see
    :func:`open_any_image`).
    Every image is opened first, so a missing one fails before the archive
    exists.  ``size_multiple`` rounds each recorded size up (the reference's
    block layer uses 512-byte sectors; the ``vma`` command passes 512 so that
    the reference restores every byte).  ``progress`` receives the writer's
    status after every cluster.  On any failure, or cancellation, the writer is
    aborted (the partial archive is removed) and the error propagates.
    Returns the final status: per-stream sizes and zero bytes.

    ``reproducible``: devices one after another, clusters ascending, so the
    same input gives a byte-identical archive (one that deduplicates well);
    ``uuid`` then defaults to one derived from the device names and sizes,
    ``ctime`` to the newest modification time of the images.  ``digest``
    collects the ``.digest`` sidecar's hashes (see ``_digest``).  Two devices
    with one name are refused (no restore could tell them apart).
    """
    images: list[tuple[str, Image]] = []
    try:
        for name, path, *image_format in devices:
            if any(name == known for known, _ in images):
                raise DuplicateDeviceNameError(f"device name '{name}' given twice")
            images.append((name, await open_any_image(path, *image_format)))
        if reproducible:
            uuid, ctime = _reproducible_identity(images, size_multiple, uuid, ctime)
        async with VmaWriter.open(target, uuid=uuid, ctime=ctime) as writer:
            for config_name, data in configs:
                writer.add_config(config_name, data)
            registered = [
                (writer.register_stream(name, _round_up(image.size, size_multiple)), image)
                for name, image in images
            ]

            def report() -> None:
                if progress is not None:
                    progress(writer.status())

            report()  # the reference's first status: "progress 0%" before any data
            digests = [
                digest.device(name, _round_up(image.size, size_multiple))
                if digest is not None
                else None
                for name, image in images
            ]
            if registered and reproducible:
                for (dev_id, image), device_digest in zip(registered, digests, strict=True):
                    await backup_image(writer, dev_id, image, report, digest=device_digest)
            elif registered:
                async with anyio.create_task_group() as tg:
                    for (dev_id, image), device_digest in zip(registered, digests, strict=True):
                        tg.start_soon(
                            partial(backup_image, digest=device_digest),
                            writer,
                            dev_id,
                            image,
                            report,
                        )
            else:
                await writer.flush()
        return writer.status()
    except BaseExceptionGroup as group:
        raise _unwrap_group(group) from None
    finally:
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
    headers match too) and the images' newest modification time."""
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


# --- names from the archive ------------------------------------------------------


def check_file_name(name: str, what: str) -> str:
    """Refuse an archive-supplied name that is not one plain file name.

    ``what`` says where the name came from, for the message.  The check is
    deliberately strict (no renaming): a name the reference would write
    outside the directory is a hostile archive, and the user should know.
    """
    encoded = name.encode("utf-8", "surrogateescape")
    problem = None
    if not name or name in (".", ".."):
        problem = "is not a file name"
    elif "/" in name:
        problem = "contains '/'"
    elif "\0" in name:
        problem = "contains a NUL byte"
    elif len(encoded) > MAX_NAME_BYTES:
        problem = f"is longer than {MAX_NAME_BYTES} bytes"
    if problem is not None:
        raise UnsafeNameError(f"refusing unsafe {what} name {name!r}: it {problem}")
    return name


# --- throttling -------------------------------------------------------------------


class RateLimiter:
    """A write-rate limit in bytes per second, shared by every sink that holds it.

    GCRA form of a token bucket: each request books its transfer time on a
    shared virtual clock and sleeps until its slot, so concurrent writers of
    one throttle group share the rate in arrival order and nobody spins.  A
    burst of ``burst`` seconds' worth of bytes may go through at once, which
    is what lets the first cluster start without waiting.
    """

    def __init__(self, bytes_per_second: int, burst: float = 0.05) -> None:
        if bytes_per_second <= 0:
            raise ValueError("the rate must be positive")
        self.bytes_per_second = bytes_per_second
        self._burst = burst
        self._booked_until = float("-inf")

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be written (a checkpoint: cancellable)."""
        now = anyio.current_time()
        self._booked_until = max(self._booked_until, now) + nbytes / self.bytes_per_second
        delay = self._booked_until - now - self._burst
        if delay > 0:
            await anyio.sleep(delay)
        else:
            await anyio.lowlevel.checkpoint()


class _SinkWrapper:
    """Forwards everything a sink offers, including the optional ``prepare``,
    ``write_many`` and ``abort`` the reader looks for, so a wrapped sink keeps
    its early size check, its batched writes and its cleanup."""

    def __init__(self, inner: Sink) -> None:
        self._inner = inner

    async def prepare(self, device: DeviceInfo) -> None:
        prepare = getattr(self._inner, "prepare", None)
        if prepare is not None:
            await prepare(device)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        await self._inner.write(offset, data)

    async def write_many(self, writes: Sequence[tuple[int, Buffer]]) -> None:
        write_many = getattr(self._inner, "write_many", None)
        if write_many is not None:
            await write_many(writes)
        else:
            for offset, data in writes:
                await self._inner.write(offset, memoryview(data))

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._inner.write_zeroes(offset, length)

    async def flush(self) -> None:
        await self._inner.flush()

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def abort(self) -> None:
        abort = getattr(self._inner, "abort", None)
        await (abort() if abort is not None else self._inner.aclose())


class ThrottledSink(_SinkWrapper):
    """A sink whose writes (and written zeros) pass through a :class:`RateLimiter`."""

    def __init__(self, inner: Sink, limiter: RateLimiter) -> None:
        super().__init__(inner)
        self._limiter = limiter

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        await self._limiter.acquire(len(data))
        await super().write(offset, data)

    async def write_many(self, writes: Sequence[tuple[int, Buffer]]) -> None:
        await self._limiter.acquire(sum(memoryview(data).nbytes for _, data in writes))
        await super().write_many(writes)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._limiter.acquire(length)
        await super().write_zeroes(offset, length)


class _ZeroesSkipped(_SinkWrapper):
    """A target that already reads back zeros (``0:`` in a map): zero blocks
    are not written, as in the reference, while other devices may want them."""

    async def write_zeroes(self, offset: int, length: int) -> None:
        return None


# --- the restore map from a file or FIFO -------------------------------------------


async def read_restore_map(path: StrPath) -> dict[str, RestoreMapEntry]:
    """Read and parse a restore map from a file or a FIFO.

    A FIFO is read non-blocking through the event loop (its writer may keep it
    open after ``done``, so reading stops at the terminator); a regular file
    is read in a worker thread.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise RestoreMapError(f"unable to open fifo {name} - {exc.strerror}") from exc
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            data = await anyio.to_thread.run_sync(_read_all, fd)
        else:
            data = await _read_until_terminator(fd)
    except OSError as exc:
        raise RestoreMapError(f"read map failed - {exc.strerror}") from exc
    finally:
        os.close(fd)
    text = data.decode("utf-8", "surrogateescape")
    return parse_restore_map(text.splitlines(keepends=True))


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 65536):
        parts.append(chunk)
    return b"".join(parts)


async def _read_until_terminator(fd: int) -> bytes:
    data = bytearray()
    while not map_is_complete(data.decode("utf-8", "surrogateescape")):
        await anyio.wait_readable(fd)
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            break
        data += chunk
    return bytes(data)


# --- extract ---------------------------------------------------------------------


@dataclass(slots=True)
class ExtractResult:
    """What :func:`extract_archive` wrote: file names inside the target directory
    (empty when a restore map sent the disks elsewhere) and the reader's summary."""

    summary: ReadSummary
    files: list[str] = field(default_factory=list)


class _CreatedFiles:
    """Files created inside one directory fd, removed again unless committed."""

    def __init__(self, dir_fd: int) -> None:
        self.dir_fd = dir_fd
        self.names: list[str] = []

    def create(self, name: str) -> int:
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
            dir_fd=self.dir_fd,
        )
        self.names.append(name)
        return fd

    def rename(self, old: str, new: str) -> None:
        # os.rename replaces an existing file; link + unlink cannot, so a name
        # that appeared meanwhile is never overwritten.
        # A file system without hard links falls back to rename after a check.
        try:
            os.link(old, new, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                raise
            if os.path.lexists(f"/proc/self/fd/{self.dir_fd}/{new}"):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), new) from exc
            os.rename(old, new, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        else:
            os.unlink(old, dir_fd=self.dir_fd)
        self.names[self.names.index(old)] = new

    def remove_all(self) -> None:
        for name in reversed(self.names):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.dir_fd)
        self.names.clear()


def _write_file(files: _CreatedFiles, name: str, data: bytes) -> None:
    fd = files.create(name)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


async def extract_archive(
    source: StrPath | int,
    targetdir: StrPath,
    *,
    restore_map: Callable[[ArchiveHeader], Awaitable[Mapping[str, RestoreMapEntry] | None]]
    | Mapping[str, RestoreMapEntry]
    | None = None,
    announce: Callable[[str, int], None] | None = None,
    progress: Callable[[ReadProgress], None] | None = None,
    devices: Collection[str] | None = None,
    image_format: str = "raw",
) -> ExtractResult:
    """Restore an archive into a new directory, the reference tool's way.

    ``targetdir`` must not exist; it is created, then every file is created
    through its descriptor (see the module notes).  Configs become files,
    ``vmstate`` becomes ``vmstate.bin``, each disk ``tmp-disk-NAME.raw``,
    renamed to ``disk-NAME.raw`` after a complete restore.  With
    ``restore_map`` (a mapping, or an async callable given the header, called
    after the directory and the configs are written: the reference reads its
    FIFO at that point) disks go to the existing targets it names instead.
    ``announce(path, size)`` is called before each disk file is created (the
    reference's ``DEVINFO`` line).  On failure everything created is removed.

    Partial restore: ``devices`` (``vma extract -d``) names the disks to
    restore (configs and vmstate always are); a map entry ``skip=NAME`` skips
    one.  A skipped disk gets no file and no writes, and its data is read
    past unchecked for duplicates.  A name in ``devices`` that the archive
    lacks is an error before anything is created.

    ``image_format`` (``vma extract --format``): each disk becomes a new
    image of that QEMU format instead, ``disk-NAME.FMT`` (via
    ``tmp-disk-NAME.FMT``), made by ``qemu-img create`` and filled through
    qemu-nbd straight from the archive, with no raw intermediate.
    """
    target = os.fspath(targetdir)
    check_format(image_format)
    async with await VmaReader.open(source) as reader:
        header = reader.header
        _check_wanted(header, devices)
        for name, _ in header.configs:
            check_file_name(name, "config")
        for dev in header.devices:
            if not dev.is_vmstate:
                check_file_name(f"tmp-disk-{dev.name}.{image_format}", "device")
        try:
            os.mkdir(target, 0o777)
            dir_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise VmaError(f"unable to create target directory {target} - {exc.strerror}") from exc
        files = _CreatedFiles(dir_fd)
        try:
            return await _extract_into(
                reader, target, files, restore_map, announce, progress, devices, image_format
            )
        except BaseException:
            files.remove_all()
            with contextlib.suppress(OSError):
                os.rmdir(target)
            raise
        finally:
            os.close(dir_fd)


async def _extract_into(
    reader: VmaReader,
    target: str,
    files: _CreatedFiles,
    restore_map: Callable[[ArchiveHeader], Awaitable[Mapping[str, RestoreMapEntry] | None]]
    | Mapping[str, RestoreMapEntry]
    | None,
    announce: Callable[[str, int], None] | None,
    progress: Callable[[ReadProgress], None] | None,
    devices: Collection[str] | None,
    image_format: str,
) -> ExtractResult:
    header = reader.header
    for name, data in header.configs:
        try:
            _write_file(files, name, data)
        except OSError as exc:
            raise VmaError(f"unable to write file {target}/{name} - {exc.strerror}") from exc
    entries = await restore_map(header) if callable(restore_map) else restore_map

    limiters: dict[str, RateLimiter] = {}
    for entry in (entries or {}).values():
        if entry.throttling_bps:
            limiters[entry.throttle_key] = RateLimiter(entry.throttling_bps)
    sinks: dict[str | int, Sink] = {}
    renames: list[tuple[str, str]] = []
    try:
        for dev in header.devices:
            if not dev.is_vmstate and devices is not None and dev.name not in devices:
                continue  # -d: not restored, and needs no map line
            if dev.is_vmstate:
                sinks[dev.dev_id] = SequentialSink(
                    _create(files, "vmstate.bin", "create vmstate file '{path}' failed - {error}")
                )
            elif entries is None:
                tmp_name = f"tmp-disk-{dev.name}.{image_format}"
                if announce is not None:
                    announce(f"{target}/{tmp_name}", dev.size)
                if image_format == "raw":
                    fd = _create(files, tmp_name, "can't create file {path} - {error}")
                    sinks[dev.dev_id] = RawFileSink(fd, dev.size, name=dev.name)
                else:  # qemu-img creates it (O_EXCL first); renamed or removed with the rest
                    path = f"{target}/{tmp_name}"
                    sinks[dev.dev_id] = NbdSink(path, image_format, create=True, name=dev.name)
                    files.names.append(tmp_name)
                renames.append((tmp_name, f"disk-{dev.name}.{image_format}"))
            else:
                sink = _mapped_sink(dev, entries, limiters)
                if sink is not None:
                    sinks[dev.dev_id] = sink
        summary = await reader.restore(
            sinks,
            write_zeroes=any(entry.write_zeroes for entry in (entries or {}).values()),
            progress=progress,
        )
    finally:
        with anyio.CancelScope(shield=True):
            for sink in sinks.values():
                await sink.aclose()
    for old, new in renames:
        try:
            files.rename(old, new)
        except OSError as exc:
            raise VmaError(
                f"rename {target}/{old} to {target}/{new} failed - {exc.strerror}"
            ) from exc
    return ExtractResult(summary, list(files.names))


def _check_wanted(header: ArchiveHeader, devices: Collection[str] | None) -> None:
    """Every disk named for a partial restore must be in the archive (the
    reference ignores unknown names silently; a typo then restores nothing)."""
    if devices is None:
        return
    disks = [dev.name for dev in header.devices if not dev.is_vmstate]
    unknown = [name for name in devices if name not in disks]
    if unknown:
        raise UnknownDeviceError(
            f"no disk named {', '.join(repr(n) for n in unknown)} in the archive"
            f" (its disks: {', '.join(disks) or 'none'})"
        )


def _create(files: _CreatedFiles, name: str, message: str) -> int:
    try:
        return files.create(name)
    except OSError as exc:
        path = f"{os.readlink(f'/proc/self/fd/{files.dir_fd}')}/{name}"
        raise VmaError(message.format(path=path, error=exc.strerror)) from exc


def _mapped_sink(
    dev: DeviceInfo, entries: Mapping[str, RestoreMapEntry], limiters: Mapping[str, RateLimiter]
) -> Sink | None:
    """The existing target a restore map names for ``dev``, wrapped for its
    zero handling and throttle group; None for ``skip=``."""
    entry = entries.get(dev.name)
    if entry is None:
        raise RestoreMapError(f"no device name mapping for {dev.name}")
    if entry.skip:
        return None
    sink: Sink = (
        ExistingFileSink(entry.path, dev.size, name=dev.name)
        if entry.format in (None, "raw")  # raw keeps the direct path
        else NbdSink(entry.path, entry.format, cache=entry.cache, name=dev.name)
    )
    if not entry.write_zeroes:
        sink = _ZeroesSkipped(sink)
    limiter = limiters.get(entry.throttle_key)
    if limiter is not None:
        sink = ThrottledSink(sink, limiter)
    return sink
