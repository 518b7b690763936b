"""Every QEMU disk format in and out of archives, through real qemu-img and qemu-nbd.

What must hold: a restore into qcow2, vmdk or vdi (new images, or existing
volumes named by a restore map, as Proxmox allocates them) holds exactly the
archived virtual disk; a backup of a qcow2, vmdk or vdi image stores its
virtual disk, never the container file; and when qemu-nbd dies, the target
is missing or of another format, or the disk under the image fills up, the
error says so and no child process, fd or half-written image is left.
Library tests run under asyncio, uvloop and trio; CLI tests run ``vma`` as
a subprocess.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from test_qemu import open_fds, qemu_children

from vma_async import (
    NbdSink,
    Progress,
    QemuError,
    RestoreMapEntry,
    RestoreMapError,
    SinkError,
    SinkExistsError,
    VmaError,
    VmaReader,
    create_archive,
    extract_archive,
    parse_restore_map,
)

MiB = 1 << 20
CLUSTER = 65536
VMA = str(Path(sys.executable).with_name("vma"))


def disk_bytes(seed: int, size: int) -> bytes:
    """A virtual disk with data, whole zero clusters, a zero 4 KiB block inside
    a data cluster, and a data tail in the last partial cluster."""
    rng = random.Random(seed)
    data = bytearray(size)
    for cluster in range(0, size, CLUSTER):
        if rng.random() < 0.5:
            end = min(cluster + CLUSTER, size)
            data[cluster:end] = rng.randbytes(end - cluster)
            if end - cluster == CLUSTER:
                data[cluster + 8192 : cluster + 12288] = bytes(4096)
    data[-512:] = rng.randbytes(512)
    return bytes(data)


def write_image(path: Path, fmt: str, data: bytes) -> Path:
    """``data`` as the virtual disk of a new ``fmt`` image at ``path``."""
    raw = path.with_name(path.name + ".src.raw")
    raw.write_bytes(data)
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(path)], check=True
    )
    raw.unlink()
    return path


def virtual_disk(path: Path, fmt: str) -> bytes:
    out = path.with_name(path.name + ".back.raw")
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", fmt, "-O", "raw", str(path), str(out)], check=True
    )
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[dict[str, bytes]]:
    """Two raw disks of odd sizes and an archive of them (a.vma)."""
    images = {
        "drive-scsi0": disk_bytes(1, 3 * MiB + 7 * 512),
        "drive-virtio1": disk_bytes(2, 2 * MiB + CLUSTER + 1024),
    }
    for name, data in images.items():
        (tmp_path / f"{name}.raw").write_bytes(data)
    yield images
    assert qemu_children() == []


async def make_archive(tmp_path: Path, images: dict[str, bytes], name: str = "a.vma") -> Path:
    archive = tmp_path / name
    await create_archive(archive, [(n, tmp_path / f"{n}.raw") for n in images])
    return archive


# --- restore: new images ------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vdi"])
async def test_extract_into_new_images(tmp_path: Path, disks: dict[str, bytes], fmt: str) -> None:
    archive = await make_archive(tmp_path, disks)
    before = open_fds()
    result = await extract_archive(archive, tmp_path / "out", image_format=fmt)
    assert sorted(result.files) == sorted(f"disk-{name}.{fmt}" for name in disks)
    for name, data in disks.items():
        image = tmp_path / "out" / f"disk-{name}.{fmt}"
        assert virtual_disk(image, fmt)[: len(data)] == data
        assert b"".join(virtual_disk(image, fmt)[len(data) :].split(b"\0")) == b""
    assert open_fds() == before


@pytest.mark.anyio
async def test_new_qcow2_stays_sparse(tmp_path: Path) -> None:
    """Zero clusters of the archive are never written: the qcow2 allocates
    only what holds data."""
    data = bytes(8 * MiB)
    data = data[: 4 * MiB] + os.urandom(CLUSTER) + data[4 * MiB + CLUSTER :]
    (tmp_path / "d.raw").write_bytes(data)
    await create_archive(tmp_path / "a.vma", [("d", tmp_path / "d.raw")])
    await extract_archive(tmp_path / "a.vma", tmp_path / "out", image_format="qcow2")
    image = tmp_path / "out" / "disk-d.qcow2"
    assert virtual_disk(image, "qcow2") == data
    assert image.stat().st_blocks * 512 < 2 * MiB


# --- restore: existing volumes of a restore map ----------------------------------------------


@pytest.mark.anyio
async def test_map_with_raw_and_qcow2_targets(tmp_path: Path, disks: dict[str, bytes]) -> None:
    """Proxmox's map: one raw volume, one pre-allocated qcow2 full of old data
    with write-zero 1 (so zero blocks must overwrite it), throttled and cached."""
    archive = await make_archive(tmp_path, disks)
    raw_target = tmp_path / "vm-100-disk-0.raw"
    raw_target.write_bytes(bytes(len(disks["drive-scsi0"])))
    old = b"\xaa" * len(disks["drive-virtio1"])
    qcow2_target = write_image(tmp_path / "vm-100-disk-1.qcow2", "qcow2", old)
    entries = {
        "drive-scsi0": RestoreMapEntry("drive-scsi0", str(raw_target), False, format="raw"),
        "drive-virtio1": RestoreMapEntry(
            "drive-virtio1",
            str(qcow2_target),
            True,
            format="qcow2",
            throttling_bps=1 << 40,
            throttling_group="local",
            cache="writeback",
        ),
    }
    await extract_archive(archive, tmp_path / "out", restore_map=entries)
    assert raw_target.read_bytes() == disks["drive-scsi0"]
    assert virtual_disk(qcow2_target, "qcow2") == disks["drive-virtio1"]


@pytest.mark.anyio
async def test_map_without_write_zero_leaves_old_data(tmp_path: Path) -> None:
    """``0:`` means the volume reads zeros already: zero runs are not written
    (the reference's rule), so old data shows where the disk had zeros."""
    data = os.urandom(CLUSTER) + bytes(CLUSTER)
    (tmp_path / "d.raw").write_bytes(data)
    await create_archive(tmp_path / "a.vma", [("d", tmp_path / "d.raw")])
    target = write_image(tmp_path / "t.vmdk", "vmdk", b"\xaa" * len(data))
    entries = {"d": RestoreMapEntry("d", str(target), False, format="vmdk")}
    await extract_archive(tmp_path / "a.vma", tmp_path / "out", restore_map=entries)
    assert virtual_disk(target, "vmdk") == data[:CLUSTER] + b"\xaa" * CLUSTER


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("missing", r"can't open file .*gone\.qcow2 - .*qemu-nbd exit status 1: .*No such file"),
        ("raw", r"can't open file .*disk\.qcow2 - .*qemu-nbd exit status 1: .*not in qcow2 format"),
        ("small", r"vma_reader_register_bs for stream d failed - unexpected size 65536 != 131072"),
    ],
)
@pytest.mark.anyio
async def test_map_target_errors(tmp_path: Path, make: str, message: str) -> None:
    (tmp_path / "d.raw").write_bytes(os.urandom(2 * CLUSTER))
    await create_archive(tmp_path / "a.vma", [("d", tmp_path / "d.raw")])
    target = tmp_path / ("gone.qcow2" if make == "missing" else "disk.qcow2")
    if make == "raw":
        target.write_bytes(bytes(2 * CLUSTER))
    elif make == "small":
        write_image(target, "qcow2", bytes(CLUSTER))
    before = target.read_bytes() if make != "missing" else None
    entries = {"d": RestoreMapEntry("d", str(target), True, format="qcow2")}
    fds = open_fds()
    with pytest.raises(SinkError, match=message):
        await extract_archive(tmp_path / "a.vma", tmp_path / "out", restore_map=entries)
    assert not (tmp_path / "out").exists()
    assert (target.read_bytes() if make != "missing" else None) == before
    assert open_fds() == fds
    assert qemu_children() == []


@pytest.mark.anyio
async def test_unknown_format_refused_before_anything(tmp_path: Path) -> None:
    (tmp_path / "d.raw").write_bytes(os.urandom(CLUSTER))
    await create_archive(tmp_path / "a.vma", [("d", tmp_path / "d.raw")])
    with pytest.raises(QemuError, match="unsupported image format 'qcow3'"):
        await extract_archive(tmp_path / "a.vma", tmp_path / "out", image_format="qcow3")
    assert not (tmp_path / "out").exists()
    with pytest.raises(RestoreMapError, match="Unknown driver 'qcow3'"):
        parse_restore_map(["format=qcow3:0:d=/x\n"])


# --- faults -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_qemu_nbd_killed_mid_restore(tmp_path: Path) -> None:
    """SIGKILL to qemu-nbd after the first batch: the restore fails naming
    qemu-nbd's death; the new image and the directory are removed."""
    (tmp_path / "d.raw").write_bytes(os.urandom(24 * MiB))
    await create_archive(tmp_path / "a.vma", [("d", tmp_path / "d.raw")])
    killed: list[int] = []

    def kill_qemu_nbd(progress: object) -> None:
        if not killed:
            (pid,) = qemu_children()
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    fds = open_fds()
    with pytest.raises(
        SinkError, match=r"write to .*tmp-disk-d\.qcow2 failed - .*killed by SIGKILL"
    ):
        await extract_archive(
            tmp_path / "a.vma", tmp_path / "out", image_format="qcow2", progress=kill_qemu_nbd
        )
    assert killed
    assert not (tmp_path / "out").exists()
    assert qemu_children() == []
    assert open_fds() == fds


@pytest.mark.anyio
async def test_cancelled_restore_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "d.raw").write_bytes(os.urandom(16 * MiB))
    await create_archive(tmp_path / "a.vma", [("d", tmp_path / "d.raw")])
    fds = open_fds()
    with anyio.CancelScope() as scope:

        def cancel(progress: object) -> None:
            assert qemu_children() != []
            scope.cancel()

        await extract_archive(
            tmp_path / "a.vma", tmp_path / "out", image_format="vdi", progress=cancel
        )
    assert scope.cancelled_caught
    assert not (tmp_path / "out").exists()
    assert qemu_children() == []
    assert open_fds() == fds


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: the disk under the image fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)])
    if result.returncode != 0:
        pytest.fail("mounting a tmpfs needs root (the tests run as root in CI)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.anyio
async def test_full_disk_under_the_image(tmp_path: Path, small_tmpfs: Path) -> None:
    (tmp_path / "d.raw").write_bytes(os.urandom(12 * MiB))
    await create_archive(tmp_path / "a.vma", [("d", tmp_path / "d.raw")])
    fds = open_fds()
    with pytest.raises(SinkError, match=r"tmp-disk-d\.qcow2 failed - .*No space left on device"):
        await extract_archive(tmp_path / "a.vma", small_tmpfs / "out", image_format="qcow2")
    assert os.listdir(small_tmpfs) == []
    assert qemu_children() == []
    assert open_fds() == fds


@pytest.mark.anyio
async def test_sink_refuses_an_existing_image(tmp_path: Path) -> None:
    """A sink that creates an image never replaces one."""
    (tmp_path / "d.raw").write_bytes(os.urandom(CLUSTER))
    await create_archive(tmp_path / "a.vma", [("d", tmp_path / "d.raw")])
    existing = write_image(tmp_path / "keep.qcow2", "qcow2", b"\x55" * CLUSTER)
    async with await VmaReader.open(tmp_path / "a.vma") as reader:
        with pytest.raises(SinkExistsError, match="file exists"):
            await reader.restore({"d": NbdSink(existing, "qcow2", create=True)})
    assert virtual_disk(existing, "qcow2") == b"\x55" * CLUSTER


# --- backup from any format ----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vdi"])
@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "probed"])
async def test_backup_from_image_stores_the_virtual_disk(
    tmp_path: Path, fmt: str, explicit: bool
) -> None:
    data = disk_bytes(3, 2 * MiB + 3 * 512)
    image = write_image(tmp_path / f"disk.{fmt}", fmt, data)
    device = ("drive-scsi0", image, fmt) if explicit else ("drive-scsi0", image)
    status = await create_archive(tmp_path / "a.vma", [device])
    (stream,) = status.streams
    assert stream.size == len(data)
    await extract_archive(tmp_path / "a.vma", tmp_path / "out")
    assert (tmp_path / "out" / "disk-drive-scsi0.raw").read_bytes() == data


# --- the vma command (subprocess) ----------------------------------------------------------


def vma(*args: str | Path, cwd: Path, status: int = 0, **env: str) -> str:
    result = subprocess.run(
        [VMA, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        env={**os.environ, **env},
        check=False,
        timeout=120,
    )
    assert result.returncode == status, result.stderr.decode()
    return result.stderr.decode() if status else result.stdout.decode()


def test_proxmox_restore_flow_with_qcow2_volumes(tmp_path: Path) -> None:
    """qmrestore's pipeline: ``zstd -q -d -c ARCHIVE | vma extract -v -r FIFO - TMPDIR``;
    the map is written only after the ``CTIME:`` line, when the config is on
    disk, into a raw and a qcow2 volume allocated beforehand (the qcow2 holds
    old data, so its ``1:`` line must write the zeros too)."""
    images = {
        "drive-scsi0": disk_bytes(4, 2 * MiB + 512),
        "drive-virtio1": disk_bytes(5, 3 * MiB + CLUSTER),
    }
    for name, data in images.items():
        (tmp_path / f"{name}.raw").write_bytes(data)
    (tmp_path / "qemu-server.conf").write_text("name: vm100\nscsi0: local:100/vm-100-disk-0.raw\n")
    vma(
        "create",
        "exec:zstd -q -o a.vma.zst",
        "-c",
        "qemu-server.conf",
        *(f"{name}={name}.raw" for name in images),
        cwd=tmp_path,
    )
    raw_volume = tmp_path / "vm-100-disk-0.raw"
    raw_volume.write_bytes(b"\x55" * len(images["drive-scsi0"]))
    qcow2_volume = write_image(
        tmp_path / "vm-100-disk-1.qcow2", "qcow2", b"\xaa" * len(images["drive-virtio1"])
    )
    fifo = tmp_path / "map.fifo"
    os.mkfifo(fifo)
    restore_dir = tmp_path / "restore"
    pipeline = subprocess.Popen(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            f"zstd -q -d -c a.vma.zst | '{VMA}' extract -v -r map.fifo - restore",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert pipeline.stdout is not None
        seen = []
        for line in pipeline.stdout:
            seen.append(line.decode())
            if line.startswith(b"CTIME:"):
                break
        assert seen[0] == "CFG: size: 47 name: qemu-server.conf\n"
        assert seen[1].startswith("DEV: dev_id=1 size: 2097664 devname: drive-scsi0")
        assert (restore_dir / "qemu-server.conf").read_text().startswith("name: vm100")
        with open(fifo, "w") as map_file:
            map_file.write(
                f"format=raw:1:drive-scsi0={raw_volume}\n"
                "throttling.bps=104857600:throttling.group=local:format=qcow2:1:"
                f"drive-virtio1={qcow2_volume}\n"
                "done\n"
            )
        rest = pipeline.stdout.read().decode()
        assert pipeline.wait(timeout=120) == 0, pipeline.stderr.read() if pipeline.stderr else ""
    finally:
        if pipeline.poll() is None:
            pipeline.kill()
            pipeline.wait()
        for stream in (pipeline.stdout, pipeline.stderr):
            if stream is not None:
                stream.close()
    assert "total bytes read" in rest
    assert raw_volume.read_bytes() == images["drive-scsi0"]
    assert virtual_disk(qcow2_volume, "qcow2") == images["drive-virtio1"]
    assert qemu_children() == []


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vdi"])
def test_vma_create_from_images_both_syntaxes(tmp_path: Path, fmt: str) -> None:
    """``-d format=FMT:NAME=PATH`` and the positional (probed) form store the
    virtual disk; ``vma extract`` gives it back byte for byte."""
    data = disk_bytes(6, 2 * MiB + 3 * 512)
    write_image(tmp_path / f"disk.{fmt}", fmt, data)
    (tmp_path / "plain.raw").write_bytes(data[:CLUSTER])
    vma("create", "d.vma", "-d", f"format={fmt}:drive-scsi0=disk.{fmt}", "-d",
        "format=raw:plain.raw", cwd=tmp_path)  # fmt: skip
    vma("create", "p.vma", f"drive-scsi0=disk.{fmt}", "plain.raw", cwd=tmp_path)
    for archive in ("d", "p"):
        vma("extract", f"{archive}.vma", archive, cwd=tmp_path)
        assert (tmp_path / archive / "disk-drive-scsi0.raw").read_bytes() == data
        assert (tmp_path / archive / "disk-disk1.raw").read_bytes() == data[:CLUSTER]


def test_vma_extract_format_from_zstd(tmp_path: Path) -> None:
    data = disk_bytes(7, 3 * MiB)
    (tmp_path / "d.raw").write_bytes(data)
    vma("create", "exec:zstd -q -o a.vma.zst", "drive-scsi0=d.raw", cwd=tmp_path)
    out = vma("extract", "--format", "qcow2", "a.vma.zst", "out", cwd=tmp_path)
    assert out == "DEVINFO out/tmp-disk-drive-scsi0.qcow2 3145728\n"
    assert os.listdir(tmp_path / "out") == ["disk-drive-scsi0.qcow2"]
    assert virtual_disk(tmp_path / "out" / "disk-drive-scsi0.qcow2", "qcow2") == data


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "a.vma", "-d", "format=qcow2:x.qcow2", "y.raw"],
         "vma: Unexpected extra argument - specify all devices via '-d' (archive a.vma)"),
        (["create", "a.vma", "-d", "drive-scsi0=x.qcow2"],
         "vma: No format specified for device: 'drive-scsi0=x.qcow2' (archive a.vma)"),
        (["create", "a.vma", "-d", "format=qcow2"],
         "vma: read map failed - option 'format' not terminated ('format=qcow2') (archive a.vma)"),
        (["extract", "--format", "qcow3", "a.vma", "out"],
         "vma: --format: unknown image format 'qcow3'"
         " (one of qcow2, qed, raw, vdi, vhdx, vmdk, vpc)"),
        (["extract", "--format", "qcow2", "-r", "map", "a.vma", "out"],
         "vma: --format makes new images; with -r the map's format= gives each target's"),
    ],
)  # fmt: skip
def test_vma_format_errors(tmp_path: Path, args: list[str], message: str) -> None:
    stderr = vma(*args, cwd=tmp_path, status=1)
    assert stderr.splitlines()[0] == message
    assert not (tmp_path / "a.vma").exists()


def test_missing_qemu_names_the_package(tmp_path: Path) -> None:
    write_image(tmp_path / "d.qcow2", "qcow2", bytes(CLUSTER))
    empty = tmp_path / "bin"
    empty.mkdir()
    stderr = vma("create", "a.vma", "d.qcow2", cwd=tmp_path, status=1, PATH=str(empty))
    assert "qemu-nbd not found: install the Debian package qemu-utils" in stderr
    assert not (tmp_path / "a.vma").exists()


@pytest.mark.anyio
async def test_backup_skips_what_block_status_calls_zero(tmp_path: Path) -> None:
    """A sparse qcow2: only its one allocated cluster is read through NBD, as
    SEEK_DATA skips holes on the raw path; the archive still has every byte."""
    data = bytearray(16 * MiB)
    data[5 * MiB : 5 * MiB + CLUSTER] = os.urandom(CLUSTER)
    image = write_image(tmp_path / "sparse.qcow2", "qcow2", bytes(data))
    reports: list[Progress] = []
    await create_archive(tmp_path / "a.vma", [("d", image)], progress=reports.append)
    assert reports[-1].read_bytes == CLUSTER
    assert reports[-1].done_bytes == len(data)
    await extract_archive(tmp_path / "a.vma", tmp_path / "out")
    assert (tmp_path / "out" / "disk-d.raw").read_bytes() == data


@pytest.mark.anyio
async def test_qemu_nbd_killed_mid_backup(tmp_path: Path) -> None:
    """The image's qemu-nbd dies after the first chunk: the backup fails
    naming it, and the partial archive is removed."""
    image = write_image(tmp_path / "d.qcow2", "qcow2", os.urandom(16 * MiB))
    killed: list[int] = []

    def kill_qemu_nbd(progress: Progress) -> None:
        if progress.read_bytes and not killed:
            (pid,) = qemu_children()
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    fds = open_fds()
    with pytest.raises(VmaError, match=r"d\.qcow2 failed - .*killed by SIGKILL"):
        await create_archive(tmp_path / "a.vma", [("d", image)], progress=kill_qemu_nbd)
    assert killed
    assert not (tmp_path / "a.vma").exists()
    assert qemu_children() == []
    assert open_fds() == fds
