"""The VMA format itself: constants, and bytes <-> structures for its two headers.

This module is the sans-I/O bottom of the library (h11's discipline): no awaits,
no files, no clocks.  Everything above it (the extent assembler, the extent
parser, the async writer and reader) goes through these functions, so every
layout rule and every header check lives here exactly once.

Hostile input is a design input.  The decoders take a bounded buffer and never
allocate in proportion to a number read from the input: ``header_size`` is
capped at the largest header the reference writer can produce (512 KiB) before
anything is read for it, and blob table walks are O(table size).

The reference implementation (``vma.h``, ``vma-writer.c``, ``vma-reader.c``) is
the spec of record; where a check here differs from it, the comment says why.
"""

from __future__ import annotations

import struct
import uuid as uuid_mod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ._errors import (
    BadMagicError,
    BlobTableError,
    BlobTooLargeError,
    ExtentChecksumError,
    ExtentMagicError,
    ExtentUuidError,
    HeaderChecksumError,
    HeaderSizeError,
    InvalidConfigPointerError,
    InvalidNameError,
    UnsupportedVersionError,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Final


# --- units ---------------------------------------------------------------------

BLOCK_SIZE = 4096
"""Unit of zero elision: a block that is all zero is not stored."""
CLUSTER_SIZE = 65536
"""Unit of addressing: blockinfo entries name clusters."""
BLOCKS_PER_CLUSTER = CLUSTER_SIZE // BLOCK_SIZE
FULL_MASK = (1 << BLOCKS_PER_CLUSTER) - 1

EXTENT_HEADER_SIZE = 512
MAX_CLUSTERS_PER_EXTENT = 59
"""Blockinfo slots in an extent header; readers accept all of them."""
WRITER_CLUSTERS_PER_EXTENT = 58
"""The reference writer flushes an extent when it holds this many clusters."""
MAX_EXTENT_SIZE = EXTENT_HEADER_SIZE + MAX_CLUSTERS_PER_EXTENT * CLUSTER_SIZE

HEADER_FIXED_SIZE = 12288
"""The fixed part of the archive header; the blob table follows it."""
MAX_HEADER_SIZE = 8 * CLUSTER_SIZE
"""The reference writer refuses to write a larger header, so no archive has one."""
HEADER_ALIGNMENT = 512
MAX_CONFIGS = 256
MAX_DEVICES = 254
"""dev_ids 1..254 are handed out; 0 means "unused" and 255 is kept back."""
DEVICE_SLOTS = 256
MAX_BLOB_SIZE = 65535
MAX_CLUSTER_NUM = (1 << 32) - 1

VMA_MAGIC = b"VMA\x00"
EXTENT_MAGIC = b"VMAE"
VMSTATE_NAME = "vmstate"

# --- header layout ---------------------------------------------------------------

_HEADER_PREFIX = struct.Struct(">4sI16sq16sIII")  # magic .. header_size: 60 bytes
_CONFIG_NAMES_OFFSET = 2044
_CONFIG_DATA_OFFSET = 3068
_DEV_INFO_OFFSET = 4096
_DEV_INFO = struct.Struct(">IIQQQ")  # devname_ptr, reserved, size, reserved, reserved
_CONFIG_PTRS = struct.Struct(f">{MAX_CONFIGS}I")
_MD5_SLICE = slice(32, 48)

_EXTENT_HEADER = struct.Struct(f">4sHH16s16s{MAX_CLUSTERS_PER_EXTENT}Q")
_EXTENT_MD5_SLICE = slice(24, 40)
_ZERO_MD5 = bytes(16)

assert _HEADER_PREFIX.size == 60
assert _DEV_INFO_OFFSET + DEVICE_SLOTS * _DEV_INFO.size == HEADER_FIXED_SIZE
assert _EXTENT_HEADER.size == EXTENT_HEADER_SIZE
assert MAX_EXTENT_SIZE == 3_867_136


if TYPE_CHECKING:
    from hashlib import md5 as _md5_new
else:
    try:  # CPython's own MD5: importing it skips hashlib's OpenSSL set-up (~2 ms of start-up)
        from _md5 import md5 as _md5_new
    except ImportError:  # pragma: no cover - a Python built without it
        from hashlib import md5 as _md5_new


def _md5(data: bytes | bytearray | memoryview) -> bytes:
    """The format's header checksums: 512-byte extent headers and the archive
    header (at most 512 KiB), so the hash's speed never matters, its import does."""
    return _md5_new(data, usedforsecurity=False).digest()


# --- structures -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device slot of the header: a disk, or the VM's saved RAM (``vmstate``)."""

    dev_id: int
    name: str
    size: int

    @property
    def is_vmstate(self) -> bool:
        """vmstate clusters must arrive in order and its size is not a bound."""
        return self.name == VMSTATE_NAME

    @property
    def cluster_count(self) -> int:
        return (self.size + CLUSTER_SIZE - 1) // CLUSTER_SIZE


@dataclass(frozen=True, slots=True)
class ArchiveHeader:
    """A decoded archive header.

    ``configs`` keeps the header's order and any duplicate names, as the
    reference does (its ``config`` command prints the first match).
    """

    uuid: uuid_mod.UUID
    ctime: int
    configs: tuple[tuple[str, bytes], ...]
    devices: tuple[DeviceInfo, ...]
    header_size: int

    @property
    def vmstate(self) -> DeviceInfo | None:
        """The device the reference treats as vmstate: the last one so named."""
        found = None
        for dev in self.devices:
            if dev.is_vmstate:
                found = dev
        return found

    def device(self, dev_id: int) -> DeviceInfo | None:
        for dev in self.devices:
            if dev.dev_id == dev_id:
                return dev
        return None

    def config(self, name: str) -> bytes | None:
        for cname, data in self.configs:
            if cname == name:
                return data
        return None


@dataclass(frozen=True, slots=True)
class ClusterEntry:
    """One used blockinfo slot: which cluster of which device, and which of its
    sixteen 4 KiB blocks are stored (bit i set) or all zero (clear)."""

    dev_id: int
    cluster_num: int
    mask: int

    @property
    def stored_blocks(self) -> int:
        return self.mask.bit_count()


@dataclass(frozen=True, slots=True)
class ExtentHeader:
    """A decoded extent header; ``entries`` skips unused (dev_id 0) slots."""

    block_count: int
    entries: tuple[ClusterEntry, ...]

    @property
    def data_size(self) -> int:
        """Bytes of block data that follow the 512-byte header."""
        return self.block_count * BLOCK_SIZE

    @property
    def size(self) -> int:
        return EXTENT_HEADER_SIZE + self.data_size


# --- names -------------------------------------------------------------------------


def config_basename(name: str) -> str:
    """The name the reference writer stores for a config file path.

    It uses glib's ``g_path_get_basename``, which differs from
    :func:`os.path.basename` for trailing slashes and empty names.
    """
    stripped = name.rstrip("/")
    if not stripped:
        return "/" if name else "."
    return stripped.rsplit("/", 1)[-1]


def encode_name(name: str) -> bytes:
    """A name as the header stores it: UTF-8, NUL-terminated.

    Names decoded from raw bytes with ``surrogateescape`` (as :mod:`os` does
    for file names) get their bytes back.  A NUL inside would cut the name
    short for every reader, so it is refused rather than silently truncated.
    """
    if "\x00" in name:
        raise InvalidNameError(f"name {name!r} contains a NUL character")
    try:
        return name.encode("utf-8", "surrogateescape") + b"\x00"
    except UnicodeEncodeError as exc:
        raise InvalidNameError(f"name {name!r} cannot be stored as UTF-8: {exc.reason}") from None


def _decode_name(data: bytes) -> str:
    return data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


# --- blob table --------------------------------------------------------------------


class BlobTable:
    """The header's blob table, laid out exactly as the reference writer does.

    Offset 0 means "none", so the first blob starts at 1.  The table grows in
    whole 512-byte steps, ``ceil((len + 2) / 512) * 512`` at a time when a blob
    does not fit, which keeps ``header_size`` a multiple of 512.  (The reference
    grows once and assumes the blob then fits; when ``len + 2`` is a multiple
    of 512 and the table is full to the byte, it would not, and the reference
    overruns its buffer.  We keep growing by 512 until it fits: the same bytes
    in every case where the reference is correct.)
    """

    __slots__ = ("_data", "_used")

    def __init__(self) -> None:
        self._data = bytearray()
        self._used = 1

    @property
    def used(self) -> int:
        """``blob_buffer_size``: bytes in use, counting the unused byte 0."""
        return self._used

    @property
    def allocated(self) -> int:
        return len(self._data)

    def add(self, blob: bytes) -> int:
        """Append ``blob``; return its offset (never 0)."""
        size = len(blob)
        if size > MAX_BLOB_SIZE:
            raise BlobTooLargeError(
                f"blob of {size} bytes exceeds the {MAX_BLOB_SIZE}-byte blob limit"
            )
        need = self._used + size + 2
        if len(self._data) < need:
            grow = (size + 2 + 511) // 512 * 512
            new_size = len(self._data) + grow
            while new_size < need:
                new_size += 512
            self._data.extend(bytes(new_size - len(self._data)))
        pos = self._used
        self._data[pos : pos + 2] = size.to_bytes(2, "little")
        self._data[pos + 2 : pos + 2 + size] = blob
        self._used = need
        return pos

    def copy(self) -> BlobTable:
        other = BlobTable()
        other._data = bytearray(self._data)
        other._used = self._used
        return other

    def to_bytes(self) -> bytes:
        return bytes(self._data)


def parse_blob_table(table: bytes | memoryview) -> dict[int, bytes]:
    """Blobs by offset, walked as the reference reader walks them.

    ``table`` is the used part of the table (``blob_buffer_size`` bytes from
    ``blob_buffer_offset``).  A blob whose length runs past the end is skipped,
    not an error, exactly like the reference; the walk is O(len(table)).
    """
    blobs: dict[int, bytes] = {}
    end = len(table)
    pos = 1
    while pos + 2 <= end:
        size = table[pos] | (table[pos + 1] << 8)
        if pos + 2 + size <= end:
            blobs[pos] = bytes(table[pos + 2 : pos + 2 + size])
        pos += size + 2
    return blobs


def _blob_string(blobs: Mapping[int, bytes], ptr: int) -> str | None:
    blob = blobs.get(ptr)
    if not blob or blob[-1] != 0:
        return None
    return _decode_name(blob)


# --- archive header ------------------------------------------------------------------


def encode_header(
    uuid: uuid_mod.UUID | bytes,
    ctime: int,
    configs: Iterable[tuple[str, bytes]] = (),
    devices: Mapping[int, tuple[str, int]] | None = None,
    *,
    blob_table: BlobTable | None = None,
    config_pointers: Sequence[tuple[int, int]] | None = None,
) -> bytes:
    """Encode an archive header, byte for byte as the reference writer would.

    ``configs`` are ``(name, data)`` pairs stored as given (the writer applies
    :func:`config_basename` first, as the reference does); ``devices`` maps
    dev_id (1..254) to ``(name, size)``.  Configs go into the blob table first,
    then device names in dev_id order.

    A writer that has already laid out its configs passes ``blob_table`` and
    ``config_pointers`` instead of ``configs``; the table is copied, not changed.

    Raises :class:`BlobTooLargeError` for a blob over 65535 bytes or a header
    over 512 KiB (the reference's header buffer).
    """
    uuid_bytes = uuid.bytes if isinstance(uuid, uuid_mod.UUID) else bytes(uuid)
    if len(uuid_bytes) != 16:
        raise ValueError("uuid must be 16 bytes")
    if blob_table is None:
        table = BlobTable()
        pointers = []
        for name, data in configs:
            name_ptr = table.add(encode_name(name))
            pointers.append((name_ptr, table.add(bytes(data))))
    else:
        table = blob_table.copy()
        pointers = list(config_pointers or ())
    if len(pointers) > MAX_CONFIGS:
        raise ValueError(f"at most {MAX_CONFIGS} configs")

    buf = bytearray(HEADER_FIXED_SIZE)
    for index, (name_ptr, data_ptr) in enumerate(pointers):
        struct.pack_into(">I", buf, _CONFIG_NAMES_OFFSET + 4 * index, name_ptr)
        struct.pack_into(">I", buf, _CONFIG_DATA_OFFSET + 4 * index, data_ptr)
    for dev_id, (name, size) in sorted((devices or {}).items()):
        if not 1 <= dev_id < DEVICE_SLOTS:
            raise ValueError(f"dev_id {dev_id} out of range 1..255")
        name_ptr = table.add(encode_name(name))
        _DEV_INFO.pack_into(
            buf, _DEV_INFO_OFFSET + _DEV_INFO.size * dev_id, name_ptr, 0, size, 0, 0
        )

    # With no configs and no devices the reference writer leaves the table
    # empty, so header_size == 12288, which its own reader rejects ("wrong vma
    # header size").  One zeroed 512-byte step keeps such an archive readable.
    table_bytes = table.to_bytes() or bytes(HEADER_ALIGNMENT)
    header_size = HEADER_FIXED_SIZE + len(table_bytes)
    if header_size > MAX_HEADER_SIZE:
        raise BlobTooLargeError(
            f"header of {header_size} bytes exceeds the {MAX_HEADER_SIZE}-byte maximum"
        )
    _HEADER_PREFIX.pack_into(
        buf, 0, VMA_MAGIC, 1, uuid_bytes, ctime, _ZERO_MD5,
        HEADER_FIXED_SIZE, table.used, header_size,
    )  # fmt: skip
    buf += table_bytes
    buf[_MD5_SLICE] = _md5(buf)
    return bytes(buf)


def header_size_from_prefix(prefix: bytes | bytearray | memoryview) -> int:
    """Check the magic and return ``header_size`` from the first bytes of an archive.

    A reader calls this on the fixed 12288-byte part before reading the rest,
    so that it never reads (or allocates) more than :data:`MAX_HEADER_SIZE`.
    """
    if len(prefix) < _HEADER_PREFIX.size:
        raise HeaderSizeError(f"header too short ({len(prefix)} bytes)")
    if bytes(prefix[0:4]) != VMA_MAGIC:
        raise BadMagicError("not a vma file - wrong magic number")
    header_size: int = struct.unpack_from(">I", prefix, 56)[0]
    if header_size <= HEADER_FIXED_SIZE:
        raise HeaderSizeError(f"wrong vma header size {header_size}")
    if header_size > MAX_HEADER_SIZE:
        raise HeaderSizeError(
            f"wrong vma header size {header_size} (more than the {MAX_HEADER_SIZE}-byte maximum)"
        )
    return header_size


def decode_header(data: bytes | bytearray | memoryview) -> ArchiveHeader:
    """Decode and check a whole archive header (``header_size`` bytes).

    Checks, in the reference reader's order: magic, header size, MD5,
    version, blob table bounds, config pointers.  Each failure raises its own
    :class:`HeaderError` subclass with the reference's message.
    """
    header_size = header_size_from_prefix(data)
    if len(data) < header_size:
        raise HeaderSizeError(f"header needs {header_size} bytes but only {len(data)} were given")
    raw = bytearray(data[:header_size])
    stored_md5 = bytes(raw[_MD5_SLICE])
    raw[_MD5_SLICE] = _ZERO_MD5
    if _md5(raw) != stored_md5:
        raise HeaderChecksumError("wrong vma header checksum")
    raw[_MD5_SLICE] = stored_md5

    _, version, uuid_bytes, ctime, _, blob_offset, blob_size, _ = _HEADER_PREFIX.unpack_from(raw)
    if version != 1:
        raise UnsupportedVersionError(f"wrong vma version {version}")
    if blob_offset + 1 <= HEADER_FIXED_SIZE:
        raise BlobTableError(f"wrong vma blob buffer offset {blob_offset}")
    if blob_offset + blob_size > header_size:
        raise BlobTableError(f"wrong vma blob buffer size {blob_offset}/{blob_size}")
    blobs = parse_blob_table(memoryview(raw)[blob_offset : blob_offset + blob_size])

    devices = []
    for dev_id in range(1, DEVICE_SLOTS):
        name_ptr, _, size, _, _ = _DEV_INFO.unpack_from(
            raw, _DEV_INFO_OFFSET + _DEV_INFO.size * dev_id
        )
        name = _blob_string(blobs, name_ptr)
        if size and name is not None:
            devices.append(DeviceInfo(dev_id, name, size))

    configs = []
    name_ptrs = _CONFIG_PTRS.unpack_from(raw, _CONFIG_NAMES_OFFSET)
    data_ptrs = _CONFIG_PTRS.unpack_from(raw, _CONFIG_DATA_OFFSET)
    for index, (name_ptr, data_ptr) in enumerate(zip(name_ptrs, data_ptrs, strict=True)):
        if not (name_ptr and data_ptr):
            continue
        name = _blob_string(blobs, name_ptr)
        blob = blobs.get(data_ptr)
        if name is None or blob is None:
            raise InvalidConfigPointerError(
                f"vma contains invalid data pointers (config slot {index})"
            )
        configs.append((name, blob))

    return ArchiveHeader(
        uuid=uuid_mod.UUID(bytes=bytes(uuid_bytes)),
        ctime=ctime,
        configs=tuple(configs),
        devices=tuple(devices),
        header_size=header_size,
    )


# --- extent header ----------------------------------------------------------------------


def make_blockinfo(dev_id: int, cluster_num: int, mask: int) -> int:
    """The 64-bit blockinfo word: mask in bits 48-63, dev_id 32-39, cluster 0-31."""
    return (mask << 48) | (dev_id << 32) | cluster_num


_LOW_BITS: Final = (1 << 48) - 1
"""A blockinfo word without its mask: reserved, dev_id and cluster number."""


def split_blockinfo(words: Iterable[int]) -> list[tuple[int, int, int]]:
    """``(dev_id, cluster_num, mask)`` of each blockinfo word.

    With :func:`make_blockinfo` and :func:`cluster_sequence`, the one place
    that knows the word's layout (mask 63..48, reserved 47..40, dev_id
    39..32, cluster 31..0)."""
    return [((word >> 32) & 0xFF, word & 0xFFFFFFFF, word >> 48) for word in words]


def cluster_sequence(words: Sequence[int]) -> tuple[int, int, list[int]] | None:
    """``(dev_id, first cluster, masks)`` when ``words`` name consecutive
    clusters of one device (the usual extent: then the words without their
    masks are consecutive integers, which C-speed comparisons can tell),
    else None."""
    count = len(words)
    if not count:
        return None
    low = words[0] & _LOW_BITS
    if low >> 40 or (low & 0xFFFFFFFF) + count > 1 << 32:  # reserved bits, or a wrap
        return None
    if [word & _LOW_BITS for word in words] != list(range(low, low + count)):
        return None
    return low >> 32, low & 0xFFFFFFFF, [word >> 48 for word in words]


# --- zero elision: the writer's per-cluster hot path ---------------------------------

ZERO_BLOCK = bytes(BLOCK_SIZE)
"""Compared with ``data.startswith(ZERO_BLOCK, offset)``: a memcmp, no copy."""
ZERO_CLUSTER = bytes(CLUSTER_SIZE)
_BLOCK_OFFSETS = tuple(range(0, CLUSTER_SIZE, BLOCK_SIZE))


def pack_cluster(
    dest: memoryview, pos: int, data: bytes | bytearray, offset: int = 0, blocks: int = 16
) -> int:
    """Copy the stored blocks of one cluster into an extent; return its mask.

    The cluster is ``data[offset : offset + 65536]``; of its first ``blocks``
    4 KiB blocks (fewer for the last cluster of a disk), each that is not all
    zero is stored: bit i of the mask is set and the block is copied to
    ``dest`` from ``pos`` on, in order, one memcpy per run of stored blocks.
    The caller advances ``pos`` by ``mask.bit_count() * BLOCK_SIZE``.

    Why it looks like this (measured, 64 KiB clusters): ``data`` is the
    caller's whole read buffer and ``offset`` says where the cluster is, so
    nothing is sliced or copied before the test (a ``bytes(memoryview)`` per
    cluster was a 64 KiB copy); the tests are ``startswith`` memcmps on the
    ``bytes``/``bytearray`` (comparing ``memoryview`` slices goes item by
    item, about 100x slower).  An all-zero cluster is one memcmp; a cluster
    whose every block has a non-zero first or last byte (most data) needs two
    16-byte strided slices and one memcpy; only the rest are tested block by
    block.
    """
    if blocks == BLOCKS_PER_CLUSTER:
        if data.startswith(ZERO_CLUSTER, offset):
            return 0
        heads = int.from_bytes(data[offset : offset + CLUSTER_SIZE : BLOCK_SIZE])
        tails = int.from_bytes(data[offset + BLOCK_SIZE - 1 : offset + CLUSTER_SIZE : BLOCK_SIZE])
        if b"\0" not in (heads | tails).to_bytes(BLOCKS_PER_CLUSTER):
            dest[pos : pos + CLUSTER_SIZE] = memoryview(data)[offset : offset + CLUSTER_SIZE]
            return FULL_MASK
    is_zero = data.startswith
    stored = [not is_zero(ZERO_BLOCK, offset + start) for start in _BLOCK_OFFSETS[:blocks]]
    source = memoryview(data)
    if all(stored):
        length = blocks * BLOCK_SIZE
        dest[pos : pos + length] = source[offset : offset + length]
        return (1 << blocks) - 1
    mask = 0
    block = 0
    while block < blocks:
        if not stored[block]:
            block += 1
            continue
        run_end = block + 1
        while run_end < blocks and stored[run_end]:
            run_end += 1
        length = (run_end - block) * BLOCK_SIZE
        start = offset + block * BLOCK_SIZE
        dest[pos : pos + length] = source[start : start + length]
        pos += length
        mask |= ((1 << (run_end - block)) - 1) << block
        block = run_end
    return mask


def encode_extent_header(
    uuid: uuid_mod.UUID | bytes,
    blockinfo: Sequence[int],
    block_count: int | None = None,
) -> bytes:
    """Encode a 512-byte extent header with its MD5.

    ``blockinfo`` holds up to 59 words (see :func:`make_blockinfo`); the rest
    of the slots are zero.  ``block_count`` defaults to the number of stored
    blocks the masks name; pass it only to build a deliberately broken extent.
    """
    uuid_bytes = uuid.bytes if isinstance(uuid, uuid_mod.UUID) else bytes(uuid)
    if len(blockinfo) > MAX_CLUSTERS_PER_EXTENT:
        raise ValueError(f"at most {MAX_CLUSTERS_PER_EXTENT} clusters per extent")
    if block_count is None:
        block_count = sum((word >> 48).bit_count() for word in blockinfo)
    words = list(blockinfo) + [0] * (MAX_CLUSTERS_PER_EXTENT - len(blockinfo))
    buf = bytearray(
        _EXTENT_HEADER.pack(EXTENT_MAGIC, 0, block_count, uuid_bytes, _ZERO_MD5, *words)
    )
    buf[_EXTENT_MD5_SLICE] = _md5(buf)
    return bytes(buf)


def decode_extent_blockinfo(
    data: bytes | bytearray | memoryview, uuid: uuid_mod.UUID | bytes
) -> tuple[int, tuple[int, ...]]:
    """Check one 512-byte extent header; return its ``block_count`` and its
    used blockinfo words (dev_id != 0), in slot order.

    The lean form the extent parser walks: one Python object per extent
    instead of one per cluster (building :class:`ClusterEntry` objects was
    most of the cost of reading a sparse archive).  Checks in the reference
    reader's order: MD5, uuid, magic and reserved field.  Whether the masks
    add up to ``block_count``, and whether each entry makes sense for its
    device, is the extent parser's business: it needs the header's device
    table.
    """
    if len(data) < EXTENT_HEADER_SIZE:
        raise ValueError("an extent header is 512 bytes")
    raw = bytearray(data[:EXTENT_HEADER_SIZE])
    stored_md5 = bytes(raw[_EXTENT_MD5_SLICE])
    raw[_EXTENT_MD5_SLICE] = _ZERO_MD5
    if _md5(raw) != stored_md5:
        raise ExtentChecksumError("wrong vma extent header checksum")
    magic, reserved, block_count, extent_uuid, _, *words = _EXTENT_HEADER.unpack(raw)
    uuid_bytes = uuid.bytes if isinstance(uuid, uuid_mod.UUID) else bytes(uuid)
    if extent_uuid != uuid_bytes:
        raise ExtentUuidError("wrong vma extent uuid")
    if magic != EXTENT_MAGIC or reserved != 0:
        raise ExtentMagicError("wrong vma extent header magic")
    return block_count, tuple([word for word in words if word & _DEV_ID_BITS])


_DEV_ID_BITS = 0xFF << 32


def extent_header_from_blockinfo(block_count: int, blockinfo: Iterable[int]) -> ExtentHeader:
    """The structured form of what :func:`decode_extent_blockinfo` returns."""
    return ExtentHeader(
        block_count,
        tuple(
            ClusterEntry(dev_id, cluster_num, mask)
            for dev_id, cluster_num, mask in split_blockinfo(blockinfo)
            if dev_id
        ),
    )


def decode_extent_header(
    data: bytes | bytearray | memoryview, uuid: uuid_mod.UUID | bytes
) -> ExtentHeader:
    """Decode and check one 512-byte extent header (the checks are those of
    :func:`decode_extent_blockinfo`)."""
    return extent_header_from_blockinfo(*decode_extent_blockinfo(data, uuid))
