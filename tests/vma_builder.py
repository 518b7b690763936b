"""A tiny, deliberately plain VMA encoder written from FORMAT.md for the tests.

It does not import vma_async: it is a second, independent implementation, so
a shared misreading of the format cannot make the reader's tests pass.  It
packs extents the way the reference writer does (58 clusters per extent,
devices interleaved cluster by cluster, zero 4 KiB blocks elided) and offers
hooks to build broken archives.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

BLOCK = 4096
CLUSTER = 65536
EXTENT_HEADER = 512
PER_EXTENT = 58
UUID = bytes(range(16))
ZERO_BLOCK = bytes(BLOCK)


@dataclass
class Device:
    name: str
    data: bytes
    """The image bytes; ``size`` defaults to its length."""
    size: int | None = None

    @property
    def real_size(self) -> int:
        return len(self.data) if self.size is None else self.size


@dataclass
class Entry:
    """One blockinfo slot and its stored blocks."""

    dev_id: int
    cluster: int
    mask: int
    blocks: list[bytes] = field(default_factory=list)


def _blob_table(blobs: Sequence[bytes]) -> tuple[bytes, list[int], int]:
    """Blob table with the reference's 512-byte growth; returns table, offsets, used."""
    table = bytearray()
    used = 1
    offsets = []
    for blob in blobs:
        need = used + len(blob) + 2
        while len(table) < need:
            table += bytes(512)
        table[used : used + 2] = struct.pack("<H", len(blob))
        table[used + 2 : used + 2 + len(blob)] = blob
        offsets.append(used)
        used = need
    if not table:
        table = bytearray(512)
    return bytes(table), offsets, used


def header(
    devices: dict[int, tuple[str, int]],
    configs: Iterable[tuple[str, bytes]] = (),
    uuid: bytes = UUID,
    ctime: int = 1_700_000_000,
) -> bytes:
    configs = list(configs)
    blobs: list[bytes] = []
    for name, data in configs:
        blobs += [name.encode() + b"\0", data]
    dev_order = sorted(devices)
    blobs += [devices[d][0].encode() + b"\0" for d in dev_order]
    table, offsets, used = _blob_table(blobs)
    fixed = bytearray(12288)
    header_size = 12288 + len(table)
    struct.pack_into(
        ">4sI16sq16sIII", fixed, 0, b"VMA\0", 1, uuid, ctime, bytes(16), 12288, used, header_size
    )
    for i in range(len(configs)):
        struct.pack_into(">I", fixed, 2044 + 4 * i, offsets[2 * i])
        struct.pack_into(">I", fixed, 3068 + 4 * i, offsets[2 * i + 1])
    for k, dev_id in enumerate(dev_order):
        name_ptr = offsets[2 * len(configs) + k]
        struct.pack_into(">IIQ", fixed, 4096 + 32 * dev_id, name_ptr, 0, devices[dev_id][1])
    whole = bytearray(fixed + table)
    whole[32:48] = hashlib.md5(whole).digest()
    return bytes(whole)


def extent(entries: Sequence[Entry], uuid: bytes = UUID, block_count: int | None = None) -> bytes:
    words = [(e.mask << 48) | (e.dev_id << 32) | e.cluster for e in entries]
    words += [0] * (59 - len(words))
    data = b"".join(b for e in entries for b in e.blocks)
    if block_count is None:
        block_count = len(data) // BLOCK
    head = bytearray(
        struct.pack(">4sHH16s16s59Q", b"VMAE", 0, block_count, uuid, bytes(16), *words)
    )
    head[24:40] = hashlib.md5(head).digest()
    return bytes(head) + data


def cluster_entry(dev_id: int, cluster: int, image: bytes, size: int) -> Entry:
    """The entry a reference writer makes for one cluster of ``image``."""
    mask = 0
    blocks = []
    for j in range(16):
        start = cluster * CLUSTER + j * BLOCK
        if start >= size:
            continue
        block = image[start : start + BLOCK].ljust(BLOCK, b"\0")
        if block != ZERO_BLOCK:
            mask |= 1 << j
            blocks.append(block)
    return Entry(dev_id, cluster, mask, blocks)


def entries_for(devices: dict[int, Device]) -> list[Entry]:
    """Every cluster of every device, interleaved like concurrent backup jobs."""
    per_device = {
        dev_id: [
            cluster_entry(dev_id, c, dev.data, dev.real_size)
            for c in range((dev.real_size + CLUSTER - 1) // CLUSTER)
        ]
        for dev_id, dev in devices.items()
    }
    out: list[Entry] = []
    index = 0
    while any(index < len(v) for v in per_device.values()):
        for entries in per_device.values():
            if index < len(entries):
                out.append(entries[index])
        index += 1
    return out


def pack(entries: Sequence[Entry], per_extent: int = PER_EXTENT) -> list[bytes]:
    return [extent(entries[i : i + per_extent]) for i in range(0, len(entries), per_extent)]


def archive(
    devices: Sequence[Device] | dict[int, Device],
    configs: Iterable[tuple[str, bytes]] = (),
    *,
    per_extent: int = PER_EXTENT,
    trailing_empty_extent: bool = True,
) -> bytes:
    """A complete archive as the reference writer would lay it out."""
    by_id = devices if isinstance(devices, dict) else {i + 1: d for i, d in enumerate(devices)}
    head = header({d: (dev.name, dev.real_size) for d, dev in by_id.items()}, configs)
    extents = pack(entries_for(by_id), per_extent)
    if trailing_empty_extent or not extents:
        extents.append(extent([]))
    return head + b"".join(extents)


def extent_offsets(data: bytes) -> list[int]:
    """Byte offsets of every extent header of a well-formed archive."""
    (header_size,) = struct.unpack_from(">I", data, 56)
    offsets = []
    pos = header_size
    while pos < len(data):
        offsets.append(pos)
        (block_count,) = struct.unpack_from(">H", data, pos + 6)
        pos += EXTENT_HEADER + block_count * BLOCK
    return offsets


def resign_extent(data: bytearray, offset: int) -> None:
    """Recompute the MD5 of the extent header at ``offset`` after editing it."""
    head = bytearray(data[offset : offset + EXTENT_HEADER])
    head[24:40] = bytes(16)
    data[offset + 24 : offset + 40] = hashlib.md5(head).digest()


def set_blockinfo(
    data: bytearray, offset: int, slot: int, dev_id: int, cluster: int, mask: int
) -> None:
    struct.pack_into(">Q", data, offset + 40 + 8 * slot, (mask << 48) | (dev_id << 32) | cluster)
    resign_extent(data, offset)


def get_blockinfo(data: bytes, offset: int, slot: int) -> tuple[int, int, int]:
    (word,) = struct.unpack_from(">Q", data, offset + 40 + 8 * slot)
    return (word >> 32) & 0xFF, word & 0xFFFFFFFF, word >> 48
