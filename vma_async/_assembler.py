"""Writer state, sans-I/O: what goes into the header, and how clusters become extents.

Goal: given the calls a backup makes (configs, streams, cluster writes, stream
closes), produce the exact bytes the reference writer (``vma-writer.c``) would,
into buffers the caller owns.  Nothing here awaits or touches a file; the async
layer (:mod:`vma_async._writer`) supplies the buffers, the lock and the output.

Plan: a cluster is checked (:meth:`ExtentAssembler.check_write`), then packed
(:meth:`ExtentAssembler.add_cluster`) into the open extent buffer: each 4 KiB
block that is all zero or lies wholly past the device's end is left out and
counted as zero bytes, runs of stored blocks are copied with one memcpy each,
and the tail of a stored block past the device's end is zeroed.  Like the
reference, an extent is sealed lazily: only when a 59th cluster arrives (so it
holds 58), on an explicit flush, or when the last stream closes.

Worst case per cluster: 16 ``startswith`` memcmps of 4 KiB on the caller's
bytes (``startswith`` on ``bytes`` is a memcmp; comparing ``memoryview`` slices
goes item by item, about 100x slower, measured) and at most 16
copies; no allocation except when the caller's data is not ``bytes`` /
``bytearray`` or is shorter than a cluster.

The first error is sticky and lives here, in one place: every later call
raises a fresh copy chained to it.  The async layer reports its own failures (output, cancellation,
a producer that raised) through :meth:`ExtentAssembler.fail`.
"""

from __future__ import annotations

import copy
import uuid as uuid_mod
from collections.abc import Sequence
from dataclasses import dataclass

from ._errors import (
    BlobTooLargeError,
    ClusterRangeError,
    ClusterSizeError,
    DuplicateDeviceNameError,
    HeaderWrittenError,
    IncompleteStreamError,
    InvalidStreamError,
    OpenStreamError,
    StreamClosedError,
    TooManyConfigsError,
    TooManyDevicesError,
    WriterAbortedError,
)
from ._format import (
    BLOCK_SIZE,
    BLOCKS_PER_CLUSTER,
    CLUSTER_SIZE,
    EXTENT_HEADER_SIZE,
    MAX_BLOB_SIZE,
    MAX_CLUSTER_NUM,
    MAX_CONFIGS,
    MAX_DEVICES,
    VMSTATE_NAME,
    WRITER_CLUSTERS_PER_EXTENT,
    ZERO_BLOCK,
    BlobTable,
    config_basename,
    encode_extent_header,
    encode_header,
    encode_name,
    make_blockinfo,
    pack_cluster,
)

WRITER_EXTENT_SIZE = EXTENT_HEADER_SIZE + WRITER_CLUSTERS_PER_EXTENT * CLUSTER_SIZE
"""The largest extent this writer seals; an extent buffer must hold this much."""

ClusterData = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """One stream's byte accounting, as ``vma_writer_get_status`` reports it."""

    dev_id: int
    name: str
    size: int
    transferred: int
    zero_bytes: int
    finished: bool


@dataclass(frozen=True, slots=True)
class WriterStatus:
    """A snapshot of the writer; ``error`` is the sticky first failure, if any."""

    uuid: uuid_mod.UUID
    closed: bool
    error: BaseException | None
    streams: tuple[StreamStatus, ...]


class _Stream:
    __slots__ = ("cluster_count", "dev_id", "finished", "name", "size", "transferred", "zero_bytes")

    def __init__(self, dev_id: int, name: str, size: int) -> None:
        self.dev_id = dev_id
        self.name = name
        self.size = size
        self.cluster_count = (size + CLUSTER_SIZE - 1) // CLUSTER_SIZE
        self.transferred = 0
        self.zero_bytes = 0
        self.finished = False


def _fresh_copy(error: BaseException) -> BaseException:
    """A new exception like ``error`` (type, args, attributes), without its
    traceback and chain; a :class:`WriterAbortedError` naming it if the type
    cannot be rebuilt from its args."""
    try:
        fresh = copy.copy(error)
    except Exception:
        fresh = WriterAbortedError(f"vma archive aborted: {error!r}")
    if fresh is error:  # pragma: no cover - a type whose copy returns itself
        fresh = WriterAbortedError(f"vma archive aborted: {error!r}")
    fresh.__traceback__ = None
    return fresh


class ExtentAssembler:
    """The reference writer's state machine, minus its I/O.

    The caller drives it in this order: ``add_config`` / ``register_stream``;
    ``encode_header`` once (freezes the registrations); then, per cluster,
    ``check_write``, ``begin_extent`` when no extent buffer is open,
    ``seal_extent`` when ``extent_full``, and ``add_cluster``; finally
    ``close_stream`` for each stream and ``check_close``.
    """

    def __init__(self, uuid: uuid_mod.UUID) -> None:
        self.uuid = uuid
        self._table = BlobTable()
        self._config_pointers: list[tuple[int, int]] = []
        self._streams: dict[int, _Stream] = {}
        self._vmstate_dev_id = 0
        self._vmstate_next_cluster = 0
        self._header_written = False
        self._closed = False
        self._error: BaseException | None = None
        self._buffer: memoryview | None = None
        self._pos = EXTENT_HEADER_SIZE
        self._blockinfo: list[int] = []

    # --- the sticky error ----------------------------------------------------

    @property
    def error(self) -> BaseException | None:
        return self._error

    def fail(self, exc: BaseException) -> BaseException:
        """Record ``exc`` unless an error is already recorded; return the sticky one.

        This is the reference's ``vma_writer_set_error``: the first error wins."""
        if self._error is None:
            self._error = exc
        return self._error

    def raise_if_failed(self) -> None:
        """Raise the sticky error, as a fresh copy chained to the first.

        Re-raising the recorded object itself would append this call's frames
        to its traceback, growing it on every call; a copy of the same type
        and message, raised ``from`` the original, keeps both short and still
        shows where the archive first failed."""
        error = self._error
        if error is not None:
            raise _fresh_copy(error) from error

    # --- registration --------------------------------------------------------

    @property
    def header_written(self) -> bool:
        return self._header_written

    @property
    def closed(self) -> bool:
        return self._closed

    def add_config(self, name: str, data: bytes) -> None:
        """Store a config blob under the basename of ``name``, as the reference does."""
        self.raise_if_failed()
        if self._header_written:
            raise self.fail(HeaderWrittenError("vma_writer_add_config: header already written"))
        if len(self._config_pointers) >= MAX_CONFIGS:
            raise self.fail(
                TooManyConfigsError(f"vma_writer_add_config: too many configs (max {MAX_CONFIGS})")
            )
        try:
            name_ptr = self._table.add(encode_name(config_basename(name)))
            data_ptr = self._table.add(bytes(data))
        except BlobTooLargeError as exc:
            raise self.fail(exc) from None
        self._config_pointers.append((name_ptr, data_ptr))

    def register_stream(self, name: str, size: int) -> int:
        """Register a device; return its dev_id (1..254, in registration order)."""
        self.raise_if_failed()
        if self._header_written:
            raise self.fail(
                HeaderWrittenError("vma_writer_register_stream: header already written")
            )
        dev_id = len(self._streams) + 1
        if dev_id > MAX_DEVICES:
            raise self.fail(TooManyDevicesError("vma_writer_register_stream: too many drives"))
        if size <= 0:
            raise self.fail(
                InvalidStreamError(f"vma_writer_register_stream: got strange size {size}")
            )
        if any(stream.name == name for stream in self._streams.values()):
            raise self.fail(
                DuplicateDeviceNameError(
                    f"vma_writer_register_stream: device name '{name}' given twice"
                )
            )
        if len(encode_name(name)) > MAX_BLOB_SIZE:
            raise self.fail(
                BlobTooLargeError(
                    f"device name of {len(encode_name(name))} bytes exceeds the "
                    f"{MAX_BLOB_SIZE}-byte blob limit"
                )
            )
        self._streams[dev_id] = _Stream(dev_id, name, size)
        if name == VMSTATE_NAME:
            self._vmstate_dev_id = dev_id
        return dev_id

    def encode_header(self, ctime: int) -> bytes:
        """The archive header, byte-identical to the reference's for the same
        uuid and ctime.  Registrations are frozen from here on."""
        self.raise_if_failed()
        self._header_written = True
        devices = {s.dev_id: (s.name, s.size) for s in self._streams.values()}
        try:
            return encode_header(
                self.uuid,
                ctime,
                devices=devices,
                blob_table=self._table,
                config_pointers=self._config_pointers,
            )
        except BlobTooLargeError as exc:
            raise self.fail(exc) from None

    # --- clusters --------------------------------------------------------------

    def check_write(self, dev_id: int, cluster_num: int) -> None:
        """Every range check the reference makes before it packs a cluster."""
        self.raise_if_failed()
        stream = self._streams.get(dev_id)
        if stream is None:
            raise self.fail(InvalidStreamError(f"vma_writer_write: no such stream {dev_id}"))
        if stream.finished:
            raise self.fail(StreamClosedError(f"vma_writer_write: stream already closed {dev_id}"))
        if not 0 <= cluster_num <= MAX_CLUSTER_NUM:
            raise self.fail(ClusterRangeError("vma_writer_write: cluster number out of range"))
        if dev_id == self._vmstate_dev_id:
            if cluster_num != self._vmstate_next_cluster:
                raise self.fail(ClusterRangeError("vma_writer_write: non sequential vmstate write"))
        elif cluster_num >= stream.cluster_count:
            raise self.fail(ClusterRangeError("vma_writer_write: cluster number too big"))

    @property
    def extent_open(self) -> bool:
        return self._buffer is not None

    @property
    def extent_full(self) -> bool:
        """The reference flushes before packing a 59th cluster."""
        return len(self._blockinfo) >= WRITER_CLUSTERS_PER_EXTENT

    @property
    def extent_room(self) -> int:
        """Clusters the open extent still takes."""
        return WRITER_CLUSTERS_PER_EXTENT - len(self._blockinfo)

    @property
    def extent_bytes(self) -> int:
        """Bytes of the open extent so far (its header counted), 0 when none is open."""
        return self._pos if self._buffer is not None else 0

    def begin_extent(self, buffer: memoryview) -> None:
        """Pack the next clusters into ``buffer`` (at least :data:`WRITER_EXTENT_SIZE`)."""
        if self._buffer is not None:
            raise RuntimeError("an extent is already open")
        if len(buffer) < WRITER_EXTENT_SIZE:
            raise ValueError(f"an extent buffer needs {WRITER_EXTENT_SIZE} bytes")
        self._buffer = buffer
        self._pos = EXTENT_HEADER_SIZE
        self._blockinfo = []

    def seal_extent(self) -> int:
        """Write the extent header into the buffer and detach it; return the
        extent's length.  An extent with no clusters is valid (the final one
        of an archive with no data, or an explicit flush)."""
        buffer = self._buffer
        if buffer is None:
            raise RuntimeError("no extent is open")
        buffer[:EXTENT_HEADER_SIZE] = encode_extent_header(self.uuid, self._blockinfo)
        length = self._pos
        self._buffer = None
        self._pos = EXTENT_HEADER_SIZE
        self._blockinfo = []
        return length

    def add_clusters(
        self,
        dev_id: int,
        first_cluster: int,
        data: bytes | bytearray,
        present: Sequence[bool] | None,
        index: int,
        count: int,
    ) -> tuple[int, int]:
        """Check and pack clusters ``index``, ``index + 1``, ... (below
        ``count``) of a run into the open extent until it is full; return the
        next index and the bytes transferred.

        Cluster ``i`` of the run is cluster ``first_cluster + i`` and its data
        is ``data[i * CLUSTER_SIZE :]``, packed in place (no slice, no copy),
        or it is all zero, unread, where ``present[i]`` is false.
        """
        transferred = 0
        blockinfo = self._blockinfo
        while index < count and len(blockinfo) < WRITER_CLUSTERS_PER_EXTENT:
            cluster_num = first_cluster + index
            self.check_write(dev_id, cluster_num)
            if present is None or present[index]:
                transferred += self.add_cluster(dev_id, cluster_num, data, index * CLUSTER_SIZE)
            else:
                transferred += self.add_cluster(dev_id, cluster_num, None)
            index += 1
        return index, transferred

    def add_cluster(
        self, dev_id: int, cluster_num: int, data: ClusterData | None, at: int | None = None
    ) -> int:
        """Pack one checked cluster into the open extent; return the bytes
        transferred (a cluster, less what lies past the end of a disk).

        ``None`` records the cluster as all zero without looking at any data.
        With ``at``, the cluster is ``data[at : at + CLUSTER_SIZE]`` of a
        larger buffer (shorter at its end: zero-padded); without, ``data`` is
        the cluster (shorter: zero-padded; longer: an error).
        """
        buffer = self._buffer
        if buffer is None or self.extent_full:
            raise RuntimeError("add_cluster needs an open extent with room")
        stream = self._streams[dev_id]
        if data is not None:
            if at is not None:
                if len(data) - at >= CLUSTER_SIZE and isinstance(data, bytes | bytearray):
                    return self._add_whole_cluster(stream, dev_id, cluster_num, data, at)
                data = memoryview(data)[at : at + CLUSTER_SIZE]
            elif len(data) > CLUSTER_SIZE:
                raise self.fail(
                    ClusterSizeError(
                        f"vma_writer_write: {len(data)} bytes of data for one cluster "
                        f"(at most {CLUSTER_SIZE})"
                    )
                )
        if dev_id == self._vmstate_dev_id:
            self._vmstate_next_cluster += 1

        offset = cluster_num * CLUSTER_SIZE
        mask = 0
        if data is None:
            stream.zero_bytes += CLUSTER_SIZE
        else:
            if not isinstance(data, bytes | bytearray):
                data = bytes(data)
            if len(data) < CLUSTER_SIZE:
                data = bytes(data) + bytes(CLUSTER_SIZE - len(data))
            inside = min(stream.size - offset, CLUSTER_SIZE)
            candidates = max(0, (inside + BLOCK_SIZE - 1) // BLOCK_SIZE)
            mask = pack_cluster(buffer, self._pos, data, 0, candidates)
            stored = mask.bit_count()
            self._pos += stored * BLOCK_SIZE
            stream.zero_bytes += (BLOCKS_PER_CLUSTER - stored) * BLOCK_SIZE
            last_block_end = candidates * BLOCK_SIZE
            if candidates and inside < last_block_end and mask >> (candidates - 1) & 1:
                # The last stored block runs past the device's end: zero its
                # tail so nothing from beyond the device leaks into the archive.
                tail_start = self._pos - (last_block_end - inside)
                buffer[tail_start : self._pos] = ZERO_BLOCK[: last_block_end - inside]

        self._blockinfo.append(make_blockinfo(dev_id, cluster_num, mask))

        transferred = CLUSTER_SIZE
        if dev_id != self._vmstate_dev_id:
            overshoot = offset + CLUSTER_SIZE - stream.size
            if overshoot > 0:
                transferred -= overshoot
        stream.transferred += transferred
        return transferred

    def _add_whole_cluster(
        self, stream: _Stream, dev_id: int, cluster_num: int, data: bytes | bytearray, at: int
    ) -> int:
        """:meth:`add_cluster` for a cluster in place in a larger buffer."""
        if dev_id == self._vmstate_dev_id or (cluster_num + 1) * CLUSTER_SIZE > stream.size:
            # vmstate's order, or a disk's last cluster (blocks past its end):
            # the general path, on a copy of this one cluster.
            return self.add_cluster(dev_id, cluster_num, data[at : at + CLUSTER_SIZE])
        assert self._buffer is not None
        mask = pack_cluster(self._buffer, self._pos, data, at)
        stored = mask.bit_count()
        self._pos += stored * BLOCK_SIZE
        stream.zero_bytes += (BLOCKS_PER_CLUSTER - stored) * BLOCK_SIZE
        stream.transferred += CLUSTER_SIZE
        self._blockinfo.append(make_blockinfo(dev_id, cluster_num, mask))
        return CLUSTER_SIZE

    # --- closing ---------------------------------------------------------------

    def close_stream(self, dev_id: int) -> int:
        """Mark a stream finished; return how many are still open (0: flush now)."""
        self.raise_if_failed()
        stream = self._streams.get(dev_id)
        if stream is None:
            raise self.fail(InvalidStreamError(f"vma_writer_close_stream: no such stream {dev_id}"))
        if stream.finished:
            raise self.fail(
                StreamClosedError(f"vma_writer_close_stream: stream already closed {dev_id}")
            )
        stream.finished = True
        return self.open_streams

    @property
    def open_streams(self) -> int:
        return sum(1 for s in self._streams.values() if not s.finished)

    def check_close(self) -> None:
        """The reference's final checks; afterwards every stream counts as closed."""
        self.raise_if_failed()
        self._closed = True
        for stream in self._streams.values():
            if not stream.finished:
                self.fail(
                    OpenStreamError(f"vma_writer_close: detected open stream '{stream.name}'")
                )
            elif stream.transferred != stream.size and stream.dev_id != self._vmstate_dev_id:
                self.fail(
                    IncompleteStreamError(
                        f"vma_writer_close: incomplete stream '{stream.name}' "
                        f"({stream.transferred} != {stream.size})"
                    )
                )
            stream.finished = True
        self.raise_if_failed()

    def mark_closed(self) -> None:
        self._closed = True

    def status(self) -> WriterStatus:
        return WriterStatus(
            uuid=self.uuid,
            closed=self._closed,
            error=self._error,
            streams=tuple(
                StreamStatus(s.dev_id, s.name, s.size, s.transferred, s.zero_bytes, s.finished)
                for s in self._streams.values()
            ),
        )
