"""Archives out to files: the one-call extract layer above the reader.

Goal: lay an archive out the reference tool's way (``disk-NAME.raw`` via
``tmp-disk-NAME.raw``, ``vmstate.bin``, one file per config) or, given a
restore map, into existing targets, without ever writing outside the new
directory or over anything, and without leaving a half-extracted directory
that looks complete.

Plan: names come from the archive and are hostile until checked
(:func:`check_file_name`); the target directory is created, then every file
is created through its descriptor with ``O_CREAT | O_EXCL | O_NOFOLLOW``, so
neither a planted symlink nor a crafted name (``..``, ``/``, NUL, over 255
bytes) gets anywhere.  Every file-system call (mkdir, create, config writes,
link/unlink, removal) runs in a worker thread.  Restore-map targets get
their sinks wrapped (:mod:`vma_async._sink_wrappers`) for zero handling and
throttle groups.

Worst case: on failure or cancellation every file created is removed again
(shielded from the cancellation), and the directory with them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field

import anyio
import anyio.to_thread

from ._errors import RestoreMapError, UnknownDeviceError, UnsafeNameError, VmaError
from ._fdio import create_exclusive, remove_created, write_all
from ._format import ArchiveHeader, DeviceInfo
from ._nbd_sink import NbdSink
from ._parser import ReadSummary
from ._progress import Progress, ProgressCallback, report_progress
from ._qemu import check_format
from ._reader import VmaReader
from ._restore_map import RestoreMapEntry
from ._sink_wrappers import RateLimiter, ThrottledSink, ZeroesSkipped
from ._sinks import ExistingFileSink, RawFileSink, SequentialSink, Sink

__all__ = ["MAX_NAME_BYTES", "ExtractResult", "check_file_name", "extract_archive"]

MAX_NAME_BYTES = 255
"""NAME_MAX on Linux file systems."""

StrPath = str | os.PathLike[str]
RestoreMapArg = (
    Callable[[ArchiveHeader], Awaitable[Mapping[str, RestoreMapEntry] | None]]
    | Mapping[str, RestoreMapEntry]
    | None
)


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


@dataclass(slots=True)
class ExtractResult:
    """What :func:`extract_archive` wrote: file names inside the target directory
    (empty when a restore map sent the disks elsewhere) and the reader's summary."""

    summary: ReadSummary
    files: list[str] = field(default_factory=list)


class _CreatedFiles:
    """Files created inside one directory fd, removed again unless committed.

    The ``*_blocking`` methods run in worker threads; a name is recorded in
    the same thread call that creates it, so a cancelled caller still
    removes it."""

    def __init__(self, path: str, dir_fd: int) -> None:
        self.path = path
        self.dir_fd = dir_fd
        self.names: list[str] = []

    def create_blocking(self, name: str) -> int:
        fd = create_exclusive(self.dir_fd, name)
        self.names.append(name)
        return fd

    def write_file_blocking(self, name: str, data: bytes) -> None:
        fd = self.create_blocking(name)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)

    def rename_blocking(self, old: str, new: str) -> None:
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

    def remove_all_blocking(self) -> None:
        """Undo: every created file, then the directory (left if not empty)."""
        for name in reversed(self.names):
            remove_created(self.dir_fd, name)
        self.names.clear()
        with contextlib.suppress(OSError):
            os.rmdir(self.path)

    async def create(self, name: str, message: str) -> int:
        """Create ``name``; a failure is a :class:`VmaError` worded by ``message``."""
        try:
            return await anyio.to_thread.run_sync(self.create_blocking, name)
        except OSError as exc:
            where = os.readlink(f"/proc/self/fd/{self.dir_fd}")  # procfs: never waits
            raise VmaError(message.format(path=f"{where}/{name}", error=exc.strerror)) from exc


def _make_directory(target: str) -> int:
    """Create ``target`` (it must not exist) and open it: a worker-thread call."""
    os.mkdir(target, 0o777)
    try:
        return os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(target)
        raise


async def extract_archive(
    source: StrPath | int,
    targetdir: StrPath,
    *,
    restore_map: RestoreMapArg = None,
    announce: Callable[[str, int], None] | None = None,
    progress: ProgressCallback | None = None,
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
    reference's ``DEVINFO`` line).  ``progress`` gets a
    :class:`~vma_async.Progress` (operation ``"extract"``) once per batch of
    extents and at the end.  On failure everything created is removed.

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
    files: _CreatedFiles | None = None
    try:
        async with VmaReader.open(source) as reader:
            header = reader.header
            _check_wanted(header, devices)
            for name, _ in header.configs:
                check_file_name(name, "config")
            for dev in header.devices:
                if not dev.is_vmstate:
                    check_file_name(f"tmp-disk-{dev.name}.{image_format}", "device")
            try:
                dir_fd = await anyio.to_thread.run_sync(_make_directory, target)
            except OSError as exc:
                raise VmaError(
                    f"unable to create target directory {target} - {exc.strerror}"
                ) from exc
            files = _CreatedFiles(target, dir_fd)
            summary, renames = await _extract_into(
                reader, files, restore_map, announce, progress, devices, image_format
            )
        # The commit, after the reader is closed: once the last rename is
        # done nothing is awaited, so the result is whole or removed.
        for old, new in renames:
            try:
                await anyio.to_thread.run_sync(files.rename_blocking, old, new)
            except OSError as exc:
                raise VmaError(
                    f"rename {target}/{old} to {target}/{new} failed - {exc.strerror}"
                ) from exc
        return ExtractResult(summary, list(files.names))
    except BaseException:
        if files is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(files.remove_all_blocking)
        raise
    finally:
        if files is not None:
            os.close(files.dir_fd)  # a directory fd: close never waits for a disk


async def _extract_into(
    reader: VmaReader,
    files: _CreatedFiles,
    restore_map: RestoreMapArg,
    announce: Callable[[str, int], None] | None,
    progress: ProgressCallback | None,
    devices: Collection[str] | None,
    image_format: str,
) -> tuple[ReadSummary, list[tuple[str, str]]]:
    """Configs, then the restore; returns the summary and the renames to do."""
    header = reader.header
    target = files.path
    for name, data in header.configs:
        try:
            await anyio.to_thread.run_sync(files.write_file_blocking, name, data)
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
                fd = await files.create(
                    "vmstate.bin", "create vmstate file '{path}' failed - {error}"
                )
                sinks[dev.dev_id] = SequentialSink(fd)
            elif entries is None:
                tmp_name = f"tmp-disk-{dev.name}.{image_format}"
                if announce is not None:
                    announce(f"{target}/{tmp_name}", dev.size)
                if image_format == "raw":
                    fd = await files.create(tmp_name, "can't create file {path} - {error}")
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
            progress=_as_extract(progress) if progress is not None else None,
        )
    finally:
        with anyio.CancelScope(shield=True):
            for sink in sinks.values():
                await sink.aclose()
    return summary, renames


def _as_extract(progress: ProgressCallback) -> ProgressCallback:
    """The reader reports a restore; to the caller of extract it is an extract."""

    async def relabel(value: Progress) -> None:
        await report_progress(progress, dataclasses.replace(value, operation="extract"))

    return relabel


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
        sink = ZeroesSkipped(sink)
    limiter = limiters.get(entry.throttle_key)
    if limiter is not None:
        sink = ThrottledSink(sink, limiter)
    return sink
