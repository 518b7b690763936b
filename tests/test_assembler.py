"""The extent assembler, sans-I/O: no event loop, bytes in, bytes out."""

from __future__ import annotations

import os
import random
import struct
import uuid as uuid_mod

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers_dissect import check_structure, read_with_dissect
from tests.writer_model import ReferenceWriterModel
from vma_async import (
    BLOCK_SIZE,
    CLUSTER_SIZE,
    BlobTooLargeError,
    ClusterRangeError,
    ClusterSizeError,
    DuplicateDeviceNameError,
    ExtentAssembler,
    HeaderWrittenError,
    IncompleteStreamError,
    InvalidStreamError,
    OpenStreamError,
    StreamClosedError,
    StreamStatus,
    TooManyConfigsError,
    TooManyDevicesError,
)
from vma_async._assembler import WRITER_EXTENT_SIZE
from vma_async._format import decode_extent_header, decode_header

UUID = uuid_mod.UUID("0123456789abcdef0123456789abcdef")
CTIME = 1_700_000_000
CLUSTER = CLUSTER_SIZE
BLOCK = BLOCK_SIZE


class Driver:
    """Drives an assembler the way the async writer does, into one bytearray."""

    def __init__(self) -> None:
        self.asm = ExtentAssembler(UUID)
        self.out = bytearray()
        self.buffer = bytearray()

    def _room(self) -> None:
        if self.asm.extent_full:
            self._seal()
        self._open()

    def _open(self) -> None:
        if not self.asm.header_written:
            self.out += self.asm.encode_header(CTIME)
        if not self.asm.extent_open:
            self.buffer = bytearray(WRITER_EXTENT_SIZE)
            self.asm.begin_extent(memoryview(self.buffer))

    def _seal(self) -> None:
        length = self.asm.seal_extent()
        self.out += self.buffer[:length]

    def write(self, dev_id: int, cluster: int, data: bytes | None) -> int:
        self.asm.check_write(dev_id, cluster)
        self._room()
        return self.asm.add_cluster(dev_id, cluster, data)

    def flush(self) -> None:
        self._open()
        self._seal()

    def close_stream(self, dev_id: int) -> int:
        remaining = self.asm.close_stream(dev_id)
        if remaining == 0:
            self.flush()
        return remaining


def both(
    configs: list[tuple[str, bytes]], streams: list[tuple[str, int]]
) -> tuple[Driver, ReferenceWriterModel]:
    driver, model = Driver(), ReferenceWriterModel(UUID.bytes, CTIME)
    for name, data in configs:
        driver.asm.add_config(name, data)
        model.add_config(name, data)
    for name, size in streams:
        assert driver.asm.register_stream(name, size) == model.register_stream(name, size)
    return driver, model


def write_both(
    driver: Driver, model: ReferenceWriterModel, dev_id: int, c: int, data: bytes | None
) -> int:
    model.write(dev_id, c, data)
    return driver.write(dev_id, c, data)


def close_both(driver: Driver, model: ReferenceWriterModel, dev_id: int) -> None:
    model.close_stream(dev_id, driver.close_stream(dev_id))


def cluster_of(pattern: str) -> bytes:
    """16 blocks from a pattern: '0' zero block, 'r' random block."""
    return b"".join(bytes(BLOCK) if p == "0" else os.urandom(BLOCK) for p in pattern)


# --- byte-identity with the independent model --------------------------------------


def test_header_is_byte_identical_to_the_reference_layout() -> None:
    configs = [("/etc/pve/qemu-server/100.conf", b"memory: 512\n"), ("qemu-server.fw", b"x" * 700)]
    driver, model = both(configs, [("drive-scsi0", 3 * CLUSTER), ("vmstate", 5000)])
    driver.flush()
    model.flush()
    header = decode_header(driver.out)
    assert bytes(driver.out[: header.header_size]) == bytes(model.out[: header.header_size])
    assert header.configs == (("100.conf", b"memory: 512\n"), ("qemu-server.fw", b"x" * 700))
    assert [(d.dev_id, d.name, d.size) for d in header.devices] == [
        (1, "drive-scsi0", 3 * CLUSTER),
        (2, "vmstate", 5000),
    ]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5 * CLUSTER + 9000), min_size=1, max_size=4),
    patterns=st.lists(st.sampled_from(["none", "zero", "rand", "mixed", "short"]), min_size=1),
    seed=st.integers(0, 2**32),
)
def test_random_archives_match_the_model_and_dissect(
    sizes: list[int], patterns: list[str], seed: int
) -> None:
    rng = random.Random(seed)
    driver, model = both([("a.conf", b"cfg")], [(f"disk{i}", s) for i, s in enumerate(sizes)])
    order = [
        (dev, c)
        for dev, size in enumerate(sizes, 1)
        for c in range((size + CLUSTER - 1) // CLUSTER)
    ]
    rng.shuffle(order)
    expected = {f"disk{i}": bytearray(s) for i, s in enumerate(sizes)}
    for n, (dev_id, c) in enumerate(order):
        kind = patterns[n % len(patterns)]
        data: bytes | None
        if kind == "none":
            data = None
        elif kind == "zero":
            data = bytes(CLUSTER)
        elif kind == "rand":
            data = rng.randbytes(CLUSTER)
        elif kind == "mixed":
            data = b"".join(
                bytes(BLOCK) if rng.random() < 0.5 else rng.randbytes(BLOCK) for _ in range(16)
            )
        else:
            data = rng.randbytes(rng.randrange(1, CLUSTER))
        write_both(driver, model, dev_id, c, data)
        if data is not None:
            image = expected[f"disk{dev_id - 1}"]
            end = min(len(image), c * CLUSTER + len(data))
            image[c * CLUSTER : end] = data[: end - c * CLUSTER]
    for dev_id in range(1, len(sizes) + 1):
        close_both(driver, model, dev_id)
    driver.asm.check_close()
    assert bytes(driver.out) == bytes(model.out)
    check_structure(bytes(driver.out))
    configs, devices = read_with_dissect(bytes(driver.out))
    assert configs == {"a.conf": b"cfg"}
    assert devices == {k: bytes(v) for k, v in expected.items()}


# --- zero elision and accounting ---------------------------------------------------


def test_zero_blocks_are_left_out_and_counted() -> None:
    driver, _ = both([], [("d", 2 * CLUSTER)])
    data = cluster_of("r0r00rrr000000r0")
    assert driver.write(1, 0, data) == CLUSTER
    assert driver.write(1, 1, None) == CLUSTER
    driver.close_stream(1)
    header = decode_header(driver.out)
    extent = decode_extent_header(driver.out[header.header_size :], UUID)
    mask = sum(1 << i for i, p in enumerate("r0r00rrr000000r0") if p == "r")
    assert [(e.dev_id, e.cluster_num, e.mask) for e in extent.entries] == [(1, 0, mask), (1, 1, 0)]
    assert extent.block_count == 6
    stored = bytes(driver.out[header.header_size + 512 :])
    assert stored == b"".join(data[i * BLOCK : (i + 1) * BLOCK] for i in range(16) if mask >> i & 1)
    assert driver.asm.status().streams == (
        StreamStatus(1, "d", 2 * CLUSTER, 2 * CLUSTER, 10 * BLOCK + CLUSTER, True),
    )


def test_last_cluster_blocks_past_the_end_left_out_and_tail_zeroed() -> None:
    size = CLUSTER + 2 * BLOCK + 100  # last cluster: 2 full blocks, 100 bytes of a third
    driver, _ = both([], [("d", size)])
    driver.write(1, 0, bytes(CLUSTER))
    garbage = os.urandom(CLUSTER)  # non-zero everywhere, past the end too
    assert driver.write(1, 1, garbage) == 2 * BLOCK + 100
    driver.close_stream(1)
    driver.asm.check_close()
    header = decode_header(driver.out)
    extent = decode_extent_header(driver.out[header.header_size :], UUID)
    assert extent.entries[1].mask == 0b111
    stored = bytes(driver.out[header.header_size + 512 :])
    assert stored == garbage[: 2 * BLOCK + 100] + bytes(BLOCK - 100)
    status = driver.asm.status().streams[0]
    assert (status.transferred, status.zero_bytes) == (size, CLUSTER + 13 * BLOCK)


def test_block_zero_inside_but_not_past_the_end_is_stored_like_the_reference() -> None:
    # buffer_is_zero looks at the whole 4 KiB block, bytes past the end included.
    driver, model = both([], [("d", 100)])
    data = bytes(100) + b"\xff" * (CLUSTER - 100)
    write_both(driver, model, 1, 0, data)
    close_both(driver, model, 1)
    assert bytes(driver.out) == bytes(model.out)
    header = decode_header(driver.out)
    assert decode_extent_header(driver.out[header.header_size :], UUID).entries[0].mask == 1
    assert bytes(driver.out[-BLOCK:]) == bytes(BLOCK)


def test_one_byte_device_and_short_data_is_zero_padded() -> None:
    driver, _ = both([], [("tiny", 1)])
    assert driver.write(1, 0, b"\x07") == 1
    driver.close_stream(1)
    driver.asm.check_close()
    assert read_with_dissect(bytes(driver.out))[1] == {"tiny": b"\x07"}


def test_memoryview_and_bytearray_data_are_accepted() -> None:
    driver, _ = both([], [("d", 2 * CLUSTER)])
    data = os.urandom(2 * CLUSTER)
    driver.write(1, 0, memoryview(data)[:CLUSTER])
    driver.write(1, 1, bytearray(data[CLUSTER:]))
    driver.close_stream(1)
    assert read_with_dissect(bytes(driver.out))[1] == {"d": data}


def test_extent_is_flushed_before_the_59th_cluster() -> None:
    driver, model = both([], [("d", 117 * CLUSTER)])
    for c in range(117):
        write_both(driver, model, 1, c, None)
    close_both(driver, model, 1)
    assert bytes(driver.out) == bytes(model.out)
    assert check_structure(bytes(driver.out))[1] == 3  # 58 + 58 + 1


def test_exactly_58_clusters_make_one_extent() -> None:
    driver, _ = both([], [("d", 58 * CLUSTER)])
    for c in range(58):
        driver.write(1, c, None)
    driver.close_stream(1)
    assert check_structure(bytes(driver.out))[1] == 1


def test_no_streams_gives_header_and_one_empty_extent() -> None:
    driver, model = both([("qemu-server.conf", b"")], [])
    driver.flush()
    model.flush()
    assert bytes(driver.out) == bytes(model.out)
    header = decode_header(driver.out)
    assert len(driver.out) == header.header_size + 512
    assert decode_extent_header(driver.out[header.header_size :], UUID).block_count == 0


def test_vmstate_is_sequential_unbounded_and_counts_whole_clusters() -> None:
    driver, _ = both([], [("vmstate", 1000)])
    assert driver.write(1, 0, os.urandom(CLUSTER)) == CLUSTER
    assert driver.write(1, 1, os.urandom(CLUSTER)) == CLUSTER  # past its size: no error
    driver.close_stream(1)
    driver.asm.check_close()  # transferred != size is fine for vmstate
    assert driver.asm.status().streams[0].transferred == 2 * CLUSTER


# --- every error, with the reference's words, and stickiness -------------------------


def sticky(asm: ExtentAssembler, exc_type: type[Exception], message: str) -> None:
    """The error is kept: any later call raises the very same one."""
    assert type(asm.error) is exc_type
    assert str(asm.error) == message
    with pytest.raises(exc_type, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        asm.check_write(1, 0)
    with pytest.raises(exc_type):
        asm.register_stream("later", 1)


@pytest.mark.parametrize(
    ("dev_id", "cluster", "exc_type", "message"),
    [
        (0, 0, InvalidStreamError, "vma_writer_write: no such stream 0"),
        (3, 0, InvalidStreamError, "vma_writer_write: no such stream 3"),
        (1, 2**32, ClusterRangeError, "vma_writer_write: cluster number out of range"),
        (1, -1, ClusterRangeError, "vma_writer_write: cluster number out of range"),
        (1, 2, ClusterRangeError, "vma_writer_write: cluster number too big"),
        (2, 1, ClusterRangeError, "vma_writer_write: non sequential vmstate write"),
    ],
)
def test_write_range_errors(
    dev_id: int, cluster: int, exc_type: type[Exception], message: str
) -> None:
    driver, _ = both([], [("d", 2 * CLUSTER), ("vmstate", 10)])
    with pytest.raises(exc_type, match=f"^{message}$"):
        driver.write(dev_id, cluster, None)
    sticky(driver.asm, exc_type, message)


def test_write_to_closed_stream() -> None:
    driver, _ = both([], [("a", CLUSTER), ("b", CLUSTER)])
    driver.write(1, 0, None)
    driver.close_stream(1)
    with pytest.raises(StreamClosedError, match="^vma_writer_write: stream already closed 1$"):
        driver.write(1, 0, None)
    sticky(driver.asm, StreamClosedError, "vma_writer_write: stream already closed 1")


def test_cluster_data_too_long() -> None:
    driver, _ = both([], [("a", 2 * CLUSTER)])
    with pytest.raises(
        ClusterSizeError,
        match=r"^vma_writer_write: 65537 bytes of data for one cluster \(at most 65536\)$",
    ):
        driver.write(1, 0, bytes(CLUSTER + 1))


def test_close_stream_errors() -> None:
    driver, _ = both([], [("a", CLUSTER), ("b", CLUSTER)])
    with pytest.raises(InvalidStreamError, match="^vma_writer_close_stream: no such stream 9$"):
        driver.close_stream(9)
    driver, _ = both([], [("a", CLUSTER), ("b", CLUSTER)])
    assert driver.close_stream(1) == 1
    with pytest.raises(
        StreamClosedError, match="^vma_writer_close_stream: stream already closed 1$"
    ):
        driver.close_stream(1)


def test_registration_after_the_header() -> None:
    driver, _ = both([], [("a", CLUSTER)])
    driver.write(1, 0, None)
    with pytest.raises(
        HeaderWrittenError, match="^vma_writer_register_stream: header already written$"
    ):
        driver.asm.register_stream("b", CLUSTER)
    driver, _ = both([], [("a", CLUSTER)])
    driver.flush()
    with pytest.raises(HeaderWrittenError, match="^vma_writer_add_config: header already written$"):
        driver.asm.add_config("c", b"")


@pytest.mark.parametrize("size", [0, -5])
def test_strange_size(size: int) -> None:
    asm = ExtentAssembler(UUID)
    with pytest.raises(
        InvalidStreamError, match=f"^vma_writer_register_stream: got strange size {size}$"
    ):
        asm.register_stream("d", size)


def test_too_many_drives() -> None:
    asm = ExtentAssembler(UUID)
    assert [asm.register_stream(f"d{i}", 1) for i in range(254)] == list(range(1, 255))
    with pytest.raises(TooManyDevicesError, match="^vma_writer_register_stream: too many drives$"):
        asm.register_stream("one-too-many", 1)


def test_the_same_device_name_twice_is_refused_by_the_writer() -> None:
    """Issue 11: an archive with two disks of one name cannot be restored
    (the second disk's file or map line would be the first's); the library
    path refuses it as ``vma create`` does, and the error is sticky."""
    asm = ExtentAssembler(UUID)
    asm.register_stream("drive-scsi0", CLUSTER)
    with pytest.raises(
        DuplicateDeviceNameError,
        match="^vma_writer_register_stream: device name 'drive-scsi0' given twice$",
    ):
        asm.register_stream("drive-scsi0", 2 * CLUSTER)
    with pytest.raises(DuplicateDeviceNameError):
        asm.register_stream("drive-scsi1", CLUSTER)


def test_too_many_configs() -> None:
    asm = ExtentAssembler(UUID)
    for i in range(256):
        asm.add_config(f"c{i}", b"")
    with pytest.raises(
        TooManyConfigsError, match=r"^vma_writer_add_config: too many configs \(max 256\)$"
    ):
        asm.add_config("c256", b"")


def test_blob_limits() -> None:
    asm = ExtentAssembler(UUID)
    asm.add_config("big", bytes(65535))  # the largest blob fits
    asm = ExtentAssembler(UUID)
    with pytest.raises(
        BlobTooLargeError, match="^blob of 65536 bytes exceeds the 65535-byte blob limit$"
    ):
        asm.add_config("big", bytes(65536))
    asm = ExtentAssembler(UUID)
    with pytest.raises(
        BlobTooLargeError, match="^device name of 65536 bytes exceeds the 65535-byte blob limit$"
    ):
        asm.register_stream("n" * 65535, 1)


def test_header_over_512_kib() -> None:
    asm = ExtentAssembler(UUID)
    for i in range(8):
        asm.add_config(f"c{i}", bytes(65000))
    with pytest.raises(BlobTooLargeError, match="-byte maximum$"):
        asm.encode_header(CTIME)


def test_close_checks() -> None:
    driver, _ = both([], [("a", CLUSTER), ("b", 2 * CLUSTER)])
    driver.write(1, 0, None)
    driver.close_stream(1)
    with pytest.raises(OpenStreamError, match="^vma_writer_close: detected open stream 'b'$"):
        driver.asm.check_close()
    assert driver.asm.status().closed
    driver, _ = both([], [("a", CLUSTER), ("b", 2 * CLUSTER)])
    driver.write(1, 0, None)
    driver.write(2, 1, None)
    driver.close_stream(1)
    driver.close_stream(2)
    with pytest.raises(
        IncompleteStreamError,
        match=r"^vma_writer_close: incomplete stream 'b' \(65536 != 131072\)$",
    ):
        driver.asm.check_close()


def test_config_basename_is_stored() -> None:
    asm = ExtentAssembler(UUID)
    asm.add_config("/etc/pve/qemu-server/100.conf", b"a")
    asm.add_config("dir/sub/", b"b")
    header = decode_header(asm.encode_header(CTIME))
    assert header.configs == (("100.conf", b"a"), ("sub", b"b"))
    assert struct.unpack_from(">q", asm.encode_header(CTIME), 24)[0] == CTIME
