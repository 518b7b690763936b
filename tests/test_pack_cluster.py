"""pack_cluster: the writer's zero elision, checked block by block against a
plain model (which blocks are stored, in which order, which mask)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vma_async._format import BLOCK_SIZE, CLUSTER_SIZE, FULL_MASK, pack_cluster

# Block kinds: all zero, zero but for the first byte, zero but for the last
# byte, zero but for a middle byte, random.
KINDS = ("zero", "first", "last", "middle", "random")


def make_block(kind: str, rng: random.Random) -> bytes:
    block = bytearray(BLOCK_SIZE)
    if kind == "first":
        block[0] = 1
    elif kind == "last":
        block[-1] = 0x80
    elif kind == "middle":
        block[rng.randrange(1, BLOCK_SIZE - 1)] = 7
    elif kind == "random":
        block[:] = rng.randbytes(BLOCK_SIZE)
        block[0] = block[0] or 1
    return bytes(block)


def model(cluster: bytes, blocks: int) -> tuple[int, bytes]:
    mask, stored = 0, b""
    for index in range(blocks):
        block = cluster[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE]
        if block != bytes(BLOCK_SIZE):
            mask |= 1 << index
            stored += block
    return mask, stored


@settings(max_examples=150, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=16, max_size=16),
    blocks=st.integers(1, 16),
    lead=st.integers(0, 3),
    pos=st.integers(0, 2 * BLOCK_SIZE),
    as_bytes=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_cluster_matches_the_block_model(
    kinds: list[str], blocks: int, lead: int, pos: int, as_bytes: bool, seed: int
) -> None:
    rng = random.Random(seed)
    cluster = b"".join(make_block(kind, rng) for kind in kinds)
    # The cluster sits at an offset inside a larger buffer, with junk around it.
    junk = rng.randbytes(lead * BLOCK_SIZE)
    data: bytes | bytearray = junk + cluster + rng.randbytes(BLOCK_SIZE)
    if not as_bytes:
        data = bytearray(data)
    dest = bytearray(b"\xaa" * (pos + CLUSTER_SIZE + BLOCK_SIZE))

    mask = pack_cluster(memoryview(dest), pos, data, len(junk), blocks)

    want_mask, want_stored = model(cluster, blocks)
    assert mask == want_mask
    end = pos + mask.bit_count() * BLOCK_SIZE
    assert bytes(dest[pos:end]) == want_stored
    assert bytes(dest[:pos]) == b"\xaa" * pos  # nothing written before pos
    assert bytes(dest[end:]) == b"\xaa" * (len(dest) - end)  # nor after the stored blocks


@pytest.mark.parametrize(
    ("cluster", "want"),
    [
        (bytes(CLUSTER_SIZE), 0),
        (b"\x01" * CLUSTER_SIZE, FULL_MASK),
        (bytes(CLUSTER_SIZE - 1) + b"\x01", 1 << 15),
        (b"\x01" + bytes(CLUSTER_SIZE - 1), 1),
    ],
    ids=["zero", "full", "last-byte", "first-byte"],
)
def test_pack_cluster_common_cases(cluster: bytes, want: int) -> None:
    dest = bytearray(CLUSTER_SIZE)
    assert pack_cluster(memoryview(dest), 0, cluster) == want
    _, stored = model(cluster, 16)
    assert bytes(dest[: len(stored)]) == stored
