"""The public surface, pinned: what ``vma_async`` exports, and the sans-I/O layer.

``__all__`` is compared with a literal list, so adding, renaming or dropping
a public name is a deliberate change to this file (and a CHANGELOG line).

The sans-I/O layer is public in the h11 sense: :class:`ExtentAssembler`
turns writer calls into archive bytes in buffers the caller owns, and
:class:`ArchiveParser` turns archive bytes, cut anywhere, into the header and
extents; neither does I/O or needs an event loop, so these tests call them
from plain functions.  The async ``VmaWriter`` must produce exactly the
bytes the assembler does on its own.
"""

from __future__ import annotations

import random
import uuid as uuid_mod
from pathlib import Path

import pytest

import vma_async
from vma_async import (
    BLOCK_SIZE,
    CLUSTER_SIZE,
    ArchiveHeader,
    ArchiveParser,
    ExtentAssembler,
    InvalidStreamError,
    MissingClusterError,
    ParsedExtent,
    ReadSummary,
    TruncatedArchiveError,
    VmaWriter,
)

PUBLIC_NAMES = [
    "ArchiveHeader", "ArchiveParser", "ArchiveSource", "AsyncResource", "BLOCK_SIZE",
    "BadMagicError", "BlobTableError", "BlobTooLargeError", "BlockBeyondEndError", "CLUSTER_SIZE",
    "CallbackSink", "ClusterEntry", "ClusterRangeError", "ClusterRead", "ClusterSizeError",
    "CommandFailedError",
    "CommandTarget", "CompressingTarget", "DeviceInfo", "DeviceProgress", "DeviceReadStats",
    "DeviceSizeError", "DeviceView", "DigestError", "DigestMismatchError", "DigestRecorder",
    "DuplicateClusterError", "DuplicateDeviceNameError", "EXTENT_HEADER_SIZE", "ExistingFileSink",
    "ExtentAssembler", "ExtentBlockCountError", "ExtentChecksumError", "ExtentError",
    "ExtentHeader", "ExtentMagicError", "ExtentUuidError", "ExtractResult", "FdTarget",
    "FifoTarget", "FormatError", "HeaderChecksumError", "HeaderError", "HeaderSizeError",
    "HeaderWrittenError", "Image", "IncompleteStreamError", "InvalidConfigPointerError",
    "InvalidNameError", "InvalidStreamError", "MAX_EXTENT_SIZE", "MissingClusterError",
    "NbdClient", "NbdCommandError", "NbdError", "NbdExport", "NbdOptionError", "NbdProtocolError",
    "NbdSink", "NewFileTarget", "OpenStreamError", "Opening", "ParsedExtent", "Progress",
    "ProgressCallback", "QEMU_FORMATS", "QemuError", "QemuImage", "QemuMissingError",
    "RateLimiter", "RawFileSink", "ReadSummary", "RestoreMapEntry", "RestoreMapError", "S3Source",
    "S3Target", "S3TargetStats", "SequentialSink", "SidecarDigest", "Sink", "SinkError",
    "SinkExistsError", "SinkWrapper", "SourceError", "StreamClosedError", "StreamStatus", "Target",
    "TargetError", "TargetExistsError", "ThrottledSink", "TooManyConfigsError",
    "TooManyDevicesError", "TruncatedArchiveError", "UnknownDeviceError", "UnsafeNameError",
    "UnsupportedVersionError", "VmaError", "VmaReader", "VmaWriter", "VmstateOrderError",
    "WriterAbortedError", "WriterStats", "WriterStatus", "WriterUsageError", "__version__",
    "backup_image", "create_archive", "digest_path", "extract_archive", "list_nbd_exports",
    "open_image", "open_source", "parse_restore_map", "probe_format", "read_digest_file",
    "read_restore_map", "repack_archive", "serve_archive", "serve_nbd", "verify_with_digest",
    "write_digest_file",
]  # fmt: skip


def test_all_is_pinned() -> None:
    assert sorted(vma_async.__all__) == PUBLIC_NAMES
    assert len(set(vma_async.__all__)) == len(vma_async.__all__)  # no name twice


def test_every_public_name_resolves_and_star_import_gives_exactly_them() -> None:
    for name in vma_async.__all__:
        assert getattr(vma_async, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from vma_async import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == PUBLIC_NAMES


def test_errors_are_all_vma_errors() -> None:
    for name in vma_async.__all__:
        value = getattr(vma_async, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, vma_async.VmaError), name


# --- the sans-I/O layer ---------------------------------------------------------------------

UUID = uuid_mod.UUID("0badc0de-0000-4000-8000-00000000beef")
CTIME = 1_700_000_000


def assemble(devices: dict[str, bytes], configs: dict[str, bytes]) -> bytes:
    """A whole archive from :class:`ExtentAssembler` alone: the caller owns
    the buffers and decides when to seal, as the async writer does."""
    assembler = ExtentAssembler(UUID)
    for name, data in configs.items():
        assembler.add_config(name, data)
    ids = {name: assembler.register_stream(name, len(data)) for name, data in devices.items()}
    out = bytearray(assembler.encode_header(CTIME))
    buffer = memoryview(bytearray(vma_async.MAX_EXTENT_SIZE))

    def seal() -> None:
        out.extend(buffer[: assembler.seal_extent()])

    for name, data in devices.items():
        for cluster in range(-(-len(data) // CLUSTER_SIZE)):
            assembler.check_write(ids[name], cluster)
            if assembler.extent_open and assembler.extent_full:
                seal()
            if not assembler.extent_open:
                assembler.begin_extent(buffer)
            chunk = data[cluster * CLUSTER_SIZE : (cluster + 1) * CLUSTER_SIZE]
            assembler.add_cluster(ids[name], cluster, chunk)
        assembler.close_stream(ids[name])
    if not assembler.extent_open:
        assembler.begin_extent(buffer)
    seal()
    assembler.check_close()
    return bytes(out)


def parse(
    archive: bytes, rng: random.Random
) -> tuple[ArchiveHeader, dict[str, bytes], ReadSummary]:
    """Feed ``archive`` to :class:`ArchiveParser` in random cuts; rebuild each device."""
    parser = ArchiveParser()
    header: ArchiveHeader | None = None
    disks: dict[int, bytearray] = {}
    pos = 0
    while True:
        event = parser.next_event()
        if event is None:
            if pos == len(archive):
                break
            step = rng.randint(1, 3 * CLUSTER_SIZE)
            parser.feed(archive[pos : pos + step])
            pos = min(pos + step, len(archive))
        elif isinstance(event, ArchiveHeader):
            header = event
            disks = {d.dev_id: bytearray(d.size) for d in event.devices}
        else:
            assert isinstance(event, ParsedExtent)
            for dev_id, offset, data in event.writes:
                disks[dev_id][offset : offset + len(data)] = data
    summary = parser.end_of_input()
    assert header is not None
    return header, {d.name: bytes(disks[d.dev_id]) for d in header.devices}, summary


def sample_devices(rng: random.Random) -> dict[str, bytes]:
    mixed = b"".join(
        bytes(BLOCK_SIZE) if rng.random() < 0.4 else rng.randbytes(BLOCK_SIZE) for _ in range(400)
    )
    return {
        "a": mixed + b"tail",
        "b": bytes(5 * CLUSTER_SIZE),
        "c": rng.randbytes(70 * CLUSTER_SIZE),
    }


def test_assembler_then_parser_round_trip_without_io() -> None:
    rng = random.Random(8)
    devices = sample_devices(rng)
    configs = {"qemu-server.conf": b"cores: 2\n"}
    archive = assemble(devices, configs)
    for seed in range(3):  # the cuts do not matter
        header, restored, summary = parse(archive, random.Random(seed))
        assert header.uuid == UUID
        assert header.ctime == CTIME
        assert header.configs == tuple(configs.items())
        assert restored == devices
        assert (
            summary.bytes_read
            == sum(-(-len(d) // CLUSTER_SIZE) for d in devices.values()) * CLUSTER_SIZE
        )


def test_parser_reports_a_cut_archive_and_a_missing_cluster() -> None:
    archive = assemble({"d": b"\x01" * (3 * CLUSTER_SIZE)}, {})
    parser = ArchiveParser()
    parser.feed(archive[:-100])
    while parser.next_event() is not None:
        pass
    with pytest.raises(TruncatedArchiveError):
        parser.end_of_input()
    # the header alone: every cluster is missing
    size = archive.index(b"VMAE")  # the first extent's magic follows the header
    cut = ArchiveParser()
    cut.feed(archive[:size])
    assert isinstance(cut.next_event(), ArchiveHeader)
    with pytest.raises(MissingClusterError, match="detected missing cluster 0 for stream d"):
        cut.end_of_input()


def test_assembler_refuses_what_the_reference_refuses() -> None:
    assembler = ExtentAssembler(UUID)
    dev_id = assembler.register_stream("d", CLUSTER_SIZE)
    assembler.encode_header(CTIME)
    with pytest.raises(InvalidStreamError, match="^vma_writer_write: no such stream 7$"):
        assembler.check_write(7, 0)
    with pytest.raises(InvalidStreamError):  # sticky, as in the reference
        assembler.check_write(dev_id, 0)


@pytest.mark.anyio
async def test_the_async_writer_writes_exactly_the_assemblers_bytes(tmp_path: Path) -> None:
    rng = random.Random(9)
    devices = sample_devices(rng)
    path = tmp_path / "w.vma"
    async with VmaWriter.open(path, uuid=UUID, ctime=CTIME) as writer:
        writer.add_config("qemu-server.conf", b"cores: 2\n")
        ids = {name: writer.register_stream(name, len(data)) for name, data in devices.items()}
        for name, data in devices.items():
            for cluster in range(-(-len(data) // CLUSTER_SIZE)):
                chunk = data[cluster * CLUSTER_SIZE : (cluster + 1) * CLUSTER_SIZE]
                await writer.write(ids[name], cluster, chunk)
            await writer.close_stream(ids[name])
    assert path.read_bytes() == assemble(devices, {"qemu-server.conf": b"cores: 2\n"})
