"""Read an archive back two ways, for the writer's tests.

* :func:`read_with_dissect`: ``dissect.archive``'s VMA reader, an independent
  implementation, gives the configs and every device's bytes.
* :func:`check_structure`: walks the extents with our format codecs and checks
  what dissect does not: each extent's length matches its masks, the archive
  ends exactly after the last extent, and every cluster of every device
  appears exactly once (dissect quietly reads a missing cluster as short data).
"""

from __future__ import annotations

import io
from collections import Counter

from dissect.archive.vma import VMA

from vma_async._format import (
    CLUSTER_SIZE,
    EXTENT_HEADER_SIZE,
    ArchiveHeader,
    decode_extent_header,
    decode_header,
)


def read_with_dissect(archive: bytes) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(configs by name, device bytes by name) as dissect.archive reads them."""
    vma = VMA(io.BytesIO(archive))
    configs = dict(vma.configs())
    devices = {dev.name: dev.open().read() for dev in vma.devices()}
    return configs, devices


def check_structure(archive: bytes) -> tuple[ArchiveHeader, int]:
    """Check extent framing and cluster coverage; return the header and the
    number of extents."""
    header = decode_header(archive)
    pos = header.header_size
    seen: Counter[tuple[int, int]] = Counter()
    extents = 0
    while pos < len(archive):
        extent = decode_extent_header(archive[pos : pos + EXTENT_HEADER_SIZE], header.uuid)
        assert sum(e.stored_blocks for e in extent.entries) == extent.block_count
        assert len(extent.entries) <= 58
        seen.update((e.dev_id, e.cluster_num) for e in extent.entries)
        pos += extent.size
        extents += 1
    assert pos == len(archive), "archive does not end on an extent boundary"
    assert extents >= 1, "an archive ends with at least one extent"
    assert all(count == 1 for count in seen.values()), "a cluster was written twice"
    for dev in header.devices:
        if dev.is_vmstate:
            clusters = {c for d, c in seen if d == dev.dev_id}
            assert clusters == set(range(len(clusters))), "vmstate clusters not 0..n-1"
        else:
            expected = {(dev.dev_id, c) for c in range(dev.cluster_count)}
            assert {k for k in seen if k[0] == dev.dev_id} == expected, f"clusters of {dev.name}"
    return header, extents


def chunks(image: bytes) -> list[bytes]:
    """An image cut into the clusters a producer would write."""
    return [image[i : i + CLUSTER_SIZE] for i in range(0, len(image), CLUSTER_SIZE)]
