"""One extent walker for streaming (verify, restore) and random access
(open_device): the same archive gets the same verdict and the same message
from both (issue 8 defect 1), under asyncio, uvloop and trio."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import vma_builder as vb

from vma_async import (
    BlockBeyondEndError,
    DuplicateClusterError,
    ExtentBlockCountError,
    FormatError,
    MissingClusterError,
    RawFileSink,
    SequentialSink,
    UnknownDeviceError,
    VmaReader,
    VmstateOrderError,
)
from vma_async._file_reader import verify_file
from vma_async._format import split_blockinfo
from vma_async._walker import ExtentWalker

pytestmark = pytest.mark.anyio

BLOCK = vb.BLOCK
CLUSTER = vb.CLUSTER


def blocks(count: int, seed: int = 1) -> list[bytes]:
    return [bytes([seed + i]) * BLOCK for i in range(count)]


def archive(size: int, *entries: vb.Entry, vmstate: bool = False) -> bytes:
    name = "vmstate" if vmstate else "disk0"
    return vb.header({1: (name, size)}) + vb.extent(list(entries))


# A 2-cluster + 8 KiB disk: its last cluster holds blocks 0 and 1, and block 2
# starts exactly at the device's end.
SIZE = 2 * CLUSTER + 2 * BLOCK
FIRST_TWO = [vb.Entry(1, 0, 0xFFFF, blocks(16)), vb.Entry(1, 1, 0)]

CASES = {
    "stored block at the device end": (
        archive(SIZE, *FIRST_TWO, vb.Entry(1, 2, 0b111, blocks(3))),
        BlockBeyondEndError,
        "got wrong block address - write beyond end",
    ),
    "full cluster across the device end": (
        archive(SIZE, *FIRST_TWO, vb.Entry(1, 2, 0xFFFF, blocks(16))),
        BlockBeyondEndError,
        "got wrong block address - write beyond end",
    ),
    "cluster past the end": (
        archive(SIZE, *FIRST_TWO, vb.Entry(1, 3, 0)),
        BlockBeyondEndError,
        "got wrong block address - cluster 3 is past the end of stream disk0 (3 clusters)",
    ),
    "unknown dev id": (
        archive(SIZE, *FIRST_TWO, vb.Entry(7, 2, 0)),
        UnknownDeviceError,
        "got wrong dev id 7 (not defined in the header)",
    ),
    "duplicate cluster": (
        archive(SIZE, *FIRST_TWO, vb.Entry(1, 1, 0)),
        DuplicateClusterError,
        "found duplicated cluster 1 for stream disk0",
    ),
    "missing cluster": (
        archive(SIZE, *FIRST_TWO),
        MissingClusterError,
        "detected missing cluster 2 for stream disk0",
    ),
    "too many blocks": (
        archive(SIZE, *FIRST_TWO, vb.Entry(1, 2, 0b11, blocks(1))),
        ExtentBlockCountError,
        "short vma extent - too many blocks",
    ),
    "missing blocks": (
        vb.header({1: ("disk0", SIZE)})
        + vb.extent([*FIRST_TWO, vb.Entry(1, 2, 0b1, blocks(1))], block_count=19)
        + bytes(2 * BLOCK),
        ExtentBlockCountError,
        "vma extent error - missing blocks",
    ),
    "vmstate out of order": (
        archive(3 * CLUSTER, vb.Entry(1, 0, 0), vb.Entry(1, 2, 0), vmstate=True),
        VmstateOrderError,
        "found out of order vmstate data",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_verify_restore_and_open_device_agree(tmp_path: Path, case: str) -> None:
    data, error, message = CASES[case]
    path = tmp_path / "a.vma"
    path.write_bytes(data)
    async with VmaReader.open(path) as reader:
        with pytest.raises(error) as info:
            await reader.verify()
        assert str(info.value) == message
    out = tmp_path / "out"
    async with VmaReader.open(path) as reader:
        sink = SequentialSink(out) if case.startswith("vmstate") else RawFileSink(out, SIZE)
        with pytest.raises(error) as info:
            await reader.restore({1: sink})
        assert str(info.value) == message
    assert not out.exists()
    async with VmaReader.open(path) as reader:
        with pytest.raises(error) as info:
            await reader.open_device(1)
        assert str(info.value) == message


async def test_the_good_twin_is_accepted_by_both(tmp_path: Path) -> None:
    """The same disk with its last cluster stored correctly (blocks 0 and 1)."""
    path = tmp_path / "a.vma"
    path.write_bytes(archive(SIZE, *FIRST_TWO, vb.Entry(1, 2, 0b11, blocks(2, 50))))
    image = b"".join(blocks(16)) + bytes(CLUSTER) + b"".join(blocks(2, 50))
    async with VmaReader.open(path) as reader:
        await reader.verify()
    async with VmaReader.open(path) as reader:
        view = await reader.open_device("disk0")
        assert await view.read(0, SIZE) == image
        assert view.block_status(0, SIZE) == [(CLUSTER, 0), (CLUSTER, 1), (2 * BLOCK, 0)]


def test_split_blockinfo_is_the_word_layout() -> None:
    word = 0xBEEF << 48 | 0xAB << 40 | 0x07 << 32 | 0x12345678
    assert split_blockinfo([word]) == [(0x07, 0x12345678, 0xBEEF)]


def test_walker_runs_are_clipped_and_merged() -> None:
    from vma_async import DeviceInfo

    walker = ExtentWalker([DeviceInfo(1, "disk0", SIZE)], None)
    words = [0xFFFF << 48 | 1 << 32 | 0, 0 << 48 | 1 << 32 | 1, 0b11 << 48 | 1 << 32 | 2]
    runs, zeroes = walker.walk(18 * BLOCK, words)
    assert runs == [[1, 0, 0, CLUSTER], [1, 2 * CLUSTER, CLUSTER, 2 * BLOCK]]
    assert zeroes == [[1, CLUSTER, CLUSTER]]  # the tail past the end is not a zero run
    walker.check_complete()
    with pytest.raises(FormatError, match="found duplicated cluster 1 for stream disk0"):
        walker.walk(0, [1 << 32 | 1])


def _word(dev_id: int, cluster: int, mask: int) -> int:
    return mask << 48 | dev_id << 32 | cluster


def test_fast_path_agrees_with_the_entry_walk() -> None:
    """Consecutive-cluster extents take a bulk path; on random extents (page
    boundaries, duplicates across extents, device ends, vmstate) it must give
    the same runs, counters and errors as the entry-by-entry walk."""
    from vma_async import DeviceInfo

    rng = random.Random(12)
    devices = [
        DeviceInfo(1, "disk0", 5000 * CLUSTER - 3 * BLOCK),
        DeviceInfo(2, "vmstate", 40 * CLUSTER),
    ]
    for _ in range(300):
        fast, slow = ExtentWalker(devices, 2), ExtentWalker(devices, 2)
        for _ in range(rng.randrange(1, 6)):
            dev_id = rng.choice([1, 1, 1, 2])
            first = rng.choice([0, 2040, 4990, rng.randrange(5000)]) if dev_id == 1 else 0
            count = rng.randrange(1, 60)
            choices = [0, 0xFFFF, 0b11] if rng.random() < 0.2 else [0, 0xFFFF]
            masks = [rng.choice(choices) for _ in range(count)]
            words = [_word(dev_id, first + i, m) for i, m in enumerate(masks)]
            data_size = sum(m.bit_count() for m in masks) * BLOCK + (
                BLOCK if rng.random() < 0.1 else 0
            )
            outcomes = []
            for walk in (fast.walk, slow._walk_entries):
                try:
                    outcomes.append(walk(data_size, words))
                except FormatError as exc:
                    outcomes.append((type(exc), str(exc)))
            assert outcomes[0] == outcomes[1], (dev_id, first, masks, data_size)
            assert fast.stats() == slow.stats()
            assert fast.clusters_walked == slow.clusters_walked
            if isinstance(outcomes[0], tuple) and isinstance(outcomes[0][0], type):
                break  # a failed extent leaves the walkers where the reader stops
        assert _missing(fast) == _missing(slow)


def _missing(walker: ExtentWalker) -> str:
    try:
        walker.check_complete()
    except MissingClusterError as exc:
        return str(exc)
    return ""


# --- the loop-free verify of the vma command (issue 10) ------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_blocking_verify_agrees_with_the_reader(tmp_path: Path, case: str) -> None:
    """``vma verify`` of a plain file runs before any event loop exists, on
    the same parser: the same error class and message as ``reader.verify``."""
    data, error, message = CASES[case]
    path = tmp_path / "a.vma"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(error) as info:
            verify_file(fd)
    finally:
        os.close(fd)
    assert str(info.value) == message


_NO_LOOP = """
import sys
from vma_async._cli import main
status = main(["verify", sys.argv[1]])
print("asyncio imported" if "asyncio" in sys.modules else "no event loop", status)
"""


@pytest.mark.parametrize("case", ["good", "missing cluster", "duplicate cluster"])
def test_vma_verify_of_a_plain_file_needs_no_event_loop(tmp_path: Path, case: str) -> None:
    """The command's loop-free verify prints what the event-loop path (taken
    with ``-v``) prints on standard error, and exits the same way."""
    if case == "good":
        data = archive(SIZE, *FIRST_TWO, vb.Entry(1, 2, 0b11, blocks(2, 50)))
    else:
        data = CASES[case][0]
    path = tmp_path / "a.vma"
    path.write_bytes(data)
    fast = subprocess.run(
        [sys.executable, "-c", _NO_LOOP, str(path)], capture_output=True, text=True
    )
    status = 0 if case == "good" else 1
    assert fast.stdout == f"no event loop {status}\n"
    slow = subprocess.run(
        [sys.executable, "-m", "vma_async", "verify", "-v", str(path)],
        capture_output=True,
        text=True,
    )
    assert slow.returncode == status
    assert fast.stderr == slow.stderr
    if case != "good":
        assert fast.stderr == f"vma: verify failed - {CASES[case][2]} (archive {path})\n"
