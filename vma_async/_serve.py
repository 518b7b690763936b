"""``vma serve``: every disk of an archive as a read-only NBD export.

Goal: let any NBD client (qemu-img, nbdcopy, nbdinfo, guestfish, the
kernel's nbd-client) read a backup's disks in place, without extracting
them: convert one to qcow2, copy one file out of it, compare it.

Plan: open the archive with :class:`VmaReader`, index it once
(:meth:`VmaReader.open_device` with ``require_complete=False``), and wrap
each disk's :class:`DeviceView` in an :class:`ArchiveDiskExport` for
:func:`serve_nbd`.  Block status comes from the index, no I/O: zero
clusters and zero 4 KiB blocks are ``hole|zero``; clusters missing from an
incomplete archive are ``hole`` without ``zero`` (contents unknown) and
reading them answers EIO, so a copy fails loudly instead of filling them
with zeroes.

Worst case: the index holds a few words per run of stored or zero blocks
(see ``_reader``); reads go to worker threads as ``pread`` calls of at most
the request's size; the server bounds everything else.  A compressed
archive cannot be read at random offsets, so it is refused up front with
a message saying so.
"""

from __future__ import annotations

import os

import anyio
import anyio.abc

from . import _nbd_proto as proto
from ._errors import SourceError
from ._nbd_server import NbdExport, serve_nbd
from ._reader import DeviceView, VmaReader

__all__ = ["ArchiveDiskExport", "serve_archive"]

_NBD_FLAGS = {
    0: 0,  # stored data
    1: proto.STATE_HOLE | proto.STATE_ZERO,  # a zero cluster or zero 4 KiB block
    2: proto.STATE_HOLE,  # missing from the archive: unallocated, contents unknown
}


class ArchiveDiskExport(NbdExport):
    """One disk of an archive, read-only."""

    def __init__(self, view: DeviceView) -> None:
        self.view = view
        self.name = view.name
        self.size = view.size
        self.description = f"disk {view.name} of a VMA archive"

    async def read(self, offset: int, length: int) -> bytes:
        return await self.view.read(offset, length)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(size, _NBD_FLAGS[flags]) for size, flags in self.view.block_status(offset, length)]


def _refuse_compressed(archive: object, compression: str) -> SourceError:
    return SourceError(
        f"{archive} is {compression}-compressed: serving needs random access to the"
        " disks, which a compressed stream cannot give; decompress it to a file first"
        f" (e.g. {'zstd -d' if compression == 'zstd' else compression + ' -d'} FILE)"
    )


async def archive_exports(
    reader: VmaReader, archive: object = "the archive"
) -> list[ArchiveDiskExport]:
    """An export per disk of ``reader``'s archive (vmstate is not a disk)."""
    if reader.compression is not None:
        raise _refuse_compressed(archive, reader.compression)
    exports = []
    for device in reader.header.devices:
        if device.is_vmstate:
            continue
        view = await reader.open_device(device.dev_id, require_complete=False)
        exports.append(ArchiveDiskExport(view))
    return exports


async def serve_archive(
    archive: str | os.PathLike[str],
    *,
    unix_socket: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    stop: anyio.Event | None = None,
    grace: float = 10.0,
    task_status: anyio.abc.TaskStatus[str | tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve every disk of the uncompressed ``archive`` (a file or block
    device) until cancelled, or until ``stop`` is set and the requests in
    flight are answered (see :func:`serve_nbd`); the address goes to
    ``task_status`` once clients can connect (use ``await tg.start(...)``)."""
    async with VmaReader.open(os.fspath(archive)) as reader:
        exports = await archive_exports(reader, archive)
        await serve_nbd(
            exports,
            unix_socket=unix_socket,
            host=host,
            port=port,
            stop=stop,
            grace=grace,
            task_status=task_status,
        )
