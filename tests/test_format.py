"""The sans-I/O format core: layout golden values, round trips, every header check."""

from __future__ import annotations

import hashlib
import io
import struct
import uuid

import pytest
from dissect.archive.vma import VMA
from hypothesis import given
from hypothesis import strategies as st

from vma_async import _format as fmt
from vma_async._errors import (
    BadMagicError,
    BlobTableError,
    BlobTooLargeError,
    ExtentChecksumError,
    ExtentMagicError,
    ExtentUuidError,
    HeaderChecksumError,
    HeaderError,
    HeaderSizeError,
    InvalidConfigPointerError,
    InvalidNameError,
    UnsupportedVersionError,
    VmaError,
)

UUID = uuid.UUID("0123456789abcdef0123456789abcdef")


def reseal(header: bytearray) -> bytes:
    """Recompute a header's MD5 after a test edits it, so only the edit is wrong."""
    header[32:48] = bytes(16)
    header[32:48] = hashlib.md5(header).digest()
    return bytes(header)


def reseal_extent(extent: bytearray) -> bytes:
    extent[24:40] = bytes(16)
    extent[24:40] = hashlib.md5(extent[:512]).digest()
    return bytes(extent)


def sample_header() -> bytes:
    return fmt.encode_header(
        UUID,
        1_700_000_000,
        [("qemu-server.conf", b"memory: 512\n"), ("qemu-server.fw", b"[OPTIONS]\n")],
        {1: ("drive-scsi0", 10 * 65536), 2: ("vmstate", 123)},
    )


class TestGoldenLayout:
    def test_units(self) -> None:
        assert fmt.HEADER_FIXED_SIZE == 12288
        assert fmt.EXTENT_HEADER_SIZE == 512
        assert fmt.MAX_EXTENT_SIZE == 3_867_136
        assert fmt.MAX_HEADER_SIZE == 524_288
        assert fmt.CLUSTER_SIZE == 16 * fmt.BLOCK_SIZE == 65536

    def test_header_field_offsets(self) -> None:
        header = sample_header()
        assert header[0:4] == b"VMA\x00"
        assert struct.unpack_from(">I", header, 4)[0] == 1
        assert header[8:24] == UUID.bytes
        assert struct.unpack_from(">q", header, 24)[0] == 1_700_000_000
        assert struct.unpack_from(">I", header, 48)[0] == 12288
        header_size = struct.unpack_from(">I", header, 56)[0]
        assert header_size == len(header) == 12288 + 512
        # Config pointers at 2044 and 3068; the first blob sits at offset 1.
        assert struct.unpack_from(">I", header, 2044)[0] == 1
        name_len = len(b"qemu-server.conf\x00")
        assert struct.unpack_from(">I", header, 3068)[0] == 1 + 2 + name_len
        # dev_info[1] at 4096 + 32: name pointer, reserved, size.
        ptr, reserved, size = struct.unpack_from(">IIQ", header, 4096 + 32)
        assert (reserved, size) == (0, 10 * 65536)
        assert header[12288 + ptr : 12288 + ptr + 2] == (12).to_bytes(2, "little")
        assert header[12288 + ptr + 2 : 12288 + ptr + 14] == b"drive-scsi0\x00"

    def test_header_md5_is_over_whole_header_with_field_zeroed(self) -> None:
        header = bytearray(sample_header())
        stored = bytes(header[32:48])
        header[32:48] = bytes(16)
        assert hashlib.md5(header).digest() == stored

    def test_blob_buffer_size_counts_unused_byte_zero_and_is_not_padded(self) -> None:
        header = fmt.encode_header(UUID, 0, [("a", b"xyz")], {})
        used = 1 + (2 + 2) + (2 + 3)
        assert struct.unpack_from(">I", header, 52)[0] == used
        assert len(header) == 12288 + 512

    def test_extent_header_layout(self) -> None:
        words = [fmt.make_blockinfo(3, 7, 0x8001), fmt.make_blockinfo(1, 0xFFFFFFFF, 0)]
        raw = fmt.encode_extent_header(UUID, words)
        assert len(raw) == 512
        assert raw[0:4] == b"VMAE"
        assert raw[4:6] == b"\x00\x00"
        assert struct.unpack_from(">H", raw, 6)[0] == 2
        assert raw[8:24] == UUID.bytes
        assert struct.unpack_from(">Q", raw, 40)[0] == (0x8001 << 48) | (3 << 32) | 7
        assert struct.unpack_from(">Q", raw, 48)[0] == (1 << 32) | 0xFFFFFFFF
        assert raw[56:] == bytes(512 - 56)
        check = bytearray(raw)
        check[24:40] = bytes(16)
        assert hashlib.md5(check).digest() == raw[24:40]


class TestBlobTable:
    def test_grows_in_whole_512_byte_steps(self) -> None:
        table = fmt.BlobTable()
        assert table.add(b"x" * 100) == 1
        assert table.allocated == 512
        assert table.add(b"y" * 500) == 1 + 102
        # 103 + 502 = 605 > 512: grows by ceil(502 / 512) * 512.
        assert table.allocated == 1024
        assert table.used == 605

    def test_blob_that_the_reference_would_overrun_still_fits(self) -> None:
        # len + 2 == 512 with the byte-0 offset: one 512 step is one byte short.
        table = fmt.BlobTable()
        table.add(b"z" * 510)
        assert table.used == 513
        assert table.allocated == 1024

    def test_blob_limit(self) -> None:
        table = fmt.BlobTable()
        table.add(b"a" * 65535)
        with pytest.raises(BlobTooLargeError, match="65536 bytes exceeds the 65535-byte"):
            table.add(b"a" * 65536)

    def test_parse_skips_blob_running_past_the_end(self) -> None:
        table = b"\x00" + (3).to_bytes(2, "little") + b"abc" + (9).to_bytes(2, "little") + b"de"
        assert fmt.parse_blob_table(table) == {1: b"abc"}

    def test_header_over_512_kib_is_refused(self) -> None:
        configs = [(f"c{i}", b"x" * 65000) for i in range(8)]
        with pytest.raises(BlobTooLargeError, match="exceeds the 524288-byte maximum"):
            fmt.encode_header(UUID, 0, configs, {})


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("qemu-server.conf", "qemu-server.conf"),
        ("/etc/pve/qemu-server/100.conf", "100.conf"),
        ("dir/", "dir"),
        ("/", "/"),
        ("", "."),
    ],
)
def test_config_basename_follows_glib(given: str, stored: str) -> None:
    assert fmt.config_basename(given) == stored


class TestHeaderRoundTrip:
    def test_decode(self) -> None:
        header = fmt.decode_header(sample_header())
        assert header.uuid == UUID
        assert header.ctime == 1_700_000_000
        assert header.configs == (
            ("qemu-server.conf", b"memory: 512\n"),
            ("qemu-server.fw", b"[OPTIONS]\n"),
        )
        assert header.devices == (
            fmt.DeviceInfo(1, "drive-scsi0", 10 * 65536),
            fmt.DeviceInfo(2, "vmstate", 123),
        )
        assert header.vmstate == fmt.DeviceInfo(2, "vmstate", 123)
        disk = header.device(1)
        assert disk is not None
        assert disk.cluster_count == 10
        assert header.config("qemu-server.fw") == b"[OPTIONS]\n"
        assert header.config("absent") is None

    def test_negative_ctime_and_slot_255(self) -> None:
        raw = fmt.encode_header(UUID, -5, [], {255: ("last", 1)})
        header = fmt.decode_header(raw)
        assert header.ctime == -5
        assert header.devices == (fmt.DeviceInfo(255, "last", 1),)

    def test_dissect_reads_what_we_encode(self) -> None:
        header = sample_header()
        vma = VMA(io.BytesIO(header))
        assert vma.uuid == UUID
        assert vma.configs() == {
            "qemu-server.conf": b"memory: 512\n",
            "qemu-server.fw": b"[OPTIONS]\n",
        }
        assert [(d.id, d.name, d.size) for d in vma.devices()] == [
            (1, "drive-scsi0", 655360),
            (2, "vmstate", 123),
        ]

    @given(
        configs=st.lists(
            st.tuples(
                st.text(
                    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                    min_size=1,
                    max_size=40,
                ),
                st.binary(max_size=3000),
            ),
            max_size=10,
        ),
        sizes=st.lists(st.integers(min_value=1, max_value=2**63 - 1), max_size=20),
        ctime=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    )
    def test_round_trip_property(
        self, configs: list[tuple[str, bytes]], sizes: list[int], ctime: int
    ) -> None:
        devices = {i + 1: (f"disk{i}", size) for i, size in enumerate(sizes)}
        raw = fmt.encode_header(UUID, ctime, configs, devices)
        assert len(raw) % 512 == 0
        header = fmt.decode_header(raw)
        assert header.ctime == ctime
        assert list(header.configs) == [(n, bytes(d)) for n, d in configs]
        assert [(d.dev_id, d.name, d.size) for d in header.devices] == [
            (i, n, s) for i, (n, s) in devices.items()
        ]


class TestHeaderChecks:
    """Each check of the reference reader, with its message."""

    def test_wrong_magic(self) -> None:
        raw = bytearray(sample_header())
        raw[3] = 1
        with pytest.raises(BadMagicError, match="^not a vma file - wrong magic number$"):
            fmt.decode_header(raw)

    @pytest.mark.parametrize("size", [0, 100, 12288])
    def test_header_size_too_small(self, size: int) -> None:
        raw = bytearray(sample_header())
        struct.pack_into(">I", raw, 56, size)
        with pytest.raises(HeaderSizeError, match=f"^wrong vma header size {size}$"):
            fmt.decode_header(raw)

    def test_header_size_too_large_is_refused_before_reading(self) -> None:
        raw = bytearray(sample_header()[:60])
        struct.pack_into(">I", raw, 56, 0xFFFFFFFF)
        with pytest.raises(HeaderSizeError, match="wrong vma header size 4294967295"):
            fmt.header_size_from_prefix(raw)

    def test_header_shorter_than_its_size(self) -> None:
        with pytest.raises(HeaderSizeError, match="header needs 12800 bytes but only 12700"):
            fmt.decode_header(sample_header()[:12700])

    def test_wrong_checksum(self) -> None:
        raw = bytearray(sample_header())
        raw[5000] ^= 0xFF
        with pytest.raises(HeaderChecksumError, match="^wrong vma header checksum$"):
            fmt.decode_header(raw)

    def test_wrong_version(self) -> None:
        raw = bytearray(sample_header())
        struct.pack_into(">I", raw, 4, 2)
        with pytest.raises(UnsupportedVersionError, match="^wrong vma version 2$"):
            fmt.decode_header(reseal(raw))

    @pytest.mark.parametrize("offset", [0, 12287])
    def test_blob_offset_inside_fixed_header(self, offset: int) -> None:
        raw = bytearray(sample_header())
        struct.pack_into(">I", raw, 48, offset)
        with pytest.raises(BlobTableError, match=f"^wrong vma blob buffer offset {offset}$"):
            fmt.decode_header(reseal(raw))

    def test_blob_table_past_header_end(self) -> None:
        raw = bytearray(sample_header())
        struct.pack_into(">I", raw, 52, 513)
        with pytest.raises(BlobTableError, match="^wrong vma blob buffer size 12288/513$"):
            fmt.decode_header(reseal(raw))

    def test_config_pointer_to_nothing(self) -> None:
        raw = bytearray(sample_header())
        struct.pack_into(">I", raw, 3068, 400)
        with pytest.raises(InvalidConfigPointerError, match="invalid data pointers"):
            fmt.decode_header(reseal(raw))

    def test_config_name_not_nul_terminated(self) -> None:
        # Point the name at the data blob, which has no trailing NUL.
        raw = bytearray(sample_header())
        data_ptr = struct.unpack_from(">I", raw, 3068)[0]
        struct.pack_into(">I", raw, 2044, data_ptr)
        with pytest.raises(InvalidConfigPointerError, match="invalid data pointers"):
            fmt.decode_header(reseal(raw))

    def test_config_with_one_null_pointer_is_skipped(self) -> None:
        raw = bytearray(sample_header())
        struct.pack_into(">I", raw, 3068, 0)
        header = fmt.decode_header(reseal(raw))
        assert [name for name, _ in header.configs] == ["qemu-server.fw"]

    def test_device_without_name_or_size_is_not_live(self) -> None:
        raw = bytearray(sample_header())
        struct.pack_into(">I", raw, 4096 + 32, 0)  # dev 1: no name
        struct.pack_into(">Q", raw, 4096 + 64 + 8, 0)  # dev 2: size 0
        assert fmt.decode_header(reseal(raw)).devices == ()

    def test_every_header_error_is_a_vma_error(self) -> None:
        assert issubclass(HeaderError, VmaError)


class TestExtentHeader:
    def test_round_trip(self) -> None:
        words = [fmt.make_blockinfo(1, n, 0xFFFF) for n in range(58)]
        words.append(fmt.make_blockinfo(2, 9, 0x0003))
        decoded = fmt.decode_extent_header(fmt.encode_extent_header(UUID, words), UUID)
        assert decoded.block_count == 58 * 16 + 2
        assert decoded.size == 512 + (58 * 16 + 2) * 4096
        assert decoded.entries[-1] == fmt.ClusterEntry(2, 9, 3)
        assert decoded.entries[-1].stored_blocks == 2
        assert len(decoded.entries) == 59

    def test_unused_slots_are_skipped(self) -> None:
        words = [0, fmt.make_blockinfo(4, 1, 0), 0]
        decoded = fmt.decode_extent_header(fmt.encode_extent_header(UUID, words), UUID)
        assert decoded.entries == (fmt.ClusterEntry(4, 1, 0),)
        assert decoded.block_count == 0

    def test_lean_form_keeps_used_words_in_slot_order(self) -> None:
        words = [fmt.make_blockinfo(2, 5, 0x8001), 0, fmt.make_blockinfo(1, 0xFFFFFFFF, 0)]
        raw = fmt.encode_extent_header(UUID, words)
        assert fmt.decode_extent_blockinfo(raw, UUID.bytes) == (2, (words[0], words[2]))
        assert fmt.extent_header_from_blockinfo(2, (words[0], words[2])) == (
            fmt.decode_extent_header(raw, UUID)
        )

    def test_wrong_checksum(self) -> None:
        raw = bytearray(fmt.encode_extent_header(UUID, [fmt.make_blockinfo(1, 0, 1)]))
        raw[45] ^= 1
        with pytest.raises(ExtentChecksumError, match="^wrong vma extent header checksum$"):
            fmt.decode_extent_header(raw, UUID)

    def test_wrong_uuid(self) -> None:
        raw = fmt.encode_extent_header(uuid.uuid4(), [])
        with pytest.raises(ExtentUuidError, match="^wrong vma extent uuid$"):
            fmt.decode_extent_header(raw, UUID)

    @pytest.mark.parametrize(("offset", "value"), [(0, b"XMAE"), (4, b"\x00\x01")])
    def test_wrong_magic_or_reserved(self, offset: int, value: bytes) -> None:
        raw = bytearray(fmt.encode_extent_header(UUID, []))
        raw[offset : offset + len(value)] = value
        with pytest.raises(ExtentMagicError, match="^wrong vma extent header magic$"):
            fmt.decode_extent_header(reseal_extent(raw), UUID)

    def test_too_many_clusters_to_encode(self) -> None:
        with pytest.raises(ValueError, match="at most 59"):
            fmt.encode_extent_header(UUID, [0] * 60)


def test_empty_archive_header_stays_readable() -> None:
    # The reference writes header_size 12288 here and then cannot read it back.
    raw = fmt.encode_header(UUID, 0, [], {})
    assert len(raw) == 12288 + 512
    header = fmt.decode_header(raw)
    assert header.configs == ()
    assert header.devices == ()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a\x00b", "contains a NUL character"),
        ("\ud800", "cannot be stored as UTF-8: surrogates not allowed"),
    ],
)
def test_names_that_cannot_be_stored(name: str, message: str) -> None:
    with pytest.raises(InvalidNameError, match=message):
        fmt.encode_header(UUID, 0, [(name, b"")], {})
    with pytest.raises(InvalidNameError, match=message):
        fmt.encode_header(UUID, 0, [], {1: (name, 1)})


def test_raw_byte_names_round_trip() -> None:
    name = b"disk-\xff".decode("utf-8", "surrogateescape")
    header = fmt.decode_header(fmt.encode_header(UUID, 0, [], {1: (name, 1)}))
    assert header.devices[0].name == name
