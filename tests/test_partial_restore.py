"""Partial restore: ``skip=`` map lines and ``vma extract -d``, through the real
qmrestore flow (``zstd -q -d -c ARCHIVE | vma extract -v -r FIFO - TMPDIR``,
the map written only after the ``CTIME:`` line) and through the library."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import vma_builder

from vma_async import (
    CLUSTER_SIZE,
    DuplicateClusterError,
    RestoreMapEntry,
    RestoreMapError,
    UnknownDeviceError,
    create_archive,
    extract_archive,
)

VMA = [sys.executable, "-m", "vma_async"]
DISKS = ("drive-scsi0", "drive-scsi1", "drive-scsi2")
SENTINEL = b"\xa5"


def _disk(seed: int, clusters: int) -> bytes:
    rng = random.Random(seed)
    parts = [
        bytes(CLUSTER_SIZE) if i % 3 == 0 else bytes(4096) + rng.randbytes(CLUSTER_SIZE - 4096)
        for i in range(clusters)
    ]
    return b"".join(parts)


@pytest.fixture
def vm(tmp_path: Path) -> dict[str, bytes]:
    """Three disks written by interleaving producers, a config, zstd-compressed."""
    contents = {name: _disk(i, 40 + 7 * i) for i, name in enumerate(DISKS)}
    for name, data in contents.items():
        (tmp_path / f"{name}.raw").write_bytes(data)
    (tmp_path / "qemu-server.conf").write_bytes(b"scsi0: local:vm-100-disk-0\n")
    args = [f"{name}={tmp_path / f'{name}.raw'}" for name in DISKS]
    subprocess.run(
        [*VMA, "create", str(tmp_path / "a.vma"), "-c", str(tmp_path / "qemu-server.conf"), *args],
        check=True,
    )
    subprocess.run(["zstd", "-q", "--rm", str(tmp_path / "a.vma")], check=True)
    return contents


def _target(path: Path, size: int) -> Path:
    """An existing volume, as qmrestore allocates it: full of a sentinel."""
    path.write_bytes(SENTINEL * size)
    return path


def _qmrestore(
    tmp_path: Path, map_lines: Sequence[str], extra: Sequence[str] = (), backend: str = "asyncio"
) -> tuple[int, str, str]:
    """Run the pipeline; answer the map only after CTIME:, as qemu-server does."""
    fifo = tmp_path / "map.fifo"
    os.mkfifo(fifo)
    env = {**os.environ, "VMA_ASYNC_BACKEND": backend}
    with subprocess.Popen(
        ["zstd", "-q", "-d", "-c", str(tmp_path / "a.vma.zst")], stdout=subprocess.PIPE
    ) as unzstd:
        assert unzstd.stdout is not None
        with subprocess.Popen(
            [*VMA, "extract", "-v", *extra, "-r", str(fifo), "-", str(tmp_path / "tmpdir")],
            stdin=unzstd.stdout,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        ) as vma:
            unzstd.stdout.close()
            assert vma.stdout is not None
            assert vma.stderr is not None
            head = []
            for raw in vma.stdout:
                line = raw.decode()
                head.append(line)
                if line.startswith("CTIME:"):
                    break
            assert head, "vma printed nothing"
            assert head[-1].startswith("CTIME:"), head
            # qemu-server reads the configs at this point: they must be on disk.
            conf = (tmp_path / "tmpdir" / "qemu-server.conf").read_bytes()
            assert conf == b"scsi0: local:vm-100-disk-0\n"
            with open(fifo, "w") as writer:  # blocks until vma opens its end
                writer.write("".join(f"{line}\n" for line in map_lines) + "done\n")
            rest = vma.stdout.read().decode()
            err = vma.stderr.read().decode()
            status = vma.wait()
    return status, "".join(head) + rest, err


@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
def test_skip_through_the_qmrestore_pipeline(
    tmp_path: Path, vm: dict[str, bytes], backend: str
) -> None:
    size = {name: len(data) for name, data in vm.items()}
    scsi0 = _target(tmp_path / "vol0", size["drive-scsi0"])
    scsi1 = _target(tmp_path / "vol1", size["drive-scsi1"])  # would-be target: must stay as is
    scsi2 = tmp_path / "vol2"
    scsi2.write_bytes(bytes(size["drive-scsi2"]))  # sparse-initialised volume: "0:" is right
    status, out, err = _qmrestore(
        tmp_path,
        [
            f"format=raw:throttling.bps=0:1:drive-scsi0={scsi0}",
            "skip=drive-scsi1",
            f"0:drive-scsi2={scsi2}",
        ],
        backend=backend,
    )
    assert status == 0, err
    assert scsi0.read_bytes() == vm["drive-scsi0"]
    assert scsi2.read_bytes() == vm["drive-scsi2"]
    assert scsi1.read_bytes() == SENTINEL * size["drive-scsi1"]
    assert "progress 100%" in out
    assert sorted(os.listdir(tmp_path / "tmpdir")) == ["qemu-server.conf"]


def test_drive_list_with_a_map_needs_no_line_for_the_others(
    tmp_path: Path, vm: dict[str, bytes]
) -> None:
    scsi2 = _target(tmp_path / "vol2", len(vm["drive-scsi2"]))
    status, _, err = _qmrestore(tmp_path, [f"1:drive-scsi2={scsi2}"], extra=["-d", "drive-scsi2"])
    assert status == 0, err
    assert scsi2.read_bytes() == vm["drive-scsi2"]


def test_a_disk_with_neither_mapping_nor_skip_is_still_an_error(
    tmp_path: Path, vm: dict[str, bytes]
) -> None:
    scsi0 = _target(tmp_path / "vol0", len(vm["drive-scsi0"]))
    status, _, err = _qmrestore(tmp_path, [f"1:drive-scsi0={scsi0}", "skip=drive-scsi2"])
    assert status == 1
    assert "no device name mapping for drive-scsi1" in err
    assert scsi0.read_bytes() == SENTINEL * len(vm["drive-scsi0"])


def test_extract_d_restores_only_the_named_disks(tmp_path: Path, vm: dict[str, bytes]) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        [*VMA, "extract", "-d", "drive-scsi2,drive-scsi0", str(tmp_path / "a.vma.zst"), str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(out)) == [
        "disk-drive-scsi0.raw",
        "disk-drive-scsi2.raw",
        "qemu-server.conf",
    ]
    assert (out / "disk-drive-scsi0.raw").read_bytes() == vm["drive-scsi0"]
    assert (out / "disk-drive-scsi2.raw").read_bytes() == vm["drive-scsi2"]
    assert "tmp-disk-drive-scsi1" not in run.stdout  # no DEVINFO for a skipped disk


def test_extract_d_with_an_unknown_name_lists_the_disks(
    tmp_path: Path, vm: dict[str, bytes]
) -> None:
    run = subprocess.run(
        [
            *VMA,
            "extract",
            "-d",
            "drive-scsi0,drive-virtio9",
            str(tmp_path / "a.vma.zst"),
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert "no disk named 'drive-virtio9' in the archive" in run.stderr
    assert "its disks: drive-scsi0, drive-scsi1, drive-scsi2" in run.stderr
    assert not (tmp_path / "o").exists()


# --- the library ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_library_devices_and_skip_entries(tmp_path: Path) -> None:
    a, b = _disk(10, 9), _disk(11, 5)
    (tmp_path / "a.raw").write_bytes(a)
    (tmp_path / "b.raw").write_bytes(b)
    archive = tmp_path / "x.vma"
    await create_archive(archive, [("a", tmp_path / "a.raw"), ("b", tmp_path / "b.raw")])

    result = await extract_archive(archive, tmp_path / "only-b", devices=["b"])
    assert sorted(result.files) == ["disk-b.raw"]
    assert (tmp_path / "only-b" / "disk-b.raw").read_bytes() == b

    target = tmp_path / "vol-a"
    target.write_bytes(bytes(len(a)))
    entries = {
        "a": RestoreMapEntry("a", str(target), write_zeroes=False),
        "b": RestoreMapEntry("b", "", write_zeroes=False, skip=True),
    }
    await extract_archive(archive, tmp_path / "mapped", restore_map=entries)
    assert target.read_bytes() == a

    with pytest.raises(RestoreMapError, match="no device name mapping for b"):
        await extract_archive(archive, tmp_path / "m2", restore_map={"a": entries["a"]})
    with pytest.raises(UnknownDeviceError, match=r"no disk named 'c'.*its disks: a, b"):
        await extract_archive(archive, tmp_path / "m3", devices=["a", "c"])
    assert not (tmp_path / "m3").exists()


@pytest.mark.anyio
async def test_a_skipped_disk_gets_no_duplicate_cluster_check(tmp_path: Path) -> None:
    """As in the reference: a skipped disk's clusters are read past unchecked."""
    a, b = _disk(20, 3), _disk(21, 2)
    devices = {1: vma_builder.Device("a", a), 2: vma_builder.Device("b", b)}
    entries = vma_builder.entries_for(devices)
    entries.append(vma_builder.cluster_entry(2, 0, b, len(b)))  # b's cluster 0 again
    archive = tmp_path / "dup.vma"
    archive.write_bytes(
        vma_builder.header({1: ("a", len(a)), 2: ("b", len(b))})
        + b"".join(vma_builder.pack(entries))
        + vma_builder.extent([])
    )
    with pytest.raises(DuplicateClusterError, match="found duplicated cluster 0 for stream b"):
        await extract_archive(archive, tmp_path / "all")
    await extract_archive(archive, tmp_path / "only-a", devices=["a"])
    assert (tmp_path / "only-a" / "disk-a.raw").read_bytes() == a
    target = tmp_path / "vol-a"
    target.write_bytes(bytes(len(a)))
    await extract_archive(
        archive,
        tmp_path / "mapped",
        restore_map={
            "a": RestoreMapEntry("a", str(target), write_zeroes=False),
            "b": RestoreMapEntry("b", "", write_zeroes=False, skip=True),
        },
    )
    assert target.read_bytes() == a
