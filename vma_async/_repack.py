"""Rewrite an archive into canonical order (``vma repack``), so that it deduplicates.

Goal: two backups of the same VM should share almost every byte, so that a
deduplicating store (borg, restic, a chunk store) keeps the second one for
little more than what changed.  Archives as the reference (or a default
``vma create``) writes them defeat this: producers interleave the devices'
clusters in whatever order they ran, and every extent header carries the
archive's random uuid.

Plan: open the input for random access (:meth:`VmaReader.open_device`: an
uncompressed archive in a regular file), then write a new archive with the
same configs (same order), the same devices (same order, names and sizes),
uuid and ctime (unless overridden), device after device and each device's
clusters in ascending order.  A cluster's stored form depends only on its
content (the writer elides zero 4 KiB blocks and all-zero clusters), so zero
blocks survive and the same content always gives the same bytes.  vmstate (a
stream whose length the header does not bound) is copied by a second,
sequential pass over the input, restoring only that device.

Compressed inputs are refused with "decompress first": random access into a
zstd/gzip/lzo stream would need a temporary copy of the whole archive, which
``zstd -d`` does as well and visibly.

Worst case: memory is one 4 MiB read chunk ahead plus the writer's pool; the
input's extent headers are indexed once (8 bytes per cluster).
"""

from __future__ import annotations

import os
import uuid as uuid_mod
from collections.abc import Sequence

import anyio

from ._errors import SourceError
from ._fdio import Buffer
from ._format import CLUSTER_SIZE, DeviceInfo
from ._reader import DeviceView, VmaReader
from ._sinks import Sink
from ._targets import TargetLike
from ._writer import VmaWriter, WriterStatus

__all__ = ["REPACK_CHUNK", "copy_device_in_order", "repack_archive"]

REPACK_CHUNK = 64 * CLUSTER_SIZE
"""4 MiB per random-access read: one worker-thread hop per 64 clusters."""


StrPath = str | os.PathLike[str]


async def repack_archive(
    source: StrPath,
    target: TargetLike,
    *,
    uuid: uuid_mod.UUID | None = None,
    ctime: int | None = None,
) -> WriterStatus:
    """Write ``source`` again into ``target`` in canonical order.

    ``uuid`` and ``ctime`` default to the input's, so a repacked archive
    describes the same backup; pass a fixed ``uuid`` so that the extent
    headers of successive backups match too.  The input must be an
    uncompressed archive in a regular file and complete (a missing cluster is
    an error before the output exists).  On failure or cancellation the
    partial output is removed (the writer aborts).
    """
    async with await VmaReader.open(source) as reader:
        header = reader.header
        if reader.compression is not None:
            raise SourceError(
                f"{os.fspath(source)} is {reader.compression}-compressed: random access"
                " needs an uncompressed archive - decompress it first"
            )
        vmstate = header.vmstate
        views = {
            dev.dev_id: await reader.open_device(dev.dev_id)
            for dev in header.devices
            if vmstate is None or dev.dev_id != vmstate.dev_id
        }
        async with VmaWriter.open(
            target,
            uuid=uuid if uuid is not None else header.uuid,
            ctime=ctime if ctime is not None else header.ctime,
        ) as writer:
            for name, data in header.configs:
                writer.add_config(name, data)
            new_ids = [(dev, writer.register_stream(dev.name, dev.size)) for dev in header.devices]
            if not new_ids:
                await writer.flush()
            for dev, new_id in new_ids:
                view = views.get(dev.dev_id)
                if view is None:
                    await _copy_vmstate(source, dev, writer, new_id)
                else:
                    await copy_device_in_order(view, writer, new_id)
                await writer.close_stream(new_id)
        return writer.status()


async def copy_device_in_order(view: DeviceView, writer: VmaWriter, dev_id: int) -> None:
    """Write every cluster of ``view`` to stream ``dev_id``, in ascending order.

    The next chunk is read (in a worker thread) while this one is packed;
    each chunk goes to the writer in one :meth:`VmaWriter.write_clusters`
    call, which finds the zero clusters and blocks itself.
    """
    size = view.size
    send, receive = anyio.create_memory_object_stream[tuple[int, bytes]](1)

    async def read_ahead() -> None:
        async with send:
            for offset in range(0, size, REPACK_CHUNK):
                await send.send((offset, await view.read(offset, REPACK_CHUNK)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_ahead)
        async with receive:
            async for offset, data in receive:
                await writer.write_clusters(dev_id, offset // CLUSTER_SIZE, data)


class _ClusterFeeder(Sink):
    """A restore sink that writes a sequential stream (vmstate) into a writer's
    stream, one cluster at a time."""

    def __init__(self, writer: VmaWriter, dev_id: int) -> None:
        self._writer = writer
        self._dev_id = dev_id
        self._pending = bytearray()
        self._next_cluster = 0

    async def write(self, offset: int, data: Buffer) -> None:
        self._pending += data
        view = memoryview(self._pending)
        whole = len(self._pending) // CLUSTER_SIZE * CLUSTER_SIZE
        try:
            for start in range(0, whole, CLUSTER_SIZE):
                await self._emit(view[start : start + CLUSTER_SIZE])
        finally:
            view.release()
        del self._pending[:whole]

    async def write_many(self, writes: Sequence[tuple[int, Buffer]]) -> None:
        for offset, data in writes:
            await self.write(offset, data)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self.write(offset, bytes(length))

    async def flush(self) -> None:
        return None

    async def _emit(self, cluster: memoryview | bytes) -> None:
        await self._writer.write(self._dev_id, self._next_cluster, cluster)
        self._next_cluster += 1

    async def aclose(self) -> None:
        if self._pending:
            pending, self._pending = bytes(self._pending), bytearray()
            await self._emit(pending)


async def _copy_vmstate(source: StrPath, dev: DeviceInfo, writer: VmaWriter, dev_id: int) -> None:
    async with await VmaReader.open(source) as reader:
        await reader.restore({dev.dev_id: _ClusterFeeder(writer, dev_id)})
