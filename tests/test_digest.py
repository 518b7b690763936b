"""The ``.digest`` sidecar: verify catches what the format's header checksums cannot."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import uuid
from pathlib import Path

import blake3
import pytest

from vma_async import (
    CLUSTER_SIZE,
    DigestError,
    DigestMismatchError,
    DigestRecorder,
    VmaReader,
    VmaWriter,
    create_archive,
    digest_path,
    read_digest_file,
    verify_with_digest,
    write_digest_file,
)

VMA = [sys.executable, "-m", "vma_async"]


def _image(seed: int, clusters: int, tail: int = 0) -> bytes:
    """Data, zero clusters and clusters with zero 4 KiB blocks, and a short tail."""
    rng = random.Random(seed)
    parts = []
    for index in range(clusters):
        if index % 5 == 0:
            parts.append(bytes(CLUSTER_SIZE))
        elif index % 5 == 1:
            parts.append(rng.randbytes(4096) + bytes(CLUSTER_SIZE - 4096))
        else:
            parts.append(rng.randbytes(CLUSTER_SIZE))
    return b"".join(parts) + rng.randbytes(tail)


async def _header_size(archive: Path) -> int:
    async with await VmaReader.open(archive) as reader:
        return reader.header.header_size


def _flip(archive: Path, offset: int) -> None:
    data = bytearray(archive.read_bytes())
    data[offset] ^= 0x01
    archive.write_bytes(bytes(data))


@pytest.mark.anyio
async def test_a_flipped_data_byte_passes_verify_but_not_the_digest(tmp_path: Path) -> None:
    (tmp_path / "a.raw").write_bytes(_image(1, 30, tail=1000))
    (tmp_path / "b.raw").write_bytes(_image(2, 20))
    archive = tmp_path / "x.vma"
    recorder = DigestRecorder()
    archive_uuid = uuid.uuid4()
    await create_archive(
        archive,
        [("a", tmp_path / "a.raw"), ("b", tmp_path / "b.raw")],
        uuid=archive_uuid,
        size_multiple=512,
        digest=recorder,
    )
    await write_digest_file(digest_path(archive), recorder, archive_uuid, ["a", "b"])
    sidecar = await read_digest_file(digest_path(archive))
    async with await VmaReader.open(archive) as reader:
        summary = await verify_with_digest(reader, sidecar)
    assert summary.bytes_read > 0

    # A byte of the first stored block: the extent header's MD5 does not cover it.
    _flip(archive, await _header_size(archive) + 512 + 10)
    async with await VmaReader.open(archive) as reader:
        await reader.verify()  # the format alone cannot tell
    async with await VmaReader.open(archive) as reader:
        with pytest.raises(
            DigestMismatchError, match=r"data of [ab] at offset \d+ .* does not match"
        ):
            await verify_with_digest(reader, sidecar)


@pytest.mark.anyio
async def test_out_of_order_clusters_are_checked_in_one_pass(tmp_path: Path) -> None:
    data = _image(3, 25, tail=512)
    archive = tmp_path / "rev.vma"
    archive_uuid = uuid.uuid4()
    async with VmaWriter.open(archive, uuid=archive_uuid) as writer:
        dev = writer.register_stream("d", len(data))
        for cluster in reversed(range(26)):
            await writer.write(dev, cluster, data[cluster * CLUSTER_SIZE :][:CLUSTER_SIZE])
        await writer.close_stream(dev)
    recorder = DigestRecorder()
    device = recorder.device("d", len(data))
    device.update(0, data[: 10 * CLUSTER_SIZE])
    device.update(10 * CLUSTER_SIZE, data[10 * CLUSTER_SIZE :])
    await write_digest_file(digest_path(archive), recorder, archive_uuid, ["d"])
    sidecar = await read_digest_file(digest_path(archive))
    assert sidecar.sha256["d"] == hashlib.sha256(data).hexdigest()
    async with await VmaReader.open(archive) as reader:
        await verify_with_digest(reader, sidecar)

    # The same sidecar against a different content of the same layout.
    other = bytearray(data)
    other[5 * CLUSTER_SIZE + 7] ^= 0xFF
    archive2 = tmp_path / "other.vma"
    async with VmaWriter.open(archive2, uuid=archive_uuid) as writer:
        dev = writer.register_stream("d", len(other))
        for cluster in reversed(range(26)):
            await writer.write(dev, cluster, bytes(other[cluster * CLUSTER_SIZE :][:CLUSTER_SIZE]))
        await writer.close_stream(dev)
    async with await VmaReader.open(archive2) as reader:
        with pytest.raises(DigestMismatchError, match=r"cluster 5\)"):
            await verify_with_digest(reader, sidecar)


@pytest.mark.anyio
async def test_a_sidecar_of_another_archive_or_damaged_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.raw").write_bytes(_image(4, 6))
    recorder = DigestRecorder()
    archive = tmp_path / "x.vma"
    await create_archive(archive, [("a", tmp_path / "a.raw")], digest=recorder)
    foreign = tmp_path / "foreign.digest"
    await write_digest_file(foreign, recorder, uuid.uuid4(), ["a"])
    sidecar = await read_digest_file(foreign)
    async with await VmaReader.open(archive) as reader:
        with pytest.raises(DigestError, match="belongs to archive"):
            await verify_with_digest(reader, sidecar)

    damaged = tmp_path / "damaged.digest"
    raw = bytearray(foreign.read_bytes())
    raw[-1] ^= 0x40
    damaged.write_bytes(bytes(raw))
    with pytest.raises(DigestError, match="damaged"):
        await read_digest_file(damaged)
    (tmp_path / "junk.digest").write_bytes(b"not a digest")
    with pytest.raises(DigestError, match="not a vma digest file"):
        await read_digest_file(tmp_path / "junk.digest")
    with pytest.raises(DigestError, match="unable to read digest"):
        await read_digest_file(tmp_path / "missing.digest")


def _cli_create_with_digest(tmp_path: Path, data: bytes, archive: Path) -> Path:
    """``vma create --digest`` of one disk holding ``data``; the sidecar's path."""
    (tmp_path / "disk.raw").write_bytes(data)
    run = subprocess.run(
        [*VMA, "create", "--digest", str(archive), f"drive-scsi0={tmp_path / 'disk.raw'}"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    return Path(str(archive) + ".digest")


def test_cli_create_digest_then_verify(tmp_path: Path) -> None:
    data = _image(5, 40, tail=100)
    archive = tmp_path / "b.vma"
    sidecar = _cli_create_with_digest(tmp_path, data, archive)
    header = json.loads(sidecar.read_bytes().split(b"\n", 1)[0])
    padded = data + bytes(-len(data) % 512)  # the size the archive records
    assert header["devices"][0]["sha256"] == hashlib.sha256(padded).hexdigest()

    ok = subprocess.run([*VMA, "verify", "-v", str(archive)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert f"data of every disk matches {sidecar}" in ok.stdout

    header_size = int.from_bytes(archive.read_bytes()[56:60], "big")  # FORMAT.md: header_size
    _flip(archive, header_size + 512 + 10)
    bad = subprocess.run([*VMA, "verify", str(archive)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "verify failed - data of drive-scsi0 at offset" in bad.stderr
    assert "does not match its digest" in bad.stderr

    # From a pipe, the sidecar is named explicitly.
    with archive.open("rb") as stdin:
        piped = subprocess.run(
            [*VMA, "verify", "--digest", str(sidecar), "-"],
            stdin=stdin,
            capture_output=True,
            text=True,
        )
    assert piped.returncode == 1
    assert "does not match its digest" in piped.stderr


def test_cli_create_digest_never_replaces_a_sidecar(tmp_path: Path) -> None:
    (tmp_path / "disk.raw").write_bytes(_image(6, 3))
    archive = tmp_path / "b.vma"
    Path(str(archive) + ".digest").write_bytes(b"keep me")
    run = subprocess.run(
        [*VMA, "create", "--digest", str(archive), str(tmp_path / "disk.raw")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert "already exists" in run.stderr
    assert not archive.exists()
    assert Path(str(archive) + ".digest").read_bytes() == b"keep me"


def test_verify_help_says_the_format_checksums_headers_only() -> None:
    run = subprocess.run([*VMA, "verify", "--help"], capture_output=True, text=True, check=True)
    assert "checksums its headers only" in run.stdout
    assert "--digest" in run.stdout


@pytest.mark.anyio
async def test_vmstate_is_read_past_and_disks_checked(tmp_path: Path) -> None:
    disk = _image(7, 4)
    state = random.Random(8).randbytes(2 * CLUSTER_SIZE + 10)
    archive = tmp_path / "vm.vma"
    archive_uuid = uuid.uuid4()
    async with VmaWriter.open(archive, uuid=archive_uuid) as writer:
        dev = writer.register_stream("drive-scsi0", len(disk))
        vmstate = writer.register_stream("vmstate", len(state))
        for cluster in range(4):
            await writer.write(vmstate, cluster, state[cluster * CLUSTER_SIZE :][:CLUSTER_SIZE])
            await writer.write(dev, cluster, disk[cluster * CLUSTER_SIZE :][:CLUSTER_SIZE])
        await writer.close_stream(dev)
        await writer.close_stream(vmstate)
    recorder = DigestRecorder()
    recorder.device("drive-scsi0", len(disk)).update(0, disk)
    await write_digest_file(digest_path(archive), recorder, archive_uuid, ["drive-scsi0"])
    sidecar = await read_digest_file(digest_path(archive))
    async with await VmaReader.open(archive) as reader:
        summary = await verify_with_digest(reader, sidecar)
    assert summary.bytes_read > 0


def test_cli_sidecar_is_version_2_blake3_and_version_1_still_verifies(tmp_path: Path) -> None:
    """Version 2 (BLAKE3 cluster digests, issue 11's cost target) is what
    create writes; a version 1 sidecar (truncated SHA-256) of the same
    archive still verifies, and still catches a flipped byte."""
    data = _image(9, 70, tail=300)
    archive = tmp_path / "c.vma"
    sidecar = _cli_create_with_digest(tmp_path, data, archive)
    line, tables = sidecar.read_bytes().split(b"\n", 1)
    header = json.loads(line)
    assert (header["version"], header["cluster_digest"]) == (2, "blake3-128")
    padded = data + bytes(-len(data) % 512)
    clusters = [padded[at : at + CLUSTER_SIZE] for at in range(0, len(padded), CLUSTER_SIZE)]
    assert tables == b"".join(blake3.blake3(c).digest(16) for c in clusters)

    old_tables = b"".join(hashlib.sha256(c).digest()[:16] for c in clusters)
    header.update(
        version=1,
        cluster_digest="sha256-128",
        table_sha256=hashlib.sha256(old_tables).hexdigest(),
    )
    old = tmp_path / "old.digest"
    old.write_bytes(json.dumps(header).encode() + b"\n" + old_tables)
    ok = subprocess.run(
        [*VMA, "verify", "-v", "--digest", str(old), str(archive)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert f"data of every disk matches {old}" in ok.stdout

    header_size = int.from_bytes(archive.read_bytes()[56:60], "big")
    _flip(archive, header_size + 512 + 4096 * 3 + 7)
    for digest_file in (old, sidecar):
        bad = subprocess.run(
            [*VMA, "verify", "--digest", str(digest_file), str(archive)],
            capture_output=True,
            text=True,
        )
        assert bad.returncode == 1
        assert "does not match its digest" in bad.stderr
