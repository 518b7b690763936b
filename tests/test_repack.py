"""vma repack: canonical order, everything kept, the same content gives the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import pytest

from vma_async import (
    CLUSTER_SIZE,
    SourceError,
    VmaReader,
    VmaWriter,
    create_archive,
    extract_archive,
)
from vma_async._repack import repack_archive

pytestmark = pytest.mark.anyio

FIXED = uuid.UUID("12345678-1234-5678-1234-567812345678")


def _image(path: Path, seed: int, clusters: int, tail: int = 0) -> bytes:
    """Data clusters, all-zero clusters and clusters with zero 4 KiB blocks."""
    rng = __import__("random").Random(seed)
    parts = []
    for index in range(clusters):
        kind = index % 4
        if kind == 0:
            parts.append(bytes(CLUSTER_SIZE))
        elif kind == 1:
            parts.append(bytes(8192) + rng.randbytes(CLUSTER_SIZE - 8192))
        else:
            parts.append(rng.randbytes(CLUSTER_SIZE))
    parts.append(rng.randbytes(tail))
    data = b"".join(parts)
    path.write_bytes(data)
    return data


async def _order(path: Path) -> list[tuple[int, int]]:
    """(dev_id, cluster) in archive order."""
    order = []
    async with await VmaReader.open(path) as reader:
        async for extent in reader.extents():
            order.extend(((w >> 32) & 0xFF, w & 0xFFFFFFFF) for w in extent.blockinfo)
    return order


async def _vm_archive(tmp_path: Path) -> tuple[Path, bytes, bytes, bytes]:
    """Two disks written by interleaving producers, two configs and a vmstate."""
    a = _image(tmp_path / "a.raw", 1, 70, tail=1536)
    b = _image(tmp_path / "b.raw", 2, 45)
    vmstate = os.urandom(3 * CLUSTER_SIZE + 100)
    archive = tmp_path / "in.vma"
    async with VmaWriter.open(archive, ctime=1_700_000_000) as writer:
        writer.add_config("qemu-server.conf", b"memory: 512\n")
        writer.add_config("qemu-server.fw", b"[OPTIONS]\n")
        ids = [
            writer.register_stream(name, len(data))
            for name, data in (("drive-b", b), ("drive-a", a))
        ]
        state = writer.register_stream("vmstate", len(vmstate))
        # Interleave the disks backwards and forwards: far from canonical.
        for step in range(70):
            if step < 45:
                await writer.write(
                    ids[0], 44 - step, b[(44 - step) * CLUSTER_SIZE :][:CLUSTER_SIZE]
                )
            await writer.write(ids[1], step, a[step * CLUSTER_SIZE :][:CLUSTER_SIZE])
            if step < 4:
                await writer.write(state, step, vmstate[step * CLUSTER_SIZE :][:CLUSTER_SIZE])
        await writer.write(ids[1], 70, a[70 * CLUSTER_SIZE :])
        for dev_id in (*ids, state):
            await writer.close_stream(dev_id)
    return archive, a, b, vmstate


async def test_repack_keeps_everything_in_canonical_order(tmp_path: Path) -> None:
    archive, a, b, vmstate = await _vm_archive(tmp_path)
    out = tmp_path / "out.vma"
    await repack_archive(archive, out)

    async with await VmaReader.open(archive) as reader:
        before = reader.header
    async with await VmaReader.open(out) as reader:
        after = reader.header
    assert after.configs == before.configs
    assert [(d.name, d.size) for d in after.devices] == [(d.name, d.size) for d in before.devices]
    assert (after.uuid, after.ctime) == (before.uuid, before.ctime)

    order = await _order(out)
    assert order == sorted(order)  # device after device, clusters ascending
    assert len(order) == 71 + 45 + 4

    await extract_archive(out, tmp_path / "x")
    assert (tmp_path / "x" / "disk-drive-a.raw").read_bytes() == a
    assert (tmp_path / "x" / "disk-drive-b.raw").read_bytes() == b
    assert (tmp_path / "x" / "vmstate.bin").read_bytes()[: len(vmstate)] == vmstate
    assert (tmp_path / "x" / "qemu-server.fw").read_bytes() == b"[OPTIONS]\n"
    # Zero blocks stay zero blocks: the repacked archive is no larger.
    assert out.stat().st_size <= archive.stat().st_size


async def test_same_content_gives_the_same_bytes(tmp_path: Path) -> None:
    a = _image(tmp_path / "a.raw", 3, 130)
    b = _image(tmp_path / "b.raw", 4, 60)
    devices = [("drive-a", tmp_path / "a.raw"), ("drive-b", tmp_path / "b.raw")]
    first, second = tmp_path / "1.vma", tmp_path / "2.vma"
    await create_archive(first, devices, uuid=uuid.uuid4())
    await create_archive(second, devices, uuid=uuid.uuid4(), ctime=1)
    assert first.read_bytes() != second.read_bytes()
    out1, out2 = tmp_path / "r1.vma", tmp_path / "r2.vma"
    await repack_archive(first, out1, uuid=FIXED, ctime=7)
    await repack_archive(second, out2, uuid=FIXED, ctime=7)
    assert out1.read_bytes() == out2.read_bytes()
    await extract_archive(out2, tmp_path / "x")
    assert (tmp_path / "x" / "disk-drive-a.raw").read_bytes() == a
    assert (tmp_path / "x" / "disk-drive-b.raw").read_bytes() == b


async def test_compressed_input_is_refused(tmp_path: Path) -> None:
    _image(tmp_path / "a.raw", 5, 3)
    plain = tmp_path / "a.vma"
    await create_archive(plain, [("d", tmp_path / "a.raw")])
    await anyio.run_process(["zstd", "-q", str(plain), "-o", str(tmp_path / "a.vma.zst")])
    with pytest.raises(
        SourceError,
        match="a.vma.zst is zstd-compressed: random access needs an uncompressed"
        " archive - decompress it first",
    ):
        await repack_archive(tmp_path / "a.vma.zst", tmp_path / "out.vma")
    assert not (tmp_path / "out.vma").exists()


async def test_missing_cluster_fails_before_any_output(tmp_path: Path) -> None:
    _image(tmp_path / "a.raw", 6, 200)
    plain = tmp_path / "a.vma"
    await create_archive(plain, [("d", tmp_path / "a.raw")])
    data = plain.read_bytes()
    (tmp_path / "cut.vma").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="missing cluster|short|truncated"):
        await repack_archive(tmp_path / "cut.vma", tmp_path / "out.vma")
    assert not (tmp_path / "out.vma").exists()


def test_cli_repack(tmp_path: Path) -> None:
    _image(tmp_path / "a.raw", 7, 20)
    vma = [sys.executable, "-m", "vma_async"]
    subprocess.run(
        [*vma, "create", str(tmp_path / "in.vma"), "d=" + str(tmp_path / "a.raw")], check=True
    )
    run = subprocess.run(
        [*vma, "repack", str(tmp_path / "in.vma"), str(tmp_path / "out.vma"), "--uuid", str(FIXED)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    listed = subprocess.run(
        [*vma, "list", "--json", str(tmp_path / "out.vma")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(FIXED) in listed.stdout
    again = subprocess.run(
        [*vma, "repack", str(tmp_path / "in.vma"), str(tmp_path / "out.vma")],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1
    assert "out.vma" in again.stderr
    assert "exists" in again.stderr.lower()


async def test_reproducible_create_equals_repack_of_a_default_create(tmp_path: Path) -> None:
    _image(tmp_path / "a.raw", 8, 90, tail=700)
    _image(tmp_path / "b.raw", 9, 70)
    devices = [("drive-a", tmp_path / "a.raw"), ("drive-b", tmp_path / "b.raw")]
    configs = [("qemu-server.conf", b"cores: 2\n")]
    for name in ("r1.vma", "r2.vma"):
        await create_archive(
            tmp_path / name, devices, configs=configs, size_multiple=512, reproducible=True
        )
    assert (tmp_path / "r1.vma").read_bytes() == (tmp_path / "r2.vma").read_bytes()
    async with await VmaReader.open(tmp_path / "r1.vma") as reader:
        header = reader.header
    # The default uuid is the layout's, the ctime the newest image's mtime.
    assert header.ctime == int(max((tmp_path / n).stat().st_mtime for n in ("a.raw", "b.raw")))
    assert await _order(tmp_path / "r1.vma") == sorted(await _order(tmp_path / "r1.vma"))

    await create_archive(tmp_path / "d.vma", devices, configs=configs, size_multiple=512)
    await repack_archive(
        tmp_path / "d.vma", tmp_path / "p.vma", uuid=header.uuid, ctime=header.ctime
    )
    assert (tmp_path / "p.vma").read_bytes() == (tmp_path / "r1.vma").read_bytes()


def test_cli_reproducible_honours_source_date_epoch(tmp_path: Path) -> None:
    _image(tmp_path / "a.raw", 10, 12)
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1234567890"}
    outputs = []
    for name in ("1.vma", "2.vma"):
        subprocess.run(
            [sys.executable, "-m", "vma_async", "create", "--reproducible", "--uuid", str(FIXED),
             str(tmp_path / name), "d=" + str(tmp_path / "a.raw")],
            check=True,
            env=env,
        )  # fmt: skip
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    listed = subprocess.run(
        [sys.executable, "-m", "vma_async", "list", "--json", str(tmp_path / "1.vma")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"ctime_epoch": 1234567890' in listed.stdout
    assert str(FIXED) in listed.stdout


def test_cli_repack_to_stdout(tmp_path: Path) -> None:
    _image(tmp_path / "a.raw", 12, 9)
    vma = [sys.executable, "-m", "vma_async"]
    subprocess.run([*vma, "create", str(tmp_path / "in.vma"), str(tmp_path / "a.raw")], check=True)
    subprocess.run(
        [*vma, "repack", str(tmp_path / "in.vma"), str(tmp_path / "file.vma")], check=True
    )
    with (tmp_path / "piped.vma").open("wb") as out:
        subprocess.run([*vma, "repack", str(tmp_path / "in.vma"), "-"], stdout=out, check=True)
    assert (tmp_path / "piped.vma").read_bytes() == (tmp_path / "file.vma").read_bytes()
