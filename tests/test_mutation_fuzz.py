"""Mutation fuzzing of the reader: damaged and hostile archives.

Valid archives made by :class:`VmaWriter` are mutated (bits flipped, ranges
zeroed, duplicated, deleted or overwritten, truncation, whole extents
duplicated or swapped, header and extent fields set to extreme values,
arbitrary bytes, compression before or after the damage), and most mutants
get their MD5s recomputed so the damage reaches the checks behind them.
Each input is then read one of several ways (verify, restore into memory,
``extract_archive`` into a directory, the raw extent stream, random access),
from a file or from a stream cut into random chunks.

The only acceptable outcomes are a restore that an independent reader
(``dissect.archive``) agrees with, or one of our :class:`VmaError`
subclasses.  Anything else is a crash, and so is an input that takes longer
than :data:`TIME_LIMIT`, allocates more than :data:`MEMORY_LIMIT` (traced by
``tracemalloc``), leaks an fd, or leaves a file anywhere but in the
extraction directory of a successful extract.

The engine lives here; the suite runs it for a bounded count with fixed
seeds, and ``benchmarks/fuzz_reader.py`` runs it longer and prints counts.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import struct
import tempfile
import time
import tracemalloc
import uuid as uuid_mod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import pytest
import zstandard
from dissect.archive.vma import VMA

from tests.harness import FdLeakCheck
from vma_async import CallbackSink, Sink, VmaError, VmaReader, VmaWriter, extract_archive
from vma_async._format import encode_extent_header, encode_header, make_blockinfo

CLUSTER = 65536
BLOCK = 4096
HEADER_FIXED = 12288
EXTENT_HEADER = 512
TIME_LIMIT = 10.0
"""Seconds one input may take (the valid inputs take milliseconds)."""
MEMORY_LIMIT = 64 << 20
"""Traced bytes one input may allocate at peak (the in-memory restore and
dissect's copy for the comparison included): a few extents and a batch of
reads, whatever sizes the archive claims."""
COMPARE_LIMIT = 16 << 20
"""Restores of devices up to this size are compared with dissect.archive."""


# --- the seed archives ------------------------------------------------------------------------


async def _write_seed(path: Path, devices: dict[str, bytes], configs: dict[str, bytes]) -> None:
    async with VmaWriter.open(path, uuid=uuid_mod.UUID(int=0x5EED), ctime=1_700_000_000) as writer:
        for name, data in configs.items():
            writer.add_config(name, data)
        ids = {name: writer.register_stream(name, len(data)) for name, data in devices.items()}
        for name, data in devices.items():
            for cluster in range(-(-len(data) // CLUSTER)):
                chunk = data[cluster * CLUSTER : (cluster + 1) * CLUSTER]
                zero = chunk.count(0) == len(chunk)
                await writer.write(ids[name], cluster, None if zero else chunk)
            await writer.close_stream(ids[name])
        if not devices:
            await writer.flush()


def _mixed(size: int, rng: random.Random, density: float) -> bytes:
    blocks = -(-size // BLOCK)
    data = b"".join(
        rng.randbytes(BLOCK) if rng.random() < density else bytes(BLOCK) for _ in range(blocks)
    )
    return data[:size]


@cache
def seed_archives() -> tuple[bytes, ...]:
    """Valid archives to mutate: configs, several disks (one spanning two
    extents), a vmstate, an empty archive, a one-byte disk."""
    rng = random.Random(1234)
    specs: list[tuple[dict[str, bytes], dict[str, bytes]]] = [
        (
            {
                "drive-scsi0": _mixed(3 * CLUSTER + 5 * BLOCK + 7, rng, 0.5),
                "drive-efidisk0": _mixed(70 * CLUSTER, rng, 0.01),
                "vmstate": _mixed(2 * CLUSTER + 100, rng, 0.7),
            },
            {"qemu-server.conf": b"memory: 2048\ncores: 2\n", "qemu-server.fw": b"[OPTIONS]\n"},
        ),
        ({}, {"qemu-server.conf": b"name: empty\n"}),
        ({"disk0": b"\x01"}, {}),
        ({f"d{i}": _mixed(CLUSTER + i * 1000, rng, 0.4) for i in range(5)}, {}),
    ]
    archives = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (devices, configs) in enumerate(specs):
            path = Path(tmp) / f"seed{index}.vma"
            anyio.run(_write_seed, path, devices, configs)
            archives.append(path.read_bytes())
    return tuple(archives)


# --- mutations ---------------------------------------------------------------------------------


def _u32(data: bytes | bytearray, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "big") if len(data) >= offset + 4 else 0


def extent_offsets(data: bytes | bytearray) -> list[int]:
    """Where extents start, walking the (possibly damaged) framing as far as it goes."""
    offsets = []
    pos = _u32(data, 56)
    if not HEADER_FIXED < pos <= len(data):
        return offsets
    while pos + EXTENT_HEADER <= len(data) and data[pos : pos + 4] == b"VMAE":
        offsets.append(pos)
        pos += EXTENT_HEADER + BLOCK * int.from_bytes(data[pos + 6 : pos + 8], "big")
    return offsets


def fix_checksums(data: bytearray) -> None:
    """Recompute the header's and every reachable extent's MD5, so that the
    damage is seen by the checks that follow the checksum checks."""
    header_size = _u32(data, 56)
    if len(data) >= 48 and HEADER_FIXED < header_size <= len(data):
        data[32:48] = bytes(16)
        data[32:48] = hashlib.md5(data[:header_size]).digest()
    for pos in extent_offsets(data):
        data[pos + 24 : pos + 40] = bytes(16)
        data[pos + 24 : pos + 40] = hashlib.md5(data[pos : pos + EXTENT_HEADER]).digest()


EXTREMES = [0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1, 12288, 12289, 65536]


def _region(data: bytearray, rng: random.Random) -> tuple[int, int]:
    """A byte range to damage: the fixed header, the blob table, an extent
    header, extent data, or anywhere."""
    header_size = min(max(_u32(data, 56), HEADER_FIXED), len(data))
    extents = extent_offsets(data)
    kind = rng.randrange(5)
    if kind == 0:
        return 0, min(HEADER_FIXED, len(data))
    if kind == 1 and header_size > HEADER_FIXED:
        return HEADER_FIXED, header_size
    if kind == 2 and extents:
        start = rng.choice(extents)
        return start, min(start + EXTENT_HEADER, len(data))
    if kind == 3 and extents:
        start = rng.choice(extents) + EXTENT_HEADER
        if start < len(data):
            return start, min(start + 4 * CLUSTER, len(data))
    return 0, len(data)


def _set_field(data: bytearray, rng: random.Random) -> str:
    """Set a header or extent field that sizes or addresses something to an
    extreme: sizes, offsets, counts, dev_ids, cluster numbers."""
    extents = extent_offsets(data)
    choices: list[tuple[int, int]] = [(48, 4), (52, 4), (56, 4), (4, 4), (24, 8)]
    choices += [(4096 + 32 * dev + 8, 8) for dev in range(1, 8)]  # device sizes
    choices += [(4096 + 32 * dev, 4) for dev in range(1, 8)]  # device name pointers
    choices += [(2044 + 4 * i, 4) for i in range(3)] + [(3068 + 4 * i, 4) for i in range(3)]
    for pos in extents:
        choices += [(pos + 4, 2), (pos + 6, 2)]
        choices += [(pos + 40 + 8 * slot, rng.choice([8, 4, 2, 1])) for slot in range(59)]
    offset, width = rng.choice(choices)
    if offset + width > len(data):
        return "field-miss"
    value = rng.choice(EXTREMES) if rng.random() < 0.7 else rng.getrandbits(width * 8)
    data[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "big")
    return "field"


def _extent_surgery(data: bytearray, rng: random.Random) -> str:
    """Duplicate, drop or swap whole extents: duplicate and missing clusters,
    vmstate out of order, with intact checksums."""
    extents = extent_offsets(data)
    if not extents:
        return "surgery-miss"
    bounds = [*extents[1:], len(data)]
    pieces = [bytes(data[a:b]) for a, b in zip(extents, bounds, strict=True)]
    head = bytes(data[: extents[0]])
    op = rng.randrange(3)
    if op == 0:
        index = rng.randrange(len(pieces))
        pieces.insert(rng.randrange(len(pieces) + 1), pieces[index])
    elif op == 1:
        del pieces[rng.randrange(len(pieces))]
    elif len(pieces) > 1:
        i, j = rng.sample(range(len(pieces)), 2)
        pieces[i], pieces[j] = pieces[j], pieces[i]
    data[:] = head + b"".join(pieces)
    return "extents"


def mutate(seed_archive: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutant and a label naming what was done to it."""
    if rng.random() < 0.04:
        size = rng.choice([0, 1, 4, 100, 12288, 13000, rng.randrange(20000)])
        blob = rng.randbytes(size)
        if rng.random() < 0.5:  # arbitrary bytes behind a magic, to pass the first check
            blob = rng.choice([b"VMA\0", b"\x28\xb5\x2f\xfd", b"\x1f\x8b"]) + blob
        return blob, "arbitrary"
    data = bytearray(seed_archive)
    labels = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        op = rng.randrange(9)
        start, end = _region(data, rng)
        if end <= start:
            start, end = 0, len(data)
        pos = rng.randrange(start, end) if end > start else 0
        if op == 0:
            for _ in range(rng.randrange(1, 9)):
                bit_pos = rng.randrange(start, end) if end > start else 0
                if bit_pos < len(data):
                    data[bit_pos] ^= 1 << rng.randrange(8)
            labels.append("flip")
        elif op == 1:
            length = rng.randrange(1, 600)
            data[pos : pos + length] = bytes(len(data[pos : pos + length]))
            labels.append("zero")
        elif op == 2:
            length = rng.randrange(1, 8192)
            data[pos:pos] = data[pos : pos + length]
            labels.append("duplicate")
        elif op == 3:
            del data[pos:]
            labels.append("truncate")
        elif op == 4:
            del data[pos : pos + rng.randrange(1, 8192)]
            labels.append("delete")
        elif op == 5:
            length = rng.randrange(1, 64)
            data[pos : pos + length] = rng.randbytes(len(data[pos : pos + length]))
            labels.append("overwrite")
        elif op == 6:
            labels.append(_set_field(data, rng))
        elif op == 7:
            labels.append(_extent_surgery(data, rng))
        else:
            data += rng.randbytes(rng.choice([1, 511, 512, 4096]))
            labels.append("append")
    if rng.random() < 0.7:
        fix_checksums(data)
        labels.append("md5")
    result = bytes(data)
    roll = rng.random()
    if roll < 0.05:
        result = zstandard.ZstdCompressor().compress(result)
        labels.append("zstd")
    elif roll < 0.08:
        result = gzip.compress(result, compresslevel=1)
        labels.append("gzip")
    if roll < 0.08 and rng.random() < 0.5:  # damage the compressed stream itself
        raw = bytearray(result)
        if raw:
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        if rng.random() < 0.5:
            del raw[rng.randrange(len(raw) + 1) :]
        result = bytes(raw)
        labels.append("compressed-damage")
    return result, "+".join(labels)


# --- reading an input every way -----------------------------------------------------------------


class ChunkedStream(anyio.abc.ByteReceiveStream):
    """Archive bytes as a byte stream, in chunks of random sizes."""

    def __init__(self, data: bytes, rng: random.Random) -> None:
        self._data = memoryview(data)
        self._rng = rng

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._data:
            raise anyio.EndOfStream
        await anyio.lowlevel.checkpoint()
        size = min(max_bytes, self._rng.choice([1, 7, 512, 4096, 70000, 1 << 20]))
        chunk, self._data = bytes(self._data[:size]), self._data[size:]
        return chunk

    async def aclose(self) -> None:
        self._data = memoryview(b"")


def dissect_devices(data: bytes) -> dict[str, bytes]:
    """Device bytes as dissect.archive reads them, for the slots the reference
    calls live: dissect also lists a named slot of size 0, which can share a
    live device's name and would shadow it here."""
    vma = VMA(io.BytesIO(data))
    return {dev.name: dev.open().read() for dev in vma.devices() if dev.size}


class DissectRefused(Exception):
    """A restore succeeded, but dissect.archive cannot read the input at all."""


class Mismatch(Exception):
    """A restore succeeded but gave bytes the independent reader disagrees with."""


async def read_restore(data: bytes, source: object) -> None:
    """Restore every device into memory; compare with dissect when small."""
    async with await VmaReader.open(source) as reader:  # type: ignore[arg-type]
        header = reader.header
        small = sum(d.size for d in header.devices) <= COMPARE_LIMIT
        restored: dict[int, bytearray] = {}
        sinks: dict[str | int, Sink] = {}
        for dev in header.devices:
            buffer = restored.setdefault(dev.dev_id, bytearray()) if small else None
            sinks[dev.dev_id] = CallbackSink(_collect(buffer, dev.size, dev.is_vmstate))
        await reader.restore(sinks, write_zeroes=False)
    names = [dev.name for dev in header.devices]
    if not small or len(set(names)) != len(names):  # dissect keys devices by name
        return
    try:
        expected = dissect_devices(data)
    except Exception as exc:
        # dissect is stricter in places (it resolves the name of a slot the
        # reference skips for its zero size): no second opinion to compare.
        raise DissectRefused from exc
    for dev in header.devices:
        got = bytes(restored[dev.dev_id])
        if dev.is_vmstate:
            got = got[: dev.size]  # dissect clips the stream at its recorded size
        else:
            got += bytes(dev.size - len(got))  # holes never written
        if expected.get(dev.name) != got:
            raise Mismatch(f"device {dev.name}: restore and dissect.archive disagree")


def _collect(
    buffer: bytearray | None, size: int, is_vmstate: bool
) -> Callable[[int, memoryview], object]:
    async def write(offset: int, data: memoryview) -> None:
        if not is_vmstate:
            assert offset >= 0, "write before the device"
            assert offset + len(data) <= size, "write beyond the device"
        if buffer is not None:
            if len(buffer) < offset:
                buffer.extend(bytes(offset - len(buffer)))
            buffer[offset : offset + len(data)] = data

    return write  # type: ignore[return-value]


async def read_verify(source: object) -> None:
    async with await VmaReader.open(source) as reader:  # type: ignore[arg-type]
        await reader.verify()


async def read_extents(source: object) -> None:
    async with await VmaReader.open(source) as reader:  # type: ignore[arg-type]
        async for _ in reader.extents():
            pass


async def read_random_access(path: Path, rng: random.Random) -> None:
    async with await VmaReader.open(path) as reader:
        for dev in reader.header.devices:
            view = await reader.open_device(dev.dev_id)
            for _ in range(3):
                offset = rng.randrange(max(1, min(view.size, 1 << 30)))
                got = await view.read(offset, rng.choice([1, 4096, 70000]))
                assert len(got) <= 70000


async def read_extract(path: Path, workdir: Path) -> None:
    out = workdir / "out"
    before = set(os.listdir(workdir))
    try:
        result = await extract_archive(path, out)
    except BaseException:
        assert set(os.listdir(workdir)) == before, "a failed extract left files behind"
        raise
    assert set(os.listdir(workdir)) == before | {"out"}
    assert sorted(os.listdir(out)) == sorted(result.files)


MODES = ["verify", "restore", "restore-stream", "verify-stream", "extract", "extents", "random"]


async def read_one(data: bytes, mode: str, workdir: Path, rng: random.Random) -> None:
    path = workdir / "input.vma"
    path.write_bytes(data)
    if mode == "verify":
        await read_verify(path)
    elif mode == "restore":
        await read_restore(data, path)
    elif mode == "restore-stream":
        await read_restore(data, ChunkedStream(data, rng))
    elif mode == "verify-stream":
        await read_verify(ChunkedStream(data, rng))
    elif mode == "extract":
        await read_extract(path, workdir)
    elif mode == "extents":
        await read_extents(path)
    else:
        await read_random_access(path, rng)


# --- the campaign ------------------------------------------------------------------------------


@dataclass
class FuzzReport:
    inputs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    crashes: list[tuple[int, str, str, str]] = field(default_factory=list)
    """(input index, mutation label, mode, what went wrong)"""
    slowest: float = 0.0
    peak_memory: int = 0


async def run_campaign(
    count: int,
    seed: int,
    *,
    keep_crashes: Path | None = None,
    on_input: Callable[[FuzzReport], None] | None = None,
) -> FuzzReport:
    """Try ``count`` mutants from ``seed``; never raises for a bad outcome,
    records it.  Traces memory with tracemalloc if it is already tracing."""
    seeds = await anyio.to_thread.run_sync(seed_archives)  # built on a loop of their own
    report = FuzzReport()
    tracing = tracemalloc.is_tracing()
    for index in range(count):
        rng = random.Random(f"{seed}:{index}")
        data, label = mutate(rng.choice(seeds), rng)
        mode = rng.choice(MODES)
        fds = FdLeakCheck.snapshot()
        if tracing:
            tracemalloc.reset_peak()
        started = time.monotonic()
        problem = None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                with anyio.fail_after(TIME_LIMIT):
                    await read_one(data, mode, Path(tmp), rng)
                outcome = "restored ok" if mode.startswith(("restore", "extract")) else "read ok"
            except VmaError as exc:
                outcome = type(exc).__name__
            except DissectRefused:
                outcome = "restored ok, dissect refused"
            except Exception as exc:
                outcome = f"CRASH {type(exc).__name__}"
                problem = f"{type(exc).__name__}: {exc}"
        elapsed = time.monotonic() - started
        report.slowest = max(report.slowest, elapsed)
        if tracing:
            peak = tracemalloc.get_traced_memory()[1]
            report.peak_memory = max(report.peak_memory, peak)
            if peak > MEMORY_LIMIT and problem is None:
                outcome, problem = "CRASH memory", f"traced peak {peak} bytes"
        if FdLeakCheck.snapshot() != fds and problem is None:
            outcome, problem = "CRASH fd leak", f"fds {sorted(FdLeakCheck.snapshot() ^ fds)}"
        report.inputs += 1
        report.outcomes[outcome] += 1
        if problem is not None:
            report.crashes.append((index, label, mode, problem))
            if keep_crashes is not None:
                crash_file = keep_crashes / f"crash-{seed}-{index}-{mode}.vma"
                await anyio.Path(crash_file).write_bytes(data)
        if on_input is not None:
            on_input(report)
    return report


# --- the bounded run in the suite ------------------------------------------------------------

CI_INPUTS = 250
"""Per backend: 750 inputs in all."""


@pytest.mark.anyio
async def test_mutated_archives_give_a_restore_or_a_vma_error(
    anyio_backend: tuple[str, dict[str, object]],
) -> None:
    backend = anyio_backend[0] + ("+uvloop" if anyio_backend[1] else "")
    seed = {"asyncio": 1, "asyncio+uvloop": 2, "trio": 3}[backend]
    tracemalloc.start()
    try:
        report = await run_campaign(CI_INPUTS, seed)
    finally:
        tracemalloc.stop()
    print(
        f"\n{backend}: {report.inputs} inputs, slowest {report.slowest:.2f} s, "
        f"peak traced {report.peak_memory / 2**20:.1f} MiB, outcomes {dict(report.outcomes)}"
    )
    assert report.crashes == []
    assert report.inputs == CI_INPUTS
    # The mutants reach past the checksums into the deeper checks, and some restore.
    assert report.outcomes["restored ok"] + report.outcomes["read ok"] > 0
    assert len(report.outcomes) >= 6


def test_seed_archives_are_valid() -> None:
    """The fuzzer's starting points restore cleanly (else every mutant is noise)."""

    archives = seed_archives()

    async def check() -> None:
        for archive in archives:
            await read_restore(archive, ChunkedStream(archive, random.Random(0)))

    anyio.run(check)


def test_fix_checksums_makes_a_changed_header_pass_the_md5_check() -> None:
    archive = bytearray(seed_archives()[0])
    struct.pack_into(">I", archive, 4, 2)  # version 2
    fix_checksums(archive)

    async def check() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "v2.vma"
            path.write_bytes(bytes(archive))
            with pytest.raises(VmaError, match="version"):
                await VmaReader.open(path)

    anyio.run(check)


# --- hostile sizes, one by one (regression tests) -------------------------------------------

DEV1_SIZE = 4096 + 32 + 8


def _with_field(offset_of: Callable[[bytes], int], width: int, value: int) -> bytes:
    archive = bytearray(seed_archives()[2])  # header, one extent, a one-byte disk
    offset = offset_of(bytes(archive))
    archive[offset : offset + width] = value.to_bytes(width, "big")
    fix_checksums(archive)
    return bytes(archive)


HOSTILE = [
    (
        "disk of 2**64-1 bytes",
        lambda a: DEV1_SIZE,
        8,
        2**64 - 1,
        "MissingClusterError",
        "detected missing cluster 1 for stream disk0",
        "SinkError",
        "can't set the size of disk0 - File too large",
    ),
    (
        "disk of 2**63-1 bytes",
        lambda a: DEV1_SIZE,
        8,
        2**63 - 1,
        "MissingClusterError",
        "detected missing cluster 1 for stream disk0",
        "SinkError",
        "can't set the size of disk0 - File too large",
    ),
    (
        "disk of 1 TiB",
        lambda a: DEV1_SIZE,
        8,
        1 << 40,
        "MissingClusterError",
        "detected missing cluster 1 for stream disk0",
        "MissingClusterError",
        "detected missing cluster 1 for stream disk0",
    ),
    (
        "header of 4 GiB",
        lambda a: 56,
        4,
        2**32 - 1,
        "HeaderSizeError",
        "wrong vma header size 4294967295 (more than the 524288-byte maximum)",
        "HeaderSizeError",
        "wrong vma header size 4294967295 (more than the 524288-byte maximum)",
    ),
    (
        "extent of 65535 blocks",
        lambda a: extent_offsets(a)[0] + 6,
        2,
        0xFFFF,
        "TruncatedArchiveError",
        "short vma extent (4608 < 268431872)",
        "TruncatedArchiveError",
        "short vma extent (4608 < 268431872)",
    ),
    (
        "cluster 2**32-1",
        lambda a: extent_offsets(a)[0] + 44,
        4,
        2**32 - 1,
        "BlockBeyondEndError",
        "got wrong block address - cluster 4294967295 is past the end of stream disk0 (1 clusters)",
        "BlockBeyondEndError",
        "got wrong block address - cluster 4294967295 is past the end of stream disk0 (1 clusters)",
    ),
]


@pytest.mark.parametrize(
    ("offset_of", "width", "value", "verify_error", "verify_message", "error", "message"),
    [case[1:] for case in HOSTILE],
    ids=[case[0] for case in HOSTILE],
)
def test_a_header_claiming_huge_sizes_allocates_nothing(
    tmp_path: Path,
    offset_of: Callable[[bytes], int],
    width: int,
    value: int,
    verify_error: str,
    verify_message: str,
    error: str,
    message: str,
) -> None:
    """Regression (2**64-1 disk size: ``extract`` raised OverflowError from
    ftruncate, not a VmaError): verify and extract fail fast with our error,
    and trace well under a megabyte beyond the input's own size."""
    archive = _with_field(offset_of, width, value)
    path = tmp_path / "hostile.vma"
    path.write_bytes(archive)
    results: dict[str, tuple[str, str, int]] = {}

    async def attempt(name: str, action: Callable[[], object]) -> None:
        tracemalloc.reset_peak()
        with pytest.raises(VmaError) as caught:
            await action()  # type: ignore[misc]
        results[name] = (
            type(caught.value).__name__,
            str(caught.value),
            tracemalloc.get_traced_memory()[1],
        )

    async def run() -> None:
        await attempt("verify", lambda: read_verify(path))
        await attempt("extract", lambda: read_extract(path, tmp_path))

    tracemalloc.start()
    try:
        anyio.run(run)
    finally:
        tracemalloc.stop()
    assert results["verify"][:2] == (verify_error, verify_message)
    assert results["extract"][:2] == (error, message)
    assert max(peak for _, _, peak in results.values()) < 8 << 20
    assert sorted(os.listdir(tmp_path)) == ["hostile.vma"]


def test_second_opinion_ignores_named_slots_of_size_zero() -> None:
    # Regression (benchmarks/fuzz_reader.py --seed 11, input 271): a mutant
    # named a size-0 slot like a live disk, and dissect's empty read of it
    # replaced the disk's bytes in the comparison: a false "Mismatch".
    archive_uuid = uuid_mod.uuid4()
    header = encode_header(archive_uuid, 0, [], {1: ("d0", CLUSTER), 2: ("d0", 0)})
    extent = encode_extent_header(archive_uuid, [make_blockinfo(1, 0, 0x0001)])
    block = bytes(range(256)) * 16
    archive = header + extent + block
    assert dissect_devices(archive) == {"d0": block + bytes(CLUSTER - len(block))}
