"""Coverage-guided fuzz target (atheris) for the sans-I/O header and extent decoders.

The only acceptable outcomes for any input are a decoded structure or a
``VmaError`` subclass: anything else (IndexError, struct.error, a hang, a huge
allocation) is a bug.  The target also checks that what decodes re-encodes to a
header that decodes to the same thing, so the codecs cannot drift apart.

Run:   .venv/bin/python fuzz/fuzz_decoders.py -runs=100000 -seed=1 [corpus_dir]
The test suite runs it for a bounded number of inputs with a fixed seed.
"""

from __future__ import annotations

import hashlib
import uuid

import atheris
from _runner import fuzz

with atheris.instrument_imports():
    from vma_async import _format as fmt
    from vma_async._errors import VmaError

_UUID = uuid.UUID("0123456789abcdef0123456789abcdef")


def _seed_header() -> bytes:
    return fmt.encode_header(
        _UUID, 1_700_000_000, [("qemu-server.conf", b"memory: 512\n")], {1: ("disk0", 65537)}
    )


def check_header(data: bytes) -> None:
    """Decode ``data`` as an archive header; re-encode what decodes."""
    try:
        header = fmt.decode_header(data)
    except VmaError:
        return
    again = fmt.decode_header(
        fmt.encode_header(
            header.uuid,
            header.ctime,
            header.configs,
            {dev.dev_id: (dev.name, dev.size) for dev in header.devices},
        )
    )
    assert again.configs == header.configs
    assert again.devices == header.devices


def check_extent(data: bytes) -> None:
    """Decode ``data`` (padded to 512 bytes) as an extent header."""
    raw = data[: fmt.EXTENT_HEADER_SIZE].ljust(fmt.EXTENT_HEADER_SIZE, b"\x00")
    try:
        extent = fmt.decode_extent_header(raw, _UUID)
    except VmaError:
        return
    assert len(extent.entries) <= fmt.MAX_CLUSTERS_PER_EXTENT
    assert all(entry.dev_id for entry in extent.entries)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    # The first byte picks the decoder; the seed corpus is built from valid
    # headers so that mutations reach past the checksums: with a selector of
    # 2 the MD5 fields are recomputed after mutation.
    selector, body = data[0] % 4, data[1:]
    if selector in (0, 2):
        if selector == 2 and len(body) >= 60:
            body = _reseal_header(body)
        check_header(body)
    else:
        if selector == 3 and len(body) >= fmt.EXTENT_HEADER_SIZE:
            body = _reseal_extent(body)
        check_extent(body)


def _reseal_header(body: bytes) -> bytes:
    raw = bytearray(body)
    raw[32:48] = bytes(16)
    size = int.from_bytes(raw[56:60], "big")
    raw[32:48] = hashlib.md5(raw[:size]).digest()
    return bytes(raw)


def _reseal_extent(body: bytes) -> bytes:
    raw = bytearray(body[: fmt.EXTENT_HEADER_SIZE])
    raw[8:24] = _UUID.bytes
    raw[24:40] = bytes(16)
    raw[24:40] = hashlib.md5(raw).digest()
    return bytes(raw)


def seeds() -> list[bytes]:
    """Valid inputs for each selector, for a corpus directory or a plain loop."""
    header = _seed_header()
    extent = fmt.encode_extent_header(_UUID, [fmt.make_blockinfo(1, 0, 0xFFFF)])
    return [b"\x00" + header, b"\x02" + header, b"\x01" + extent, b"\x03" + extent]


def main() -> None:
    fuzz(test_one_input, seeds(), "vma-fuzz-corpus-")


if __name__ == "__main__":
    main()
