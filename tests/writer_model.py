"""An independent, plain model of the reference writer (``vma-writer.c``) for the tests.

It imports nothing from vma_async: it follows the C code call for call (blob
table growth, configs before device names, flush before the 59th cluster,
``buffer_is_zero`` on whole 4 KiB blocks, tail zeroing), so that comparing its
bytes with VmaWriter's bytes checks the writer against the reference's rules
rather than against itself.  Slow and simple on purpose.
"""

from __future__ import annotations

import hashlib
import struct

BLOCK = 4096
CLUSTER = 65536
HEADER_FIXED = 12288


class ReferenceWriterModel:
    def __init__(self, uuid: bytes, ctime: int) -> None:
        self.uuid = uuid
        self.ctime = ctime
        self.table = bytearray()
        self.table_pos = 1
        self.config_names: list[int] = []
        self.config_data: list[int] = []
        self.streams: dict[int, tuple[str, int]] = {}
        self.vmstate = 0
        self.out = bytearray()
        self.header_written = False
        self.blockinfo: list[int] = []
        self.data = bytearray()

    def _blob(self, blob: bytes) -> int:
        if len(self.table) < self.table_pos + len(blob) + 2:
            self.table += bytes((len(blob) + 2 + 511) // 512 * 512)
        pos = self.table_pos
        self.table[pos : pos + 2] = bytes([len(blob) & 255, len(blob) >> 8])
        self.table[pos + 2 : pos + 2 + len(blob)] = blob
        self.table_pos += len(blob) + 2
        return pos

    def add_config(self, name: str, data: bytes) -> None:
        base = name.rstrip("/").split("/")[-1]
        self.config_names.append(self._blob(base.encode() + b"\0"))
        self.config_data.append(self._blob(data))

    def register_stream(self, name: str, size: int) -> int:
        dev_id = len(self.streams) + 1
        self.streams[dev_id] = (name, size)
        if name == "vmstate":
            self.vmstate = dev_id
        return dev_id

    def _write_header(self) -> None:
        head = bytearray(HEADER_FIXED)
        for i, (n, d) in enumerate(zip(self.config_names, self.config_data, strict=True)):
            struct.pack_into(">I", head, 2044 + 4 * i, n)
            struct.pack_into(">I", head, 3068 + 4 * i, d)
        for dev_id, (name, size) in sorted(self.streams.items()):
            ptr = self._blob(name.encode() + b"\0")
            struct.pack_into(">IIQ", head, 4096 + 32 * dev_id, ptr, 0, size)
        header_size = HEADER_FIXED + len(self.table)
        struct.pack_into(">4sI16sq", head, 0, b"VMA\0", 1, self.uuid, self.ctime)
        struct.pack_into(">III", head, 48, HEADER_FIXED, self.table_pos, header_size)
        whole = head + self.table
        whole[32:48] = hashlib.md5(whole).digest()
        self.out += whole

    def flush(self) -> None:
        if not self.header_written:
            self.header_written = True
            self._write_header()
        words = self.blockinfo + [0] * (59 - len(self.blockinfo))
        ext = bytearray(struct.pack(">4sHH16s16s59Q", b"VMAE", 0, len(self.data) // BLOCK,
                                    self.uuid, bytes(16), *words))  # fmt: skip
        ext[24:40] = hashlib.md5(ext).digest()
        self.out += ext + self.data
        self.blockinfo = []
        self.data = bytearray()

    def write(self, dev_id: int, cluster: int, buf: bytes | None) -> None:
        while len(self.blockinfo) >= 58:
            self.flush()
        size = self.streams[dev_id][1]
        mask = 0
        if buf is not None:
            buf = buf + bytes(CLUSTER - len(buf))
            for i in range(16):
                offset = cluster * CLUSTER + i * BLOCK
                block = buf[i * BLOCK : (i + 1) * BLOCK]
                if offset < size and block != bytes(BLOCK):
                    mask |= 1 << i
                    if offset + BLOCK > size:
                        keep = size - offset
                        block = block[:keep] + bytes(BLOCK - keep)
                    self.data += block
        self.blockinfo.append((mask << 48) | (dev_id << 32) | cluster)

    def close_stream(self, dev_id: int, remaining: int) -> None:
        if remaining == 0:
            self.flush()
